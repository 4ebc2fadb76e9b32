"""Rollout gates on a fake clock: timed pauses, promotes, and waits a new desire ends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from graven.model import CanaryConfig
from graven.plan.steps import Pause
from graven.rollout.gates import Gates
from tests.unit.test_engine import World, config


class NoWorker:
    def wake_event(self, service: str) -> asyncio.Event | None:
        return None


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def gates_of(world: World) -> Gates:
    return Gates(world.state, world.router, world.clock, NoWorker())


def test_hold_waits_its_time_unless_the_desire_changes(world: World) -> None:
    world.deploy(world.v1, config(replicas=1))
    gates = gates_of(world)
    start = world.clock.monotonic()
    assert asyncio.run(gates.hold("web", 5.0, lambda: False)) is True
    assert world.clock.monotonic() - start == pytest.approx(5.0)

    def new_desire() -> bool:  # a deploy lands while it waits
        if world.state.desired_release("web") == 1:
            world.deploy(world.v2, config(replicas=1))
        return False

    start = world.clock.monotonic()
    assert asyncio.run(gates.hold("web", 5.0, new_desire)) is False
    assert world.clock.monotonic() - start < 5.0


def test_a_timed_pause_is_recorded_done_and_not_repeated(world: World) -> None:
    out = world.deploy(world.v1, config(replicas=1, strategy=CanaryConfig()))
    assert out.rollout is not None
    gates = gates_of(world)
    cfg = world.state.release("web", 1).config
    step = Pause(10.0, "canary step 1")
    asyncio.run(gates.pause("web", step, world.state.rollout(out.rollout), cfg))
    ro = world.state.rollout(out.rollout)
    assert ro.paused_until is None
    assert ro.gate.pause is not None and ro.gate.pause.done is True
    # Applied again (a restarted controller): done already, no second wait.
    before = world.clock.monotonic()
    asyncio.run(gates.pause("web", step, ro, cfg))
    assert world.clock.monotonic() == before


def test_a_promote_ends_a_pause_until_promoted(world: World) -> None:
    out = world.deploy(world.v1, config(replicas=1))
    assert out.rollout is not None
    gates = gates_of(world)
    with world.state.transaction() as tx:
        tx.set_rollout_promoted(out.rollout, True)
    assert asyncio.run(gates.await_promote("web", out.rollout, "manual gate")) is True
    assert world.state.rollout(out.rollout).progress.startswith("paused: manual gate")
