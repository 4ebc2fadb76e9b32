"""Canary replacement, as a pure planner.

A few instances of the new release (the canary) start beside the stable set and join
the router dark. Each step then sets router weights so the canary release gets the
step's share of live traffic, pauses, and optionally analyzes the canary against the
stable release. The last step (weight 100, explicit or implied) is a blue-green
cut-over: the canary scales to the full replica count, takes all traffic in one
switch while stable stays warm for that step's pause and analysis, then stable is
drained and stopped.

Resumable like Argo Rollouts' ``canary.go``: the plan is computed from what runs, the
router weights, and ``step_index``, the number of steps already done, which the
controller persists when it applies ``RecordProgress``.

How many canary instances
    ``canary_count``: enough that at the largest partial step no canary instance
    carries more than a stable instance does before the rollout (1/replicas of it):
    ``ceil(replicas * max_weight / 100)``, at least 1, at most ``replicas``. Three
    replicas with steps at 10, 25 and 50% get 2 canaries (50% of 3 is 1.5 instances).

Weight math
    ``weights_for_share``: for a share of ``p`` percent, the stable instances together
    weigh ``(100 - p) * k`` and the canary instances ``p * k``, so the canary release
    gets exactly ``p`` percent whatever the rounding. Each total is split evenly over
    its instances (their weights differ by at most 1). ``k`` is the smallest integer that
    makes both splits exact, e.g. 3 stable + 1 canary at 10%: ``k = 1``, stable 30
    each, canary 10. When that would exceed the router's maximum weight (1000), ``k``
    is the largest that fits and the splits are as even as integers allow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from graven.errors import InternalError, UsageError
from graven.model import CanaryConfig, CanaryStep
from graven.plan.blue_green import Fleet, check_replicas, heaviest_release, plan_flip_back
from graven.plan.rolling import ObservedInstance
from graven.plan.steps import Analyze, Pause, Plan, RecordProgress

# The router's largest weight (graven.router.base.MAX_WEIGHT; a test keeps them equal).
MAX_WEIGHT = 1000


def canary_count(replicas: int, steps: Sequence[CanaryStep]) -> int:
    """How many canary instances carry the partial steps (see the module doc)."""
    largest = max((s.weight for s in steps if s.weight < 100), default=0)
    return max(1, min(replicas, -(-replicas * largest // 100)))


def weights_for_share(
    stable: Sequence[str], canary: Sequence[str], percent: int, *, max_weight: int = MAX_WEIGHT
) -> tuple[tuple[str, int], ...]:
    """Per-instance router weights giving the canary ``percent`` of live traffic
    (see the module doc). Stable targets first, then canary targets."""
    if not stable or not canary:
        raise ValueError("weights_for_share needs at least one stable and one canary target")
    if not 1 <= percent <= 99:
        raise ValueError(f"a split share must be 1-99 percent (got {percent})")
    s, c = len(stable), len(canary)
    stable_unit, canary_unit = 100 - percent, percent
    k = math.lcm(s // math.gcd(s, stable_unit), c // math.gcd(c, canary_unit))
    if stable_unit * k > max_weight * s or canary_unit * k > max_weight * c:
        k = min(max_weight * s // stable_unit, max_weight * c // canary_unit)
    return _spread(stable, stable_unit * k) + _spread(canary, canary_unit * k)


def _spread(targets: Sequence[str], total: int) -> tuple[tuple[str, int], ...]:
    base, extra = divmod(total, len(targets))
    return tuple((t, base + (1 if n < extra else 0)) for n, t in enumerate(targets))


def _check_steps(steps: Sequence[CanaryStep], step_index: int) -> None:
    for n, step in enumerate(steps[:-1]):
        if step.weight == 100:
            raise UsageError(
                f"steps[{n}]: weight 100 completes the rollout, so it must be the last step",
                hint="Remove the steps after it, or lower its weight.",
            )
    if not 0 <= step_index <= len(steps):
        raise UsageError(f"step_index must be 0-{len(steps)} (got {step_index})")


def plan_canary(
    service: str,
    release: int,
    replicas: int,
    observed: Sequence[ObservedInstance],
    config: CanaryConfig,
    *,
    step_index: int = 0,
    weights: Mapping[str, int] | None = None,
) -> Plan:
    """Steps from what runs through the canary steps of ``config`` (from
    ``step_index`` on) to ``replicas`` instances of ``release`` taking all traffic.

    ``weights`` is the router weight of each routed instance (absent: 100). When no
    other release serves (a first deploy, or the cut-over already happened), the
    partial steps are moot: the plan scales the new release to full strength, runs
    the final step's pause and analysis if the previous release is still warm, and
    retires it. Each step ends with ``RecordProgress``; a plan from a later
    ``step_index`` skips the steps already done (a pause restarts in full).
    """
    check_replicas(replicas)
    steps = config.steps
    analysis_window = config.analysis.window
    _check_steps(steps, step_index)
    fleet = Fleet(release, observed, weights or {})
    floor = min(replicas, fleet.initial_serving)
    final = len(steps) - 1 if steps and steps[-1].weight == 100 else len(steps)
    live_releases = {m.release for m in fleet.others() if m.serving}

    if live_releases:
        # The stable set: every routed instance of a release that serves live traffic.
        fleet.retire_all(m for m in fleet.others() if not (m.routed and m.release in live_releases))
        fleet.trim(fleet.others(), replicas, floor)
        stable = heaviest_release(fleet.others(), lambda m: m.weight)
        if stable is None:
            raise InternalError(f"{service}: the stable set vanished while planning")
        if step_index < final:
            canary = fleet.scale_new(canary_count(replicas, steps), floor)
            stable_ids = [m.id for m in fleet.others()]
            one_stable = len({m.release for m in fleet.others()}) == 1
            for n in range(step_index, final):
                weight = steps[n].weight
                shares = ((stable, 100 - weight),) if one_stable else ()
                fleet.set_weights(
                    weights_for_share(stable_ids, canary, weight), (*shares, (release, weight))
                )
                _gates(fleet, steps, n, stable, analysis_window)
        fleet.scale_new(replicas, floor)
        fleet.switch()
        fleet.trim(fleet.new(), replicas, floor)
        if final < len(steps) and step_index <= final:
            _gates(fleet, steps, final, stable, analysis_window)
    else:
        fleet.retire_all(m for m in fleet.others() if not m.routed)
        # The final step's gates still run while the previous release is warm.
        warm = heaviest_release(fleet.others(), lambda m: 1)
        if final == len(steps) or step_index > final:
            warm = None
        fleet.retire_all(m for m in fleet.others() if m.release != warm)
        fleet.trim(fleet.others(), replicas, floor)
        fleet.scale_new(replicas, floor)
        fleet.settle()
        if warm is not None:
            _gates(fleet, steps, final, warm, analysis_window)
    fleet.retire_all(fleet.others())
    return fleet.plan(service)


def _gates(fleet: Fleet, steps: Sequence[CanaryStep], n: int, baseline: int, window: float) -> None:
    """The pause and analysis that end step ``n``, then its progress record."""
    step = steps[n]
    if step.pause != 0:
        what = f"canary step {n + 1} of {len(steps)} at {step.weight}%"
        fleet.steps.append(Pause(step.pause, what))
    if step.analysis:
        fleet.steps.append(Analyze(window, baseline, fleet.release))
    fleet.steps.append(RecordProgress(n + 1, len(steps)))


def plan_abort(
    service: str,
    stable_release: int,
    replicas: int,
    observed: Sequence[ObservedInstance],
    *,
    weights: Mapping[str, int] | None = None,
) -> Plan:
    """Abort a canary: all live traffic back to ``stable_release`` in one switch, then
    the canary instances drain and stop (a blue-green flip back)."""
    return plan_flip_back(service, stable_release, replicas, observed, weights=weights)
