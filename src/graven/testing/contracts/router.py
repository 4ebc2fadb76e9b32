"""The Router port's contract: what every adapter must do, written once.

Each adapter's tests subclass ``RouterContract`` (or ``RouterTrafficContract``, for
adapters that move real requests) and provide a ``harness`` fixture; the class name
shows in every test id::

    class TestMyRouter(RouterTrafficContract):
        @pytest.fixture
        def harness(self, tmp_path: Path) -> Iterator[RouterHarness]:
            router = MyRouter(tmp_path / "state")
            h = ProcessHarness(router, lambda service: [router.pid(service)])
            try:
                yield h
            finally:
                h.close()

``FakeHarness`` drives ``FakeRouter``; ``ProcessHarness`` any adapter that runs router
processes, with ``EchoBackend`` servers as its backends. The suite needs pytest.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import pytest

from graven.errors import RouterError, UsageError
from graven.router.base import LATENCY_BOUNDS, Backend, BackendState, BackendStats, Router
from graven.testing.fakes import EchoBackend, FakeRouter
from graven.testing.net import eventually, free_port

__all__ = [
    "SERVICE",
    "FakeHarness",
    "ProcessHarness",
    "RouterContract",
    "RouterHarness",
    "RouterTrafficContract",
]

SERVICE = "web"


class RouterHarness(Protocol):
    """What the contract needs besides the router: backends, in-flight requests, identity."""

    router: Router

    def backend(self, name: str, state: BackendState = "ready", weight: int = 100) -> Backend: ...

    def hold(self, service: str, backend: Backend) -> contextlib.AbstractContextManager[None]:
        """Keep one request in flight on ``backend`` (the only ready one) while open."""
        ...

    def identity(self, service: str) -> object:
        """Changes whenever the service's router is (re)started."""
        ...

    def close(self) -> None: ...


class FakeHarness:
    """``FakeRouter`` with made-up backend addresses and counters set by hand."""

    def __init__(self) -> None:
        self.fake = FakeRouter()
        self.router: Router = self.fake
        self._next_port = 20000

    def backend(self, name: str, state: BackendState = "ready", weight: int = 100) -> Backend:
        self._next_port += 1
        return Backend(name, f"127.0.0.1:{self._next_port}", state, weight)

    @contextlib.contextmanager
    def hold(self, service: str, backend: Backend) -> Iterator[None]:
        self.fake.set_inflight(service, backend.id, 1)
        try:
            yield
        finally:
            self.fake.set_inflight(service, backend.id, 0)

    def identity(self, service: str) -> object:
        return self.fake.starts.get(service)

    def close(self) -> None:
        pass


class ProcessHarness:
    """An adapter that runs router processes: real backends, real requests.

    ``pids(service)`` lists the processes the adapter runs for ``service``, the router
    itself first (its pid is the identity); each one seen is killed at ``close``, so
    nothing the test started survives it.
    """

    def __init__(self, router: Router, pids: Callable[[str], Iterable[int | None]]) -> None:
        self.router = router
        self._pids_of = pids
        self.echoes: dict[str, EchoBackend] = {}
        self.pids: set[int] = set()

    def backend(self, name: str, state: BackendState = "ready", weight: int = 100) -> Backend:
        if name not in self.echoes:
            self.echoes[name] = EchoBackend(name)
        return self.echoes[name].backend(state, weight)

    @contextlib.contextmanager
    def hold(self, service: str, backend: Backend) -> Iterator[None]:
        echo = self.echoes[backend.id]
        port = self.router.running()[service]
        echo.gate.clear()
        before = echo.held
        result: list[int] = []

        def request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            try:
                conn.request("GET", "/hold")
                resp = conn.getresponse()
                resp.read()
                result.append(resp.status)
            finally:
                conn.close()

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        try:
            assert echo.wait_held(before + 1), "the held request never reached the backend"
            yield
        finally:
            echo.gate.set()
            thread.join(timeout=20)
        assert result == [200]

    def identity(self, service: str) -> object:
        pids = list(self._pids_of(service))
        self.pids.update(p for p in pids if p is not None)
        return pids[0] if pids else None

    def close(self) -> None:
        for service in list(self.router.running()):
            with contextlib.suppress(Exception):
                self.router.stop(service)
        for pid in self.pids:  # belt and braces: nothing we started survives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for echo in self.echoes.values():
            echo.close()


def _ensure(harness: RouterHarness, port: int | None = None, service: str = SERVICE) -> int:
    port = port or free_port()
    harness.router.ensure(service, port)
    harness.identity(service)
    return port


def _by_id(stats: list[BackendStats]) -> dict[str, BackendStats]:
    return {s.id: s for s in stats}


class RouterContract:
    """What every Router does: lifecycle, backend sets, draining. Subclass it per
    adapter (a ``Test...`` name) and override the ``harness`` fixture."""

    @pytest.fixture
    def harness(self) -> RouterHarness:
        raise NotImplementedError(f"{type(self).__name__} must define the 'harness' fixture")

    @pytest.fixture
    def router(self, harness: RouterHarness) -> Router:
        return harness.router

    # ----------------------------------------------------------------------- lifecycle

    def test_ensure_is_idempotent(self, harness: RouterHarness) -> None:
        port = _ensure(harness)
        first = harness.identity(SERVICE)
        harness.router.ensure(SERVICE, port)
        harness.router.ensure(SERVICE, port)
        assert harness.identity(SERVICE) == first
        assert harness.router.running() == {SERVICE: port}

    def test_ensure_on_another_port_moves_the_router_and_keeps_its_backends(
        self,
        harness: RouterHarness,
    ) -> None:
        _ensure(harness)
        backends = [harness.backend("a"), harness.backend("b", "drain", 50)]
        harness.router.set_backends(SERVICE, backends)
        first = harness.identity(SERVICE)

        new_port = _ensure(harness)

        assert harness.router.running() == {SERVICE: new_port}
        assert harness.identity(SERVICE) != first
        got = harness.router.stats(SERVICE)
        assert [(s.id, s.address, s.state) for s in got] == [
            ("a", backends[0].address, "ready"),
            ("b", backends[1].address, "drain"),
        ]

    def test_stop_is_idempotent(self, harness: RouterHarness) -> None:
        _ensure(harness)
        harness.router.stop(SERVICE)
        harness.router.stop(SERVICE)
        harness.router.stop("never-started")
        assert harness.router.running() == {}
        with pytest.raises(RouterError, match="no router is running"):
            harness.router.stats(SERVICE)

    def test_stop_forgets_the_backend_set(self, harness: RouterHarness) -> None:
        _ensure(harness)
        harness.router.set_backends(SERVICE, [harness.backend("a")])
        harness.router.stop(SERVICE)
        _ensure(harness)
        assert harness.router.stats(SERVICE) == []

    def test_running_lists_every_service(self, harness: RouterHarness) -> None:
        web, api = _ensure(harness, service="web"), _ensure(harness, service="api")
        assert harness.router.running() == {"web": web, "api": api}

    def test_a_port_held_by_another_router_is_refused(self, harness: RouterHarness) -> None:
        port = _ensure(harness, service="web")
        with pytest.raises(RouterError, match=str(port)):
            harness.router.ensure("api", port)
        assert harness.router.running() == {"web": port}

    def test_calls_before_ensure_raise_router_error(self, router: Router) -> None:
        with pytest.raises(RouterError, match="no router is running for service 'web'"):
            router.stats(SERVICE)
        with pytest.raises(RouterError, match="no router is running"):
            router.set_backends(SERVICE, [Backend("a", "127.0.0.1:9")])

    @pytest.mark.parametrize("bad", ["Web", "", "a b", "../etc", "x" * 64])
    def test_invalid_service_names_are_usage_errors(self, router: Router, bad: str) -> None:
        with pytest.raises(UsageError, match="not a valid service name"):
            router.ensure(bad, free_port())

    @pytest.mark.parametrize("port", [0, -1, 65536])
    def test_invalid_ports_are_usage_errors(self, router: Router, port: int) -> None:
        with pytest.raises(UsageError, match="port must be 1-65535"):
            router.ensure(SERVICE, port)

    # ----------------------------------------------------------------------- backend sets

    def test_set_backends_and_stats_round_trip(self, harness: RouterHarness) -> None:
        _ensure(harness)
        a, b = harness.backend("a", weight=30), harness.backend("b", "drain", 70)
        harness.router.set_backends(SERVICE, [a, b])

        core = [
            (s.id, s.address, s.state, s.inflight, s.requests, s.errors)
            for s in harness.router.stats(SERVICE)
        ]
        assert core == [("a", a.address, "ready", 0, 0, 0), ("b", b.address, "drain", 0, 0, 0)]
        # Idle backends left out of the next set are forgotten at once.
        harness.router.set_backends(SERVICE, [harness.backend("b")])
        assert [(s.id, s.state) for s in harness.router.stats(SERVICE)] == [("b", "ready")]
        harness.router.set_backends(SERVICE, [])
        assert harness.router.stats(SERVICE) == []

    def test_stats_report_the_configured_weights(self, harness: RouterHarness) -> None:
        _ensure(harness)
        a, b = harness.backend("a", weight=30), harness.backend("b", "drain", 700)
        harness.router.set_backends(SERVICE, [a, b])
        got = _by_id(harness.router.stats(SERVICE))
        assert (got["a"].weight, got["b"].weight) == (30, 700)
        assert (got["a"].responses_5xx, got["a"].latency_buckets) == (
            0,
            (0,) * (len(LATENCY_BOUNDS) + 1),
        )
        harness.router.set_backends(SERVICE, [harness.backend("a", weight=1000)])
        assert [(s.id, s.weight) for s in harness.router.stats(SERVICE)] == [("a", 1000)]

    @pytest.mark.parametrize(
        ("backends", "message"),
        [
            ([Backend("a", "127.0.0.1:1"), Backend("a", "127.0.0.1:2")], "duplicate id 'a'"),
            ([Backend("a", "127.0.0.1:1", weight=5000)], r"weight: must be 0-1000 \(got 5000\)"),
            ([Backend("a", "127.0.0.1:1", weight=-1)], "weight: must be 0-1000"),
            ([Backend("a", "no-port")], "address: expected host:port"),
            ([Backend("a", "127.0.0.1:70000")], "port must be 1-65535"),
            ([Backend("a b", "127.0.0.1:1")], r"backends\[0\].id"),
            ([Backend("a", "127.0.0.1:1", state="gone")], "state: expected 'ready' or 'drain'"),  # type: ignore[arg-type]
        ],
    )
    def test_an_invalid_backend_set_is_refused_and_the_old_one_kept(
        self, harness: RouterHarness, backends: list[Backend], message: str
    ) -> None:
        _ensure(harness)
        harness.router.set_backends(SERVICE, [harness.backend("ok")])
        before = harness.router.stats(SERVICE)
        with pytest.raises(RouterError, match=message):
            harness.router.set_backends(SERVICE, backends)
        assert harness.router.stats(SERVICE) == before

    def test_a_drained_backend_stays_visible_while_requests_are_in_flight(
        self, harness: RouterHarness
    ) -> None:
        _ensure(harness)
        a = harness.backend("a")
        harness.router.set_backends(SERVICE, [a])
        with harness.hold(SERVICE, a):
            harness.router.set_backends(SERVICE, [harness.backend("a", "drain")])
            assert _by_id(harness.router.stats(SERVICE))["a"].state == "drain"
            assert _by_id(harness.router.stats(SERVICE))["a"].inflight == 1
        assert eventually(lambda: _by_id(harness.router.stats(SERVICE))["a"].inflight == 0)
        assert _by_id(harness.router.stats(SERVICE))["a"].state == "drain"

    def test_a_removed_backend_lingers_as_drain_until_idle(self, harness: RouterHarness) -> None:
        _ensure(harness)
        a, b = harness.backend("a"), harness.backend("b")
        harness.router.set_backends(SERVICE, [a])
        with harness.hold(SERVICE, a):
            harness.router.set_backends(SERVICE, [b])
            stats = _by_id(harness.router.stats(SERVICE))
            assert (stats["a"].state, stats["a"].inflight) == ("drain", 1)
            assert stats["b"].state == "ready"
        assert eventually(lambda: [s.id for s in harness.router.stats(SERVICE)] == ["b"])

    def test_a_lingering_backend_that_comes_back_is_configured_again(
        self, harness: RouterHarness
    ) -> None:
        _ensure(harness)
        a, b = harness.backend("a"), harness.backend("b")
        harness.router.set_backends(SERVICE, [a])
        with harness.hold(SERVICE, a):
            harness.router.set_backends(SERVICE, [b])
            harness.router.set_backends(SERVICE, [b, a])
            assert [(s.id, s.state) for s in harness.router.stats(SERVICE)] == [
                ("b", "ready"),
                ("a", "ready"),
            ]
        assert eventually(lambda: _by_id(harness.router.stats(SERVICE))["a"].inflight == 0)
        assert [s.id for s in harness.router.stats(SERVICE)] == ["b", "a"]


class RouterTrafficContract(RouterContract):
    """The data-plane half as well: real requests through the router to real backends.
    For adapters that move traffic (``ProcessHarness``)."""

    # ----------------------------------------------------------------------- real traffic

    def test_requests_go_to_ready_backends_and_are_counted(self, harness: RouterHarness) -> None:
        port = _ensure(harness)
        harness.router.set_backends(SERVICE, [harness.backend("a"), harness.backend("b", "drain")])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(10):
                conn.request("GET", "/")
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, b"a\n")
                assert resp.getheader("X-Graven-Backend") == "a"
        finally:
            conn.close()
        stats = _by_id(harness.router.stats(SERVICE))
        assert (stats["a"].requests, stats["a"].errors) == (10, 0)
        assert stats["b"].requests == 0

    def test_backend_errors_are_counted(self, harness: RouterHarness) -> None:
        port = _ensure(harness)
        harness.router.set_backends(SERVICE, [harness.backend("a")])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for path in ("/status?code=500", "/status?code=404", "/"):
                conn.request("GET", path)
                conn.getresponse().read()
        finally:
            conn.close()
        stats = _by_id(harness.router.stats(SERVICE))["a"]
        assert (stats.requests, stats.errors) == (3, 1)

    def test_5xx_answers_and_latencies_are_reported(self, harness: RouterHarness) -> None:
        port = _ensure(harness)
        harness.router.set_backends(SERVICE, [harness.backend("a")])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for path in ("/status?code=503", "/slow?ms=30", "/slow?ms=30", "/"):
                conn.request("GET", path)
                conn.getresponse().read()
        finally:
            conn.close()
        # Requests are counted when they end; a router may record their timing a moment later.
        assert eventually(
            lambda: sum(_by_id(harness.router.stats(SERVICE))["a"].latency_buckets) == 4
        ), harness.router.stats(SERVICE)
        stats = _by_id(harness.router.stats(SERVICE))["a"]
        assert (stats.requests, stats.errors, stats.responses_5xx) == (4, 1, 1)
        assert len(stats.latency_buckets) == len(LATENCY_BOUNDS) + 1
        # The two slow requests took at least 30 ms: they sit above the 20 ms bound (on a
        # busy machine the quick ones may join them).
        assert sum(stats.latency_buckets[LATENCY_BOUNDS.index(0.02) + 1 :]) >= 2
