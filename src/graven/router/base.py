"""The Router port: the data plane in front of a service's instances.

A router listens on the service's port and forwards each request to one *ready*
backend. The controller changes the backend set; a router must apply a change
without dropping a request, and must keep serving with its last backend set when
the controller is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

BackendState = Literal["ready", "drain"]


@dataclass(frozen=True)
class Backend:
    """One instance as the router sees it."""

    id: str  # instance id, e.g. web-r7-3f2a
    address: str  # host:port
    state: BackendState = "ready"
    weight: int = 100


# Upper bounds (seconds) of the latency histogram every router keeps per backend;
# one more bucket counts everything slower than the last bound.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)


@dataclass(frozen=True)
class BackendStats:
    """What the router observed of one backend. Counters only grow (until the router
    restarts); callers compare two readings to get a window."""

    id: str
    address: str
    state: BackendState
    inflight: int
    requests: int
    errors: int  # 5xx answers plus requests that got no answer
    weight: int = 100
    responses_5xx: int = 0
    # Completed requests per LATENCY_BOUNDS bucket, plus one overflow bucket.
    latency_buckets: tuple[int, ...] = ()


class Router(Protocol):
    """Routes a service's traffic. Every call is idempotent."""

    def ensure(self, service: str, port: int) -> None:
        """Make sure a router listens on ``port`` for ``service``; adopt a running one."""
        ...

    def set_backends(self, service: str, backends: list[Backend]) -> None:
        """Replace the backend set. ``ready`` backends get new requests; ``drain``
        backends only finish the requests they have. Absent ones are forgotten once idle."""
        ...

    def stats(self, service: str) -> list[BackendStats]:
        """Per-backend counters, including requests in flight (used to drain)."""
        ...

    def stop(self, service: str) -> None:
        """Stop the service's router. No error if it is not running."""
        ...

    def running(self) -> dict[str, int]:
        """Services that have a live router, with the port each listens on."""
        ...
