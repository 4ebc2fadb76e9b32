"""The embedded router's processes: one supervisor, N worker proxies (N >= 1).

The process started for a service is always a supervisor; the proxy code runs only in
its workers, so a proxy that crashes leaves the port open and new connections wait in
its backlog instead of being refused.

- The supervisor owns the data port's listening socket. With one worker, the worker
  accepts on it directly (a lone proxy's speed). With several, the supervisor accepts
  each new connection and hands it to the next worker in turn (its descriptor passed
  over a private socketpair), so connections spread evenly, however fast they arrive
  (workers accepting from one queue themselves would let the first one awake take a
  whole burst); a connection no worker can take now is held, and accepting paused,
  until one can (answered 503 after ``HOLD_TIMEOUT``).
- It keeps the admin socket, the state file and the backend set. ``PUT /backends`` is
  persisted once, then sent to every worker over its private control channel (a
  socketpair: nothing on the filesystem, nobody else can reach it) and answered when
  all of them serve it; ``GET /backends`` sums the workers' counters per backend.
- It restarts a worker that dies, giving it the current backend set before it takes
  any connection; meanwhile the others (or the backlog) take every new connection.
- SIGTERM closes the port and is passed on to the workers, whose in-flight requests
  finish (their own drain bound), then it exits.
- Every worker holds the listening socket too. A worker whose supervisor vanished
  (SIGKILL, a crash: its control channel closes without a SIGTERM first) keeps the
  port open and, given ``--pid-file``, starts a new supervisor on it
  (``graven.router.embedded.revive_router`` decides, under the router's lock, that
  the router was neither stopped nor already replaced), then drains and exits.

Control protocol, one JSON object per line, supervisor -> worker:
``{"op": "put", "backends": [...]}`` or ``{"op": "get"}``; worker -> supervisor:
``{"ok": true, "loop": .., "backends": [snapshot...]}`` or ``{"ok": false, "error": ..}``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from graven import detached
from graven.atomic import write_atomic
from graven.router.base import LATENCY_BOUNDS, Backend, BackendSetError
from graven.router.proxy.admin import serve_admin_request
from graven.router.proxy.backends import (
    BackendTable,
    backends_to_json,
    load_state,
    parse_backends,
    state_document,
)
from graven.router.proxy.entry import EXIT_BIND, EXIT_STATE
from graven.router.proxy.http1 import _error_response
from graven.router.proxy.server import DRAIN_TIMEOUT, Closable, RouterProxy, loop_name

log = logging.getLogger("graven.router.workers")

CONTROL_TIMEOUT: Final = 5.0  # a worker answers a control message within this
START_TIMEOUT: Final = 10.0  # a new worker takes its first backend set within this
RESTART_DELAY: Final = 0.5  # before a dead worker is started again; doubles per quick death
RESTART_DELAY_MAX: Final = 10.0
STABLE_AFTER: Final = 30.0  # a worker that lived this long resets the delay
HOLD_RETRY: Final = 0.02  # a connection no worker could take is offered again after this
HOLD_TIMEOUT: Final = 10.0  # ... and answered 503 after this long without a worker
CONTROL_LINE_LIMIT: Final = 4 * 1024 * 1024
_SUMMED: Final = ("inflight", "requests", "errors", "responses_5xx", "idle_connections")


class WorkerError(Exception):
    """A worker did not answer its control channel properly. ``gone``: the worker is
    not running (its channel closed), so it takes the current set when restarted."""

    def __init__(self, message: str, *, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True)
class RouterOptions:
    """One service's router as started: what a supervisor needs, and what a worker
    needs to start a new supervisor in place of a dead one."""

    service: str
    host: str
    port: int
    admin: Path
    state: Path
    workers: int
    loop: str
    pid_file: Path | None = None
    lock_file: Path | None = None

    def argv(self) -> list[str]:
        """The supervisor's command line."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        argv = [
            sys.executable,
            "-m",
            "graven.router.proxy",
            "--service",
            self.service,
            "--listen",
            f"{host}:{self.port}",
            "--admin",
            str(self.admin),
            "--state",
            str(self.state),
            "--workers",
            str(self.workers),
            "--loop",
            self.loop,
        ]
        if self.pid_file is not None and self.lock_file is not None:
            argv += ["--pid-file", str(self.pid_file), "--lock-file", str(self.lock_file)]
        return argv


def merge_snapshots(
    configured: list[Backend], snapshots: list[list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """One backend list from the workers' own: counters summed per backend id.

    Configured backends come first, in the configured order, with their configured
    state and weight; then ids a worker still holds after their removal (draining
    requests in flight), in the order first seen.
    """
    merged: dict[str, dict[str, Any]] = {}
    for b in configured:
        merged[b.id] = {
            "id": b.id,
            "address": b.address,
            "state": b.state,
            "weight": b.weight,
            **dict.fromkeys(_SUMMED, 0),
            "latency_buckets": [0] * (len(LATENCY_BOUNDS) + 1),
        }
    for snapshot in snapshots:
        for item in snapshot:
            into = merged.get(item["id"])
            if into is None:
                into = merged[item["id"]] = {
                    **item,
                    **dict.fromkeys(_SUMMED, 0),
                    "latency_buckets": [0] * (len(LATENCY_BOUNDS) + 1),
                }
            for key in _SUMMED:
                into[key] += int(item.get(key, 0))
            buckets = item.get("latency_buckets") or []
            for i, n in enumerate(buckets[: len(into["latency_buckets"])]):
                into["latency_buckets"][i] += int(n)
    return list(merged.values())


# --------------------------------------------------------------------------- worker side


async def run_worker(options: RouterOptions, fds: str) -> int:
    """Serve the port (one worker: accepting on it; several: the connections the
    supervisor hands over) with the backend sets the supervisor sends. ``fds``:
    ``CONTROL,LISTEN[,HANDOFF]``, descriptors inherited from the supervisor."""
    loop = asyncio.get_running_loop()
    control_fd, listen_fd, *handoff_fd = (int(fd) for fd in fds.split(","))
    supervisor_pid = os.getppid()
    # Held in every mode: if the supervisor dies, this copy keeps the port open (new
    # connections wait in its backlog) and goes to the supervisor started in its place.
    listen = socket.socket(fileno=listen_fd)
    table = BackendTable()
    proxy = RouterProxy(options.service, options.port, table)
    reader, writer = await asyncio.open_connection(
        sock=socket.socket(fileno=control_fd), limit=CONTROL_LINE_LIMIT
    )
    handoff = _Handoff(proxy, handoff_fd[0]) if handoff_fd else None
    loop.add_signal_handler(signal.SIGTERM, proxy.begin_shutdown)
    # A terminal's Ctrl-C reaches the whole group; the supervisor decides for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    first_set = loop.create_future()
    orphaned = functools.partial(_revive_supervisor, options, listen_fd, supervisor_pid)
    control = asyncio.create_task(_control_loop(proxy, reader, writer, first_set, orphaned))
    try:
        async with asyncio.timeout(START_TIMEOUT):
            await asyncio.wait({first_set, control}, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        pass
    if not first_set.done() or first_set.cancelled():
        control.cancel()
        if handoff is not None:
            handoff.close()
        listen.close()
        log.error("no backend set from the supervisor; worker exiting")
        return 1
    # Take connections only now: one taken before the first set would get a 503.
    sources: list[Closable]
    if handoff is None:
        sources = [await loop.create_server(proxy.client_channel, sock=listen, backlog=1024)]
    else:
        handoff.start()
        sources = [handoff, listen]
    await proxy.serve(sources)
    control.cancel()
    writer.close()
    return 0


async def _revive_supervisor(options: RouterOptions, listen_fd: int, dead: int) -> None:
    """The supervisor died (nobody asked it to stop): start a new one on the port this
    worker still holds, then leave. Only with a pid file to record it in: the lock and
    the pid file decide between the workers, the controller and ``stop``."""
    if options.pid_file is None or options.lock_file is None:
        return
    from graven.router.embedded import revive_router

    argv = [*options.argv(), "--listen-fd", str(listen_fd)]

    def start() -> subprocess.Popen[bytes]:
        # Its own session, like the first one: it outlives this worker.
        return detached.spawn(argv, output=None, pass_fds=(listen_fd,))

    log.warning("supervisor (pid %d) is gone; starting a new one unless stopped", dead)
    try:
        pid = await asyncio.to_thread(
            revive_router, options, dead, start, timeout=START_TIMEOUT + CONTROL_TIMEOUT
        )
    except Exception:
        log.exception("cannot start a new supervisor")
        return
    if pid is None:
        log.warning("no new supervisor (the router was stopped or replaced); worker exiting")
    else:
        log.warning("supervisor pid %d serves the port; this worker finishes and exits", pid)


class _Handoff:
    """The worker's end of the connection hand-off: each message carries one accepted
    connection's descriptor. Closed first at shutdown, like a listening server."""

    def __init__(self, proxy: RouterProxy, fd: int) -> None:
        self.proxy = proxy
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.reading = False
        self._pending: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._receive)
        self.reading = True

    def _receive(self) -> None:
        for _ in range(64):  # then let the loop serve what it has
            try:
                _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("connection hand-off failed: %s", exc)
                self.close()
                return
            if not fds:  # the supervisor closed its end
                self.close()
                return
            conn = socket.socket(fileno=fds[0])
            if self.proxy.closing:
                conn.close()
                continue
            task = self.loop.create_task(self._adopt(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.proxy.client_channel, conn)
        except OSError:
            conn.close()  # the client left already

    def close(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False
        self.sock.close()


async def _control_loop(
    proxy: RouterProxy,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    first_set: asyncio.Future[None],
    orphaned: Callable[[], Awaitable[None]],
) -> None:
    try:
        while line := await reader.readline():
            writer.write(json.dumps(_control_reply(proxy, line, first_set)).encode() + b"\n")
            await writer.drain()
    except (OSError, ValueError) as exc:  # ValueError: a line over the limit
        log.warning("control channel failed: %s", exc)
    if not first_set.done():
        first_set.cancel()
    elif not proxy.closing:
        # The supervisor died without stopping us (a supervisor that stops sends
        # SIGTERM first): keep serving until a new one holds the port.
        await orphaned()
    # Stop taking requests, finish those in flight.
    proxy.begin_shutdown()


def _control_reply(
    proxy: RouterProxy, line: bytes, first_set: asyncio.Future[None]
) -> dict[str, object]:
    try:
        message = json.loads(line)
        op = message["op"]
        if op == "put":
            proxy.table.replace(parse_backends(message["backends"]))
            if not first_set.done():
                first_set.set_result(None)
        elif op != "get":
            return {"ok": False, "error": f"unknown op {op!r}"}
    except (ValueError, KeyError, TypeError, BackendSetError) as exc:
        return {"ok": False, "error": f"bad control message: {exc}"}
    return {"ok": True, "loop": loop_name(), "backends": proxy.table.snapshot()}


# --------------------------------------------------------------------------- supervisor


class _Worker:
    """One worker process and the supervisor's end of its control channel."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.loop = ""
        self.lock = asyncio.Lock()
        self.handoff: socket.socket | None = None  # set once the worker serves

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def call(self, message: Mapping[str, object]) -> list[dict[str, Any]]:
        """Send one control message; the worker's backend snapshot, or WorkerError."""
        async with self.lock:
            where = f"worker {self.index} (pid {self.pid})"
            if self.reader is None or self.writer is None:
                raise WorkerError(f"{where} is not running", gone=True)
            try:
                self.writer.write(json.dumps(message).encode() + b"\n")
                async with asyncio.timeout(CONTROL_TIMEOUT):
                    await self.writer.drain()
                    line = await self.reader.readline()
            except (ConnectionError, EOFError) as exc:
                raise WorkerError(f"{where}: {exc}", gone=True) from None
            except (OSError, TimeoutError, ValueError) as exc:
                raise WorkerError(f"{where}: {exc or 'no answer in time'}", gone=False) from None
            if not line:
                raise WorkerError(f"{where} closed its control channel", gone=True)
            try:
                reply = json.loads(line)
            except ValueError:
                reply = None
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                what = reply.get("error") if isinstance(reply, dict) else "a malformed answer"
                raise WorkerError(f"{where}: {what}", gone=False)
            self.loop = str(reply.get("loop", ""))
            return list(reply["backends"])

    def detach(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        if self.handoff is not None:
            self.handoff.close()
            self.handoff = None


class Supervisor:
    """The admin API and the workers of one service's router."""

    def __init__(
        self, options: RouterOptions, backends: list[Backend], listen: socket.socket
    ) -> None:
        self.options = options
        self.service = options.service
        self.port = options.port
        self.state_path = options.state
        self.backends = backends
        self.listen = listen
        # One worker accepts on the port itself: no hand-off hop, a lone proxy's speed.
        self.direct = options.workers == 1
        self.workers = [_Worker(i) for i in range(options.workers)]
        self.closing = False
        self._put_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._supervising: set[asyncio.Task[None]] = set()
        self._next = 0  # the worker the next connection goes to
        self._held: collections.deque[tuple[socket.socket, float]] = collections.deque()
        self._retry: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ workers

    async def start_all(self) -> None:
        """Start every worker and give each the backend set; raise if one cannot."""
        await asyncio.gather(*(self._start(w) for w in self.workers))
        for w in self.workers:
            task = asyncio.create_task(self._supervise(w))
            self._supervising.add(task)

    async def _start(self, worker: _Worker) -> None:
        parent_end, child_end = socket.socketpair()
        hand_parent = hand_child = None
        if not self.direct:
            hand_parent, hand_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = [child_end.fileno(), self.listen.fileno()]
        if hand_child is not None:
            fds.append(hand_child.fileno())
        try:
            argv = [*self.options.argv(), "--worker-fds", ",".join(map(str, fds))]
            # stdout and stderr are the supervisor's: the router's log.
            worker.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, pass_fds=fds
            )
        except BaseException:
            parent_end.close()
            if hand_parent is not None:
                hand_parent.close()
            raise
        finally:
            child_end.close()
            if hand_child is not None:
                hand_child.close()
        worker.reader, worker.writer = await asyncio.open_connection(
            sock=parent_end, limit=CONTROL_LINE_LIMIT
        )
        try:
            await worker.call({"op": "put", "backends": backends_to_json(self.backends)})
        except WorkerError:
            if hand_parent is not None:
                hand_parent.close()
            worker.detach()
            raise
        if hand_parent is not None:
            hand_parent.setblocking(False)
            worker.handoff = hand_parent
            self._release_held()

    # ------------------------------------------------------------------ connections

    def start_accepting(self) -> None:
        """Hand connections to the workers (several); one worker accepts them itself."""
        if not self.direct:
            self.listen.setblocking(False)
            asyncio.get_running_loop().add_reader(self.listen.fileno(), self.accept_ready)

    def accept_ready(self) -> None:
        """The port has connections waiting: hand each to the next serving worker."""
        for _ in range(64):  # then let the loop serve what it has
            try:
                conn, _ = self.listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the next event retries
                log.warning("cannot accept a connection: %s", exc)
                return
            if not self._hand_off(conn):
                self._hold(conn)
                return

    def _hand_off(self, conn: socket.socket) -> bool:
        n = len(self.workers)
        for i in range(n):
            worker = self.workers[(self._next + i) % n]
            if worker.handoff is None:
                continue
            try:
                socket.send_fds(worker.handoff, [b"c"], [conn.fileno()])
            except OSError:  # its queue is full, or it just died: try the next
                continue
            self._next = (self._next + i + 1) % n
            conn.close()
            return True
        return False

    def _hold(self, conn: socket.socket) -> None:
        """No worker takes connections now (all restarting, or all busy): keep this one
        and stop accepting, so the next ones wait in the port's backlog, not refused."""
        self._held.append((conn, time.monotonic()))
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.listen.fileno())
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(HOLD_RETRY, self._release_held)

    def _release_held(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if not self._held or self.closing:
            return
        now = time.monotonic()
        while self._held:
            conn, since = self._held[0]
            if not self._hand_off(conn):
                if now - since < HOLD_TIMEOUT:
                    self._retry = asyncio.get_running_loop().call_later(
                        HOLD_RETRY, self._release_held
                    )
                    return
                # Bounded: after this long without a worker, say so.
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(_error_response(503, "no router worker is serving", keep_alive=False))
                conn.close()
            self._held.popleft()
        asyncio.get_running_loop().add_reader(self.listen.fileno(), self.accept_ready)

    async def _supervise(self, worker: _Worker) -> None:
        delay = RESTART_DELAY
        while True:
            assert worker.proc is not None
            started = time.monotonic()
            code = await worker.proc.wait()
            worker.detach()
            if self.closing:
                return
            if time.monotonic() - started >= STABLE_AFTER:
                delay = RESTART_DELAY
            log.warning(
                "worker %d (pid %d) exited with code %s; starting it again in %.1f s",
                worker.index,
                worker.proc.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)
            if self.closing:
                return
            try:
                await self._start(worker)
            except (OSError, WorkerError) as exc:
                log.warning("worker %d did not start: %s", worker.index, exc)

    # ------------------------------------------------------------------ admin API

    def health(self) -> dict[str, object]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "service": self.service,
            "port": self.port,
            "loop": next((w.loop for w in self.workers if w.loop), ""),
            "workers": [w.pid for w in self.workers],
        }

    async def get_backends(self) -> tuple[int, dict[str, object]]:
        # A worker being restarted is left out: its counters restarted with it.
        replies = await asyncio.gather(
            *(w.call({"op": "get"}) for w in self.workers), return_exceptions=True
        )
        snapshots = [r for r in replies if isinstance(r, list)]
        return 200, self._doc(snapshots)

    async def put_backends(self, backends: list[Backend]) -> tuple[int, dict[str, object]]:
        async with self._put_lock:
            data = state_document(self.service, self.port, backends)
            try:
                await asyncio.to_thread(write_atomic, self.state_path, data, mode=0o600)
            except OSError as exc:
                return 500, {"error": f"cannot write state file {self.state_path}: {exc}"}
            # From here a restarted worker starts with the new set.
            self.backends = backends
            message = {"op": "put", "backends": backends_to_json(backends)}
            replies = await asyncio.gather(
                *(w.call(message) for w in self.workers if w.writer is not None),
                return_exceptions=True,
            )
        # A worker that is gone starts again with self.backends: not a failure.
        failed = [
            str(r)
            for r in replies
            if isinstance(r, BaseException) and not (isinstance(r, WorkerError) and r.gone)
        ]
        if failed:
            return 500, {"error": "not every worker took the backend set: " + "; ".join(failed)}
        return 200, self._doc([r for r in replies if isinstance(r, list)])

    def _doc(self, snapshots: list[list[dict[str, Any]]]) -> dict[str, object]:
        return {
            "service": self.service,
            "port": self.port,
            "backends": merge_snapshots(self.backends, snapshots),
        }

    # ------------------------------------------------------------------ lifecycle

    def begin_shutdown(self) -> None:
        self.closing = True
        self._stop.set()

    async def serve(self, admin: asyncio.AbstractServer | None) -> None:
        await self._stop.wait()
        # The port closes first: new connections are refused, not left queued.
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.listen.fileno())
        self.listen.close()
        if self._retry is not None:
            self._retry.cancel()
        while self._held:
            self._held.popleft()[0].close()
        if admin is not None:
            admin.close()
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT + 2.0):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for task in self._supervising:
            task.cancel()
        for w in self.workers:
            w.detach()


def bind_listener(host: str, port: int) -> socket.socket:
    """The data port's listening socket (the supervisor holds it, workers share it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


def inherited_listener(fd: int) -> socket.socket:
    """The listening socket a worker passed on when it started this supervisor."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.close()
        raise OSError(errno.ENOTSOCK, f"descriptor {fd} is not a listening TCP socket")
    return sock


async def run_supervisor(options: RouterOptions, listen_fd: int | None = None) -> int:
    """Hold the port and the admin socket, run the workers; until SIGTERM."""
    from graven.router.proxy.entry import _admin_in_use, _die

    service, host, port = options.service, options.host, options.port
    admin_path, state_path = options.admin, options.state
    try:
        backends = load_state(state_path)
    except (BackendSetError, OSError) as exc:
        return _die(
            EXIT_STATE,
            f"state file {state_path} is unusable: {exc}. Move it aside and restart; "
            "the controller sends the backend set again.",
        )
    try:
        listen = bind_listener(host, port) if listen_fd is None else inherited_listener(listen_fd)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = " (another process holds the port)" if exc.errno == errno.EADDRINUSE else ""
        return _die(EXIT_BIND, f"cannot listen on {host}:{port}: {reason}{hint}")
    supervisor = Supervisor(options, backends, listen)
    if admin_path.exists():
        if _admin_in_use(admin_path):
            listen.close()
            return _die(EXIT_BIND, f"admin socket {admin_path} is in use by another router")
        admin_path.unlink()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.begin_shutdown)
    try:
        await supervisor.start_all()
    except (OSError, WorkerError) as exc:
        supervisor.begin_shutdown()
        await supervisor.serve(None)
        return _die(1, f"cannot start the router's workers: {exc}")
    supervisor.start_accepting()
    # The admin socket appears last: answering /health means every worker serves.
    try:
        admin = await asyncio.start_unix_server(
            functools.partial(serve_admin_request, supervisor), path=str(admin_path)
        )
    except OSError as exc:
        supervisor.begin_shutdown()
        await supervisor.serve(None)
        return _die(EXIT_BIND, f"cannot bind admin socket {admin_path}: {exc.strerror or exc}")
    admin_ino = admin_path.stat().st_ino
    pids = ", ".join(str(w.pid) for w in supervisor.workers)
    taken = "" if listen_fd is None else " (port taken over from a worker)"
    print(
        f"graven-router: service {service} listening on {host}:{port}{taken}, "
        f"admin {admin_path}, {len(backends)} backend(s) from state, "
        f"{options.workers} worker(s) (pids {pids})",
        file=sys.stderr,
        flush=True,
    )
    await supervisor.serve(admin)
    with contextlib.suppress(OSError):
        if admin_path.stat().st_ino == admin_ino:
            admin_path.unlink()
    print(f"graven-router: service {service} stopped", file=sys.stderr, flush=True)
    return 0
