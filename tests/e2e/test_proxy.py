"""The embedded router process against real backend servers and real traffic.

Every proxy is started through ``EmbeddedRouter`` and stopped by pid at teardown;
every backend is an ``EchoBackend``, a ``KeepAliveBackend`` or a ``FlakyBackend`` on
127.0.0.1; every load loop is bounded in request count and in time.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from graven.errors import RouterError
from graven.router.base import LATENCY_BOUNDS, Backend, BackendState, BackendStats
from graven.router.embedded import EmbeddedRouter
from graven.testing import load as loadgen
from graven.testing.fakes import EchoBackend
from tests.e2e.conftest import eventually, free_port, pid_alive

pytestmark = pytest.mark.e2e

SERVICE = "web"


def remove_short_socket_dir(router: EmbeddedRouter) -> None:
    """Long state dirs put admin sockets under /tmp; leave nothing behind there."""
    parent = router.admin_socket(SERVICE).parent
    if parent.name.startswith("graven-") and parent.name.endswith("-routers"):
        with contextlib.suppress(OSError):
            parent.rmdir()


def by_id(stats: list[BackendStats]) -> dict[str, BackendStats]:
    return {s.id: s for s in stats}


def idle(proxy: Proxy, backend_id: str) -> bool:
    """No request in flight on the backend (gone from the stats counts as idle)."""
    return all(s.inflight == 0 for s in proxy.router.stats(SERVICE) if s.id == backend_id)


@dataclass
class Proxy:
    """One service's router as a test sees it."""

    router: EmbeddedRouter
    port: int
    pids: set[int]

    def start(self) -> int:
        self.router.ensure(SERVICE, self.port)
        pid = self.router.pid(SERVICE)
        assert pid is not None
        self.pids.add(pid)
        return pid

    def get(self, path: str = "/", **headers: str) -> tuple[int, bytes, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp
        finally:
            conn.close()

    def raw(self, data: bytes, *, read_until_close: bool = True) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            if not read_until_close:
                return s.recv(65536)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def log(self) -> str:
        return self.router.log_path(SERVICE).read_text(errors="replace")[-2000:]


# The proxy runs on uvloop when it is installed; the standard library's loop is its
# fallback. Tests marked with BOTH_LOOPS run the edge cases (resends, streaming,
# framing, shutdown) on each. One worker process unless a test asks for more: pool
# and counter details are per process; WORKERS runs a test on one and on two.
BOTH_LOOPS = pytest.mark.parametrize(
    "proxy", [{"loop": "auto"}, {"loop": "asyncio"}], indirect=True, ids=["uvloop", "asyncio"]
)
WORKERS = pytest.mark.parametrize(
    "proxy", [{"workers": 1}, {"workers": 2}], indirect=True, ids=["1-worker", "2-workers"]
)


@pytest.fixture
def proxy(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Proxy]:
    param = getattr(request, "param", {})
    monkeypatch.setenv("GRAVEN_ROUTER_LOOP", param.get("loop", "auto"))
    router = EmbeddedRouter(tmp_path / "state", workers=param.get("workers", 1))
    p = Proxy(router, free_port(), set())
    try:
        yield p
    finally:
        with contextlib.suppress(Exception):
            p.router.stop(SERVICE)
        for pid in p.pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        remove_short_socket_dir(p.router)


@pytest.fixture
def echoes() -> Iterator[Callable[[str], EchoBackend]]:
    started: list[EchoBackend] = []

    def make(name: str) -> EchoBackend:
        echo = EchoBackend(name)
        started.append(echo)
        return echo

    try:
        yield make
    finally:
        for echo in started:
            echo.close()


class _KeepAliveServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    backend: KeepAliveBackend

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, addr = super().get_request()
        with self.backend.lock:
            self.backend.connections += 1
            self.backend.open.add(conn)
        return conn, addr

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self.backend.lock:
            self.backend.open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a peer resetting a connection is part of these tests


class _KeepAliveHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _KeepAliveServer

    def setup(self) -> None:
        super().setup()
        # A socket timeout is how http.server closes an idle keep-alive connection.
        self.connection.settimeout(self.server.backend.keep_alive_timeout)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        backend = self.server.backend
        sent = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with backend.lock:
            backend.requests += 1
        body = sent if self.path == "/echo" else f"{backend.name}\n".encode()
        # One write: a backend killed between two writes would break off a response,
        # which no proxy may resend (a test of dying between requests must not race).
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    do_POST = do_GET


class KeepAliveBackend:
    """An HTTP/1.1 keep-alive server that counts its connections, closes idle ones
    after ``keep_alive_timeout`` (None: never) and can die like a process: listening
    socket and every connection closed at once. Any method answers its name, except
    on ``/echo``, which answers the request body."""

    def __init__(self, name: str, keep_alive_timeout: float | None = None) -> None:
        self.name = name
        self.keep_alive_timeout = keep_alive_timeout
        self.lock = threading.Lock()
        self.connections = 0  # accepted so far
        self.requests = 0
        self.open: set[socket.socket] = set()
        self._server = _KeepAliveServer(("127.0.0.1", 0), _KeepAliveHandler)
        self._server.backend = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.dead = False

    @property
    def open_connections(self) -> int:
        with self.lock:
            return len(self.open)

    def backend(self, state: BackendState = "ready", weight: int = 100) -> Backend:
        port = self._server.server_address[1]
        return Backend(self.name, f"127.0.0.1:{port}", state, weight)

    def die(self) -> None:
        if self.dead:
            return
        self.dead = True
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            conns = list(self.open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


class FlakyBackend:
    """A raw HTTP/1.1 server that answers ``answered`` requests on each connection,
    then reads the next one and closes without a word: cleanly (``mode="eof"``) or
    with a reset (``mode="reset"``). ``answered=1`` acts out the keep-alive race on
    every reused connection; ``answered=0`` drops every request."""

    def __init__(self, name: str, answered: int, mode: str = "eof") -> None:
        self.name = name
        self.answered = answered
        self.mode = mode
        self.lock = threading.Lock()
        self.received = 0  # requests read, answered or not
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def backend(self, state: BackendState = "ready") -> Backend:
        return Backend(self.name, f"127.0.0.1:{self._listener.getsockname()[1]}", state)

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(timeout=5)
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            data = b""
            for n in range(self.answered + 1):
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    data += piece
                head, _, data = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                with self.lock:
                    self.received += 1
                if n == self.answered:
                    break
                body = f"{self.name}\n".encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def keepalives() -> Iterator[Callable[..., KeepAliveBackend]]:
    started: list[KeepAliveBackend] = []

    def make(name: str, keep_alive_timeout: float | None = None) -> KeepAliveBackend:
        backend = KeepAliveBackend(name, keep_alive_timeout)
        started.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in started:
            backend.die()


@pytest.fixture
def flakies() -> Iterator[Callable[..., FlakyBackend]]:
    started: list[FlakyBackend] = []

    def make(name: str, answered: int, mode: str = "eof") -> FlakyBackend:
        backend = FlakyBackend(name, answered, mode)
        started.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in started:
            backend.close()


@dataclass
class Load:
    """Keep-alive requests (GETs, or POSTs with a small body) from ``clients`` threads
    until stopped (after ``min_requests``), ``max_requests`` were sent, or
    ``max_seconds`` passed: bounded either way. Each client pauses up to ``pause``
    seconds (at random) between requests."""

    port: int
    clients: int = 6
    min_requests: int = 2000
    max_requests: int = 20000
    max_seconds: float = 30.0
    method: str = "GET"
    pause: float = 0.0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    served_by: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._deadline = time.monotonic() + self.max_seconds
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    @property
    def sent(self) -> int:
        return self._sent

    def wait_sent(self, n: int) -> None:
        eventually(lambda: self._sent >= n, timeout=self.max_seconds)

    def finish(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.max_seconds + 10)

    def _ticket(self) -> bool:
        with self._lock:
            if self._sent >= self.max_requests or time.monotonic() > self._deadline:
                return False
            if self._stop.is_set() and self._sent >= self.min_requests:
                return False
            self._sent += 1
            return True

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        payload = b"x" * 100 if self.method == "POST" else None
        rng = random.Random()
        while self._ticket():
            if self.pause:
                time.sleep(rng.uniform(0, self.pause))
            try:
                conn.request(self.method, "/", body=payload)
                resp = conn.getresponse()
                body = resp.read()
                backend = resp.getheader("X-Graven-Backend", "?")
                with self._lock:
                    if resp.status == 200 and body == f"{backend}\n".encode():
                        self.ok += 1
                        self.served_by[backend] += 1
                    else:
                        self.failures[f"HTTP {resp.status}: {body[:80]!r}"] += 1
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures[repr(exc)] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()


# --------------------------------------------------------------------------- routing


def test_requests_reach_only_ready_backends(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a, b, c = echoes("a"), echoes("b"), echoes("c")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend(), b.backend("drain"), c.backend()])
    seen = Counter(proxy.get()[2].getheader("X-Graven-Backend") for _ in range(40))
    assert seen == {"a": 20, "c": 20}
    assert b.requests == 0


@WORKERS
def test_weights_are_respected(proxy: Proxy, echoes: Callable[[str], EchoBackend]) -> None:
    light, heavy, off = echoes("light"), echoes("heavy"), echoes("off")
    proxy.start()
    proxy.router.set_backends(
        SERVICE, [light.backend(weight=100), heavy.backend(weight=300), off.backend(weight=0)]
    )
    load = Load(proxy.port, clients=4, min_requests=400, max_requests=400, max_seconds=20)
    load.start().finish()
    assert not load.failures
    assert 80 <= load.served_by["light"] <= 120, load.served_by
    assert 280 <= load.served_by["heavy"] <= 320, load.served_by
    assert off.requests == 0


@WORKERS
def test_no_ready_backend_is_503_and_all_dead_is_502(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    proxy.start()
    status, body, resp = proxy.get()
    assert (status, resp.getheader("Retry-After")) == (503, "1")
    assert b"no ready backend" in body

    dead = echoes("dead")
    proxy.router.set_backends(SERVICE, [dead.backend()])
    dead.close()
    assert proxy.get()[0] == 502
    assert by_id(proxy.router.stats(SERVICE))["dead"].errors >= 1


@BOTH_LOOPS
def test_health_names_the_event_loop_serving(request: pytest.FixtureRequest, proxy: Proxy) -> None:
    proxy.start()
    router = proxy.router
    status, doc = router._call(router._files(SERVICE), "GET", "/health", None, 5.0)
    expected = "asyncio" if request.node.callspec.params["proxy"]["loop"] == "asyncio" else "uvloop"
    assert (status, doc["loop"]) == (200, expected)


@BOTH_LOOPS
def test_forwarding_headers(proxy: Proxy, echoes: Callable[[str], EchoBackend]) -> None:
    a = echoes("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    status, _, resp = proxy.get(
        "/", **{"X-Forwarded-For": "203.0.113.9", "Connection": "X-Secret", "X-Secret": "1"}
    )
    assert status == 200
    assert resp.getheader("X-Graven-Backend") == "a"
    assert a.headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert a.headers["Connection"] == "keep-alive"
    assert "X-Secret" not in a.headers  # named in Connection: hop-by-hop


# --------------------------------------------------------------------------- draining


@WORKERS
def test_a_drained_backend_gets_nothing_new_but_finishes_its_slow_request(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    old, new = echoes("old"), echoes("new")
    proxy.start()
    proxy.router.set_backends(SERVICE, [old.backend()])
    old.gate.clear()
    slow: list[tuple[int, bytes]] = []
    thread = threading.Thread(target=lambda: slow.append(proxy.get("/hold")[:2]), daemon=True)
    thread.start()
    assert old.wait_held(1)

    proxy.router.set_backends(SERVICE, [old.backend("drain"), new.backend()])
    served = Counter(proxy.get()[2].getheader("X-Graven-Backend") for _ in range(20))
    assert served == {"new": 20}
    assert by_id(proxy.router.stats(SERVICE))["old"].inflight == 1

    old.gate.set()
    thread.join(timeout=10)
    assert slow == [(200, b"old\n")]
    assert eventually(lambda: by_id(proxy.router.stats(SERVICE))["old"].inflight == 0)


@WORKERS
def test_zero_failed_requests_while_backends_are_swapped_under_load(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    current = echoes("gen0")
    proxy.start()
    proxy.router.set_backends(SERVICE, [current.backend()])
    load = Load(proxy.port, clients=6, min_requests=2500).start()
    swaps = 0
    try:
        load.wait_sent(200)
        for gen in range(1, 9):
            new = echoes(f"gen{gen}")
            old = current
            proxy.router.set_backends(SERVICE, [old.backend(), new.backend()])
            time.sleep(0.1)
            # Drain both ways the controller may: explicitly, or by leaving it out.
            if gen % 2:
                proxy.router.set_backends(SERVICE, [old.backend("drain"), new.backend()])
            else:
                proxy.router.set_backends(SERVICE, [new.backend()])
            assert eventually(lambda: idle(proxy, old.name))
            old.close()
            current = new
            swaps += 1
            time.sleep(0.1)
    finally:
        load.finish()
    assert swaps == 8
    assert not load.failures, f"{load.failures} after {load.ok} ok\n{proxy.log()}"
    assert load.ok >= 2000
    assert len(load.served_by) >= 5  # traffic really moved across generations


@BOTH_LOOPS
def test_a_backend_that_dies_abruptly_costs_no_request(
    proxy: Proxy, keepalives: Callable[..., KeepAliveBackend]
) -> None:
    a, b, c = keepalives("a"), keepalives("b"), keepalives("c")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend(), b.backend(), c.backend()])
    load = Load(proxy.port, clients=6, min_requests=1500, max_seconds=20).start()
    try:
        load.wait_sent(300)
        # No word to the router: its pooled connections to b close or reset, and b
        # refuses new ones.
        b.die()
        load.wait_sent(900)
        c.die()
    finally:
        load.finish()
    assert not load.failures, f"{load.failures} after {load.ok} ok\n{proxy.log()}"
    stats = by_id(proxy.router.stats(SERVICE))
    assert stats["b"].state == "ready"  # still configured: only the controller removes it
    assert stats["b"].errors >= 1
    assert load.served_by["a"] > 0


@WORKERS
def test_stopping_a_drained_backend_under_load_costs_no_request(
    proxy: Proxy, keepalives: Callable[..., KeepAliveBackend]
) -> None:
    """The rollout's order: route to the new one, drain the old, wait until it is idle,
    stop it. Its pooled connections are gone by then, so neither GETs nor POSTs (which
    are never resent after a clean close on a fresh connection) can fail."""
    current = keepalives("gen0")
    proxy.start()
    proxy.router.set_backends(SERVICE, [current.backend()])
    gets = Load(proxy.port, clients=3, min_requests=1200).start()
    posts = Load(proxy.port, clients=3, min_requests=1200, method="POST").start()
    try:
        gets.wait_sent(100)
        for gen in range(1, 7):
            new, old = keepalives(f"gen{gen}"), current
            proxy.router.set_backends(SERVICE, [old.backend(), new.backend()])
            time.sleep(0.1)
            if gen % 2:
                proxy.router.set_backends(SERVICE, [old.backend("drain"), new.backend()])
            else:
                proxy.router.set_backends(SERVICE, [new.backend()])
            assert eventually(lambda: idle(proxy, old.name))
            # Idle pooled connections were closed at the drain, busy ones after their
            # answer: the instance sees no connection left when it stops.
            assert eventually(lambda: old.open_connections == 0, timeout=2.0)
            old.die()
            current = new
            time.sleep(0.1)
    finally:
        gets.finish()
        posts.finish()
    for load in (gets, posts):
        assert not load.failures, f"{load.failures} after {load.ok} ok\n{proxy.log()}"
        assert load.ok >= 1000
    assert len(gets.served_by) >= 5


# --------------------------------------------------------------------------- connection pool


def test_backend_connections_are_pooled_and_reused(
    proxy: Proxy, keepalives: Callable[..., KeepAliveBackend]
) -> None:
    a = keepalives("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    load = Load(proxy.port, clients=4, min_requests=400, max_requests=400, max_seconds=20)
    load.start().finish()
    assert not load.failures
    assert a.requests == 400
    # One connection per concurrent request at most, not one per request.
    assert a.connections <= 8, a.connections
    stats = by_id(proxy.router.stats(SERVICE))["a"]
    assert (stats.requests, sum(stats.latency_buckets), stats.errors) == (400, 400, 0)


def test_draining_or_removing_a_backend_closes_its_idle_connections_at_once(
    proxy: Proxy, keepalives: Callable[..., KeepAliveBackend]
) -> None:
    a, b = keepalives("a"), keepalives("b")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    for _ in range(10):
        assert proxy.get()[:2] == (200, b"a\n")
    assert (a.connections, a.open_connections) == (1, 1)  # one connection, kept open

    proxy.router.set_backends(SERVICE, [a.backend("drain"), b.backend()])
    # At once, not when the pool would have expired it (POOL_IDLE_TIMEOUT, 4 s).
    assert eventually(lambda: a.open_connections == 0, timeout=1.0)
    assert proxy.get()[:2] == (200, b"b\n")
    assert eventually(lambda: b.open_connections == 1)

    proxy.router.set_backends(SERVICE, [a.backend()])  # b removed while idle
    assert eventually(lambda: b.open_connections == 0, timeout=1.0)
    assert proxy.get()[:2] == (200, b"a\n")
    assert a.connections == 2  # a drained backend made ready again starts afresh


@BOTH_LOOPS
def test_streamed_bodies_use_fresh_connections_that_are_pooled_afterwards(
    proxy: Proxy, keepalives: Callable[..., KeepAliveBackend]
) -> None:
    a = keepalives("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    big = os.urandom(300_000)  # above REPLAY_LIMIT and COPY_SIZE: streamed both ways
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("POST", "/echo", body=big)
            resp = conn.getresponse()
            assert (resp.status, resp.read() == big) == (200, True)
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"a\n"
    finally:
        conn.close()
    # A body that cannot be sent again never risks a stale connection; each one's
    # connection then served the GETs.
    assert (a.requests, a.connections) == (6, 3)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_backend_closing_idle_connections_costs_no_request(
    proxy: Proxy, keepalives: Callable[..., KeepAliveBackend], method: str
) -> None:
    """The backend's keep-alive timeout (50 ms) is shorter than the pool's and the
    clients' pauses (0-80 ms) straddle it, so connections close under the proxy's
    feet, now and then exactly as a request is on its way."""
    a = keepalives("a", keep_alive_timeout=0.05)
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    load = Load(
        proxy.port,
        clients=8,
        min_requests=1000,
        max_requests=1000,
        max_seconds=40,
        method=method,
        pause=0.08,
    )
    load.start().finish()
    assert not load.failures, f"{load.failures} after {load.ok} ok\n{proxy.log()}"
    assert load.ok == 1000
    # The backend really did close connections, many times (8 clients need 8 at most).
    assert a.connections > 20
    stats = by_id(proxy.router.stats(SERVICE))["a"]
    assert stats.errors == 0  # a stale pooled connection is no fault of the backend


@BOTH_LOOPS
@pytest.mark.parametrize("mode", ["eof", "reset"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_request_that_meets_a_stale_pooled_connection_is_sent_again(
    proxy: Proxy, flakies: Callable[..., FlakyBackend], mode: str, method: str
) -> None:
    # Every reused connection takes the next request and closes without answering.
    a = flakies("a", answered=1, mode=mode)
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for _ in range(5):
            conn.request(method, "/", body=b"payload" if method == "POST" else None)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"a\n")
    finally:
        conn.close()
    # Requests 2-5 each went twice: once on the stale connection, once on a fresh one.
    assert (a.received, a.connections) == (9, 5)
    stats = by_id(proxy.router.stats(SERVICE))["a"]
    assert (stats.requests, stats.errors) == (5, 0)


@BOTH_LOOPS
def test_a_fresh_connection_closed_unanswered_resends_only_idempotent_requests(
    proxy: Proxy, flakies: Callable[..., FlakyBackend], keepalives: Callable[..., KeepAliveBackend]
) -> None:
    hole, good = flakies("hole", answered=0), keepalives("good")
    proxy.start()
    proxy.router.set_backends(SERVICE, [hole.backend()])
    # The hole read the request and closed: it may have acted on it. A POST is not
    # sent again...
    assert proxy.raw(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    ).startswith(b"HTTP/1.1 502 ")
    assert hole.received == 1
    # ... a GET goes to another backend.
    proxy.router.set_backends(SERVICE, [hole.backend(), good.backend()])
    for _ in range(4):
        assert proxy.get()[:2] == (200, b"good\n")
    assert hole.received >= 2
    assert good.requests == 4


# --------------------------------------------------------------------------- metrics


def test_every_answer_is_timed_and_5xx_are_counted(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    paths = ["/status?code=500"] * 2 + ["/status?code=503", "/status?code=404"]
    paths += ["/slow?ms=30"] * 2 + ["/"] * 14
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for path in paths:
            conn.request("GET", path)
            conn.getresponse().read()
    finally:
        conn.close()
    stats = by_id(proxy.router.stats(SERVICE))["a"]
    assert (stats.requests, stats.responses_5xx, stats.errors, stats.weight) == (20, 3, 3, 100)
    assert len(stats.latency_buckets) == len(LATENCY_BOUNDS) + 1
    assert sum(stats.latency_buckets) == 20
    # The two slow answers took at least 30 ms: above the 20 ms bound.
    assert sum(stats.latency_buckets[LATENCY_BOUNDS.index(0.02) + 1 :]) >= 2


@WORKERS
def test_histograms_sum_to_the_requests_under_load(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a, b = echoes("a"), echoes("b")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend(weight=100), b.backend(weight=300)])
    load = Load(proxy.port, clients=6, min_requests=1200, max_requests=1200, max_seconds=30)
    load.start().finish()
    assert not load.failures
    stats = by_id(proxy.router.stats(SERVICE))
    for backend in ("a", "b"):
        assert sum(stats[backend].latency_buckets) == stats[backend].requests
        assert stats[backend].requests == load.served_by[backend]
    assert (stats["a"].weight, stats["b"].weight) == (100, 300)
    assert stats["a"].requests + stats["b"].requests == 1200


# --------------------------------------------------------------------------- process life# --------------------------------------------------------------------------- process life


def test_the_proxy_outlives_its_router_object(
    proxy: Proxy, echoes: Callable[[str], EchoBackend], tmp_path: Path
) -> None:
    a = echoes("a")
    pid = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    proxy.router = EmbeddedRouter(tmp_path / "state")  # a restarted controller

    assert proxy.start() == pid
    assert proxy.router.running() == {SERVICE: proxy.port}
    assert proxy.get()[:2] == (200, b"a\n")


@WORKERS
def test_a_restarted_proxy_restores_its_backends(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a, b = echoes("a"), echoes("b")
    pid = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend(weight=10), b.backend("drain")])
    os.killpg(pid, signal.SIGKILL)  # the whole router: supervisor and workers
    assert eventually(lambda: proxy.router.running() == {})

    assert proxy.start() != pid
    assert [(s.id, s.state) for s in proxy.router.stats(SERVICE)] == [
        ("a", "ready"),
        ("b", "drain"),
    ]
    assert proxy.get()[:2] == (200, b"a\n")


@pytest.mark.parametrize(
    "proxy",
    [{"loop": "auto"}, {"loop": "asyncio"}, {"workers": 2}],
    indirect=True,
    ids=["uvloop", "asyncio", "2-workers"],
)
def test_sigterm_lets_in_flight_requests_finish(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    pid = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    results: list[tuple[int, bytes]] = []
    thread = threading.Thread(
        target=lambda: results.append(proxy.get("/slow?ms=700")[:2]), daemon=True
    )
    thread.start()
    assert eventually(lambda: a.requests == 1)

    proxy.router.stop(SERVICE)  # returns once the proxy has exited

    thread.join(timeout=10)
    assert results == [(200, b"a\n")]
    assert not pid_alive(pid)
    assert "stopped" in proxy.log()


@WORKERS
def test_a_port_in_use_is_a_router_error_naming_the_port(proxy: Proxy) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", proxy.port))
        holder.listen()
        with pytest.raises(RouterError, match=rf"port {proxy.port}.*in use") as info:
            proxy.start()
    assert str(proxy.port) in (info.value.hint or "")
    assert proxy.router.running() == {}


def test_a_long_state_dir_gets_a_short_admin_socket(
    tmp_path: Path, echoes: Callable[[str], EchoBackend]
) -> None:
    deep = tmp_path.joinpath(*["deeply-nested-directory"] * 5, "state")
    proxy = Proxy(EmbeddedRouter(deep), free_port(), set())
    try:
        proxy.start()
        proxy.router.set_backends(SERVICE, [echoes("a").backend()])
        assert proxy.get()[:2] == (200, b"a\n")
        record = (deep / "routers" / f"{SERVICE}.pid").read_text()
        assert "/tmp/graven-" in record
    finally:
        proxy.router.stop(SERVICE)
        remove_short_socket_dir(proxy.router)
    assert proxy.router.running() == {}


# --------------------------------------------------------------------------- HTTP framing


@BOTH_LOOPS
def test_chunked_request_and_response_bodies_pass_through(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    pieces = [b"x" * 10, b"", b"y" * 70_000, b"z\r\n0\r\n\r\n"]  # framing-like bytes too
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("POST", "/echo", body=iter(pieces), encode_chunked=True)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"".join(pieces))
        sock = conn.sock

        conn.request("GET", "/chunked?n=4")
        resp = conn.getresponse()
        expected = b"".join(b"a chunk %d\n" % i * (i + 1) for i in range(4))
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.read() == expected

        # A body delimited by the backend closing is re-framed, keeping us connected.
        conn.request("GET", "/until-close")
        resp = conn.getresponse()
        assert resp.read() == b"a until close\n" * 3

        conn.request("POST", "/echo", body=b"plain body")
        assert conn.getresponse().read() == b"plain body"
        assert conn.sock is sock  # one client connection carried all four
    finally:
        conn.close()


@BOTH_LOOPS
def test_http_1_0_clients_get_their_semantics(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    # Without keep-alive the proxy closes after the answer.
    out = proxy.raw(b"GET / HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\na\n")
    assert b"Connection: close" in out
    # A chunked answer reaches an HTTP/1.0 client decoded, ended by the close.
    out = proxy.raw(b"GET /chunked?n=2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    assert body == b"a chunk 0\na chunk 1\na chunk 1\n"
    # With keep-alive and a length, the connection stays open.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            answer = b""
            while not answer.endswith(b"\r\n\r\na\n") and (piece := s.recv(65536)):
                answer += piece
            assert b"Connection: keep-alive" in answer and answer.endswith(b"a\n")


@BOTH_LOOPS
def test_head_answers_keep_length_without_body(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("HEAD", "/")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Length"), resp.read()) == (200, "1234", b"")
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"a\n"
    finally:
        conn.close()


@BOTH_LOOPS
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"BLAH\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"GET / HTTP/1.1\r\nHost: x\r\n bad fold\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"400"),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400"),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"505"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    ],
)
def test_malformed_requests_are_refused_and_the_proxy_keeps_serving(
    proxy: Proxy, echoes: Callable[[str], EchoBackend], request_bytes: bytes, status: bytes
) -> None:
    a = echoes("a")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    answer = proxy.raw(request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert proxy.get()[:2] == (200, b"a\n")
    assert by_id(proxy.router.stats(SERVICE))["a"].errors == 0


# --------------------------------------------------------------------------- workers


def health(proxy: Proxy) -> dict[str, Any]:
    router = proxy.router
    status, doc = router._call(router._files(SERVICE), "GET", "/health", None, 5.0)
    assert status == 200
    return doc


TWO_WORKERS = pytest.mark.parametrize("proxy", [{"workers": 2}], indirect=True, ids=["2-workers"])


@TWO_WORKERS
def test_workers_serve_one_port_and_their_counters_add_up(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    supervisor = proxy.start()
    workers = health(proxy)["workers"]
    assert len(workers) == 2 and supervisor not in workers and all(map(pid_alive, workers))
    proxy.router.set_backends(SERVICE, [a.backend()])
    answers = Counter(proxy.get()[:2] for _ in range(40))
    assert answers == {(200, b"a\n"): 40}
    (stats,) = proxy.router.stats(SERVICE)
    assert (stats.requests, sum(stats.latency_buckets), stats.inflight) == (40, 40, 0)


@TWO_WORKERS
def test_a_new_backend_set_reaches_every_worker(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a, b = echoes("a"), echoes("b")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    assert proxy.get()[:2] == (200, b"a\n")
    proxy.router.set_backends(SERVICE, [a.backend("drain"), b.backend()])
    # Fresh connections land on either worker: every one must see the new set.
    assert Counter(proxy.get()[:2] for _ in range(30)) == {(200, b"b\n"): 30}
    assert [(s.id, s.state) for s in proxy.router.stats(SERVICE)] == [
        ("a", "drain"),
        ("b", "ready"),
    ]


@TWO_WORKERS
def test_a_killed_worker_is_replaced_and_given_the_current_set(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a, b = echoes("a"), echoes("b")
    proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    victim, other = health(proxy)["workers"]
    os.kill(victim, signal.SIGKILL)
    # Changed while the worker is down: its successor must start with this set.
    proxy.router.set_backends(SERVICE, [b.backend()])
    assert eventually(lambda: victim not in health(proxy)["workers"], timeout=10)
    replacement, still = health(proxy)["workers"]
    assert still == other and pid_alive(replacement)
    assert Counter(proxy.get()[:2] for _ in range(30)) == {(200, b"b\n"): 30}
    assert "starting it again" in proxy.log()


# --------------------------------------------------------------------------- crashes
#
# Load from graven.testing.load: a few keep-alive clients, each with one request in
# flight at a time. A process that dies takes the connections it serves with it, so
# each client may lose the one request it had on such a connection, never more (per
# process killed); no client may find the port closed.

CLIENTS = 3


def serving(proxy: Proxy) -> list[int]:
    """The processes that serve the port's traffic (a router without a supervisor is
    its own)."""
    doc = health(proxy)
    return list(doc.get("workers") or [doc["pid"]])


def answering(proxy: Proxy) -> int | None:
    """The pid answering on the admin socket; None while there is none."""
    try:
        return int(health(proxy)["pid"])
    except OSError:
        return None


def kill_under_load(proxy: Proxy, victim: int) -> loadgen.LoadReport:
    """SIGKILL ``victim`` once 100 requests went out; go on for 200 more, bounded."""
    with loadgen.Load("127.0.0.1", proxy.port, clients=CLIENTS, max_seconds=60) as load:
        assert eventually(lambda: load.report.sent >= 100, timeout=30)
        os.kill(victim, signal.SIGKILL)
        assert eventually(lambda: load.report.sent >= 300, timeout=40), load.report.to_dict()
    return load.report


def assert_nothing_refused(report: loadgen.LoadReport, kills: int = 1) -> None:
    """No connection refused; per process killed, at most the one request each
    client had in flight (a client that reconnected after one kill may meet the next)."""
    assert "ConnectionRefusedError" not in report.errors, report.to_dict()
    assert report.failed <= CLIENTS * kills, report.to_dict()
    assert report.ok >= 300 - CLIENTS * kills, report.to_dict()


@WORKERS
def test_a_killed_proxy_process_under_load_refuses_no_connection(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    supervisor = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    victim = serving(proxy)[0]
    proxy.pids.update(serving(proxy))

    report = kill_under_load(proxy, victim)

    assert_nothing_refused(report)
    assert not pid_alive(victim)
    assert proxy.router.pid(SERVICE) == supervisor  # nothing but the proxy restarted
    assert victim not in serving(proxy)
    proxy.pids.update(serving(proxy))
    assert Counter(proxy.get()[:2] for _ in range(10)) == {(200, b"a\n"): 10}


@TWO_WORKERS
def test_every_worker_killed_at_once_under_load_refuses_no_connection(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    supervisor = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    workers = serving(proxy)
    proxy.pids.update(workers)
    with loadgen.Load("127.0.0.1", proxy.port, clients=CLIENTS, max_seconds=60) as load:
        assert eventually(lambda: load.report.sent >= 100, timeout=30)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        # No worker for a while: connections wait (held, then in the backlog).
        assert eventually(lambda: load.report.sent >= 300, timeout=40), load.report.to_dict()

    assert_nothing_refused(load.report, kills=len(workers))
    assert "HTTP 503" not in load.report.errors, load.report.to_dict()
    assert proxy.router.pid(SERVICE) == supervisor
    assert not set(serving(proxy)) & set(workers)
    proxy.pids.update(serving(proxy))


@WORKERS
def test_a_killed_supervisor_under_load_is_replaced_by_its_worker(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    supervisor = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    workers = serving(proxy)
    proxy.pids.update(workers)

    report = kill_under_load(proxy, supervisor)

    assert_nothing_refused(report)
    # A worker started a new supervisor on the port it held, recorded it, then left.
    assert eventually(lambda: answering(proxy) not in (None, supervisor), timeout=20)
    successor = proxy.router.pid(SERVICE)
    assert successor is not None and successor != supervisor
    assert health(proxy)["pid"] == successor
    proxy.pids.update([successor, *serving(proxy)])
    assert not set(serving(proxy)) & set(workers)
    assert eventually(lambda: not any(map(pid_alive, workers)), timeout=20)
    proxy.router.set_backends(SERVICE, [a.backend("drain")])  # its admin API works
    assert proxy.get()[0] == 503
    # And it stops like the first one: nothing left, the port closed.
    proxy.router.stop(SERVICE)
    assert not any(map(pid_alive, proxy.pids))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()


@WORKERS
def test_a_router_stopped_while_its_supervisor_is_dead_stays_stopped(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    supervisor = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    workers = serving(proxy)
    proxy.pids.update(workers)
    for pid in workers:  # so that the stop comes first
        os.kill(pid, signal.SIGSTOP)
    try:
        os.kill(supervisor, signal.SIGKILL)
        proxy.router.stop(SERVICE)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    # The workers see their supervisor gone and the router stopped: they leave.
    assert eventually(lambda: not any(map(pid_alive, workers)), timeout=20)
    assert proxy.router.running() == {}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    assert "no new supervisor (the router was stopped" in proxy.log()


@WORKERS
def test_ensure_adopts_the_supervisor_a_worker_starts_in_place_of_a_dead_one(
    proxy: Proxy, echoes: Callable[[str], EchoBackend]
) -> None:
    a = echoes("a")
    supervisor = proxy.start()
    proxy.router.set_backends(SERVICE, [a.backend()])
    workers = serving(proxy)
    proxy.pids.update(workers)
    for pid in workers:  # the controller gets there first
        os.kill(pid, signal.SIGSTOP)
    outcome: list[BaseException | None] = []

    def ensure() -> None:
        try:
            proxy.router.ensure(SERVICE, proxy.port)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    try:
        os.kill(supervisor, signal.SIGKILL)
        assert eventually(lambda: not pid_alive(supervisor))
        thread = threading.Thread(target=ensure, daemon=True)
        thread.start()
        thread.join(timeout=1.0)  # a spawn on the held port would have failed by now
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    thread.join(timeout=30)
    assert outcome == [None]
    successor = proxy.router.pid(SERVICE)
    assert successor is not None and successor != supervisor
    assert health(proxy)["pid"] == successor
    proxy.pids.update([successor, *serving(proxy)])
    assert proxy.get()[:2] == (200, b"a\n")
    assert "cannot listen" not in proxy.log()
