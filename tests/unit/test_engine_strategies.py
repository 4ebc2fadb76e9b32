"""Blue-green and canary rollouts through the controller's engine, on fakes: fast,
no processes, a fake clock (waits advance time instead of sleeping)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from graven.model import AnalysisConfig, BlueGreenConfig, CanaryConfig, CanaryStep, ServiceConfig
from graven.testing.clock import FakeClock
from tests.unit.test_engine import World, config


class TrafficClock(FakeClock):
    """A fake clock under which every wait also moves fake traffic through the router."""

    def __init__(self) -> None:
        super().__init__()
        self.on_sleep: Callable[[float], None] | None = None

    async def sleep(self, seconds: float) -> None:
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        await super().sleep(seconds)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.clock = TrafficClock()
    w.engine = w.make_engine(tmp_path)
    return w


def blue_green(**kw: Any) -> ServiceConfig:
    return config(replicas=2, strategy=BlueGreenConfig(rollback_window=1000.0, **kw))


def canary(steps: tuple[tuple[int, float | None, bool], ...], **analysis: Any) -> ServiceConfig:
    return config(
        replicas=2,
        strategy=CanaryConfig(
            steps=tuple(CanaryStep(*s) for s in steps), analysis=AnalysisConfig(**analysis)
        ),
    )


def weights_by_release(world: World) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    table = world.state.weights("web")
    for inst in world.state.live_instances("web"):
        if inst.state == "healthy":
            out.setdefault(inst.release, []).append(table.get(inst.id, 100))
    return {r: sorted(w) for r, w in sorted(out.items())}


async def until(check: Callable[[], bool], task: asyncio.Task[None], limit: int = 200_000) -> None:
    for _ in range(limit):
        if check():
            return
        if task.done():
            task.result()
            assert check(), "the rollout ended without reaching the expected point"
            return
        await asyncio.sleep(0)
    raise AssertionError("never reached the expected point")


def rollout_state(world: World, rollout: int | None) -> str:
    assert rollout is not None
    return world.state.rollout(rollout).state


def test_blue_green_switches_at_once_and_rolls_back_by_a_switch(world: World) -> None:
    world.deploy(world.v1, blue_green())
    world.converge()
    assert weights_by_release(world) == {1: [100, 100]}
    out = world.deploy(world.v2, blue_green())

    async def scenario() -> None:
        task = asyncio.create_task(world.engine.reconcile("web"))
        await until(lambda: rollout_state(world, out.rollout) == "succeeded", task)
        # All live traffic on r2 in one change; r1 warm and idle, not stopped.
        assert weights_by_release(world) == {1: [0, 0], 2: [100, 100]}
        started = len(world.runtime.started)
        back = world.engine.commands.rollback("web", None, "ana", "bad v2")
        await task
        await world.engine.reconcile("web")
        assert weights_by_release(world)[1] == [100, 100]
        assert world.state.rollout(back.rollout).state == "succeeded"
        assert len(world.runtime.started) == started, "a rollback in the window starts nothing"

    asyncio.run(scenario())


def test_blue_green_waits_for_promote(world: World) -> None:
    world.deploy(world.v1, blue_green())
    world.converge()
    out = world.deploy(world.v2, blue_green(auto_promote=False))

    async def scenario() -> None:
        task = asyncio.create_task(world.engine.reconcile("web"))
        rid = out.rollout
        await until(lambda: world.state.rollout(rid).progress.startswith("paused"), task)
        # The new set runs but takes no live traffic until promoted.
        assert weights_by_release(world) == {1: [100, 100], 2: [0, 0]}
        world.engine.commands.promote("web", "ana", "looks good")
        await until(lambda: world.state.rollout(rid).state == "succeeded", task)
        assert weights_by_release(world) == {1: [0, 0], 2: [100, 100]}
        task.cancel()

    asyncio.run(scenario())
    assert [e.action for e in world.state.ledger()] == ["deploy", "deploy", "promote"]


def shares_seen(world: World) -> set[int]:
    """Canary shares (percent of weight on r2) the router was given, over time."""
    releases = {s.instance_id: s.release for s in world.runtime.started}
    seen = set()
    for _, backends in world.router.history:
        ready = [b for b in backends if b.state == "ready"]
        total = sum(b.weight for b in ready)
        if total and any(releases.get(b.id) == 1 for b in ready):
            seen.add(round(100 * sum(b.weight for b in ready if releases.get(b.id) == 2) / total))
    return seen


def test_canary_walks_its_steps_to_full_replacement(world: World) -> None:
    world.deploy(world.v1, canary(((50, 0.0, False),)))
    world.converge()
    world.deploy(world.v2, canary(((25, 10.0, False), (50, 0.0, False))))
    world.converge(passes=20)
    assert weights_by_release(world) == {2: [100, 100]}
    assert {25, 50} <= shares_seen(world)


def test_failing_canary_aborts_with_its_reason_and_goes_back(world: World) -> None:
    world.deploy(world.v1, canary(((50, 0.0, False),)))
    world.converge()
    v1_ids = {i.id for i in world.state.live_instances("web")}
    releases = {s.instance_id: s.release for s in world.runtime.started}

    def traffic(seconds: float) -> None:
        if "web" not in world.router.running():
            return
        releases.update({s.instance_id: s.release for s in world.runtime.started})
        for b in world.router.stats("web"):
            if b.state == "ready" and b.weight > 0:
                bad = releases.get(b.id) == 2
                world.router.count("web", b.id, requests=10, errors=5 if bad else 0, latency=0.01)

    assert isinstance(world.clock, TrafficClock)
    world.clock.on_sleep = traffic
    out = world.deploy(world.v2, canary(((50, 0.0, True),), window=5.0, min_requests=20))
    world.converge(passes=20)
    rollout = world.state.rollout(out.rollout)
    assert rollout.state == "failed"
    assert rollout.reason.startswith("analysis failed:")
    assert "5xx" in rollout.reason or "error" in rollout.reason
    assert world.state.desired_release("web") == 1
    assert {i.id for i in world.state.live_instances("web")} == v1_ids
    assert weights_by_release(world) == {1: [100, 100]}
    failed = [e for e in world.state.ledger() if e.action == "rollout-failed"]
    assert failed and failed[0].message == rollout.reason


def test_abort_names_who_and_why(world: World) -> None:
    world.deploy(world.v1, blue_green())
    world.converge()
    out = world.deploy(world.v2, blue_green(auto_promote=False))

    async def scenario() -> None:
        task = asyncio.create_task(world.engine.reconcile("web"))
        rid = out.rollout
        await until(lambda: world.state.rollout(rid).progress.startswith("paused"), task)
        world.engine.commands.abort("web", "ana@host", "saw errors in preview")
        await task

    asyncio.run(scenario())
    world.converge(passes=20)
    rollout = world.state.rollout(out.rollout)
    assert rollout.state == "aborted"
    assert rollout.reason == "aborted by ana@host: saw errors in preview"
    assert weights_by_release(world) == {1: [100, 100]}
    assert world.state.ledger()[-1].action == "abort"


def test_plan_shows_the_strategy_steps_before_anything_runs(world: World) -> None:
    world.deploy(world.v1, blue_green())
    world.converge()
    started = len(world.runtime.started)
    preview = world.engine.commands.preview("web", world.v2, blue_green(auto_promote=False))
    described = [s.description for s in preview.steps.steps]
    assert any("pause until 'graven promote web'" in d for d in described)
    assert any("switch all live traffic to web@r2" in d for d in described)
    canary_plan = world.engine.commands.preview("web", world.v2, canary(((20, 5.0, True),)))
    kinds = [s.kind for s in canary_plan.steps.steps]
    assert "analyze" in kinds and "set-weights" in kinds
    assert len(world.runtime.started) == started  # planning starts nothing


def test_a_restarted_controller_resumes_the_analysis_window_it_was_in(
    world: World, tmp_path: Path
) -> None:
    """The canary errs only before the controller dies, 20 s into a 60 s window. Judged
    over the whole window it fails; a window restarted from zero would pass it. The
    30 s pause before the analysis had finished, and is not waited again."""
    world.deploy(world.v1, canary(((50, 0.0, False),)))
    world.converge()
    releases = {s.instance_id: s.release for s in world.runtime.started}
    erring = [True]

    def traffic(seconds: float) -> None:
        if "web" not in world.router.running():
            return
        releases.update({s.instance_id: s.release for s in world.runtime.started})
        for b in world.router.stats("web"):
            if b.state == "ready" and b.weight > 0:
                bad = erring[0] and releases.get(b.id) == 2
                world.router.count("web", b.id, requests=10, errors=5 if bad else 0, latency=0.01)

    assert isinstance(world.clock, TrafficClock)
    world.clock.on_sleep = traffic
    out = world.deploy(world.v2, canary(((50, 30.0, True),), window=60.0, min_requests=20))
    rid = out.rollout

    def window_start() -> float | None:
        analysis = world.state.rollout(rid).gate.analysis
        return analysis.started_at if analysis else None

    async def until_killed() -> None:
        task = asyncio.create_task(world.engine.reconcile("web"))
        await until(lambda: window_start() is not None, task)
        start = window_start()
        assert start is not None
        await until(lambda: world.clock.now() >= start + 20.0, task)
        task.cancel()  # the controller dies
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(until_killed())
    erring[0] = False
    died_at = world.clock.now()
    world.engine = world.make_engine(tmp_path)  # a new controller, same state
    world.converge(passes=20)

    rollout = world.state.rollout(rid)
    assert rollout.state == "failed", rollout
    assert rollout.reason.startswith("analysis failed:")
    # It waited out the 40 s left of the window, not a new 30 s pause plus 60 s window.
    assert world.clock.now() - died_at < 60.0


def test_an_aborted_blue_green_stops_its_preview_router(world: World) -> None:
    world.deploy(world.v1, blue_green(preview_port=9901))
    world.converge()
    out = world.deploy(world.v2, blue_green(auto_promote=False, preview_port=9901))

    async def scenario() -> None:
        task = asyncio.create_task(world.engine.reconcile("web"))
        rid = out.rollout
        await until(lambda: world.state.rollout(rid).progress.startswith("paused"), task)
        assert world.router.running().get("web-preview") == 9901
        world.engine.commands.abort("web", "ana@host", "preview looks wrong")
        await task

    asyncio.run(scenario())
    world.converge(passes=20)
    assert "web-preview" not in world.router.running()
    assert weights_by_release(world) == {1: [100, 100]}


def test_down_in_a_paused_blue_green_leaves_no_router(world: World) -> None:
    world.deploy(world.v1, blue_green(preview_port=9901))
    world.converge()
    out = world.deploy(world.v2, blue_green(auto_promote=False, preview_port=9901))

    async def scenario() -> None:
        task = asyncio.create_task(world.engine.reconcile("web"))
        rid = out.rollout
        await until(lambda: world.state.rollout(rid).progress.startswith("paused"), task)
        world.engine.commands.down("web", "ana@host", "done for today")
        await task

    asyncio.run(scenario())
    world.converge(passes=20)
    assert world.router.running() == {}
    assert world.state.live_instances("web") == []


def test_down_stops_a_router_left_running_with_nothing_behind_it(world: World) -> None:
    world.deploy(world.v1, blue_green(preview_port=9901))
    world.converge()
    world.engine.commands.down("web", "ana@host", "done")
    world.converge(passes=20)
    world.router.ensure("web-preview", 9901)  # left over, e.g. by an older graven
    out = world.engine.commands.down("web", "ana@host", "again")
    assert out.changed is True
    world.converge(passes=20)
    assert world.router.running() == {}
