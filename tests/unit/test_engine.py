"""The controller's engine against fakes: fast, no processes, no sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from graven.controller.engine import Engine
from graven.controller.results import DeployResult
from graven.errors import NotFoundError, UsageError
from graven.ledger.chain import verify_chain
from graven.model import Digest, HealthCheck, ImageConfig, ServiceConfig
from graven.store.cas import ContentStore
from graven.store.tree_model import Tree
from graven.testing.clock import FakeClock
from graven.testing.fakes import FakeRouter
from graven.testing.runtime import FakeRuntime
from graven.testing.state import MemoryStateStore


def config(replicas: int = 3, **kw: object) -> ServiceConfig:
    return ServiceConfig(replicas=replicas, port=18080, health=HealthCheck(start_timeout=5), **kw)  # type: ignore[arg-type]


class World:
    def __init__(self, tmp: Path) -> None:
        self.state = MemoryStateStore()
        self.store = ContentStore(tmp / "store")
        self.runtime = FakeRuntime()
        self.router = FakeRouter()
        self.clock = FakeClock()
        self.engine = self.make_engine(tmp)
        rootfs = self.store.put_tree(Tree.of([]))
        self.v1 = self.store.put_image(rootfs, ImageConfig(entrypoint=("app", "v1"))).digest
        self.v2 = self.store.put_image(rootfs, ImageConfig(entrypoint=("app", "v2"))).digest

    def make_engine(self, tmp: Path) -> Engine:
        return Engine(
            tmp,
            self.state,
            self.store,
            self.runtime,
            self.router,
            self.clock,
            probe=self.runtime.probe,
        )

    def deploy(
        self, image: Digest, cfg: ServiceConfig | None = None, why: str = "test"
    ) -> DeployResult:
        return self.engine.commands.deploy(
            "web", image, "web", cfg or config(), "ana@host", why, {}
        )

    def converge(self, passes: int = 10) -> None:
        async def go() -> None:
            for _ in range(passes):
                await self.engine.reconcile("web")
                if self.engine.plan("web").empty and self.state.running_rollout("web") is None:
                    return

        asyncio.run(go())

    def serving(self) -> list[tuple[int, str]]:
        return sorted((i.release, i.state) for i in self.state.live_instances("web"))

    def routed(self) -> set[str]:
        return {s.id for s in self.router.stats("web") if s.state == "ready"}


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_deploy_converges_and_records(world: World) -> None:
    out = world.deploy(world.v1)
    assert out.changed is True and out.release == "web@r1"
    world.converge()
    assert world.serving() == [(1, "healthy")] * 3
    assert world.routed() == {i.id for i in world.state.live_instances("web")}
    assert world.state.rollout(out.rollout).state == "succeeded"
    entries = world.state.ledger()
    assert [(e.action, e.release, e.actor, e.message) for e in entries] == [
        ("deploy", "web@r1", "ana@host", "test")
    ]
    verify_chain(entries)


def test_same_deploy_twice_is_a_no_op(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    started = len(world.runtime.started)
    again = world.deploy(world.v1, why="again")
    assert again.changed is False
    world.converge()
    assert len(world.runtime.started) == started
    assert len(world.state.ledger()) == 1


def test_new_release_replaces_every_instance(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    old = {i.id for i in world.state.live_instances("web")}
    world.deploy(world.v2)
    world.converge()
    new = {i.id for i in world.state.live_instances("web")}
    assert world.serving() == [(2, "healthy")] * 3
    assert not old & new
    # Every old backend was drained before it was stopped.
    for inst in old:
        states = [
            next((b.state for b in bs if b.id == inst), None) for svc, bs in world.router.history
        ]
        assert "drain" in states, inst
        assert states.index("drain") < len(states) - 1 and states[-1] is None


def test_failed_health_rolls_back_and_says_why(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    v1_ids = {i.id for i in world.state.live_instances("web")}
    world.runtime.unhealthy_releases.add(2)
    out = world.deploy(world.v2)
    world.converge()
    rollout = world.state.rollout(out.rollout)
    assert rollout.state == "failed"
    assert "did not pass health check GET /healthz" in rollout.reason
    assert world.state.desired_release("web") == 1
    assert {i.id for i in world.state.live_instances("web")} == v1_ids
    actions = [e.action for e in world.state.ledger()]
    assert actions == ["deploy", "deploy", "rollout-failed"]


def test_rollback_goes_to_the_release_that_served_before(world: World) -> None:
    with pytest.raises(NotFoundError):
        world.engine.commands.rollback("web", None, "ana", "why")
    world.deploy(world.v1)
    world.converge()
    with pytest.raises(UsageError, match="no earlier release"):
        world.engine.commands.rollback("web", None, "ana", "why")
    world.deploy(world.v2)
    world.converge()
    out = world.engine.commands.rollback("web", None, "ana", "bad v2")
    assert out.release == "web@r1"
    world.converge()
    assert world.serving() == [(1, "healthy")] * 3
    # Rolling back again swaps back to r2.
    assert world.engine.commands.rollback_target("web") == 2


def test_restart_adopts_live_instances_and_forgets_dead_ones(world: World, tmp_path: Path) -> None:
    world.deploy(world.v1)
    world.converge()
    live = world.state.live_instances("web")
    world.runtime.kill(live[0].pid)
    restarted = world.make_engine(tmp_path)
    restarted.adopt()
    assert {i.id for i in world.state.live_instances("web")} == {i.id for i in live[1:]}
    world.engine = restarted
    started = len(world.runtime.started)
    world.converge()
    assert len(world.runtime.started) == started + 1  # replaces only the dead one
    assert world.serving() == [(1, "healthy")] * 3


def test_unhealthy_instance_is_taken_out_and_replaced(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    victim = world.state.live_instances("web")[0]
    world.runtime.healthy_ports.discard(victim.port)

    async def watch() -> None:
        for _ in range(5):
            world.clock.advance(1.0)
            await world.engine.health_watch.check_once()

    asyncio.run(watch())
    assert victim.id not in world.routed()
    world.converge()
    assert victim.id not in {i.id for i in world.state.live_instances("web")}
    assert world.serving() == [(1, "healthy")] * 3


def test_down_stops_everything_and_the_router(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    world.engine.commands.down("web", "ana", "done")
    world.converge()
    assert world.state.live_instances("web") == []
    assert world.router.running() == {}
    assert [e.action for e in world.state.ledger()] == ["deploy", "down"]


def test_deploy_refuses_an_image_the_store_lacks(world: World) -> None:
    with pytest.raises(Exception, match="sha256"):
        world.deploy(Digest("sha256:" + "0" * 64))
    assert world.state.ledger() == []


def test_ledger_head_follows_every_change_in_and_out_of_the_loop(world: World) -> None:
    import json

    def head() -> tuple[int, str]:
        raw = json.loads((world.engine.state_dir / "ledger.head").read_text())
        return int(raw["seq"]), str(raw["hash"])

    world.deploy(world.v1)
    world.converge()
    world.deploy(world.v2)
    world.converge()
    assert head() == (2, world.state.ledger()[-1].hash)  # written at once outside a loop

    async def in_the_controller() -> None:
        world.engine.commands.rollback("web", None, "ana", "why")
        # In the loop the head is written off the loop's thread, after the reply.
        for _ in range(1000):
            if head()[0] == 3:
                return
            await asyncio.sleep(0.001)

    asyncio.run(in_the_controller())
    entries = world.state.ledger()
    assert head() == (3, entries[-1].hash)
    assert verify_chain(entries, head()) == 3
