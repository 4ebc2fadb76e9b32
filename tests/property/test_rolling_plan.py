"""Invariants of the rolling planner, over generated fleets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from graven.model import RollingConfig
from graven.plan.rolling import ObservedInstance, plan_rolling
from graven.plan.steps import AwaitHealthy, Drain, RouteTraffic, StartInstance, StopInstance


@st.composite
def fleets(draw: st.DrawFn) -> tuple[int, int, int, int, list[ObservedInstance]]:
    replicas = draw(st.integers(1, 6))
    max_surge = draw(st.integers(0, 3))
    max_unavailable = draw(st.integers(0 if max_surge else 1, 3))
    desired = draw(st.integers(1, 4))
    count = draw(st.integers(0, replicas + max_surge))
    observed = [
        ObservedInstance(
            id=f"i{n}",
            release=draw(st.integers(1, 4)),
            state=draw(
                st.sampled_from(["healthy", "healthy", "starting", "unhealthy", "draining"])
            ),
        )
        for n in range(count)
    ]
    return replicas, max_surge, max_unavailable, desired, observed


def apply(
    observed: list[ObservedInstance], steps: tuple[object, ...], floor: int, ceiling: int
) -> dict[str, ObservedInstance]:
    """Simulate a plan, checking the bounds after every step."""
    fleet = {i.id: i for i in observed}
    slots: dict[str, str] = {}
    serving = lambda: sum(1 for i in fleet.values() if i.state == "healthy")  # noqa: E731
    start_serving = serving()
    for step in steps:
        if isinstance(step, StartInstance):
            new_id = f"n{len(slots)}"
            slots[step.slot] = new_id
            fleet[new_id] = ObservedInstance(new_id, step.release, "starting")
            live = sum(1 for i in fleet.values() if i.state != "draining")
            assert live <= max(ceiling, len(observed)), "surged above the ceiling"
        elif isinstance(step, AwaitHealthy):
            assert slots.get(step.target, step.target) in fleet
        elif isinstance(step, RouteTraffic):
            key = slots.get(step.target, step.target)
            fleet[key] = ObservedInstance(key, fleet[key].release, "healthy")
        elif isinstance(step, Drain):
            i = fleet[step.target]
            fleet[step.target] = ObservedInstance(i.id, i.release, "draining")
            assert serving() >= min(floor, start_serving), "fell below the availability floor"
        elif isinstance(step, StopInstance):
            i = fleet.pop(step.target)
            assert i.state != "healthy", "stopped an instance that was still routed"
    return fleet


@settings(max_examples=400, deadline=None)
@given(fleets())
def test_rolling_respects_bounds_and_converges(
    case: tuple[int, int, int, int, list[ObservedInstance]],
) -> None:
    replicas, surge, unavailable, desired, observed = case
    plan = plan_rolling("web", desired, replicas, observed, RollingConfig(surge, unavailable))
    fleet = apply(observed, plan.steps, replicas - unavailable, replicas + surge)
    # Ends with exactly one release serving, at full strength.
    assert sorted((i.release, i.state) for i in fleet.values()) == [(desired, "healthy")] * replicas
    # Re-planning after the apply is empty.
    again = plan_rolling(
        "web", desired, replicas, list(fleet.values()), RollingConfig(surge, unavailable)
    )
    assert again.empty, again


@settings(max_examples=100, deadline=None)
@given(fleets())
def test_down_stops_everything_draining_first(
    case: tuple[int, int, int, int, list[ObservedInstance]],
) -> None:
    *_, observed = case
    plan = plan_rolling("web", None, 0, observed)
    fleet = apply(observed, plan.steps, 0, 100)
    assert fleet == {}


def test_default_rolling_surges_before_retiring() -> None:
    old = [ObservedInstance(f"old{n}", 1, "healthy") for n in range(3)]
    plan = plan_rolling("web", 2, 3, old)
    kinds = [s.kind for s in plan.steps]
    assert kinds[:3] == ["start", "await-healthy", "route"]
    assert kinds[3:5] == ["drain", "stop"]
    assert kinds.count("start") == 3 and kinds.count("stop") == 3
