"""Invariants of the blue-green planner, over generated fleets and interrupted rollouts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graven.errors import UsageError
from graven.model import AnalysisConfig, BlueGreenConfig
from graven.plan.blue_green import BlueGreenStatus, plan_blue_green, plan_flip_back
from graven.plan.rolling import ObservedInstance
from graven.plan.steps import (
    Analyze,
    Drain,
    KeepWarm,
    Pause,
    Plan,
    StartInstance,
    StopInstance,
    SwitchTraffic,
)
from tests.property.traffic_sim import World

PREVIEW_PORT = 9080


@dataclass(frozen=True)
class Case:
    replicas: int
    release: int
    observed: list[ObservedInstance]
    table: dict[str, int]
    auto_promote: bool
    preview: bool
    window: float
    promoted: bool
    switched_at: float | None


@st.composite
def cases(draw: st.DrawFn) -> Case:
    replicas = draw(st.integers(1, 5))
    count = draw(st.integers(0, 2 * replicas + 2))
    observed = [
        ObservedInstance(
            f"i{n}",
            draw(st.integers(1, 4)),
            draw(
                st.sampled_from(
                    ["healthy", "healthy", "healthy", "starting", "unhealthy", "draining"]
                )
            ),
        )
        for n in range(count)
    ]
    table = {
        i.id: draw(st.sampled_from([0, 0, 100, 100, 1, 30, 1000]))
        for i in observed
        if draw(st.booleans())
    }
    return Case(
        replicas=replicas,
        release=draw(st.integers(1, 4)),
        observed=observed,
        table=table,
        auto_promote=draw(st.booleans()),
        preview=draw(st.booleans()),
        window=draw(st.sampled_from([0.0, 60.0, 600.0])),
        promoted=draw(st.booleans()),
        switched_at=draw(st.none() | st.sampled_from([-1000.0, -30.0, 0.0])),
    )


def plan_for(world: World, case: Case) -> Plan:
    return plan_blue_green(
        "web",
        case.release,
        case.replicas,
        world.observed(),
        BlueGreenConfig(
            auto_promote=case.auto_promote,
            preview_port=PREVIEW_PORT if case.preview else None,
            rollback_window=case.window,
        ),
        weights=world.table,
        status=BlueGreenStatus(world.promoted, world.switched_at),
        now=world.clock,
    )


def run_checked(world: World, plan: Plan, case: Case, limit: int | None = None) -> None:
    """Apply ``plan`` (its first ``limit`` steps), checking what blue-green promises."""
    slots: dict[str, str] = {}
    promoted = world.promoted
    for step in plan.steps[:limit]:
        others_serving = any(
            world.weight(i.id) > 0 for i in world.routed() if i.release != case.release
        )
        if isinstance(step, SwitchTraffic):
            assert step.to_release == case.release
            # The whole new set is up before it takes the traffic.
            assert len(world.routed(case.release)) == case.replicas
            if case.preview and others_serving:
                assert {i.id for i in world.routed(case.release)} <= world.preview
        if isinstance(step, Pause):
            assert step.seconds is None and not case.auto_promote and not promoted
            assert others_serving, "paused a first deploy"
        if isinstance(step, Analyze):
            assert case.auto_promote and case.preview and others_serving
            assert step.canary_release == case.release
        before = world.clock
        world.apply(step, slots)
        if isinstance(step, KeepWarm):
            warm = world.routed(step.release)
            assert step.release != case.release and warm
            assert all(world.weight(i.id) == 0 for i in warm), "a warm instance got traffic"
            assert len(warm) <= case.replicas
            assert world.share(case.release) == 100
            expected = case.window
            if world.switched_at is not None and world.switched_at < before:
                expected = min(case.window, case.window - (before - world.switched_at))
            assert step.until_seconds == pytest.approx(expected)
            assert step.until_seconds > 0
        # Instances this plan starts join dark: no live traffic before the whole new set
        # is up.
        lit = [
            i for i in world.routed(case.release) if i.id in slots.values() and world.weight(i.id)
        ]
        if lit:
            assert len(world.routed(case.release)) == case.replicas


def assert_done(world: World, case: Case) -> None:
    # Exactly one release serves, at full strength, evenly.
    assert world.summary() == [(case.release, "healthy", 100)] * case.replicas
    assert plan_for(world, case).empty


@settings(max_examples=400, deadline=None)
@given(cases(), st.integers(0, 40))
def test_blue_green_converges_from_any_state_even_interrupted(case: Case, cut: int) -> None:
    world = World.of(case.replicas, case.observed, case.table)
    world.promoted, world.switched_at = case.promoted, case.switched_at
    run_checked(world, plan_for(world, case), case, limit=cut)
    # A controller restarted here plans again from what it finds.
    run_checked(world, plan_for(world, case), case)
    assert_done(world, case)


def steady(replicas: int, release: int = 1) -> list[ObservedInstance]:
    return [ObservedInstance(f"r{release}-{n}", release, "healthy") for n in range(replicas)]


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0.0, 600.0]),
    st.integers(0, 40),
)
def test_deploy_never_drops_below_the_replica_count(
    replicas: int, auto: bool, preview: bool, window: float, cut: int
) -> None:
    case = Case(replicas, 2, steady(replicas), {}, auto, preview, window, False, None)
    world = World.of(replicas, case.observed, {})
    assert world.floor == replicas  # blue-green's floor: the full replica count
    plan = plan_for(world, case)
    assert sum(isinstance(s, StartInstance) for s in plan.steps) == replicas
    run_checked(world, plan, case, limit=cut)
    run_checked(world, plan_for(world, case), case)
    assert_done(world, case)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.booleans(), st.integers(0, 40))
def test_flip_back_is_a_switch_while_the_old_set_is_warm(
    replicas: int, preview: bool, cut: int
) -> None:
    case = Case(replicas, 2, steady(replicas), {}, False, preview, 600.0, False, None)
    world = World.of(replicas, case.observed, {})
    run_checked(world, plan_for(world, case), case, limit=cut)
    warm_whole = len(world.routed(1)) == replicas
    new_serving = any(world.weight(i.id) > 0 for i in world.routed(2))
    back = plan_flip_back("web", 1, replicas, world.observed(), weights=world.table)
    if warm_whole:
        assert not any(isinstance(s, StartInstance) for s in back.steps)
        if new_serving:
            assert isinstance(back.steps[0], SwitchTraffic)
            assert all(isinstance(s, Drain | StopInstance) for s in back.steps[1:])
    world.run(back)
    assert world.summary() == [(1, "healthy", 100)] * replicas
    assert plan_flip_back("web", 1, replicas, world.observed(), weights=world.table).empty


def kinds(plan: Plan) -> list[str]:
    return [s.kind for s in plan.steps]


def test_manual_blue_green_with_preview_reads_like_the_runbook() -> None:
    plan = plan_blue_green(
        "web",
        2,
        2,
        steady(2),
        BlueGreenConfig(auto_promote=False, preview_port=PREVIEW_PORT, rollback_window=600),
    )
    assert kinds(plan) == [
        *["start"] * 2,
        *["await-healthy"] * 2,
        "set-weights",
        *["route"] * 2,
        *["route-preview"] * 2,
        "pause",
        "switch",
        "keep-warm",
        *["drain", "stop"] * 2,
    ]
    assert plan.steps[4].describe("web") == "hold new-1, new-2 at weight 0 (no live traffic yet)"
    assert plan.steps[9] == Pause(None, "awaiting promote")
    assert plan.steps[11] == KeepWarm(1, 600)
    assert plan.steps[9].describe("web") == "pause until 'graven promote web' (awaiting promote)"


def test_promote_received_lifts_the_gate() -> None:
    plan = plan_blue_green(
        "web",
        2,
        2,
        steady(2),
        BlueGreenConfig(auto_promote=False, rollback_window=600),
        status=BlueGreenStatus(promoted=True),
    )
    assert "pause" not in kinds(plan) and "switch" in kinds(plan)


def test_auto_promote_gates_on_analysis_of_the_preview() -> None:
    plan = plan_blue_green(
        "web",
        2,
        2,
        steady(2),
        BlueGreenConfig(
            auto_promote=True,
            preview_port=PREVIEW_PORT,
            rollback_window=60,
            analysis=AnalysisConfig(window=30),
        ),
    )
    gate = plan.steps[kinds(plan).index("switch") - 1]
    assert gate == Analyze(30, 1, 2)
    no_preview = plan_blue_green(
        "web", 2, 2, steady(2), BlueGreenConfig(auto_promote=True, rollback_window=60)
    )
    # Without a preview there is no traffic to judge: the health checks are the gate.
    assert kinds(no_preview)[kinds(no_preview).index("switch") - 1] == "route"


def test_first_deploy_has_no_gate_and_nothing_to_keep_warm() -> None:
    plan = plan_blue_green(
        "web",
        1,
        3,
        [],
        BlueGreenConfig(auto_promote=False, preview_port=PREVIEW_PORT, rollback_window=600),
    )
    assert "pause" not in kinds(plan) and "keep-warm" not in kinds(plan)
    assert kinds(plan)[-1] == "switch"


def test_resumed_after_the_switch_only_the_rest_of_the_window_remains() -> None:
    observed = steady(2, 1) + steady(2, 2)
    weights = {"r1-0": 0, "r1-1": 0}
    plan = plan_blue_green(
        "web",
        2,
        2,
        observed,
        BlueGreenConfig(auto_promote=False, preview_port=PREVIEW_PORT, rollback_window=600),
        weights=weights,
        status=BlueGreenStatus(switched_at=100.0),
        now=400.0,
    )
    assert plan.steps == (
        KeepWarm(1, 300.0),
        Drain("r1-0"),
        StopInstance("r1-0"),
        Drain("r1-1"),
        StopInstance("r1-1"),
    )
    assert plan.steps[0].describe("web") == (
        "keep web@r1 warm for 300s (rollback window: 'graven rollback web' switches back at once)"
    )
    late = plan_blue_green(
        "web",
        2,
        2,
        observed,
        BlueGreenConfig(auto_promote=False, preview_port=PREVIEW_PORT, rollback_window=600),
        weights=weights,
        status=BlueGreenStatus(switched_at=100.0),
        now=800.0,
    )
    assert "keep-warm" not in kinds(late) and kinds(late).count("stop") == 2


def test_flip_back_tops_up_a_short_warm_set_before_switching() -> None:
    observed = [ObservedInstance("r1-0", 1, "healthy"), *steady(2, 2)]
    plan = plan_flip_back("web", 1, 2, observed, weights={"r1-0": 0})
    assert kinds(plan)[:4] == ["start", "await-healthy", "set-weights", "route"]
    assert kinds(plan)[4] == "switch"


def test_replicas_must_be_positive() -> None:
    with pytest.raises(UsageError, match="replicas must be at least 1"):
        plan_blue_green("web", 1, 0, [], BlueGreenConfig(auto_promote=True, rollback_window=0))
