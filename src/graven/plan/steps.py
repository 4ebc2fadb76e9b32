"""Plan steps: pure data describing what a rollout does, in order.

A new instance does not exist when the plan is made, so steps name it by a *slot*
(``new-1``); the rollout binds each slot to the instance it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StartInstance:
    """Start one instance of ``release``; it is not routed until it is healthy."""

    slot: str
    release: int
    kind: str = "start"

    def describe(self, service: str) -> str:
        return f"start a new instance of {service}@r{self.release} ({self.slot})"


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


Step = StartInstance | AwaitHealthy | RouteTraffic | Drain | StopInstance


@dataclass(frozen=True)
class Plan:
    """The ordered steps that take a service from what runs to what is desired."""

    service: str
    release: int | None  # None: take the service down
    steps: tuple[Step, ...]

    @property
    def empty(self) -> bool:
        return not self.steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "release": self.release,
            "steps": [
                {"kind": s.kind, "description": s.describe(self.service)} for s in self.steps
            ],
        }
