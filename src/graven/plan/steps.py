"""Plan steps: pure data describing what a rollout does, in order.

A new instance does not exist when the plan is made, so steps name it by a *slot*
(``new-1``); the rollout binds each slot to the instance it starts.

The traffic model every strategy plans against (the controller applies it, the
property tests simulate it):

- An instance is *routed* once ``RouteTraffic`` ran: it is a ready backend. A
  ``Drain`` takes it out of new traffic; a ``StopInstance`` forgets it.
- Each routed instance has an integer router weight, from the service's weight table;
  an instance the table does not name weighs 100 (so rolling needs no table at all).
- ``SetWeights`` writes entries of that table, for routed instances or for ones routed
  later (a slot or a starting instance: it then joins at that weight). Entries it does
  not name keep their weight.
- ``SwitchTraffic(r)`` rewrites the table for every routed instance: 100 for the
  instances of release ``r``, 0 for every other one (still routed, warm, idle).
- A release's live share is the sum of its routed instances' weights over the sum of
  all routed weights. An instance *serves* when it is routed with a weight above 0.

Weighted strategies (blue-green, canary) let a new instance join *dark*: a
``SetWeights`` to 0 for it, then ``RouteTraffic``, so no request reaches it before
the plan says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from graven.model import release_id


@dataclass(frozen=True)
class StartInstance:
    """Start one instance of ``release``; it is not routed until it is healthy."""

    slot: str
    release: int
    kind: str = "start"

    def describe(self, service: str) -> str:
        return f"start a new instance of {release_id(service, self.release)} ({self.slot})"


@dataclass(frozen=True)
class AwaitHealthy:
    """Wait until the instance passes its health check (bounded by start_timeout)."""

    target: str  # a slot or an instance id
    kind: str = "await-healthy"

    def describe(self, service: str) -> str:
        return f"wait until {self.target} is healthy"


@dataclass(frozen=True)
class RouteTraffic:
    """Add the instance to the router's ready set."""

    target: str
    kind: str = "route"

    def describe(self, service: str) -> str:
        return f"send traffic to {self.target}"


@dataclass(frozen=True)
class Drain:
    """Take the instance out of new traffic and wait for its in-flight requests."""

    target: str
    kind: str = "drain"

    def describe(self, service: str) -> str:
        return f"drain {self.target}"


@dataclass(frozen=True)
class StopInstance:
    """SIGTERM, grace period, SIGKILL."""

    target: str
    kind: str = "stop"

    def describe(self, service: str) -> str:
        return f"stop {self.target}"


def _seconds(value: float) -> str:
    return f"{value:g}s"


@dataclass(frozen=True)
class SetWeights:
    """Write router weights, per target (a slot or an instance id); see the module doc.

    ``shares`` (release, percent) only annotates the description: the live share of
    each release follows from the weights of the routed instances.
    """

    weights: tuple[tuple[str, int], ...]
    shares: tuple[tuple[int, int], ...] = ()
    kind: str = "set-weights"

    def describe(self, service: str) -> str:
        if self.weights and all(w == 0 for _, w in self.weights):
            names = ", ".join(t for t, _ in self.weights)
            return f"hold {names} at weight 0 (no live traffic yet)"
        table = ", ".join(f"{t}={w}" for t, w in self.weights)
        if not self.shares:
            return f"set router weights {table}"
        split = ", ".join(f"{release_id(service, r)} {p}%" for r, p in self.shares)
        return f"shift live traffic to {split} (weights {table})"


@dataclass(frozen=True)
class Pause:
    """Hold the rollout for ``seconds``, or until ``graven promote`` when None."""

    seconds: float | None
    reason: str
    kind: str = "pause"

    def describe(self, service: str) -> str:
        if self.seconds is None:
            return f"pause until 'graven promote {service}' ({self.reason})"
        return f"pause {_seconds(self.seconds)} ({self.reason})"


@dataclass(frozen=True)
class Analyze:
    """Watch both releases' traffic for ``window`` seconds and judge the canary against
    the baseline (``graven.rollout.analysis``); a failing verdict aborts the rollout."""

    window: float
    baseline_release: int
    canary_release: int
    kind: str = "analyze"

    def describe(self, service: str) -> str:
        return (
            f"analyze {release_id(service, self.canary_release)} against "
            f"{release_id(service, self.baseline_release)} for {_seconds(self.window)}"
        )


@dataclass(frozen=True)
class SwitchTraffic:
    """Blue-green cut-over, in one router change: every routed instance of
    ``to_release`` weighs 100, every other routed instance 0 (kept warm, idle)."""

    to_release: int
    kind: str = "switch"

    def describe(self, service: str) -> str:
        to = release_id(service, self.to_release)
        return f"switch all live traffic to {to} (others stay warm, idle)"


@dataclass(frozen=True)
class KeepWarm:
    """Keep ``release``'s idle instances running for ``until_seconds`` more: the
    rollback window, inside which a rollback is only a traffic switch."""

    release: int
    until_seconds: float
    kind: str = "keep-warm"

    def describe(self, service: str) -> str:
        return (
            f"keep {release_id(service, self.release)} warm for {_seconds(self.until_seconds)} "
            f"(rollback window: 'graven rollback {service}' switches back at once)"
        )


@dataclass(frozen=True)
class RoutePreview:
    """Put the instance behind the service's preview route (live traffic unchanged)."""

    target: str
    kind: str = "route-preview"

    def describe(self, service: str) -> str:
        return f"expose {self.target} on the preview route"


@dataclass(frozen=True)
class RecordProgress:
    """Persist that canary steps before ``step_index`` are done, so a restarted
    controller resumes at the next one (Argo's ``currentStepIndex``)."""

    step_index: int
    total: int
    kind: str = "record-progress"

    def describe(self, service: str) -> str:
        return f"record canary step {self.step_index} of {self.total} as done"


Step = (
    StartInstance
    | AwaitHealthy
    | RouteTraffic
    | Drain
    | StopInstance
    | SetWeights
    | Pause
    | Analyze
    | SwitchTraffic
    | KeepWarm
    | RoutePreview
    | RecordProgress
)


def bind_slots(step: Step, slots: Mapping[str, str]) -> Step:
    """``step`` with every slot it names replaced by the instance started for it.

    The controller applies and shows bound steps; slots not yet bound stay as they are.
    """
    if isinstance(step, AwaitHealthy | RouteTraffic | Drain | StopInstance | RoutePreview):
        return replace(step, target=slots.get(step.target, step.target))
    if isinstance(step, SetWeights):
        return replace(step, weights=tuple((slots.get(t, t), w) for t, w in step.weights))
    return step


@dataclass(frozen=True)
class Plan:
    """The ordered steps that take a service from what runs to what is desired."""

    service: str
    release: int | None  # None: take the service down
    steps: tuple[Step, ...]

    @property
    def empty(self) -> bool:
        return not self.steps
