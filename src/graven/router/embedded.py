"""The embedded Router adapter: one ``graven.router.proxy`` router per service, a
supervisor holding the port and its worker proxies (``graven.router.workers``).

The router runs detached (its own session), so it outlives the controller that
started it: killing the controller drops no request, and a restarted controller
adopts the running routers instead of replacing them. It also outlives its own
crashes: the supervisor restarts a dead worker, and a worker whose supervisor died
starts a new one and records it here (``revive_router``), controller or not.

Files, per service, under ``STATE/routers/``::

    web.sock   admin socket (or a short path under /tmp when the full path would not
               fit a unix socket address; the pid file records which)
    web.json   the backend set, written by the proxy on every change and read when it
               starts, so a restarted proxy serves the same set
    web.pid    {"pid", "port", "start_time", "admin"} of the supervisor; start_time
               (field 22 of /proc/PID/stat) tells it from a process that reused its pid
    web.log    the proxy's stderr: start-up, shutdown and errors, never per request
    web.lock   serialises ensure/stop between threads and controller processes, and
               a worker replacing its dead supervisor

``stop`` forgets the backend set as well (the service is no longer routed);
a proxy that crashed, or that ``ensure`` moves to another port, keeps it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from graven import detached
from graven.atomic import write_atomic
from graven.errors import RouterError, UsageError
from graven.model import is_valid_name
from graven.router.base import LATENCY_BOUNDS, Backend, BackendStats, check_backends
from graven.router.proxy.backends import backends_to_json

if TYPE_CHECKING:
    from graven.router.workers import RouterOptions

_HEALTH_TIMEOUT: Final = 2.0
_ADMIN_TIMEOUT: Final = 10.0
_POLL: Final = 0.02


@dataclass(frozen=True)
class _Record:
    """What the pid file says about a proxy."""

    pid: int
    port: int
    start_time: int
    admin: str


@dataclass(frozen=True)
class _Files:
    service: str
    sock: Path
    state: Path
    pid: Path
    log: Path
    lock: Path


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` speaking to a unix socket instead of a TCP port."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def default_workers() -> int:
    """Proxy processes per service: ``GRAVEN_ROUTER_WORKERS``, else one per usable core
    but one, at most four. The spare core is for the instances and everything else: on
    2 cores one worker serves as many requests as two, with a shorter tail (two
    workers, the load and the instances outnumber the cores; ``bench/RESULTS.md``)."""
    text = os.environ.get("GRAVEN_ROUTER_WORKERS", "").strip()
    if text:
        if not text.isdigit() or not 1 <= int(text) <= 64:
            raise UsageError(
                f"GRAVEN_ROUTER_WORKERS must be a number 1-64 (got {text!r})",
                hint="Unset it for the default: one worker per core but one, up to 4.",
            )
        return int(text)
    return max(1, min(len(os.sched_getaffinity(0)) - 1, 4))


class EmbeddedRouter:
    """Router port adapter running graven's own proxy, one router per service: a
    supervisor and ``workers`` worker proxies (``graven.router.workers``); one pid
    (the supervisor's) and one admin socket.

    ``state_dir`` is graven's state directory; routers keep their files in
    ``state_dir/routers``. Proxies listen on ``listen_host`` (loopback by default).
    Methods are synchronous and may block for up to ``start_timeout`` (ensure) or
    ``stop_timeout`` (stop): call them from a worker thread in async code.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        listen_host: str = "127.0.0.1",
        start_timeout: float = 10.0,
        stop_timeout: float = 15.0,
        workers: int | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.workers = default_workers() if workers is None else workers
        self.dir = self.state_dir / "routers"
        self.listen_host = listen_host
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

    # ------------------------------------------------------------------ Router port

    def ensure(self, service: str, port: int) -> None:
        """Make sure a proxy for ``service`` listens on ``port``; adopt a running one."""
        check_service_name(service)
        check_router_port(port)
        files = self._files(service)
        for patient in (True, False):
            with self._locked(files):
                if self._ensure_locked(files, port, patient=patient):
                    return
            # A worker whose supervisor died holds the port and starts a new
            # supervisor under this lock: let it, then adopt what it started.
            detached.wait_until(lambda: self._health(files) is not None, self.start_timeout)

    def _ensure_locked(self, files: _Files, port: int, *, patient: bool) -> bool:
        """One attempt of ``ensure``; False (only when ``patient``) if the recorded
        supervisor is dead but its port is still held: a worker is reviving it."""
        health = self._health(files)
        if health is not None:
            pid, live_port = health
            if live_port == port:
                self._adopt(files, pid, port)
                return True
            self._terminate(files, pid)
        else:
            record = self._read_record(files)
            if record is not None and detached.is_running(record.pid, record.start_time):
                # Alive but silent: still starting, or wedged. Give it the start
                # timeout before replacing it.
                if record.port == port and self._wait_healthy(files, record.pid, None):
                    return True
                self._terminate(files, record.pid)
            elif (
                patient
                and record is not None
                and record.port == port
                and _port_held(self.listen_host, port)
            ):
                return False
        self._spawn(files, port)
        return True

    def set_backends(self, service: str, backends: list[Backend]) -> None:
        """Replace the service's backend set (see ``Router.set_backends``)."""
        check_service_name(service)
        check_backends(backends)
        body = json.dumps({"backends": backends_to_json(backends)}).encode()
        status, doc = self._admin(self._files(service), "PUT", "/backends", body)
        if status != 200:
            raise RouterError(
                f"router for service {service!r} refused the backend set "
                f"(HTTP {status}): {doc.get('error', doc)}",
                hint=f"See {self._files(service).log}.",
            )

    def stats(self, service: str) -> list[BackendStats]:
        """Per-backend counters as the proxy sees them, drained leftovers included."""
        check_service_name(service)
        files = self._files(service)
        status, doc = self._admin(files, "GET", "/backends", None)
        try:
            if status != 200:
                raise ValueError(f"HTTP {status}: {doc.get('error', doc)}")
            return [
                BackendStats(
                    id=str(b["id"]),
                    address=str(b["address"]),
                    state="drain" if b["state"] == "drain" else "ready",
                    inflight=int(b["inflight"]),
                    requests=int(b["requests"]),
                    errors=int(b["errors"]),
                    # A proxy started by an older graven lacks the newer counters.
                    weight=int(b.get("weight", 100)),
                    responses_5xx=int(b.get("responses_5xx", 0)),
                    latency_buckets=_latency_buckets(b.get("latency_buckets")),
                )
                for b in doc["backends"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise RouterError(
                f"router for service {service!r} answered GET /backends badly: {exc}",
                hint=f"See {files.log}; 'graven down' and deploy again restarts it.",
            ) from None

    def stop(self, service: str) -> None:
        """Stop the service's proxy (SIGTERM, then SIGKILL) and forget its backend set.

        In-flight requests get the proxy's own drain time. No error if it is not running.
        """
        check_service_name(service)
        files = self._files(service)
        with self._locked(files):
            health = self._health(files)
            record = self._read_record(files)
            if health is not None:
                self._terminate(files, health[0])
            elif record is not None and detached.is_running(record.pid, record.start_time):
                self._terminate(files, record.pid)
            for path in (files.pid, files.state, files.sock):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def running(self) -> dict[str, int]:
        """Services with a live proxy and the port each listens on."""
        out: dict[str, int] = {}
        if not self.dir.is_dir():
            return out
        for pid_file in sorted(self.dir.glob("*.pid")):
            service = pid_file.stem
            if not is_valid_name(service):
                continue
            record = self._read_record(self._files(service))
            if record is not None and detached.is_running(record.pid, record.start_time):
                out[service] = record.port
        return out

    # ------------------------------------------------------------------ extras

    def pid(self, service: str) -> int | None:
        """The pid of the service's live proxy, or None."""
        check_service_name(service)
        record = self._read_record(self._files(service))
        if record is not None and detached.is_running(record.pid, record.start_time):
            return record.pid
        return None

    def admin_socket(self, service: str) -> Path:
        """The unix socket of the service's admin API (``curl --unix-socket`` it)."""
        check_service_name(service)
        return self._files(service).sock

    def log_path(self, service: str) -> Path:
        """Where the service's proxy writes its start-up messages and errors."""
        check_service_name(service)
        return self._files(service).log

    # ------------------------------------------------------------------ internals

    def _files(self, service: str) -> _Files:
        sock = self.dir / f"{service}.sock"
        if not detached.fits_socket_address(sock):
            sock = self._short_socket_dir() / f"{service}.sock"
        return _Files(
            service=service,
            sock=sock,
            state=self.dir / f"{service}.json",
            pid=self.dir / f"{service}.pid",
            log=self.dir / f"{service}.log",
            lock=self.dir / f"{service}.lock",
        )

    def _short_socket_dir(self) -> Path:
        # Same state dir, same short dir: a restarted controller finds the socket
        # without the pid file too.
        tag = detached.short_name(self.state_dir.resolve())
        short = detached.temp_dir() / f"graven-{tag}-routers"
        return detached.private_dir(short, what="admin socket directory", error=RouterError)

    @contextlib.contextmanager
    def _locked(self, files: _Files) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RouterError(
                f"cannot use router directory {self.dir}: {exc}",
                hint="Check that the state directory exists and is writable.",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _read_record(files: _Files) -> _Record | None:
        try:
            doc = json.loads(files.pid.read_bytes())
            return _Record(
                pid=int(doc["pid"]),
                port=int(doc["port"]),
                start_time=int(doc["start_time"]),
                admin=str(doc["admin"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # A damaged pid file proves nothing; the admin socket is the authority.
            return None

    @staticmethod
    def _write_record(files: _Files, pid: int, port: int) -> None:
        started = detached.start_time(pid)
        if started is None:
            return
        doc = {"pid": pid, "port": port, "start_time": started, "admin": str(files.sock)}
        try:
            write_atomic(files.pid, json.dumps(doc).encode(), mode=0o600)
        except OSError as exc:
            raise RouterError(f"cannot write {files.pid}: {exc}") from None

    def _adopt(self, files: _Files, pid: int, port: int) -> None:
        record = self._read_record(files)
        if record is None or record.pid != pid or record.port != port:
            self._write_record(files, pid, port)

    def _spawn(self, files: _Files, port: int) -> None:
        argv = [
            sys.executable,
            "-m",
            "graven.router.proxy",
            "--service",
            files.service,
            "--listen",
            f"{self.listen_host}:{port}",
            "--admin",
            str(files.sock),
            "--state",
            str(files.state),
            "--workers",
            str(self.workers),
            "--pid-file",
            str(files.pid),
            "--lock-file",
            str(files.lock),
        ]
        try:
            offset, proc = detached.spawn_logged(argv, files.log, cwd=self.dir)
        except OSError as exc:
            raise RouterError(
                f"cannot start the router for service {files.service!r}: {exc}"
            ) from None
        # Recorded before it is healthy, so a controller that dies right now still
        # finds (and can stop) this process.
        self._write_record(files, proc.pid, port)
        if self._wait_healthy(files, proc.pid, proc):
            return
        how = detached.describe_failed_start(proc, files.sock, self.start_timeout)
        if proc.poll() is None:  # a pid reaped already may be reused
            self._terminate(files, proc.pid)
        with contextlib.suppress(FileNotFoundError):
            files.pid.unlink()
        raise start_failure(f"router for service {files.service!r}", port, how, files.log, offset)

    def _wait_healthy(self, files: _Files, pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
        def answers() -> bool:
            health = self._health(files)
            return health is not None and health[0] == pid

        return detached.wait_until(answers, self.start_timeout, unless_exited=proc)

    def _terminate(self, files: _Files, pid: int) -> None:
        """SIGTERM ``pid``, wait for its drain, then SIGKILL. Only our proxy is signalled:
        the start time is read once and re-checked, so a reused pid is left alone."""
        with not_allowed_to_stop(f"the router of service {files.service!r}", pid):
            detached.stop_pid(pid, grace=self.stop_timeout)

    @staticmethod
    def _health(files: _Files) -> tuple[int, int] | None:
        """``(pid, port)`` of the proxy answering on the admin socket, or None."""
        try:
            status, doc = EmbeddedRouter._call(files, "GET", "/health", None, _HEALTH_TIMEOUT)
            if status != 200 or doc.get("ok") is not True or doc.get("service") != files.service:
                return None
            return int(doc["pid"]), int(doc["port"])
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            return None

    def _admin(
        self, files: _Files, method: str, path: str, body: bytes | None
    ) -> tuple[int, dict[str, Any]]:
        try:
            return self._call(files, method, path, body, _ADMIN_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError):
            raise no_router(files.service, files.log) from None
        except (OSError, http.client.HTTPException, ValueError, TypeError) as exc:
            raise RouterError(
                f"router for service {files.service!r} did not answer {method} {path}: {exc}",
                hint=f"See {files.log}; restarting the controller re-creates a broken router.",
            ) from None

    @staticmethod
    def _call(
        files: _Files, method: str, path: str, body: bytes | None, timeout: float
    ) -> tuple[int, dict[str, Any]]:
        conn = _UnixHTTPConnection(str(files.sock), timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
        return resp.status, doc


def revive_router(
    options: RouterOptions,
    dead_pid: int,
    start: Callable[[], subprocess.Popen[bytes]],
    *,
    timeout: float,
) -> int | None:
    """Start a supervisor in place of ``dead_pid``, for a worker that outlived it.

    Under the router's lock, and only if the pid file still names ``dead_pid``: if it
    is gone, ``stop`` ran (the service is no longer routed); if it names another
    process, someone (another worker, the controller) already replaced it. ``start``
    spawns the new supervisor, which is recorded at once, then awaited on the admin
    socket. Its pid, or None when there was nothing to do or it did not come up.
    """
    if options.pid_file is None or options.lock_file is None:
        return None  # started without a record to keep: nobody could adopt a successor
    files = _Files(
        service=options.service,
        sock=options.admin,
        state=options.state,
        pid=options.pid_file,
        log=Path(os.devnull),
        lock=options.lock_file,
    )
    try:
        fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return None
                time.sleep(_POLL)
        record = EmbeddedRouter._read_record(files)
        if record is None or record.pid != dead_pid:
            return None
        proc = start()
        detached.track(proc)
        EmbeddedRouter._write_record(files, proc.pid, options.port)

        def answers() -> bool:
            health = EmbeddedRouter._health(files)
            return health is not None and health[0] == proc.pid

        if detached.wait_until(answers, timeout, unless_exited=proc):
            return proc.pid
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        return None
    finally:
        os.close(fd)


def _port_held(host: str, port: int) -> bool:
    """True if something listens on ``host:port`` (a bind of our own is refused)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _latency_buckets(value: object) -> tuple[int, ...]:
    """The histogram from GET /backends: one count per LATENCY_BOUNDS bucket plus the
    overflow bucket, or () from a proxy that keeps none."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) != len(LATENCY_BOUNDS) + 1:
        raise ValueError(
            f"latency_buckets: expected a list of {len(LATENCY_BOUNDS) + 1} counts (got {value!r})"
        )
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise ValueError(f"latency_buckets: expected non-negative integers (got {value!r})")
    return tuple(value)


def check_router_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"router port must be 1-65535 (got {port!r})")


def no_router(service: str, log: Path) -> RouterError:
    """The error for a call to a router that is not running."""
    return RouterError(
        f"no router is running for service {service!r}",
        hint="The controller starts it (Router.ensure) on its next reconcile; "
        f"if it keeps failing, see {log}.",
    )


def start_failure(what: str, port: int, how: str, log: Path, offset: int) -> RouterError:
    """The error for a router process that did not come up on ``port``: ``how``
    (``detached.describe_failed_start``), and what it logged since ``offset``."""
    return RouterError(
        f"{what} on port {port} {how}: {router_log_tail(log, offset)}",
        hint=f"If port {port} is in use, stop what holds it or choose another port. "
        f"Full log: {log}",
    )


@contextlib.contextmanager
def not_allowed_to_stop(what: str, pid: int) -> Iterator[None]:
    """Turn a refused signal (another user's process) into a RouterError that says so."""
    try:
        yield
    except PermissionError:
        raise RouterError(
            f"not allowed to stop {what} (pid {pid})",
            hint="Run graven as the user that started the router.",
        ) from None


def check_service_name(service: str) -> None:
    if not isinstance(service, str) or not is_valid_name(service):
        raise UsageError(
            f"not a valid service name: {service!r} (lowercase letters, digits and '-', "
            "starting with a letter, at most 63 characters)"
        )


def router_log_tail(path: Path, offset: int, lines: int = 5) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "(no log)"
        return f"(log unreadable: {exc})"
    kept = [line for line in text.splitlines() if line and not line.startswith("--- ")]
    return " | ".join(kept[-lines:]) or "(nothing logged)"
