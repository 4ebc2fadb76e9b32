"""Backend sets of the embedded proxy: their wire and state-file forms, and the live
table a worker routes with (per-backend counters, idle-connection pools, and the smooth
weighted round-robin that picks a backend for each request)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from graven.router.base import (
    LATENCY_BOUNDS,
    Backend,
    BackendSetError,
    BackendState,
    split_address,
    validate_backend,
)

if TYPE_CHECKING:
    from graven.router.proxy.channel import _Channel

COOLDOWN: Final = 2.0  # passive: a backend that refused a connection sits out this long
POOL_SIZE: Final = 64  # idle keep-alive connections kept per backend
# Idle pooled connections close after this long: below the keep-alive timeouts of
# common servers (Node 5 s, uvicorn 5 s, nginx 75 s), so the backend rarely closes first.
POOL_IDLE_TIMEOUT: Final = 4.0
_NO_EXCLUSIONS: Final[frozenset[str]] = frozenset()
_now = time.monotonic


def parse_backends(items: object, where: str = "backends") -> list[Backend]:
    """Validate a JSON backend list strictly and return it as ``Backend`` values.

    Each item is ``{"id", "address", "state"?, "weight"?}``, checked by
    ``graven.router.base.validate_backend``: ids are unique, state is ``ready`` or
    ``drain`` (default ``ready``), weight an integer 0-1000 (default 100).
    """
    if not isinstance(items, list):
        raise BackendSetError(f"{where}: expected a list, got {type(items).__name__}")
    out: list[Backend] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise BackendSetError(f"{at}: expected an object, got {type(item).__name__}")
        unknown = sorted(set(item) - {"id", "address", "state", "weight"})
        if unknown:
            raise BackendSetError(f"{at}: unknown key(s) {', '.join(unknown)}")
        out.append(
            validate_backend(
                at,
                item.get("id"),
                item.get("address"),
                item.get("state", "ready"),
                item.get("weight", 100),
                seen,
            )
        )
    return out


def backends_to_json(backends: Iterable[Backend]) -> list[dict[str, object]]:
    """The wire and state-file form of a backend set."""
    return [
        {"id": b.id, "address": b.address, "state": b.state, "weight": b.weight} for b in backends
    ]


def state_document(service: str, port: int, backends: Iterable[Backend]) -> bytes:
    """The state file's bytes: what a restarted proxy needs to serve the same set."""
    doc = {"service": service, "port": port, "backends": backends_to_json(backends)}
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def load_state(path: Path) -> list[Backend]:
    """The backend set a previous run persisted; empty if there is no state file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise BackendSetError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "backends" not in doc:
        raise BackendSetError('expected a JSON object with key "backends"')
    return parse_backends(doc["backends"])


class _Pool:
    """Idle keep-alive connections to one backend; the most recently used is taken
    first, so spare connections age out instead of all staying barely warm."""

    __slots__ = ("_idle", "closed")

    def __init__(self) -> None:
        self._idle: list[_Channel] = []  # oldest first
        self.closed = False

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, now: float) -> _Channel | None:
        idle = self._idle
        if not idle:
            return None
        chan = idle.pop()
        if now - chan.idle_since < POOL_IDLE_TIMEOUT:
            chan.pool = None
            return chan
        # The newest is too old, so every other one is as well.
        idle.append(chan)
        self.expire(now)
        return None

    def put(self, chan: _Channel, now: float) -> bool:
        """Keep ``chan`` for a later request; False (and nothing kept) if closed or full."""
        if self.closed or len(self._idle) >= POOL_SIZE:
            return False
        chan.idle_since = now
        chan.pool = self
        chan.listener = chan.leave_pool
        self._idle.append(chan)
        return True

    def discard(self, chan: _Channel) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(chan)

    def expire(self, now: float) -> None:
        """Close the connections idle for ``POOL_IDLE_TIMEOUT`` or longer."""
        idle = self._idle
        cutoff = now - POOL_IDLE_TIMEOUT
        n = 0
        while n < len(idle) and idle[n].idle_since <= cutoff:
            n += 1
        if n:
            old, self._idle = idle[:n], idle[n:]
            for chan in old:
                chan.pool = None
                chan.close()

    def close(self) -> None:
        """Close every idle connection and keep none from now on."""
        self.closed = True
        idle, self._idle = self._idle, []
        for chan in idle:
            chan.pool = None
            chan.close()


class _Entry:
    """A backend plus the counters, balancer state and idle connections kept for it."""

    __slots__ = (
        "address",
        "configured",
        "cooldown_until",
        "current",
        "errors",
        "host",
        "id",
        "inflight",
        "latency",
        "pool",
        "port",
        "requests",
        "responses_5xx",
        "state",
        "tag",
        "weight",
    )

    def __init__(self, backend: Backend) -> None:
        self.id = backend.id
        self.tag = b"X-Graven-Backend: " + backend.id.encode() + b"\r\n"
        self.inflight = 0
        self.requests = 0
        self.errors = 0
        self.responses_5xx = 0
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        self.current = 0  # smooth weighted round-robin accumulator
        self.cooldown_until = 0.0
        self.configured = True
        self.pool = _Pool()
        self.address = ""
        self.update(backend)

    def update(self, backend: Backend) -> None:
        if backend.address != self.address:
            self.host, self.port = split_address(backend.address)
            self.address = backend.address
            self.reset_pool()  # connections to the old address must not serve the new one
        self.state: BackendState = backend.state
        self.weight = backend.weight
        self.configured = True

    def reset_pool(self) -> None:
        # A fresh pool object: exchanges that started with the old one will not put
        # their connection back (see _Exchange.finish).
        self.pool.close()
        self.pool = _Pool()


class BackendTable:
    """The live backend set: selection, counters, and entries kept until idle."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._ready: list[_Entry] = []
        self._cooldowns_until = 0.0  # no backend cools down past this moment

    def replace(self, backends: list[Backend]) -> None:
        """Swap in a new set. Counters of ids that stay are kept; removed backends with
        requests in flight stay (as ``drain``) until their last request ends. Idle
        connections of backends that drain or leave are closed at once."""
        fresh: dict[str, _Entry] = {}
        for b in backends:
            entry = self._entries.get(b.id)
            if entry is None:
                entry = _Entry(b)
            else:
                entry.update(b)
            if entry.state != "ready":
                entry.reset_pool()
            fresh[b.id] = entry
        for bid, entry in self._entries.items():
            if bid in fresh:
                continue
            entry.reset_pool()
            if entry.inflight > 0:
                entry.configured = False
                entry.state = "drain"
                fresh[bid] = entry
        self._entries = fresh
        self._ready = [
            e for e in fresh.values() if e.configured and e.state == "ready" and e.weight > 0
        ]

    def entries(self) -> list[_Entry]:
        return list(self._entries.values())

    def close_pools(self) -> None:
        for entry in self._entries.values():
            entry.pool.close()

    def snapshot(self) -> list[dict[str, object]]:
        return [
            {
                "id": e.id,
                "address": e.address,
                "state": e.state,
                "weight": e.weight,
                "inflight": e.inflight,
                "requests": e.requests,
                "errors": e.errors,
                "responses_5xx": e.responses_5xx,
                "latency_buckets": list(e.latency),
                "idle_connections": len(e.pool),
            }
            for e in self._entries.values()
        ]

    def acquire(self, exclude: frozenset[str] | set[str] = _NO_EXCLUSIONS) -> _Entry | None:
        """Pick a ready backend not in ``exclude`` and count the request on it.

        Backends cooling down after a failure are used only when no other is left:
        the cooldown is a hint, and trying a maybe-broken backend beats a 503.
        """
        ready = self._ready
        if not exclude and (len(ready) == 1 or self._cooldowns_until <= _now()):
            chosen = ready[0] if len(ready) == 1 else _smooth_weighted_pick(ready)
        else:
            now = _now()
            fresh = [e for e in ready if e.id not in exclude and e.cooldown_until <= now]
            chosen = _smooth_weighted_pick(fresh or [e for e in ready if e.id not in exclude])
        if chosen is not None:
            chosen.inflight += 1
            chosen.requests += 1
        return chosen

    def release(self, entry: _Entry) -> None:
        entry.inflight -= 1
        if entry.inflight == 0 and not entry.configured and self._entries.get(entry.id) is entry:
            del self._entries[entry.id]

    def failed(self, entry: _Entry, *, cooldown: bool) -> None:
        entry.errors += 1
        if cooldown:
            entry.cooldown_until = _now() + COOLDOWN
            self._cooldowns_until = max(self._cooldowns_until, entry.cooldown_until)


def _smooth_weighted_pick(candidates: list[_Entry]) -> _Entry | None:
    # Nginx's smooth weighted round-robin: weights 5,1,1 give a,a,b,a,c,a,a rather
    # than bursts, so a canary at a small weight sees an even trickle of requests.
    best: _Entry | None = None
    total = 0
    for e in candidates:
        e.current += e.weight
        total += e.weight
        if best is None or e.current > best.current:
            best = e
    if best is not None:
        best.current -= total
    return best
