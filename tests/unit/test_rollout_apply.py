"""The plan applier's table: every step type has a handler, each handler does its step."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

from graven.errors import InternalError
from graven.ledger.state import PauseGate, RolloutGate
from graven.plan import steps
from graven.plan.steps import (
    RecordProgress,
    RouteTraffic,
    SetWeights,
    StartInstance,
    Step,
    StopInstance,
)
from graven.rollout.apply import Applier
from tests.unit.test_engine import World, config


class Host:
    """Records what the applier asks of the controller."""

    def __init__(self) -> None:
        self.synced: list[str] = []
        self.stopped: list[str] = []

    def wake_event(self, service: str) -> asyncio.Event | None:
        return None

    def sync_router(self, service: str) -> None:
        self.synced.append(service)

    def sync_preview(self, service: str, port: int) -> None:
        pass

    def deadline_hit(self, service: str) -> str | None:
        return None

    def notify(self, service: str) -> None:
        pass

    def instance_stopped(self, inst_id: str) -> None:
        self.stopped.append(inst_id)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def applier_of(world: World, host: Host) -> Applier:
    return Applier(
        world.state,
        world.store,
        world.runtime,
        world.router,
        world.clock,
        world.runtime.probe,
        world.engine.secrets.reveal_env,
        host,
    )


def step_classes() -> set[type]:
    """Every step the plan module defines: the frozen dataclasses with a ``kind``."""
    return {
        cls
        for _, cls in inspect.getmembers(steps, inspect.isclass)
        if cls.__module__ == steps.__name__
        and dataclasses.is_dataclass(cls)
        and any(f.name == "kind" for f in dataclasses.fields(cls))
    }


def test_every_step_class_is_a_step() -> None:
    assert step_classes() == set(typing.get_args(Step))


def test_every_step_type_has_a_handler(world: World) -> None:
    assert set(applier_of(world, Host()).handlers) == set(typing.get_args(Step))


def test_a_step_without_a_handler_is_refused(world: World) -> None:
    @dataclasses.dataclass(frozen=True)
    class Teleport:
        kind: str = "teleport"

    with pytest.raises(InternalError, match="no handler for plan step"):
        asyncio.run(applier_of(world, Host()).apply("web", Teleport(), {}))  # type: ignore[arg-type]


def test_start_binds_its_slot_and_later_steps_use_it(world: World) -> None:
    world.deploy(world.v1, config(replicas=1))
    host = Host()
    applier = applier_of(world, host)
    slots: dict[str, str] = {}

    async def go() -> None:
        await applier.apply("web", StartInstance("new-1", 1), slots)
        await applier.apply("web", RouteTraffic("new-1"), slots)

    asyncio.run(go())
    [inst] = world.state.live_instances("web")
    assert slots == {"new-1": inst.id}
    assert inst.state == "healthy"
    assert host.synced == ["web"]


def test_set_weights_writes_only_live_instances(world: World) -> None:
    world.deploy(world.v1, config(replicas=1))
    world.converge()
    [inst] = world.state.live_instances("web")
    host = Host()
    step = SetWeights(((inst.id, 30), ("web-r9-gone", 70)))
    asyncio.run(applier_of(world, host).apply("web", step, {}))
    assert world.state.weights("web") == {inst.id: 30}
    assert host.synced == ["web"]


def test_stop_stops_the_process_and_forgets_its_health(world: World) -> None:
    world.deploy(world.v1, config(replicas=1))
    world.converge()
    [inst] = world.state.live_instances("web")
    host = Host()
    asyncio.run(applier_of(world, host).apply("web", StopInstance(inst.id), {}))
    assert world.state.live_instances("web") == []
    assert host.stopped == [inst.id]


def test_record_progress_moves_the_canary_step_and_clears_its_gate(world: World) -> None:
    out = world.deploy(world.v1, config(replicas=1))
    rollout = out.rollout
    with world.state.transaction() as tx:
        tx.set_rollout_gate(rollout, RolloutGate(pause=PauseGate(until=1.0, done=True)))
    asyncio.run(applier_of(world, Host()).apply("web", RecordProgress(2, 3), {}))
    ro = world.state.rollout(rollout)
    assert (ro.step_index, ro.gate) == (2, RolloutGate())
