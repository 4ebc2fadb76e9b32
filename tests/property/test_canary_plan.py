"""Invariants of the canary planner and its weight math, over generated fleets, step
lists and interrupted rollouts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graven.errors import UsageError
from graven.model import AnalysisConfig, CanaryConfig, CanaryStep
from graven.plan.canary import (
    MAX_WEIGHT,
    canary_count,
    plan_abort,
    plan_canary,
    weights_for_share,
)
from graven.plan.rolling import ObservedInstance
from graven.plan.steps import (
    Analyze,
    Pause,
    Plan,
    RecordProgress,
    SetWeights,
    StartInstance,
    SwitchTraffic,
)
from graven.router import base as router_base
from tests.property.traffic_sim import World

# --- weight math ------------------------------------------------------------------------------


def test_three_stable_one_canary_at_ten_percent() -> None:
    assert weights_for_share(["a", "b", "c"], ["x"], 10) == (
        ("a", 30),
        ("b", 30),
        ("c", 30),
        ("x", 10),
    )


def test_uneven_splits_scale_to_stay_exact() -> None:
    # 50% over 3 stable and 2 canaries: k = 3, stable 150 = 3 x 50, canary 150 = 2 x 75.
    assert weights_for_share(["a", "b", "c"], ["x", "y"], 50) == (
        ("a", 50),
        ("b", 50),
        ("c", 50),
        ("x", 75),
        ("y", 75),
    )
    # 1% over 7 stable and 3 canaries needs k = 21 (99*21/7 = 297, 1*21/3 = 7).
    assert weights_for_share([f"s{n}" for n in range(7)], ["x", "y", "z"], 1)[-1] == ("z", 7)


def test_max_weight_is_the_routers() -> None:
    assert MAX_WEIGHT == router_base.MAX_WEIGHT


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.integers(1, 99))
def test_weights_give_the_canary_its_share(stable: int, canary: int, percent: int) -> None:
    pairs = weights_for_share(
        [f"s{n}" for n in range(stable)], [f"c{n}" for n in range(canary)], percent
    )
    stable_w = [w for t, w in pairs if t.startswith("s")]
    canary_w = [w for t, w in pairs if t.startswith("c")]
    assert len(stable_w) == stable and len(canary_w) == canary
    share = 100 * sum(canary_w) / (sum(stable_w) + sum(canary_w))
    assert abs(share - percent) <= 1
    assert all(0 <= w <= MAX_WEIGHT for _, w in pairs)
    # Even within a release: an instance carries its fair part.
    assert max(stable_w) - min(stable_w) <= 1 and max(canary_w) - min(canary_w) <= 1
    if max(stable, canary) <= 10:
        assert min(w for _, w in pairs) >= 1, "an instance got no traffic"


def test_canary_count_carries_the_largest_partial_step() -> None:
    steps = [CanaryStep(10), CanaryStep(25), CanaryStep(50), CanaryStep(100)]
    assert canary_count(3, steps) == 2  # 50% of 3 replicas is 1.5 instances
    assert canary_count(10, [CanaryStep(5)]) == 1
    assert canary_count(4, [CanaryStep(99)]) == 4
    assert canary_count(1, steps) == 1


def test_bad_steps_are_refused_with_where_and_what() -> None:
    with pytest.raises(UsageError, match=r"weight must be 1-100 \(got 120\)"):
        CanaryStep(120)
    with pytest.raises(UsageError, match="pause must be 0 or more seconds"):
        CanaryStep(10, pause=-1)
    with pytest.raises(UsageError, match=r"steps\[0\]: weight 100 completes the rollout"):
        plan_canary(
            "web",
            2,
            2,
            [],
            CanaryConfig(
                (
                    CanaryStep(100),
                    CanaryStep(10),
                )
            ),
        )
    with pytest.raises(UsageError, match="step_index must be 0-1"):
        plan_canary("web", 2, 2, [], CanaryConfig((CanaryStep(10),)), step_index=2)


# --- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    replicas: int
    release: int
    observed: list[ObservedInstance]
    table: dict[str, int]
    steps: list[CanaryStep]
    step_index: int


canary_steps = st.builds(
    CanaryStep,
    weight=st.integers(1, 99),
    pause=st.sampled_from([0.0, None, 30.0]),
    analysis=st.booleans(),
)


@st.composite
def step_lists(draw: st.DrawFn) -> list[CanaryStep]:
    steps = draw(st.lists(canary_steps, max_size=4))
    if draw(st.booleans()):
        steps.append(
            CanaryStep(
                100, pause=draw(st.sampled_from([0.0, None, 60.0])), analysis=draw(st.booleans())
            )
        )
    return steps


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
    steps = draw(step_lists())
    return Case(
        replicas,
        draw(st.integers(1, 4)),
        observed,
        table,
        steps,
        draw(st.integers(0, len(steps))),
    )


def plan_for(world: World, case: Case) -> Plan:
    return plan_canary(
        "web",
        case.release,
        case.replicas,
        world.observed(),
        CanaryConfig(tuple(case.steps)),
        step_index=world.step_index,
        weights=world.table,
    )


def run_checked(
    world: World, plan: Plan, case: Case, limit: int | None = None, canaries: int | None = None
) -> None:
    """Apply ``plan`` (its first ``limit`` steps), checking what canary promises; with
    ``canaries``, that this many canary instances carry each partial step."""
    slots: dict[str, str] = {}
    # The canary step each plan step belongs to: the one the next RecordProgress closes.
    current: list[int | None] = []
    closing = None
    for step in reversed(plan.steps):
        if isinstance(step, RecordProgress):
            closing = step.step_index - 1
        current.append(closing)
    current.reverse()
    for n, step in enumerate(plan.steps[:limit]):
        index = current[n]
        if isinstance(step, Analyze):
            assert index is not None, f"{step} outside any canary step"
            assert step.canary_release == case.release
            assert step.baseline_release != case.release and world.routed(step.baseline_release)
            assert case.steps[index].analysis
        if isinstance(step, Pause):
            assert index is not None, f"{step} outside any canary step"
            assert case.steps[index].pause == step.seconds
        if isinstance(step, SwitchTraffic):
            assert len(world.routed(case.release)) == case.replicas, "cut over short-handed"
        world.apply(step, slots)
        if isinstance(step, SetWeights) and step.shares:
            for release, percent in step.shares:
                assert abs(world.share(release) - percent) <= 1
        if isinstance(step, RecordProgress):
            # At the end of each step the canary release has the step's share of traffic.
            assert step.total == len(case.steps)
            wanted = case.steps[step.step_index - 1].weight
            assert abs(world.share(case.release) - wanted) <= 1, (world.share(case.release), wanted)
            if wanted < 100 and canaries is not None:
                assert len(world.routed(case.release)) == canaries


def assert_done(world: World, case: Case) -> None:
    assert world.summary() == [(case.release, "healthy", 100)] * case.replicas
    assert plan_for(world, case).empty


@settings(max_examples=400, deadline=None)
@given(cases(), st.integers(0, 60))
def test_canary_converges_from_any_state_even_interrupted(case: Case, cut: int) -> None:
    world = World.of(case.replicas, case.observed, case.table)
    world.step_index = case.step_index
    run_checked(world, plan_for(world, case), case, limit=cut)
    # A controller restarted here resumes from what runs and the recorded step index.
    run_checked(world, plan_for(world, case), case)
    assert_done(world, case)


def steady(replicas: int, release: int = 1) -> list[ObservedInstance]:
    return [ObservedInstance(f"r{release}-{n}", release, "healthy") for n in range(replicas)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), step_lists(), st.integers(0, 60))
def test_canary_walks_every_step_without_dropping_capacity(
    replicas: int, steps: list[CanaryStep], cut: int
) -> None:
    case = Case(replicas, 2, steady(replicas), {}, steps, 0)
    world = World.of(replicas, case.observed, {})
    assert world.floor == replicas
    plan = plan_for(world, case)
    first_starts = 0
    for step in plan.steps:
        if not isinstance(step, StartInstance):
            break
        first_starts += 1
    partial = [s for s in steps if s.weight < 100]
    assert first_starts == (canary_count(replicas, steps) if partial else replicas)
    done = [s.step_index for s in plan.steps if isinstance(s, RecordProgress)]
    assert done == list(range(1, len(steps) + 1))
    count = canary_count(replicas, steps)
    run_checked(world, plan, case, limit=cut, canaries=count)
    run_checked(world, plan_for(world, case), case, canaries=count)
    assert world.step_index == len(steps)
    assert_done(world, case)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), step_lists(), st.integers(0, 60))
def test_abort_returns_all_traffic_to_stable(
    replicas: int, steps: list[CanaryStep], cut: int
) -> None:
    case = Case(replicas, 2, steady(replicas), {}, steps, 0)
    world = World.of(replicas, case.observed, {})
    run_checked(world, plan_for(world, case), case, limit=cut)
    stable_whole = len(world.routed(1)) == replicas
    back = plan_abort("web", 1, replicas, world.observed(), weights=world.table)
    if stable_whole:
        assert not any(isinstance(s, StartInstance) for s in back.steps)
    world.run(back)
    assert world.summary() == [(1, "healthy", 100)] * replicas


def test_a_typical_canary_reads_like_the_runbook() -> None:
    steps = [CanaryStep(10, pause=60), CanaryStep(50, pause=None, analysis=True), CanaryStep(100)]
    plan = plan_canary(
        "web", 2, 3, steady(3), CanaryConfig(tuple(steps), AnalysisConfig(window=30))
    )
    described = [s.describe("web") for s in plan.steps]
    assert described == [
        "start a new instance of web@r2 (new-1)",
        "start a new instance of web@r2 (new-2)",
        "wait until new-1 is healthy",
        "wait until new-2 is healthy",
        "hold new-1, new-2 at weight 0 (no live traffic yet)",
        "send traffic to new-1",
        "send traffic to new-2",
        "shift live traffic to web@r1 90%, web@r2 10% "
        "(weights r1-0=30, r1-1=30, r1-2=30, new-1=5, new-2=5)",
        "pause 60s (canary step 1 of 3 at 10%)",
        "record canary step 1 of 3 as done",
        "shift live traffic to web@r1 50%, web@r2 50% "
        "(weights r1-0=50, r1-1=50, r1-2=50, new-1=75, new-2=75)",
        "pause until 'graven promote web' (canary step 2 of 3 at 50%)",
        "analyze web@r2 against web@r1 for 30s",
        "record canary step 2 of 3 as done",
        "start a new instance of web@r2 (new-3)",
        "wait until new-3 is healthy",
        "hold new-3 at weight 0 (no live traffic yet)",
        "send traffic to new-3",
        "switch all live traffic to web@r2 (others stay warm, idle)",
        "record canary step 3 of 3 as done",
        "drain r1-0",
        "stop r1-0",
        "drain r1-1",
        "stop r1-1",
        "drain r1-2",
        "stop r1-2",
    ]


def test_resuming_at_a_later_step_skips_the_done_ones() -> None:
    steps = [CanaryStep(10), CanaryStep(50), CanaryStep(100)]
    observed = [
        *steady(3),
        ObservedInstance("c1", 2, "healthy"),
        ObservedInstance("c2", 2, "healthy"),
    ]
    weights = {"r1-0": 60, "r1-1": 60, "r1-2": 60, "c1": 10, "c2": 10}
    plan = plan_canary(
        "web", 2, 3, observed, CanaryConfig(tuple(steps)), step_index=1, weights=weights
    )
    assert plan.steps[0] == SetWeights(
        (("r1-0", 50), ("r1-1", 50), ("r1-2", 50), ("c1", 75), ("c2", 75)), ((1, 50), (2, 50))
    )
    assert plan.steps[1] == RecordProgress(2, 3)


def test_first_deploy_skips_the_steps() -> None:
    plan = plan_canary(
        "web",
        1,
        2,
        [],
        CanaryConfig(
            (
                CanaryStep(10, pause=None),
                CanaryStep(100),
            )
        ),
    )
    assert [s.kind for s in plan.steps] == [
        "start",
        "start",
        "await-healthy",
        "await-healthy",
        "set-weights",
        "route",
        "route",
        "switch",
    ]
