"""The controller's upkeep of the state dir (graven.controller.upkeep, and the engine's
``keep_state_dir``, which the health loop calls about once a second): the logs of live
instances and routers are bounded, free space is measured and shown in status."""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from graven.controller import daemon
from graven.controller.api import Api
from graven.controller.engine import Engine
from graven.controller.paths import controller_log
from graven.controller.upkeep import log_files
from graven.ledger.sqlite import SqliteStateStore
from graven.logfiles import LogLimits, RotatingStreamHandler
from graven.model import HealthCheck, ImageConfig, ServiceConfig
from graven.router.embedded import EmbeddedRouter
from graven.router.haproxy.adapter import HAProxyRouter
from graven.runtime.process import ProcessRuntime
from graven.store.cas import ContentStore
from graven.store.tree_model import Tree
from graven.testing.clock import FakeClock
from graven.testing.fakes import FakeRouter
from graven.testing.runtime import FakeRuntime


class LoggingRuntime(FakeRuntime):
    def __init__(self, logs: Path) -> None:
        super().__init__()
        self.logs = logs

    def log_path(self, instance_id: str) -> Path:
        return self.logs / f"{instance_id}.log"


class LoggingRouter(FakeRouter):
    def __init__(self, logs: Path) -> None:
        super().__init__()
        self.logs = logs

    def log_path(self, service: str) -> Path:
        return self.logs / f"router-{service}.log"


class World(NamedTuple):
    engine: Engine
    runtime: LoggingRuntime
    router: LoggingRouter


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setenv("GRAVEN_LOG_MAX_BYTES", "4K")
    monkeypatch.setenv("GRAVEN_LOG_KEEP", "1")
    monkeypatch.setenv("GRAVEN_STATE_MIN_FREE", "1")
    logs = tmp_path / "logs"
    logs.mkdir()
    state = SqliteStateStore(tmp_path / "state.db")
    store = ContentStore(tmp_path / "store")
    runtime, router = LoggingRuntime(logs), LoggingRouter(logs)
    engine = Engine(tmp_path, state, store, runtime, router, FakeClock(), probe=runtime.probe)
    image = store.put_image(store.put_tree(Tree.of([])), ImageConfig(entrypoint=("app",))).digest
    cfg = ServiceConfig(replicas=2, port=18080, health=HealthCheck(start_timeout=5))
    engine.commands.deploy("web", image, "web", cfg, "ana@host", "test", {})

    async def converge() -> None:
        for _ in range(10):
            await engine.reconcile("web")

    asyncio.run(converge())
    assert len(state.live_instances("web")) == 2
    return World(engine, runtime, router)


def test_limits_are_read_from_the_environment(world: World) -> None:
    assert world.engine.upkeep.limits == LogLimits(4096, 1)


def test_a_pass_bounds_the_logs_of_live_instances_and_routers(world: World) -> None:
    logs = [world.runtime.log_path(i.id) for i in world.engine.state.live_instances("web")]
    logs.append(world.router.log_path("web"))
    for path in logs:
        path.write_bytes(b"chatter\n" * 10_000)
    gone = world.runtime.logs / "web-r9-gone.log"  # not a live instance's: left alone
    gone.write_bytes(b"chatter\n" * 10_000)
    world.engine.keep_state_dir()
    for path in logs:
        assert path.stat().st_size == 0
        assert 0 < path.with_name(path.name + ".1").stat().st_size <= 4096
    assert gone.stat().st_size == 80_000


def test_owners_without_logs_are_skipped() -> None:
    assert log_files(FakeRuntime(), ["web-r1-abcd"]) == []


def test_the_real_runtime_and_routers_have_their_logs_bounded(tmp_path: Path) -> None:
    runtime = ProcessRuntime(tmp_path, ContentStore(tmp_path / "store"))
    assert log_files(runtime, ["web-r1-abcd"]) == [tmp_path / "instances/web-r1-abcd/log"]
    assert log_files(EmbeddedRouter(tmp_path), ["web"]) == [tmp_path / "routers/web.log"]
    assert log_files(HAProxyRouter(tmp_path), ["web"]) == [tmp_path / "haproxy/web/haproxy.log"]


def test_status_reports_the_state_dir(world: World, tmp_path: Path) -> None:
    engine = world.engine
    api = Api(engine, lambda: None)
    reply = asyncio.run(api.status({}, {})).state_dir
    assert reply is not None
    assert reply.path == str(tmp_path)
    assert reply.problem is None
    assert reply.free_bytes is not None and reply.free_bytes > 0

    engine.upkeep.disk.probe = lambda path: False  # writes keep failing
    engine.upkeep.disk.refused(OSError(errno.ENOSPC, "No space left on device"))
    full = asyncio.run(api.status({}, {})).state_dir
    assert full is not None and full.problem is not None
    assert full.problem.startswith(f"state dir {tmp_path} is full")


@pytest.mark.parametrize("appending", [True, False])
def test_the_controller_rotates_its_log_only_when_stderr_appends_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, appending: bool
) -> None:
    path = controller_log(tmp_path)
    root = logging.getLogger()
    saved = root.handlers[:]
    with path.open("a" if appending else "w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        root.handlers.clear()
        try:
            daemon._log_to_stderr(tmp_path)
            (handler,) = root.handlers
        finally:
            root.handlers[:] = saved
    assert isinstance(handler, RotatingStreamHandler) is appending
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is stream  # crash tracebacks on stderr still land in the log
