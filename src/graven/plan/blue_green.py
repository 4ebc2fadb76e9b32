"""Blue-green replacement, as a pure planner.

The new release's full set starts beside the old one (a surge to twice the replicas),
joins the router *dark* (weight 0: no live traffic), optionally behind the preview
route, waits at a gate, then takes all live traffic in one router change. The old set
stays warm and idle for the rollback window, inside which a rollback is only a
traffic switch back (``plan_flip_back``); then it is drained and stopped.

Like Argo Rollouts' ``bluegreen.go``, the plan is level-triggered: it is computed from
what runs (instances, their router weights) and a little persisted status (a promote
received, when traffic switched), so a controller restarted at any point re-plans
only what is left. Traffic semantics are those of ``graven.plan.steps``.

``Fleet`` is the working view both weighted strategies build their plans on; canary
uses it too, because a canary's last step is a blue-green cut-over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from graven.errors import UsageError
from graven.model import BlueGreenConfig
from graven.plan.rolling import ObservedInstance
from graven.plan.steps import (
    Analyze,
    AwaitHealthy,
    Drain,
    KeepWarm,
    Pause,
    Plan,
    RoutePreview,
    RouteTraffic,
    SetWeights,
    StartInstance,
    Step,
    StopInstance,
    SwitchTraffic,
)

DEFAULT_WEIGHT = 100  # what a routed instance weighs when the weight table does not name it
PROMOTE_REASON = "awaiting promote"


@dataclass(frozen=True)
class BlueGreenStatus:
    """What the controller persists of a blue-green rollout, beside what runs.

    ``promoted``: ``graven promote`` was received for this rollout (the gate is passed).
    ``switched_at``: the clock time live traffic switched to the new release; it starts
    the rollback window. The controller records it when it applies ``SwitchTraffic``.
    """

    promoted: bool = False
    switched_at: float | None = None


@dataclass
class Member:
    """One instance (or slot) in a plan being built."""

    id: str  # instance id, or slot for an instance the plan starts
    release: int
    routed: bool  # a ready backend (state 'healthy')
    weight: int

    @property
    def serving(self) -> bool:
        return self.routed and self.weight > 0


class Fleet:
    """The instances a weighted plan works on, updated by every step it emits.

    Decisions later in a plan (the floor, which set is warm, whether traffic is
    settled) see the effect of the steps before them. Construction already emits the
    clean-up every plan starts with: draining instances finish draining and stop,
    unhealthy ones stop (they serve nothing).
    """

    def __init__(
        self, release: int, observed: Iterable[ObservedInstance], weights: Mapping[str, int]
    ) -> None:
        self.release = release
        self.steps: list[Step] = []
        self.members: list[Member] = []
        self._slots = 0
        for inst in observed:
            if inst.state == "draining":
                self.steps += [Drain(inst.id), StopInstance(inst.id)]
            elif inst.state == "unhealthy":
                self.steps.append(StopInstance(inst.id))
            else:
                weight = weights.get(inst.id, DEFAULT_WEIGHT)
                self.members.append(Member(inst.id, inst.release, inst.state == "healthy", weight))
        # Never fewer serving instances than at the start, up to the replica count.
        self.initial_serving = self.serving()

    # --- views ----------------------------------------------------------------------------

    def serving(self) -> int:
        return sum(1 for m in self.members if m.serving)

    def new(self) -> list[Member]:
        return [m for m in self.members if m.release == self.release]

    def others(self) -> list[Member]:
        return [m for m in self.members if m.release != self.release]

    def settled(self) -> bool:
        """All live traffic on the new release, spread evenly over its routed instances."""
        routed = [m for m in self.members if m.routed]
        return any(m.release == self.release for m in routed) and all(
            m.weight == (DEFAULT_WEIGHT if m.release == self.release else 0) for m in routed
        )

    def switched(self) -> bool:
        """The new release serves and no other release does."""
        return any(m.serving for m in self.new()) and not any(m.serving for m in self.others())

    # --- steps ----------------------------------------------------------------------------

    def retire(self, member: Member) -> None:
        if member.routed:
            self.steps.append(Drain(member.id))
        self.steps.append(StopInstance(member.id))
        self.members.remove(member)

    def trim(self, members: Sequence[Member], keep: int, floor: int) -> None:
        """Retire ``members`` beyond ``keep``: unrouted first, then idle, then serving
        ones while the serving count stays at or above ``floor``."""
        order = sorted(members, key=lambda m: (m.routed, m.serving, m.id))
        for member in order[: max(len(members) - keep, 0)]:
            if member.serving and self.serving() - 1 < floor:
                continue
            self.retire(member)

    def retire_all(self, members: Iterable[Member]) -> None:
        for member in list(members):
            self.retire(member)

    def scale_new(self, count: int, floor: int) -> list[str]:
        """Bring the new release to ``count`` routed instances, each joining dark.

        Returns the targets (ids and slots) of the new release afterwards."""
        self.trim(self.new(), count, floor)
        pending = [m for m in self.new() if not m.routed]
        for _ in range(count - len(self.new())):
            self._slots += 1
            slot = f"new-{self._slots}"
            self.steps.append(StartInstance(slot, self.release))
            member = Member(slot, self.release, routed=False, weight=0)
            self.members.append(member)
            pending.append(member)
        if pending:
            self.steps += [AwaitHealthy(m.id) for m in pending]
            self.steps.append(SetWeights(tuple((m.id, 0) for m in pending)))
            for member in pending:
                self.steps.append(RouteTraffic(member.id))
                member.routed, member.weight = True, 0
        return [m.id for m in self.new()]

    def set_weights(
        self, weights: tuple[tuple[str, int], ...], shares: tuple[tuple[int, int], ...] = ()
    ) -> None:
        table = dict(weights)
        for member in self.members:
            member.weight = table.get(member.id, member.weight)
        self.steps.append(SetWeights(weights, shares))

    def switch(self) -> None:
        for member in self.members:
            if member.routed:
                member.weight = DEFAULT_WEIGHT if member.release == self.release else 0
        self.steps.append(SwitchTraffic(self.release))

    def settle(self) -> None:
        """Make the new release take all live traffic, evenly. Once it already does (the
        cut-over happened), only the weights that differ are set: no second switch, which
        would restart the rollback window."""
        if self.settled():
            return
        if not self.switched():
            self.switch()
            return
        fixes = tuple(
            (m.id, DEFAULT_WEIGHT if m.release == self.release else 0)
            for m in self.members
            if m.routed and m.weight != (DEFAULT_WEIGHT if m.release == self.release else 0)
        )
        self.set_weights(fixes, ((self.release, 100),))

    def plan(self, service: str) -> Plan:
        return Plan(service, self.release, tuple(self.steps))


def heaviest_release(members: Iterable[Member], key: Callable[[Member], int]) -> int | None:
    """The release with the largest total ``key`` (ties: the newest release)."""
    totals: dict[int, int] = {}
    for member in members:
        totals[member.release] = totals.get(member.release, 0) + key(member)
    if not totals:
        return None
    return max(totals, key=lambda r: (totals[r], r))


def check_replicas(replicas: int) -> None:
    if replicas < 1:
        raise UsageError(f"replicas must be at least 1 (got {replicas})")


def plan_blue_green(
    service: str,
    release: int,
    replicas: int,
    observed: Sequence[ObservedInstance],
    config: BlueGreenConfig,
    *,
    weights: Mapping[str, int] | None = None,
    status: BlueGreenStatus | None = None,
    now: float = 0.0,
) -> Plan:
    """Steps from what runs to ``replicas`` instances of ``release`` taking all traffic.

    ``weights`` is the router weight of each routed instance (absent: 100). Before the
    cut-over, the gate is ``Pause(None, "awaiting promote")`` unless ``status.promoted``;
    with ``config.auto_promote`` it is an ``Analyze`` of the preview traffic against the
    live release when ``config`` has a preview port, else the start-up health checks
    alone. A first deploy (nothing else serving) has no gate, as in Argo Rollouts.
    After the switch the previous set is kept warm for what is left of
    ``config.rollback_window`` (counted from ``status.switched_at``, with ``now``), then
    drained and stopped.
    """
    check_replicas(replicas)
    preview = config.preview_port is not None
    rollback_window = config.rollback_window
    status = status or BlueGreenStatus()
    fleet = Fleet(release, observed, weights or {})
    floor = min(replicas, fleet.initial_serving)
    remaining = rollback_window
    if fleet.switched():
        _trim_warm(fleet, replicas)
        fleet.scale_new(replicas, floor)
        fleet.settle()
        if status.switched_at is not None:
            remaining = min(rollback_window, rollback_window - (now - status.switched_at))
    else:
        # The active set: every instance of a release that serves live traffic now.
        live_releases = {m.release for m in fleet.others() if m.serving}
        fleet.retire_all(m for m in fleet.others() if not (m.routed and m.release in live_releases))
        fleet.trim(fleet.others(), replicas, floor)
        targets = fleet.scale_new(replicas, floor)
        if preview:
            fleet.steps += [RoutePreview(t) for t in targets]
        baseline = heaviest_release((m for m in fleet.others() if m.serving), lambda m: m.weight)
        if baseline is not None:
            if config.auto_promote:
                if preview:
                    fleet.steps.append(Analyze(config.analysis.window, baseline, release))
            elif not status.promoted:
                fleet.steps.append(Pause(None, PROMOTE_REASON))
        fleet.switch()
        _trim_warm(fleet, replicas)
    warm = heaviest_release(fleet.others(), lambda m: 1)
    if warm is not None and remaining > 0:
        fleet.steps.append(KeepWarm(warm, remaining))
    fleet.retire_all(fleet.others())
    return fleet.plan(service)


def _trim_warm(fleet: Fleet, replicas: int) -> None:
    """After the switch only one release stays warm, at most ``replicas`` strong: the
    one a flip back would return to. Everything else is idle and goes first."""
    fleet.retire_all(m for m in fleet.others() if not m.routed)
    keep = heaviest_release(fleet.others(), lambda m: 1)
    fleet.retire_all(m for m in fleet.others() if m.release != keep)
    fleet.trim(fleet.others(), replicas, floor=0)


def plan_flip_back(
    service: str,
    release: int,
    replicas: int,
    observed: Sequence[ObservedInstance],
    *,
    weights: Mapping[str, int] | None = None,
) -> Plan:
    """Roll back to the warm ``release`` inside the rollback window: one traffic
    switch back, then the release it replaces is drained and stopped.

    Starts nothing while the warm set is whole. When it is short (a warm instance died
    or went unhealthy), the missing instances start and join dark *before* the switch,
    so the switch never puts the whole load on fewer than ``replicas`` instances.
    Also serves as a canary abort: all traffic back to stable at once.
    """
    check_replicas(replicas)
    fleet = Fleet(release, observed, weights or {})
    floor = min(replicas, fleet.initial_serving)
    fleet.retire_all(m for m in fleet.others() if not m.serving)
    fleet.trim(fleet.others(), replicas, floor)
    fleet.scale_new(replicas, floor)
    fleet.settle()
    fleet.retire_all(fleet.others())
    return fleet.plan(service)
