"""The Router port: the data plane in front of a service's instances.

A router listens on the service's port and forwards each request to one *ready*
backend. The controller changes the backend set; a router must apply a change
without dropping a request, and must keep serving with its last backend set when
the controller is gone.

Every adapter (and the fake) takes the same backend sets: ``check_backends`` holds the
rules, ``split_address`` the address syntax, ``latency_bucket`` the histogram's buckets.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from graven.errors import RouterError

BackendState = Literal["ready", "drain"]

MAX_WEIGHT: Final = 1000
_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
_HOSTNAME_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")


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


def latency_bucket(seconds: float) -> int:
    """Index of the ``LATENCY_BOUNDS`` bucket for ``seconds``: the first bound at or
    above it, or ``len(LATENCY_BOUNDS)`` (the overflow bucket) past the last one."""
    return bisect_left(LATENCY_BOUNDS, seconds)


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


# --------------------------------------------------------------------------- backend sets


class BackendSetError(ValueError):
    """A backend set (admin PUT body, state file, adapter call) is malformed; the
    message names where."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> ``(host, port)``; ``ValueError`` says what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port (got {address!r})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1-65535 (got {address!r})")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"bad IPv6 address in {address!r}") from None
        return host[1:-1], int(port_text)
    if not _HOSTNAME_RE.match(host):
        raise ValueError(f"bad host in {address!r} (use a hostname, an IPv4 or [IPv6])")
    return host, int(port_text)


def validate_backend(
    at: str, bid: object, address: object, state: object, weight: object, seen: set[str]
) -> Backend:
    """One backend's fields as a ``Backend``, by the rules every router applies.

    ``at`` names the item in messages; ``seen`` holds the ids of the items before it
    (this one's is added). Raises ``BackendSetError``.
    """
    if not isinstance(bid, str) or not _ID_RE.match(bid):
        raise BackendSetError(
            f"{at}.id: expected 1-128 characters of [A-Za-z0-9._:@-] (got {bid!r})"
        )
    if bid in seen:
        raise BackendSetError(f"{at}.id: duplicate id {bid!r}")
    seen.add(bid)
    if not isinstance(address, str):
        raise BackendSetError(f"{at}.address: expected a 'host:port' string (got {address!r})")
    try:
        split_address(address)
    except ValueError as exc:
        raise BackendSetError(f"{at}.address: {exc}") from None
    if state not in ("ready", "drain"):
        raise BackendSetError(f"{at}.state: expected 'ready' or 'drain' (got {state!r})")
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise BackendSetError(f"{at}.weight: expected an integer (got {weight!r})")
    if not 0 <= weight <= MAX_WEIGHT:
        raise BackendSetError(f"{at}.weight: must be 0-{MAX_WEIGHT} (got {weight})")
    return Backend(id=bid, address=address, state=state, weight=weight)


def check_backends(backends: Iterable[Backend]) -> None:
    """Raise ``RouterError`` unless every router would take ``backends``: unique ids,
    ``host:port`` addresses, state ``ready`` or ``drain``, weights 0-``MAX_WEIGHT``."""
    seen: set[str] = set()
    try:
        for i, b in enumerate(backends):
            validate_backend(f"backends[{i}]", b.id, b.address, b.state, b.weight, seen)
    except BackendSetError as exc:
        raise RouterError(
            f"invalid backend set: {exc}",
            hint="Each backend needs a unique id, a host:port address, "
            f"state 'ready' or 'drain' and a weight of 0-{MAX_WEIGHT}.",
        ) from None
