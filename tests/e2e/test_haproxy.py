"""HAProxyRouter against a real haproxy, real backend processes and real traffic.

Every haproxy is started through ``HAProxyRouter`` and stopped by pid at teardown;
every backend is a separate Python process on 127.0.0.1 (so it can die abruptly);
every load loop is bounded in request count and in time.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from graven.errors import RouterError
from graven.router.base import LATENCY_BOUNDS, Backend, BackendStats
from graven.router.haproxy.adapter import HAProxyRouter
from graven.router.haproxy.config import render_config
from graven.router.haproxy.plan import Desired, parse_show_stat
from tests.e2e.conftest import eventually, free_port, pid_alive

pytestmark = pytest.mark.e2e

SERVICE = "web"
LOAD_DEADLINE = 30.0  # seconds: every load loop stops by itself by then

# A small HTTP/1.1 keep-alive server: answers its name, /slow?ms=N waits first.
BACKEND_SCRIPT = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

NAME = sys.argv[1]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/slow":
            time.sleep(int(parse_qs(url.query).get("ms", ["50"])[0]) / 1000)
        body = (NAME + "\n").encode()
        # One write per response: a kill lands before or after it, never half-way
        # (bytes already on their way to a client are beyond any router's reach).
        head = "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        self.wfile.write(head.encode() + body)

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def handle_error(self, request, client_address):
        pass  # resets from the router's pool are normal

server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever(poll_interval=0.05)
"""


class BackendProcess:
    """One backend server in its own process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BACKEND_SCRIPT, name],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"backend {name} did not start: {line!r}"
        self.port = int(line)

    def backend(self, state: str = "ready", weight: int = 100) -> Backend:
        return Backend(self.name, f"127.0.0.1:{self.port}", state, weight)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Env:
    router: HAProxyRouter
    port: int
    backends: list[BackendProcess] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)

    def start_backend(self, name: str) -> BackendProcess:
        b = BackendProcess(name)
        self.backends.append(b)
        return b

    def remember_pids(self) -> None:
        for pid in (self.router.pid(SERVICE), self.router.collector_pid(SERVICE)):
            if pid is not None:
                self.pids.add(pid)

    def stats(self) -> dict[str, BackendStats]:
        return {s.id: s for s in self.router.stats(SERVICE)}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(router=HAProxyRouter(tmp_path / "state"), port=free_port())
    e.router.ensure(SERVICE, e.port)
    e.remember_pids()
    try:
        yield e
    finally:
        e.remember_pids()
        with contextlib.suppress(Exception):
            e.router.stop(SERVICE)
        for pid in e.pids:  # nothing we started survives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for b in e.backends:
            b.kill()


class Load:
    """Keep-alive clients sending GETs until stopped, a request cap or the deadline."""

    def __init__(
        self, port: int, clients: int = 6, paths: tuple[str, ...] = ("/",), cap: int = 50_000
    ) -> None:
        self.port = port
        self.cap = cap
        self.started = 0
        self.done = 0
        self.failures: list[str] = []
        self.served: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + LOAD_DEADLINE
        self._threads = [
            threading.Thread(target=self._client, args=(paths[i % len(paths)],), daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=LOAD_DEADLINE + 5)

    def wait_for(self, count: int) -> None:
        """Until ``count`` requests are done in all (or the load stopped)."""
        while self.done < count and not self._stop.is_set() and time.monotonic() < self._deadline:
            time.sleep(0.01)

    def _client(self, path: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                with self._lock:
                    if self.started >= self.cap:
                        return
                    self.started += 1
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    body = resp.read()
                    outcome = None if resp.status == 200 else f"HTTP {resp.status}: {body[:80]!r}"
                    who = resp.getheader("X-Graven-Backend") or "?"
                except (OSError, http.client.HTTPException) as exc:
                    outcome, who = f"{type(exc).__name__}: {exc}", "?"
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                with self._lock:
                    self.done += 1
                    if outcome is None:
                        self.served[who] += 1
                    else:
                        self.failures.append(outcome)
        finally:
            conn.close()


# --------------------------------------------------------------------------- data plane


def test_swapping_backends_under_load_fails_no_request(env: Env) -> None:
    old = env.start_backend("gen0")
    env.router.set_backends(SERVICE, [old.backend()])
    swaps = 8
    # Slow requests on some clients keep requests in flight when a backend is drained.
    with Load(env.port, paths=("/", "/slow?ms=20")) as load:
        load.wait_for(200)
        for gen in range(1, swaps + 1):
            new = env.start_backend(f"gen{gen}")
            env.router.set_backends(SERVICE, [old.backend(), new.backend()])
            load.wait_for(load.done + 100)
            env.router.set_backends(SERVICE, [new.backend(), old.backend("drain")])
            assert eventually(lambda o=old: env.stats()[o.name].inflight == 0, 10)
            env.router.set_backends(SERVICE, [new.backend()])
            assert eventually(lambda n=new: list(env.stats()) == [n.name], 10)
            old.stop()
            old = new
            load.wait_for(load.done + 100)
        load.wait_for(2000)
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.done >= 2000, f"only {load.done} requests in {LOAD_DEADLINE:.0f} s"
    # Every generation took real traffic: the swaps happened under load.
    assert all(load.served[f"gen{g}"] > 0 for g in range(swaps + 1)), load.served


def test_weights_split_traffic(env: Env) -> None:
    a, b = env.start_backend("a"), env.start_backend("b")
    env.router.set_backends(SERVICE, [a.backend(weight=100), b.backend(weight=300)])
    with Load(env.port, clients=4, cap=800) as load:
        load.wait_for(800)
    assert load.failures == []
    share = load.served["b"] / (load.served["a"] + load.served["b"])
    assert 0.70 <= share <= 0.80, load.served
    stats = env.stats()
    assert (stats["a"].weight, stats["b"].weight) == (100, 300)
    assert (stats["a"].requests, stats["b"].requests) == (load.served["a"], load.served["b"])


def test_a_backend_that_dies_abruptly_costs_no_request(env: Env) -> None:
    a, b = env.start_backend("a"), env.start_backend("b")
    env.router.set_backends(SERVICE, [a.backend(), b.backend()])
    # Slow requests keep some in flight on 'a' at the moment it dies.
    with Load(env.port, clients=6, paths=("/slow?ms=5", "/")) as load:
        load.wait_for(300)
        a.kill()
        killed_at = load.done
        load.wait_for(killed_at + 1000)
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.done >= killed_at + 1000
    stats = env.stats()
    # haproxy kept picking 'a' (health is the controller's job) and retried elsewhere.
    assert stats["a"].errors > 0
    assert stats["b"].requests >= 1000


def test_stop_lets_requests_in_flight_finish(env: Env) -> None:
    a = env.start_backend("a")
    env.router.set_backends(SERVICE, [a.backend()])
    result: list[int] = []

    def slow_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
        try:
            conn.request("GET", "/slow?ms=700")
            resp = conn.getresponse()
            resp.read()
            result.append(resp.status)
        finally:
            conn.close()

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert eventually(lambda: env.stats()["a"].inflight == 1)
    pid = env.router.pid(SERVICE)
    env.router.stop(SERVICE)
    thread.join(timeout=15)
    assert result == [200]
    assert pid is not None and not pid_alive(pid)
    assert env.router.running() == {}


def test_latency_histogram_counts_each_request_once(env: Env) -> None:
    a = env.start_backend("a")
    env.router.set_backends(SERVICE, [a.backend()])
    with Load(env.port, clients=2, paths=("/slow?ms=60",), cap=20) as load:
        load.wait_for(20)
    assert load.failures == []
    assert eventually(lambda: sum(env.stats()["a"].latency_buckets) == 20)
    buckets = env.stats()["a"].latency_buckets
    # Each took at least 60 ms: all sit above the 50 ms bound (a busy machine may push
    # some past 100 ms, so no upper bound is asserted).
    assert sum(buckets[LATENCY_BOUNDS.index(0.05) + 1 :]) == 20, buckets


# --------------------------------------------------------------------------- lifecycle


def test_a_new_router_object_adopts_the_running_haproxy(env: Env, tmp_path: Path) -> None:
    a = env.start_backend("a")
    env.router.set_backends(SERVICE, [a.backend(weight=40)])
    pid, collector = env.router.pid(SERVICE), env.router.collector_pid(SERVICE)

    again = HAProxyRouter(tmp_path / "state")
    again.ensure(SERVICE, env.port)

    assert (again.pid(SERVICE), again.collector_pid(SERVICE)) == (pid, collector)
    assert again.running() == {SERVICE: env.port}
    assert [(s.id, s.state, s.weight) for s in again.stats(SERVICE)] == [("a", "ready", 40)]
    with Load(env.port, clients=1, cap=10) as load:
        load.wait_for(10)
    assert (load.failures, load.served["a"]) == ([], 10)


def test_ensure_replaces_a_dead_collector_and_keeps_haproxy(env: Env) -> None:
    a = env.start_backend("a")
    env.router.set_backends(SERVICE, [a.backend()])
    pid, collector = env.router.pid(SERVICE), env.router.collector_pid(SERVICE)
    assert collector is not None
    os.kill(collector, signal.SIGKILL)
    assert eventually(lambda: not pid_alive(collector))
    # Without a collector the histogram is unknown, not zero; the rest still holds.
    assert env.stats()["a"].latency_buckets == ()

    env.router.ensure(SERVICE, env.port)
    env.remember_pids()

    assert env.router.pid(SERVICE) == pid
    assert env.router.collector_pid(SERVICE) not in (None, collector)
    with Load(env.port, clients=1, cap=5) as load:
        load.wait_for(5)
    assert eventually(lambda: sum(env.stats()["a"].latency_buckets) == 5)


def test_a_restarted_haproxy_serves_the_same_backends(env: Env) -> None:
    a, b = env.start_backend("a"), env.start_backend("b")
    env.router.set_backends(SERVICE, [a.backend(weight=70), b.backend("drain", 30)])
    first = env.router.pid(SERVICE)
    first_collector = env.router.collector_pid(SERVICE)
    assert first is not None and first_collector is not None

    os.kill(first, signal.SIGKILL)
    assert eventually(lambda: env.router.running() == {})
    # The collector notices its haproxy is gone and leaves by itself.
    assert eventually(lambda: not pid_alive(first_collector))

    env.router.ensure(SERVICE, env.port)
    env.remember_pids()
    assert env.router.pid(SERVICE) not in (None, first)
    assert [(s.id, s.address, s.state, s.weight) for s in env.router.stats(SERVICE)] == [
        ("a", a.backend().address, "ready", 70),
        ("b", b.backend().address, "drain", 30),
    ]
    with Load(env.port, clients=2, cap=50) as load:
        load.wait_for(50)
    assert (load.failures, load.served["a"]) == ([], 50)
    # haproxy itself has 'b' in drain again, not merely weighted 0 as in the config.
    rows = parse_show_stat(env.router.command(SERVICE, "show stat"), SERVICE)
    assert [(r.name, r.status) for r in rows] == [("a", "no check"), ("b", "DRAIN")]


def test_a_reload_of_the_generated_config_keeps_the_backends(env: Env) -> None:
    """What an operator's reload does: a new haproxy from haproxy.cfg takes the
    listeners over (-x) and soft-stops the old one (-sf). No request fails, no
    backend is lost, and graven adopts the new process."""
    a, b = env.start_backend("a"), env.start_backend("b")
    env.router.set_backends(SERVICE, [a.backend(weight=70), b.backend("drain", 30)])
    old = env.router.pid(SERVICE)
    assert old is not None
    with Load(env.port, clients=4) as load:
        load.wait_for(300)
        reloaded = subprocess.Popen(
            [
                "haproxy",
                "-db",
                "-f",
                str(env.router.config_path(SERVICE)),
                "-x",
                str(env.router.admin_socket(SERVICE)),
                "-sf",
                str(old),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        env.pids.add(reloaded.pid)
        try:
            assert eventually(lambda: not pid_alive(old), 15)
            done = load.done
            load.wait_for(done + 300)
            load.stop()
            assert load.failures == [], load.failures[:5]
            assert load.served["b"] == 0

            assert env.router.running() == {SERVICE: env.port}
            env.router.ensure(SERVICE, env.port)
            env.remember_pids()
            assert env.router.pid(SERVICE) == reloaded.pid
            assert [(s.id, s.state, s.weight) for s in env.router.stats(SERVICE)] == [
                ("a", "ready", 70),
                ("b", "drain", 30),
            ]
            rows = parse_show_stat(env.router.command(SERVICE, "show stat"), SERVICE)
            assert [(r.name, r.status) for r in rows] == [("a", "no check"), ("b", "DRAIN")]
        finally:
            env.router.stop(SERVICE)
            reloaded.wait(timeout=20)


def test_the_generated_config_carries_the_backend_set(env: Env) -> None:
    a, b = env.start_backend("a"), env.start_backend("b")
    env.router.set_backends(SERVICE, [a.backend(), b.backend("drain")])
    config = env.router.config_path(SERVICE).read_text()
    assert f"server a 127.0.0.1:{a.port} weight 256\n" in config
    assert f"server b 127.0.0.1:{b.port} weight 0  # drain\n" in config
    # The file is what a reload would run: haproxy itself accepts it.
    check = subprocess.run(
        ["haproxy", "-c", "-q", "-f", str(env.router.config_path(SERVICE))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_missing_haproxy_is_a_router_error_with_the_fix(tmp_path: Path) -> None:
    router = HAProxyRouter(tmp_path / "state", haproxy="/nonexistent/haproxy")
    with pytest.raises(RouterError, match="haproxy is not installed") as caught:
        router.ensure(SERVICE, free_port())
    assert "apt-get install haproxy" in (caught.value.hint or "")
    assert router.running() == {}


def test_render_config_is_valid_haproxy(tmp_path: Path) -> None:
    text = render_config(
        service="web",
        listen="127.0.0.1:8080",
        admin_socket=tmp_path / "admin.sock",
        log_socket=tmp_path / "log.sock",
        stop_timeout=5,
        servers=[
            Desired(Backend("a@1", "localhost:80", weight=10), "127.0.0.1:80"),
            Desired(Backend("b", "[::1]:81", "drain"), "[::1]:81"),
        ],
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    check = subprocess.run(
        ["haproxy", "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "    server a:a1 127.0.0.1:80 weight 26\n" in text
