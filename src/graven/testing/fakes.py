"""Test doubles for the Router port.

``FakeRouter`` is an in-memory Router for fast unit tests of the controller: it
records every backend set and reports stats whose counters a test sets.
``EchoBackend`` is the opposite: a real HTTP/1.1 server on loopback that stands in
for an instance when a test needs real traffic through a real router.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from graven.errors import RouterError, UsageError
from graven.model import is_valid_name
from graven.router.base import (
    LATENCY_BOUNDS,
    Backend,
    BackendState,
    BackendStats,
    check_backends,
    latency_bucket,
)


@dataclass
class _FakeBackend:
    backend: Backend
    configured: bool = True
    inflight: int = 0
    requests: int = 0
    errors: int = 0
    responses_5xx: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))

    @property
    def state(self) -> BackendState:
        return self.backend.state if self.configured else "drain"


@dataclass
class _FakeService:
    port: int
    backends: dict[str, _FakeBackend] = field(default_factory=dict)


class FakeRouter:
    """In-memory Router with the embedded router's semantics and no traffic.

    Test controls: ``set_inflight`` and ``count`` move counters; ``history`` holds
    every accepted ``(service, backends)`` change in order; ``starts[service]``
    counts how many times a router had to be (re)started, so idempotent ``ensure``
    calls can be asserted.
    """

    def __init__(self) -> None:
        self._services: dict[str, _FakeService] = {}
        # Like the proxy's state file: survives a restart on another port, not a stop.
        self._kept: dict[str, dict[str, _FakeBackend]] = {}
        self.history: list[tuple[str, tuple[Backend, ...]]] = []
        self.starts: dict[str, int] = {}
        # Ports some other program holds: a router asked to listen there cannot start.
        self.foreign_ports: dict[int, str] = {}

    # ------------------------------------------------------------------ Router port

    def ensure(self, service: str, port: int) -> None:
        """Start (or move) the service's fake router; nothing if it already runs on ``port``."""
        _check(service)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise UsageError(f"router port must be 1-65535 (got {port!r})")
        current = self._services.get(service)
        if current is not None and current.port == port:
            return
        if port in self.foreign_ports:
            raise RouterError(
                f"router for service {service!r} cannot listen: port {port} on 127.0.0.1 is "
                f"in use by {self.foreign_ports[port]}",
                hint=f"Stop what holds port {port}, or give the service another port.",
            )
        for other, svc in self._services.items():
            if other != service and svc.port == port:
                raise RouterError(
                    f"router for service {service!r} on port {port} cannot start: "
                    f"port {port} is used by the router of {other!r}"
                )
        backends = current.backends if current is not None else self._kept.pop(service, {})
        self._services[service] = _FakeService(port=port, backends=backends)
        self.starts[service] = self.starts.get(service, 0) + 1

    def set_backends(self, service: str, backends: list[Backend]) -> None:
        """Replace the set; removed backends with requests in flight linger as drain."""
        svc = self._running(service)
        check_backends(backends)
        fresh: dict[str, _FakeBackend] = {}
        for b in backends:
            old = svc.backends.get(b.id)
            if old is None:
                fresh[b.id] = _FakeBackend(backend=b)
            else:
                old.backend, old.configured = b, True
                fresh[b.id] = old
        for bid, old in svc.backends.items():
            if bid not in fresh and old.inflight > 0:
                old.configured = False
                fresh[bid] = old
        svc.backends = fresh
        self.history.append((service, tuple(backends)))

    def stats(self, service: str) -> list[BackendStats]:
        """Counters as set by the test."""
        svc = self._running(service)
        return [
            BackendStats(
                id=fb.backend.id,
                address=fb.backend.address,
                state=fb.state,
                inflight=fb.inflight,
                requests=fb.requests,
                errors=fb.errors,
                weight=fb.backend.weight,
                responses_5xx=fb.responses_5xx,
                latency_buckets=tuple(fb.latency),
            )
            for fb in svc.backends.values()
        ]

    def stop(self, service: str) -> None:
        """Forget the service's router and its backend set."""
        _check(service)
        self._services.pop(service, None)
        self._kept.pop(service, None)

    def running(self) -> dict[str, int]:
        """Services with a fake router and their ports."""
        return {name: svc.port for name, svc in self._services.items()}

    # ------------------------------------------------------------------ test controls

    def backends(self, service: str) -> list[Backend]:
        """The configured set (what the last ``set_backends`` said)."""
        return [fb.backend for fb in self._running(service).backends.values() if fb.configured]

    def set_inflight(self, service: str, backend_id: str, inflight: int) -> None:
        """Pretend ``inflight`` requests are open on a backend; 0 lets a removed one go."""
        svc = self._running(service)
        fb = svc.backends.get(backend_id)
        if fb is None:
            raise KeyError(f"service {service!r} has no backend {backend_id!r}")
        fb.inflight = inflight
        if inflight == 0 and not fb.configured:
            del svc.backends[backend_id]

    def count(
        self,
        service: str,
        backend_id: str,
        *,
        requests: int = 1,
        errors: int = 0,
        latency: float | None = None,
    ) -> None:
        """Add to a backend's counters; ``errors`` count as 5xx answers, and with
        ``latency`` every request lands in that histogram bucket."""
        fb = self._running(service).backends[backend_id]
        fb.requests += requests
        fb.errors += errors
        fb.responses_5xx += errors
        if latency is not None:
            fb.latency[latency_bucket(latency)] += requests

    def crash(self, service: str) -> None:
        """The router process dies: it stops running but its backend set is kept."""
        svc = self._services.pop(service, None)
        if svc is not None:
            self._kept[service] = {
                bid: _FakeBackend(backend=fb.backend)
                for bid, fb in svc.backends.items()
                if fb.configured
            }

    def _running(self, service: str) -> _FakeService:
        _check(service)
        svc = self._services.get(service)
        if svc is None:
            raise RouterError(
                f"no router is running for service {service!r}",
                hint="The controller starts it (Router.ensure) on its next reconcile.",
            )
        return svc


def _check(service: str) -> None:
    if not is_valid_name(service):
        raise UsageError(f"not a valid service name: {service!r}")


# --------------------------------------------------------------------------- EchoBackend


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 overflows under load with a connection per request,
    # and an overflowing backlog shows up as one-second SYN retransmits.
    request_queue_size = 512
    echo: EchoBackend


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _EchoServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests stay quiet

    def do_GET(self) -> None:
        echo = self.server.echo
        echo._note_request(self)
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/slow":
            time.sleep(min(float(query.get("ms", "100")), 10_000) / 1000)
        elif url.path == "/hold":
            with echo._cond:
                echo.held += 1
                echo._cond.notify_all()
            echo.gate.wait(timeout=30)
        elif url.path == "/chunked":
            self._send_chunked(echo, int(query.get("n", "5")))
            return
        elif url.path == "/until-close":
            self.send_response(200)
            self.send_header("X-Echo-Backend", echo.name)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(f"{echo.name} until close\n".encode() * 3)
            self.close_connection = True
            return
        elif url.path == "/status":
            code = int(query.get("code", "200"))
            self._send_body(code, f"{echo.name} {code}\n".encode())
            return
        self._send_body(200, f"{echo.name}\n".encode())

    def do_HEAD(self) -> None:
        self.server.echo._note_request(self)
        self.send_response(200)
        self.send_header("Content-Length", "1234")
        self.send_header("X-Echo-Backend", self.server.echo.name)
        self.end_headers()

    def do_POST(self) -> None:
        self.server.echo._note_request(self)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send_body(200, body)

    do_PUT = do_POST

    def _send_body(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Echo-Backend", self.server.echo.name)
        self.end_headers()
        self.wfile.write(body)

    def _send_chunked(self, echo: EchoBackend, n: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Echo-Backend", echo.name)
        self.end_headers()
        for i in range(n):
            piece = f"{echo.name} chunk {i}\n".encode() * (i + 1)
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()


class EchoBackend:
    """A real HTTP/1.1 server on ``127.0.0.1`` (ephemeral port) in a thread.

    ``GET /`` answers its name; ``/slow?ms=N`` waits first; ``/hold`` waits until
    ``gate`` is set (``wait_held`` sees it arrive); ``/chunked?n=K`` answers chunked;
    ``/until-close`` answers without a length; ``/status?code=C`` answers C.
    ``POST``/``PUT`` echo the body (chunked or not). ``HEAD`` answers a length only.
    ``requests`` counts what arrived; ``headers`` keeps the last request's headers.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.gate = threading.Event()
        self.gate.set()
        self.held = 0
        self.requests = 0
        self.headers: dict[str, str] = {}
        self._cond = threading.Condition()
        self._server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
        self._server.echo = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.closed = False

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def backend(self, state: BackendState = "ready", weight: int = 100) -> Backend:
        """This server as a router backend, its name as the id."""
        return Backend(id=self.name, address=self.address, state=state, weight=weight)

    def wait_held(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` requests are waiting at ``/hold``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.held >= count, timeout=timeout)

    def close(self) -> None:
        """Stop accepting and close the listening socket (requests being served finish;
        connections still queued are reset, as when a process dies)."""
        if self.closed:
            return
        self.closed = True
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> EchoBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _note_request(self, handler: BaseHTTPRequestHandler) -> None:
        with self._cond:
            self.requests += 1
            self.headers = dict(handler.headers.items())
