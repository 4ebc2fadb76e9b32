"""``graven serve``: the controller process.

One per state dir (an exclusive lock makes sure). It holds one task group: the API
server, one worker per service and the health loop. Stopping it (SIGTERM, or a
crash, or kill -9) stops none of the instances or routers: they are separate
processes, and the next controller adopts them.

A controller a verb started exits by itself once it has had nothing to do for
GRAVEN_CONTROLLER_IDLE seconds (default 300): no service wants a release, no
instance or router runs, no request came. While anything runs it stays: it is the
health loop of the live services. ``graven serve`` only exits idle when that
variable is set.
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
from graven.ledger.state import open_state_store
from graven.logfiles import RotatingStreamHandler, appends_to, log_limits
from graven.router.base import Router
from graven.router.embedded import EmbeddedRouter
from graven.runtime.base import Runtime
from graven.runtime.limits import sweep_cgroups
from graven.runtime.process import ProcessRuntime
from graven.store.cas import ContentStore

log = logging.getLogger("graven.controller")

IDLE_ENV = "GRAVEN_CONTROLLER_IDLE"
DEFAULT_IDLE = 300.0


def idle_limit(default: float | None) -> float | None:
    """Seconds of nothing to do after which the controller exits (None: never), from
    $GRAVEN_CONTROLLER_IDLE, else ``default``; 0 means never."""
    raw = os.environ.get(IDLE_ENV, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ControllerError(
            f"{IDLE_ENV} must be a number of seconds, 0 or more (got {raw!r})",
            hint=f"Unset it for the default ({DEFAULT_IDLE:g}s), or 0 to never exit idle.",
        )
    return seconds or None


def has_work(engine: Engine) -> bool:
    """Whether anything is this controller's to look after: a service with a desired
    release, a rollout under way, an instance or a router still running."""
    state = engine.state
    services = state.services()
    return (
        any(release is not None for release in services.values())
        or any(state.running_rollout(s) is not None for s in services)
        or bool(state.live_instances())
        or bool(engine.router.running())
    )


async def _exit_when_idle(engine: Engine, limit: float, last_request: list[float]) -> None:
    """Return once the controller has had nothing to do for ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    idle_since: float | None = None
    while True:
        await asyncio.sleep(min(1.0, limit / 4))
        busy = await asyncio.to_thread(has_work, engine)
        now = loop.time()
        if busy:
            idle_since = None
            continue
        idle_since = idle_since if idle_since is not None else now
        if now - max(idle_since, last_request[0]) >= limit:
            log.info("nothing to do for %gs: exiting", limit)
            return


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
        from graven.router.haproxy.adapter import HAProxyRouter

        return HAProxyRouter(state_dir)
    if kind != "embedded":
        raise ControllerError(
            f"GRAVEN_ROUTER={kind!r} is not a router graven knows",
            hint="Use 'embedded' (the default) or 'haproxy'.",
        )
    return EmbeddedRouter(state_dir)


RUNTIMES = ("process", "runc")


def _runtime(state_dir: Path, store: ContentStore) -> Runtime:
    """How instances run: host processes, or runc containers with GRAVEN_RUNTIME=runc.

    Like the router, the choice sticks to the state dir: a controller of the other kind
    could not stop or adopt the instances that run there."""
    recorded_file = state_dir / "runtime"
    recorded = recorded_file.read_text().strip() if recorded_file.exists() else None
    wanted = os.environ.get("GRAVEN_RUNTIME") or None
    if recorded and wanted and recorded != wanted and _services_running(state_dir):
        raise ControllerError(
            f"this state dir runs its instances with the {recorded} runtime, not {wanted}",
            hint="Run 'graven down' first to switch runtimes.",
        )
    kind = wanted or recorded or "process"
    if kind not in RUNTIMES:
        raise ControllerError(
            f"GRAVEN_RUNTIME={kind!r} is not a runtime graven knows",
            hint="Use 'process' (the default) or 'runc'.",
        )
    if kind == "runc":
        from graven.runtime.runc import RuncRuntime

        runtime: Runtime = RuncRuntime(state_dir, store)
        RuncRuntime.check_machine()  # before anything is recorded: say now what is missing
    else:
        runtime = ProcessRuntime(state_dir, store)
    if kind != recorded:
        write_atomic(recorded_file, kind.encode(), mode=0o600)
    return runtime


def _services_running(state_dir: Path) -> bool:
    db = state_db(state_dir)
    if not db.exists():
        return False
    store = open_state_store(db, read_only=True)
    try:
        return bool(store.live_instances())
    finally:
        store.close()


async def _serve(state_dir: Path, idle: float | None) -> None:
    clock = RealClock()
    state = open_state_store(state_db(state_dir))
    store = ContentStore(store_root(state_dir))
    engine = Engine(
        state_dir,
        state,
        store,
        _runtime(state_dir, store),
        _router(state_dir),
        clock,
    )
    engine.adopt()
    sweep_cgroups(state_dir)  # groups of instances that died with an earlier controller
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = Api(engine, stop.set)
    last_request = [loop.time()]

    async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        last_request[0] = loop.time()  # a verb at work: not idle
        await api.serve_connection(reader, writer)

    sock = controller_socket(state_dir, create=True)
    sock.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(serve_connection, path=str(sock))
    sock.chmod(0o600)
    log.info("controller %d serving on %s", os.getpid(), sock)
    engine_task = asyncio.create_task(engine.run())
    idle_task = None
    if idle is not None:
        idle_task = asyncio.create_task(_exit_when_idle(engine, idle, last_request))
        idle_task.add_done_callback(lambda _: stop.set())
    try:
        await stop.wait()
    finally:
        server.close()
        engine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engine_task
        if idle_task is not None:
            idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await idle_task
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


def serve(state_dir: Path, *, idle_default: float | None = None) -> None:
    """Run the controller in the foreground until SIGTERM/SIGINT, a shutdown request,
    or (see ``idle_limit``) an idle period with nothing to do."""
    # Everything the controller creates (database, WAL, ledger head, logs, secrets) is
    # its user's alone; instances inherit the umask too.
    os.umask(0o077)
    require_access(state_dir)
    _log_to_stderr(state_dir)
    for change in make_private(state_dir):
        log.warning("tightened permissions of %s", change)
    idle = idle_limit(idle_default)
    fd = _lock(state_dir)
    try:
        asyncio.run(_serve(state_dir, idle))
    finally:
        os.close(fd)


if __name__ == "__main__":
    # Started by a verb (graven.controller.client): exits when idle.
    try:
        serve(Path(sys.argv[1]), idle_default=DEFAULT_IDLE)
    except GravenError as exc:
        # The verb that started this controller shows the log's tail: make it the reason.
        sys.stderr.write(f"error: {exc.message}\n" + (f"hint: {exc.hint}\n" if exc.hint else ""))
        sys.exit(exc.exit_code)
