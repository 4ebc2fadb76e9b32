"""``graven serve``: the controller process.

One per state dir (an exclusive lock makes sure). It holds one task group: the API
server, one worker per service and the health loop. Stopping it (SIGTERM, or a
crash, or kill -9) stops none of the instances or routers: they are separate
processes, and the next controller adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path

from graven.atomic import write_atomic
from graven.clock import RealClock
from graven.controller.api import Api
from graven.controller.engine import Engine
from graven.controller.paths import (
    controller_lock,
    controller_log,
    controller_socket,
    make_private,
    require_access,
    state_db,
    store_root,
)
from graven.errors import ControllerError, GravenError
from graven.ledger.store import StateStore
from graven.logfiles import RotatingStreamHandler, appends_to, log_limits
from graven.router.base import Router
from graven.router.embedded import EmbeddedRouter
from graven.runtime.process import ProcessRuntime
from graven.store.cas import ContentStore

log = logging.getLogger("graven.controller")


def _lock(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(controller_lock(state_dir), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ControllerError(
            f"a controller is already running for {state_dir}",
            hint="Use it (every verb talks to it), or stop it with 'graven down'.",
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _router(state_dir: Path) -> Router:
    """The data plane: the embedded proxy, or HAProxy with GRAVEN_ROUTER=haproxy.

    The choice sticks to the state dir: routers of one kind run there, and a controller
    of the other kind could not adopt them."""
    recorded_file = state_dir / "router"
    recorded = recorded_file.read_text().strip() if recorded_file.exists() else None
    wanted = os.environ.get("GRAVEN_ROUTER") or None
    if recorded and wanted and recorded != wanted and _services_running(state_dir):
        raise ControllerError(
            f"this state dir runs the {recorded} router, not {wanted}",
            hint="Run 'graven down' first to switch routers.",
        )
    kind = wanted or recorded or "embedded"
    if kind != recorded:
        write_atomic(recorded_file, kind.encode(), mode=0o600)
    if kind == "haproxy":
        from graven.router.haproxy import HAProxyRouter

        return HAProxyRouter(state_dir)
    if kind != "embedded":
        raise ControllerError(
            f"GRAVEN_ROUTER={kind!r} is not a router graven knows",
            hint="Use 'embedded' (the default) or 'haproxy'.",
        )
    return EmbeddedRouter(state_dir)


def _services_running(state_dir: Path) -> bool:
    db = state_db(state_dir)
    if not db.exists():
        return False
    store = StateStore(db, read_only=True)
    try:
        return bool(store.live_instances())
    finally:
        store.close()


async def _serve(state_dir: Path) -> None:
    clock = RealClock()
    state = StateStore(state_db(state_dir))
    store = ContentStore(store_root(state_dir))
    engine = Engine(
        state_dir,
        state,
        store,
        ProcessRuntime(state_dir, store),
        _router(state_dir),
        clock,
    )
    engine.adopt()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = Api(engine, stop.set)
    sock = controller_socket(state_dir)
    sock.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(api.serve_connection, path=str(sock))
    sock.chmod(0o600)
    log.info("controller %d serving on %s", os.getpid(), sock)
    engine_task = asyncio.create_task(engine.run())
    try:
        await stop.wait()
    finally:
        server.close()
        engine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engine_task
        sock.unlink(missing_ok=True)
        state.close()
        log.info("controller %d stopped; instances and routers keep running", os.getpid())


def _log_to_stderr(state_dir: Path) -> None:
    """Log to stderr; when stderr appends to the state dir's controller log (a
    controller a verb started), bound that log: rotated by copy-truncate, so stderr
    stays the current log and a crash's traceback still lands in it."""
    path = controller_log(state_dir)
    handler: logging.Handler = (
        RotatingStreamHandler(sys.stderr, path, log_limits())
        if appends_to(sys.stderr, path)
        else logging.StreamHandler(sys.stderr)
    )
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )


def serve(state_dir: Path) -> None:
    """Run the controller in the foreground until SIGTERM/SIGINT or a shutdown request."""
    # Everything the controller creates (database, WAL, ledger head, logs, secrets) is
    # its user's alone; instances inherit the umask too.
    os.umask(0o077)
    require_access(state_dir)
    _log_to_stderr(state_dir)
    for change in make_private(state_dir):
        log.warning("tightened permissions of %s", change)
    fd = _lock(state_dir)
    try:
        asyncio.run(_serve(state_dir))
    finally:
        os.close(fd)


if __name__ == "__main__":
    try:
        serve(Path(sys.argv[1]))
    except GravenError as exc:
        # The verb that started this controller shows the log's tail: make it the reason.
        sys.stderr.write(f"error: {exc.message}\n" + (f"hint: {exc.hint}\n" if exc.hint else ""))
        sys.exit(exc.exit_code)
