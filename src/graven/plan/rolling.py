"""Rolling replacement, as a pure planner.

Bounds, as Kubernetes defines them: at most ``replicas + max_surge`` instances exist,
and at least ``replicas - max_unavailable`` healthy instances serve, at every step.
Old instances go first when the floor allows it; otherwise a new instance surges.
"""

from __future__ import annotations

from dataclasses import dataclass

from graven.errors import InternalError
from graven.model import InstanceState, RollingConfig
from graven.plan.steps import (
    AwaitHealthy,
    Drain,
    Plan,
    RouteTraffic,
    StartInstance,
    Step,
    StopInstance,
)

DEFAULT_ROLLING = RollingConfig()  # one above the replica count, none below


@dataclass(frozen=True)
class ObservedInstance:
    """What the planner needs to know of a live instance."""

    id: str
    release: int
    state: InstanceState  # a live one: starting, healthy, unhealthy or draining


def plan_rolling(
    service: str,
    release: int | None,
    replicas: int,
    observed: list[ObservedInstance],
    config: RollingConfig = DEFAULT_ROLLING,
) -> Plan:
    """Steps from ``observed`` to ``replicas`` healthy, routed instances of ``release``,
    within ``config``'s surge and unavailability bounds.

    ``release=None`` takes the service down: every instance is drained and stopped.
    Assumes started instances become healthy; when one does not, the rollout fails
    and the controller plans again from what it then observes.
    """
    steps: list[Step] = []
    if release is None:
        for inst in observed:
            if inst.state in ("healthy", "draining"):
                steps.append(Drain(inst.id))
            steps.append(StopInstance(inst.id))
        return Plan(service, None, tuple(steps))

    # Broken instances serve nothing: remove them first, whatever their release.
    current = [i for i in observed if i.state not in ("unhealthy", "draining")]
    for inst in observed:
        if inst.state == "draining":
            steps += [Drain(inst.id), StopInstance(inst.id)]
        elif inst.state == "unhealthy":
            steps.append(StopInstance(inst.id))

    new = [i for i in current if i.release == release]
    old = [i for i in current if i.release != release]
    # Surplus instances of the desired release count as old (scale down).
    new_ready = [i for i in new if i.state == "healthy"]
    new_pending = [i for i in new if i.state == "starting"]
    surplus = len(new) - replicas
    if surplus > 0:
        # Keep healthy ones; retire pending ones first.
        keep = (new_ready + new_pending)[:replicas]
        old += [i for i in new if i not in keep]
        new_ready = [i for i in keep if i.state == "healthy"]
        new_pending = [i for i in keep if i.state == "starting"]
    for inst in new_pending:
        steps += [AwaitHealthy(inst.id), RouteTraffic(inst.id)]
    new_count = len(new_ready) + len(new_pending)
    # Old instances that are still only starting count as unavailable: retire them first.
    old.sort(key=lambda i: (i.state == "healthy", i.id))
    available = new_count + sum(1 for i in old if i.state == "healthy")
    floor = max(replicas - config.max_unavailable, 0)
    ceiling = replicas + config.max_surge
    slot = 0
    while old or new_count < replicas:
        progressed = False
        # Retire old instances while the floor allows it.
        while old:
            victim = old[0]
            serving = victim.state == "healthy"
            if serving and available - 1 < floor:
                break
            old.pop(0)
            if serving:
                available -= 1
                steps.append(Drain(victim.id))
            steps.append(StopInstance(victim.id))
            progressed = True
        # Surge new instances up to the ceiling.
        batch: list[str] = []
        while new_count < replicas and new_count + len(old) < ceiling:
            slot += 1
            name = f"new-{slot}"
            steps.append(StartInstance(name, release))
            batch.append(name)
            new_count += 1
        for name in batch:
            steps += [AwaitHealthy(name), RouteTraffic(name)]
            available += 1
        progressed = progressed or bool(batch)
        if not progressed:
            # Both bounds block every move: only possible with surge 0 and unavailable 0,
            # which RollingConfig refuses; fail loudly rather than loop.
            raise InternalError(
                f"{service}: max_surge={config.max_surge} and "
                f"max_unavailable={config.max_unavailable} leave no room to replace any instance"
            )
    return Plan(service, release, tuple(steps))
