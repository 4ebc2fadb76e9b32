"""The embedded router: one small HTTP/1.1 reverse-proxy process per service.

Run as::

    python -m graven.router.proxy --service web --listen 127.0.0.1:8080 \\
        --admin STATE/routers/web.sock --state STATE/routers/web.json

Data plane
    Each client request goes to one backend in state ``ready``, chosen by smooth
    weighted round-robin, over a keep-alive backend connection: an idle one from the
    backend's pool when there is one, else a fresh one. ``drain`` backends get no new
    requests (their in-flight requests finish) and their idle connections are closed
    at once, so an instance about to stop sees no new request on an old connection.

Connection pool
    Per backend, at most ``POOL_SIZE`` idle connections, most recently used first; one
    idle for ``POOL_IDLE_TIMEOUT`` (shorter than common backend keep-alive timeouts) is
    closed. A connection goes back to the pool only when its exchange ended cleanly:
    the whole request sent, a length-delimited or chunked response read to its end,
    nothing more in the buffer, no ``Connection: close``, an HTTP/1.1 (or explicitly
    keep-alive) backend, and the backend still ``ready``. Anything arriving on an idle
    connection (data or a close) discards it. Requests whose body is streamed
    (chunked, or longer than ``REPLAY_LIMIT``) always get a fresh connection.

When a request is sent again (``resend_decision``)
    Never once any byte of the response arrived, never when the body was streamed
    (it is gone), and never after a response timeout. Otherwise:

    - on a *reused* connection, a clean close (EOF) or a reset / broken pipe before the
      answer started is the keep-alive race: the backend closed the idle connection as
      the request was on its way, so it never read it. The request goes once more, on
      a fresh connection to the same backend, whatever the method (its body is
      buffered); idempotent methods are also resent after any other socket error. This
      is HAProxy's ``retry-on conn-failure empty-response``; it counts no error.
    - on a *fresh* connection, a reset before the answer means the backend closed its
      listening socket with our connection still queued (the application never saw
      it), so any method goes to another ready backend; a clean close is ambiguous and
      only an idempotent request goes to another backend. Both count an error and put
      the backend on a short cooldown, as does a refused connection.

Metrics (cumulative since the proxy started)
    Per backend: ``requests`` (times it was chosen), ``errors`` (5xx answers plus
    attempts that got no usable answer), ``responses_5xx``, and ``latency_buckets``:
    responses per ``LATENCY_BOUNDS`` bucket (upper bounds, inclusive) plus an overflow
    bucket, timed from the moment the whole request was handed to the backend's socket
    to the moment the final response head arrived (the backend's think time, not the
    client's download time). Their sum is the number of responses the backend gave.

Admin API (HTTP/1.1 + JSON on the unix socket ``--admin``)
    ``GET /health``    -> ``{"ok": true, "pid": .., "service": .., "port": .., "loop": ..}``
                          (``loop``: ``uvloop`` or ``asyncio``, the event loop serving)
    ``GET /backends``  -> ``{"service", "port", "backends": [{id, address, state,
    weight, inflight, requests, errors, responses_5xx, latency_buckets,
    idle_connections}]}``
    ``PUT /backends``  with ``{"backends": [{id, address, state, weight}]}`` replaces
    the set atomically, after persisting it to ``--state``.

The process started is a supervisor that holds the port and the admin socket and runs
``--workers N`` proxy processes (one by default); see ``graven.router.workers``.

Exit codes: 0 after SIGTERM (in-flight requests finish, at most 10 s), 2 bad
arguments, 3 cannot bind the port or the admin socket, 4 unreadable state file.
Nothing is written per request; errors go to stderr.

The hot path runs in protocol callbacks: no task, timer or future per request. A
coroutine takes over only to connect or to stream a body too big to buffer; one
periodic sweep enforces the timeouts and expires idle pooled connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Coroutine, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal, Protocol, cast

from graven.model import is_valid_name
from graven.router.base import LATENCY_BOUNDS, Backend, BackendState

log = logging.getLogger("graven.router.proxy")

HEAD_LIMIT: Final = 64 * 1024  # request/response head, chunk-size lines, trailers
REPLAY_LIMIT: Final = 64 * 1024  # bodies up to this size are buffered so a retry can resend them
COPY_SIZE: Final = 64 * 1024
READ_HIGH_WATER: Final = 256 * 1024  # stop reading a socket whose buffer holds this much
READ_LOW_WATER: Final = 64 * 1024  # ... and read again once it is down to this
IDLE_TIMEOUT: Final = 60.0  # keep-alive connection waiting for its next request head
CONNECT_TIMEOUT: Final = 3.0
RESPONSE_TIMEOUT: Final = 300.0  # backend may think this long before its response head
COOLDOWN: Final = 2.0  # passive: a backend that refused a connection sits out this long
DRAIN_TIMEOUT: Final = 10.0  # on SIGTERM, in-flight requests get this long
POOL_SIZE: Final = 64  # idle keep-alive connections kept per backend
# Idle pooled connections close after this long: below the keep-alive timeouts of
# common servers (Node 5 s, uvicorn 5 s, nginx 75 s), so the backend rarely closes first.
POOL_IDLE_TIMEOUT: Final = 4.0
SWEEP_INTERVAL: Final = 1.0  # how often timeouts and pool expiry are checked
ADMIN_BODY_LIMIT: Final = 1024 * 1024
MAX_WEIGHT: Final = 1000
EXIT_BIND: Final = 3
EXIT_STATE: Final = 4

# Methods that RFC 9110 calls idempotent: sending one twice is harmless.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Methods whose requests announce their body's length even when it is empty.
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
# Headers never copied across: hop-by-hop ones, and those the proxy writes itself
# (message framing, X-Forwarded-For, and Expect, which it answers on its own).
_NOT_COPIED: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
    }
)
_TOKEN_RE: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET_RE: Final = re.compile(rb"^[\x21-\x7e]+$")
_DIGITS_RE: Final = re.compile(rb"^[0-9]{1,18}$")
_HEX_RE: Final = re.compile(rb"^[0-9A-Fa-f]{1,15}$")
_BAD_VALUE_RE: Final = re.compile(rb"[\x00\r\n]")
_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
_HOSTNAME_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
_NO_EXCLUSIONS: Final[frozenset[str]] = frozenset()
_now = time.monotonic


# --------------------------------------------------------------------------- backend sets


class BackendSetError(ValueError):
    """A backend set (admin PUT body or state file) is malformed; the message names where."""


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


def parse_backends(items: object, where: str = "backends") -> list[Backend]:
    """Validate a JSON backend list strictly and return it as ``Backend`` values.

    Each item is ``{"id", "address", "state"?, "weight"?}``; ids are unique, state is
    ``ready`` or ``drain`` (default ``ready``), weight an integer 0-1000 (default 100).
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
        bid = item.get("id")
        if not isinstance(bid, str) or not _ID_RE.match(bid):
            raise BackendSetError(
                f"{at}.id: expected 1-128 characters of [A-Za-z0-9._:@-] (got {bid!r})"
            )
        if bid in seen:
            raise BackendSetError(f"{at}.id: duplicate id {bid!r}")
        seen.add(bid)
        address = item.get("address")
        if not isinstance(address, str):
            raise BackendSetError(f"{at}.address: expected a 'host:port' string (got {address!r})")
        try:
            split_address(address)
        except ValueError as exc:
            raise BackendSetError(f"{at}.address: {exc}") from None
        state = item.get("state", "ready")
        if state not in ("ready", "drain"):
            raise BackendSetError(f"{at}.state: expected 'ready' or 'drain' (got {state!r})")
        weight = item.get("weight", 100)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise BackendSetError(f"{at}.weight: expected an integer (got {weight!r})")
        if not 0 <= weight <= MAX_WEIGHT:
            raise BackendSetError(f"{at}.weight: must be 0-{MAX_WEIGHT} (got {weight})")
        out.append(Backend(id=bid, address=address, state=state, weight=weight))
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


def latency_bucket(seconds: float) -> int:
    """Index of the ``LATENCY_BOUNDS`` bucket for ``seconds``: the first bound at or
    above it, or ``len(LATENCY_BOUNDS)`` (the overflow bucket) past the last one."""
    return bisect_left(LATENCY_BOUNDS, seconds)


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


# --------------------------------------------------------------------------- HTTP parsing


class _BadMessage(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Request:
    __slots__ = (
        "chunked",
        "client_ip",
        "expect_continue",
        "forward",
        "has_host",
        "keep_alive",
        "length",
        "method",
        "target",
        "version",
        "xff",
    )

    method: bytes
    target: bytes
    version: int  # 10 or 11
    keep_alive: bool
    length: int
    chunked: bool
    expect_continue: bool
    has_host: bool
    forward: bytes  # end-to-end header lines, each ending in CRLF
    xff: bytes
    client_ip: bytes


def _split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes, bytes]]]:
    """Start line and ``(lowercase name, name, value)`` of each header line."""
    lines = head[:-4].split(b"\r\n")
    headers: list[tuple[bytes, bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # A name with surrounding space (or an obs-fold continuation line) is how
        # request smuggling starts: reject rather than guess.
        if not sep or not _TOKEN_RE.match(name):
            raise _BadMessage(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE_RE.search(value):
            raise _BadMessage(400, "invalid character in header value")
        headers.append((name.lower(), name, value))
    return lines[0], headers


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")]


def _content_length(values: list[bytes], status: int) -> int:
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])  # the usual case, decided at once
    # Several equal values ("5, 5") are tolerated by RFC 9112; differing ones are not.
    found = {t.strip(b" \t") for v in values for t in v.split(b",")}
    if len(found) != 1:
        raise _BadMessage(status, "conflicting Content-Length")
    (text,) = found
    if not _DIGITS_RE.match(text):
        raise _BadMessage(status, "invalid Content-Length")
    return int(text)


# Fast paths. A head in canonical form ("Name: value", one space after the colon, no
# whitespace around the value: what clients and servers nearly always send) is
# validated by one regular expression and copied without being rebuilt line by line.
# A "plain" head, one with no header the proxy must act on (besides Host, or the
# response's Content-Length), is then done; others have their special lines found and
# cut. Anything not canonical takes the strict parser, which names the problem. All
# paths give the same result for any head a faster one accepts (see the unit tests).
_START_LINE_REQUEST: Final = rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.([01])\r\n"
_START_LINE_RESPONSE: Final = rb"HTTP/1\.([01]) ([0-9]{3}) ([^\r\n]*)\r\n"
_CANONICAL_LINE: Final = (
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: (?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?\r\n"
)
_FAST_REQUEST_RE: Final = re.compile(_START_LINE_REQUEST + rb"((?:" + _CANONICAL_LINE + rb")*)\r\n")
_FAST_RESPONSE_RE: Final = re.compile(
    _START_LINE_RESPONSE + rb"((?:" + _CANONICAL_LINE + rb")*)\r\n"
)
# Hop-by-hop, framing and proxy-owned names (and "close": see below), as a prefix tree
# so that a line is cleared at its first letter or two.
_ACTED_ON: Final = (
    rb"c(?:onnection|lose)|keep-alive|proxy-(?:connection|authenticate|authorization)"
    rb"|t(?:e|railer|ransfer-encoding)|upgrade|expect|x-(?:forwarded-for|graven-backend)"
)
_PLAIN_REQUEST_RE: Final = re.compile(
    _START_LINE_REQUEST
    + rb"((?:(?!(?i:"
    + _ACTED_ON
    + rb"|content-length):)"
    + _CANONICAL_LINE
    + rb")*)\r\n"
)
_PLAIN_RESPONSE_RE: Final = re.compile(
    _START_LINE_RESPONSE + rb"((?:(?!(?i:" + _ACTED_ON + rb"):)" + _CANONICAL_LINE + rb")*)\r\n"
)
# The commonest heads of all, settled by one match with nothing left to look up: a
# plain request with exactly one Host line, and a plain response with exactly one
# all-digit Content-Length (captured, and the lines either side of it).
_CANONICAL_VALUE: Final = rb"(?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?\r\n"
_NO_HOST_LINE: Final = rb"(?!(?i:" + _ACTED_ON + rb"|content-length|host):)" + _CANONICAL_LINE
_ONE_HOST_REQUEST_RE: Final = re.compile(
    _START_LINE_REQUEST
    + rb"((?:"
    + _NO_HOST_LINE
    + rb")*(?i:host): "
    + _CANONICAL_VALUE
    + rb"(?:"
    + _NO_HOST_LINE
    + rb")*)\r\n"
)
_NO_LENGTH_LINE: Final = rb"(?!(?i:" + _ACTED_ON + rb"|content-length):)" + _CANONICAL_LINE
_ONE_LENGTH_RESPONSE_RE: Final = re.compile(
    _START_LINE_RESPONSE
    + rb"((?:"
    + _NO_LENGTH_LINE
    + rb")*)(?i:content-length): ([0-9]{1,18})\r\n((?:"
    + _NO_LENGTH_LINE
    + rb")*)\r\n"
)
# Header lines the proxy reads or drops (and "close", so that the rare header named by
# ``Connection: close`` is left to the strict parser), searched for in the lowercased
# head of a message the fast path accepted: each line is "name: value\r\n" there.
_SPECIAL_NAMES: Final = (
    rb"connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|proxy-authenticate|proxy-authorization|content-length|expect|x-forwarded-for|close"
)
_REQUEST_SPECIAL_RE: Final = re.compile(rb"\n(" + _SPECIAL_NAMES + rb"|host): ([^\r]*)\r")
_RESPONSE_SPECIAL_RE: Final = re.compile(
    rb"\n(" + _SPECIAL_NAMES + rb"|x-graven-backend): ([^\r]*)\r"
)
_PLAIN_CONNECTION_TOKENS: Final = frozenset({b"close", b"keep-alive"})


def _cut(head: bytes, start: int, end: int, cuts: list[tuple[int, int]]) -> bytes:
    """``head[start:end]`` without the ``cuts`` spans (ascending, inside the range)."""
    if not cuts:
        return head[start:end]
    pieces = []
    for cut_start, cut_end in cuts:
        pieces.append(head[start:cut_start])
        start = cut_end
    pieces.append(head[start:end])
    return b"".join(pieces)


def _parse_request(head: bytes) -> _Request:
    m = _ONE_HOST_REQUEST_RE.fullmatch(head)
    if m is not None:
        req = _Request()
        req.method, req.target, minor, req.forward = m.groups()
        if minor == b"1":
            req.version, req.keep_alive = 11, True
        else:
            req.version, req.keep_alive = 10, False
        req.has_host = True
        req.chunked = req.expect_continue = False
        req.length = 0
        req.xff = req.client_ip = b""
        return req
    m = _PLAIN_REQUEST_RE.fullmatch(head)
    if m is not None:
        return _request_from(
            m.group(1),
            m.group(2),
            11 if m.group(3) == b"1" else 10,
            [],
            [],
            [],
            [],
            head.lower().count(b"\nhost: "),
            False,
            m.group(4),
        )
    m = _FAST_REQUEST_RE.fullmatch(head)
    if m is None:
        return _parse_request_strict(head)
    block_start, block_end = m.span(4)
    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    xff: list[bytes] = []
    hosts = 0
    expect_continue = False
    cuts: list[tuple[int, int]] = []
    for special in _REQUEST_SPECIAL_RE.finditer(head.lower(), block_start - 1, block_end):
        name, value = special.groups()
        if name == b"host":
            hosts += 1
            continue
        cuts.append((special.start() + 1, special.end() + 1))
        if name == b"connection":
            connection.append(value)
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        elif name == b"x-forwarded-for":
            xff.append(head[special.start(2) : special.end(2)])  # as sent, not lowercased
        elif name == b"expect":
            expect_continue = value == b"100-continue"
        elif name == b"close":
            return _parse_request_strict(head)
    conn_tokens = _tokens(connection) if connection else []
    if not _PLAIN_CONNECTION_TOKENS.issuperset(conn_tokens):
        return _parse_request_strict(head)  # it names headers to drop
    return _request_from(
        m.group(1),
        m.group(2),
        11 if m.group(3) == b"1" else 10,
        conn_tokens,
        lengths,
        codings,
        xff,
        hosts,
        expect_continue,
        _cut(head, block_start, block_end, cuts),
    )


def _parse_request_strict(head: bytes) -> _Request:
    start, headers = _split_head(head)
    parts = start.split(b" ")
    if len(parts) != 3:
        raise _BadMessage(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.match(method) or not _TARGET_RE.match(target):
        raise _BadMessage(400, "malformed request line")
    if version == b"HTTP/1.1":
        ver = 11
    elif version == b"HTTP/1.0":
        ver = 10
    elif version.startswith(b"HTTP/") and len(version) == 8:
        raise _BadMessage(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    else:
        raise _BadMessage(400, "malformed request line")

    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    xff: list[bytes] = []
    hosts = 0
    expect_continue = False
    kept: list[tuple[bytes, bytes, bytes]] = []
    for lname, name, value in headers:
        if lname not in _NOT_COPIED:
            if lname == b"host":
                hosts += 1
            kept.append((lname, name, value))
        elif lname == b"connection":
            connection.append(value)
        elif lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
        elif lname == b"x-forwarded-for":
            xff.append(value)
        elif lname == b"expect":
            expect_continue = value.lower() == b"100-continue"
    conn_tokens = _tokens(connection)
    if conn_tokens:
        named = set(conn_tokens)
        kept = [h for h in kept if h[0] not in named]
    forward = b"".join(name + b": " + value + b"\r\n" for _, name, value in kept)
    return _request_from(
        method, target, ver, conn_tokens, lengths, codings, xff, hosts, expect_continue, forward
    )


def _request_from(
    method: bytes,
    target: bytes,
    ver: int,
    conn_tokens: list[bytes],
    lengths: list[bytes],
    codings: list[bytes],
    xff: list[bytes],
    hosts: int,
    expect_continue: bool,
    forward: bytes,
) -> _Request:
    req = _Request()
    req.method = method
    req.target = target
    req.version = ver
    if ver == 11:
        req.keep_alive = b"close" not in conn_tokens
    else:
        req.keep_alive = b"keep-alive" in conn_tokens
    if hosts > 1 or (ver == 11 and hosts == 0):
        raise _BadMessage(400, "exactly one Host header is required")
    req.has_host = hosts == 1
    req.chunked = False
    req.length = 0
    if codings:
        # Both framings at once is the textbook smuggling vector; refuse it.
        if lengths or ver == 10:
            raise _BadMessage(400, "Transfer-Encoding not allowed here")
        if _tokens(codings) != [b"chunked"]:
            raise _BadMessage(501, "only 'chunked' transfer coding is supported")
        req.chunked = True
    elif lengths:
        req.length = _content_length(lengths, 400)
    req.expect_continue = expect_continue and (req.chunked or req.length > 0)
    req.forward = forward
    req.xff = b", ".join(xff) if xff else b""
    req.client_ip = b""
    return req


class _Response:
    __slots__ = (
        "chunked",
        "close_delimited",
        "forward",
        "has_body",
        "keep_alive",
        "length",
        "start",
        "status",
    )

    status: int
    start: bytes  # b"HTTP/1.1 200 OK\r\n"
    forward: bytes
    chunked: bool
    close_delimited: bool
    keep_alive: bool  # the backend keeps the connection open after this response
    has_body: bool  # False for HEAD answers, 1xx, 204 and 304
    length: int | None  # None: no Content-Length (or a bodiless response)


def _parse_response(head: bytes, method: bytes) -> _Response:
    m = _ONE_LENGTH_RESPONSE_RE.fullmatch(head)
    if m is not None:
        minor, status, reason, before, length, after = m.groups()
        start = b"HTTP/1.1 " + status + b" " + reason + b"\r\n"
        code = int(status)
        if code < 200 or code in (204, 304) or method == b"HEAD":
            return _response_from(
                status, start, minor == b"1", set(), [length], [], before + after, method
            )
        resp = _Response()
        resp.status = code
        resp.start = start
        resp.forward = before + after
        resp.keep_alive = minor == b"1"
        resp.has_body = True
        resp.chunked = resp.close_delimited = False
        resp.length = int(length)
        return resp
    m = _PLAIN_RESPONSE_RE.fullmatch(head)
    if m is not None:
        status = m.group(2)
        start = b"HTTP/1.1 " + status + b" " + m.group(3) + b"\r\n"
        block_start, block_end = m.span(4)
        lowered = head.lower()
        at = lowered.find(b"\ncontent-length: ", block_start - 1)
        if at < 0:
            return _response_from(
                status, start, m.group(1) == b"1", set(), [], [], m.group(4), method
            )
        line_end = head.index(b"\r\n", at + 1) + 2
        if lowered.find(b"\ncontent-length: ", line_end - 1) < 0:  # just the one
            return _response_from(
                status,
                start,
                m.group(1) == b"1",
                set(),
                [head[at + 17 : line_end - 2]],
                [],
                head[block_start : at + 1] + head[line_end:block_end],
                method,
            )
    m = _FAST_RESPONSE_RE.fullmatch(head)
    if m is None:
        return _parse_response_strict(head, method)
    block_start, block_end = m.span(4)
    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    cuts: list[tuple[int, int]] = []
    for special in _RESPONSE_SPECIAL_RE.finditer(head.lower(), block_start - 1, block_end):
        name, value = special.groups()
        cuts.append((special.start() + 1, special.end() + 1))
        if name == b"content-length":
            lengths.append(value)
        elif name == b"connection":
            connection.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        elif name == b"close":
            return _parse_response_strict(head, method)
    named = set(_tokens(connection)) if connection else set()
    if not _PLAIN_CONNECTION_TOKENS.issuperset(named):
        return _parse_response_strict(head, method)  # it names headers to drop
    status = m.group(2)
    return _response_from(
        status,
        b"HTTP/1.1 " + status + b" " + m.group(3) + b"\r\n",
        m.group(1) == b"1",
        named,
        lengths,
        codings,
        _cut(head, block_start, block_end, cuts),
        method,
    )


def _parse_response_strict(head: bytes, method: bytes) -> _Response:
    start, headers = _split_head(head)
    parts = start.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise _BadMessage(502, "malformed status line from backend")
    if not parts[1].isdigit():
        raise _BadMessage(502, "malformed status line from backend")
    reason = parts[2] if len(parts) == 3 else b""

    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    kept: list[tuple[bytes, bytes, bytes]] = []
    for lname, name, value in headers:
        if lname == b"connection":
            connection.append(value)
        elif lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
        elif lname in _NOT_COPIED or lname == b"x-graven-backend":
            continue
        else:
            kept.append((lname, name, value))
    named = set(_tokens(connection)) if connection else set()
    if named:
        kept = [h for h in kept if h[0] not in named]
    return _response_from(
        parts[1],
        b"HTTP/1.1 " + parts[1] + b" " + reason + b"\r\n",
        parts[0] == b"HTTP/1.1",
        named,
        lengths,
        codings,
        b"".join(name + b": " + value + b"\r\n" for _, name, value in kept),
        method,
    )


def _response_from(
    status: bytes,
    start: bytes,
    http11: bool,
    conn_tokens: set[bytes],
    lengths: list[bytes],
    codings: list[bytes],
    forward: bytes,
    method: bytes,
) -> _Response:
    resp = _Response()
    resp.status = code = int(status)
    resp.start = start
    resp.forward = forward
    resp.keep_alive = b"close" not in conn_tokens and (http11 or b"keep-alive" in conn_tokens)
    resp.chunked = False
    resp.close_delimited = False
    resp.length = None
    resp.has_body = not (method == b"HEAD" or code in (204, 304) or code < 200)
    if not resp.has_body:
        # A HEAD answer's Content-Length describes the GET body; pass it through as is.
        if lengths and code != 204 and code >= 200:
            resp.length = _content_length(lengths, 502)
    elif codings:
        # Transfer-Encoding overrides Content-Length (RFC 9112 6.3); a final coding
        # other than chunked means the body runs until the backend closes.
        if _tokens(codings)[-1:] == [b"chunked"]:
            resp.chunked = True
        else:
            resp.close_delimited = True
    elif lengths:
        resp.length = _content_length(lengths, 502)
    else:
        resp.close_delimited = True
    return resp


# --------------------------------------------------------------------------- body copying


class _ClientFailed(Exception):
    """The client went away or sent a body we cannot frame."""


class _BackendFailed(Exception):
    """The backend went away or sent a body we cannot frame."""


class _BrokenBody(Exception):
    """The backend broke off a short body before the proxy answered the client."""


async def _read(src: _Channel, n: int, fail: type[Exception]) -> bytes:
    try:
        data = await src.read(n)
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise fail(str(exc)) from exc
    if not data:
        raise fail("connection closed mid-body")
    return data


async def _read_line(src: _Channel, fail: type[Exception]) -> bytes:
    try:
        return await src.readuntil(b"\r\n")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise fail(f"bad chunked framing: {exc}") from exc


async def _drain(dst: _Channel, fail: type[Exception]) -> None:
    if dst.writing_paused or dst.lost:
        try:
            await dst.drain()
        except OSError as exc:
            raise fail(str(exc)) from exc


async def _copy_fixed(
    src: _Channel,
    dst: _Channel,
    n: int,
    src_fail: type[Exception],
    dst_fail: type[Exception],
) -> None:
    while n > 0:
        data = await _read(src, min(n, COPY_SIZE), src_fail)
        dst.write(data)
        n -= len(data)
        await _drain(dst, dst_fail)


async def _copy_chunked(
    src: _Channel,
    dst: _Channel,
    reencode: bool,
    src_fail: type[Exception],
    dst_fail: type[Exception],
) -> None:
    """Copy a chunked body, validating its framing. With ``reencode`` the output is
    chunked again (trailers kept); without, the decoded bytes (an HTTP/1.0 client)."""
    while True:
        line = await _read_line(src, src_fail)
        size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
        if not _HEX_RE.match(size_text):
            raise src_fail("bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            trailers: list[bytes] = []
            total = 0
            while True:
                t = await _read_line(src, src_fail)
                if t == b"\r\n":
                    break
                total += len(t)
                if total > HEAD_LIMIT or b":" not in t:
                    raise src_fail("bad trailer section")
                trailers.append(t)
            if reencode:
                dst.write(b"0\r\n" + b"".join(trailers) + b"\r\n")
            return
        if reencode:
            dst.write(b"%x\r\n" % size)
        await _copy_fixed(src, dst, size, src_fail, dst_fail)
        try:
            crlf = await src.readexactly(2)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise src_fail("body ended mid-chunk") from exc
        if crlf != b"\r\n":
            raise src_fail("chunk not followed by CRLF")
        if reencode:
            dst.write(b"\r\n")


async def _copy_until_close(
    src: _Channel,
    dst: _Channel,
    chunk_it: bool,
    dst_fail: type[Exception],
) -> None:
    # A body delimited by the backend closing: re-frame it as chunked for an HTTP/1.1
    # client so its connection can stay open.
    while True:
        try:
            data = await src.read(COPY_SIZE)
        except OSError as exc:
            raise _BackendFailed(str(exc)) from exc
        if not data:
            break
        dst.write(b"%x\r\n%b\r\n" % (len(data), data) if chunk_it else data)
        await _drain(dst, dst_fail)
    if chunk_it:
        dst.write(b"0\r\n\r\n")


# --------------------------------------------------------------------------- retry rule

FailureKind = Literal["eof", "reset", "timeout", "other"]
Resend = Literal["fresh-connection", "next-backend", "no"]


def resend_decision(
    method: bytes, failure: FailureKind, *, reused: bool, replayable: bool, answered: bool
) -> Resend:
    """Whether a request whose backend connection failed may be sent again, and how.

    ``failure`` is how the connection failed before a complete response head: a clean
    close (``eof``), a reset or broken pipe (``reset``), the response timeout, or
    another socket error. ``reused``: the connection came from the pool. ``replayable``:
    the body is buffered. ``answered``: some byte of the response had arrived.
    See the module docstring for the reasoning.
    """
    if answered or not replayable or failure == "timeout":
        return "no"
    if reused:
        if failure in ("eof", "reset") or method in _IDEMPOTENT:
            return "fresh-connection"
        return "no"
    if failure == "reset" or (failure == "eof" and method in _IDEMPOTENT):
        return "next-backend"
    return "no"


def _failure_kind(chan: _Channel) -> FailureKind:
    error = chan.error
    if error is None:
        return "eof"
    if isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(error, TimeoutError):
        return "timeout"
    return "other"


_FAILURE_TEXT: Final[dict[FailureKind, str]] = {
    "eof": "closed the connection early",
    "reset": "reset the connection",
    "timeout": "did not answer in time",
    "other": "did not answer properly",
}


# --------------------------------------------------------------------------- connections


class _Abort:
    """Outcome: a response was cut short; reset the client connection so the client
    cannot take a truncated body for a complete one."""


_ABORT: Final = _Abort()
# What an exchange leaves its client connection with: True, carry on; False, close
# after the answer; _ABORT, reset.
_Outcome = bool | _Abort


def _error_response(status: int, message: str, *, keep_alive: bool) -> bytes:
    body = message.encode() + b"\n"
    lines = [
        b"HTTP/1.1 %d %b\r\n" % (status, HTTPStatus(status).phrase.encode()),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if status == 503:
        lines.append(b"Retry-After: 1\r\n")
    lines.append(b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    return b"".join(lines) + body


class _Channel(asyncio.Protocol):
    """One TCP connection, client or backend side: a receive buffer that protocol
    callbacks (through ``listener``) and coroutines (``read*``) both consume.

    ``listener`` is called on every event (data, EOF, loss, writable again) unless a
    coroutine is waiting in a ``read*`` call, which is woken instead; either re-checks
    the state, so an event without news is harmless.
    """

    __slots__ = (
        "_read_waiter",
        "_reading_paused",
        "_write_waiter",
        "buf",
        "eof",
        "error",
        "idle_since",
        "listener",
        "lost",
        "on_made",
        "pool",
        "received",
        "transport",
        "writing_paused",
    )

    transport: asyncio.Transport

    def __init__(self, on_made: Callable[[_Channel], None] | None = None) -> None:
        self.buf = bytearray()
        self.eof = False  # nothing more will arrive
        self.lost = False  # the connection is gone
        self.error: Exception | None = None  # why it went, if not a clean close
        self.received = 0  # bytes that arrived since the owner last reset this
        self.listener: Callable[[], None] | None = None
        self.on_made = on_made
        self.pool: _Pool | None = None  # set while the connection waits in a pool
        self.idle_since = 0.0
        self.writing_paused = False
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- protocol events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        self.received += len(data)
        if len(buf) > READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        # _wake(), inlined: this is the hot path.
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        elif self.listener is not None:
            self.listener()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep our sending half open: a half-closed client still gets its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake_writer()
        self._wake()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()
        self._wake()

    def _wake(self) -> None:
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        elif self.listener is not None:
            self.listener()

    def _wake_writer(self) -> None:
        waiter = self._write_waiter
        if waiter is not None:
            self._write_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ---------------------------------------------------------------- use

    def take(self, n: int) -> bytes:
        """Remove and return the first ``n`` buffered bytes (fewer if fewer are there)."""
        buf = self.buf
        if n >= len(buf):
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(buf[:n])
            del buf[:n]
        if self._reading_paused and len(buf) <= READ_LOW_WATER:
            self._reading_paused = False
            self.transport.resume_reading()
        return out

    def write(self, data: bytes) -> None:
        if not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """Close after sending what is buffered."""
        self.transport.close()

    def abort(self) -> None:
        """Reset at once: the peer cannot mistake a cut-short message for a whole one."""
        self.transport.abort()

    def time_out(self) -> None:
        self.error = TimeoutError("timed out")
        self.abort()

    def leave_pool(self) -> None:
        """Listener while pooled: any event (a close, stray bytes) disqualifies it."""
        if self.pool is not None:
            self.pool.discard(self)
            self.pool = None
        self.listener = None
        if self.buf:
            self.abort()
        else:
            self.close()

    async def _readable(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._read_waiter = waiter
        try:
            await waiter
        finally:
            self._read_waiter = None

    async def readuntil(self, sep: bytes, limit: int = HEAD_LIMIT) -> bytes:
        """Like ``StreamReader.readuntil``; a lost connection raises its error."""
        while True:
            found = self.buf.find(sep)
            if found >= 0:
                end = found + len(sep)
                if end > limit:
                    raise asyncio.LimitOverrunError("separator beyond the limit", found)
                return self.take(end)
            if len(self.buf) > limit:
                raise asyncio.LimitOverrunError("no separator within the limit", len(self.buf))
            if self.error is not None:
                raise self.error
            if self.eof:
                raise asyncio.IncompleteReadError(self.take(len(self.buf)), None)
            await self._readable()

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` at a clean end."""
        while not self.buf:
            if self.error is not None:
                raise self.error
            if self.eof:
                return b""
            await self._readable()
        return self.take(n)

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.error is not None:
                raise self.error
            if self.eof:
                raise asyncio.IncompleteReadError(self.take(len(self.buf)), n)
            await self._readable()
        return self.take(n)

    async def drain(self) -> None:
        """Wait until the transport takes more; raise if the connection is gone."""
        while self.writing_paused and not self.lost:
            waiter = asyncio.get_running_loop().create_future()
            self._write_waiter = waiter
            try:
                await waiter
            finally:
                self._write_waiter = None
        if self.lost:
            raise self.error or ConnectionResetError("connection lost")


# --------------------------------------------------------------------------- exchanges


class _Session:
    """One client connection: its requests one at a time, each an ``_Exchange``;
    pipelined requests wait in the buffer until the one before is answered."""

    __slots__ = ("_looping", "chan", "client_ip", "closed", "exchange", "idle_since", "proxy")

    def __init__(self, proxy: RouterProxy, chan: _Channel) -> None:
        self.proxy = proxy
        self.chan = chan
        peer = chan.transport.get_extra_info("peername")
        self.client_ip = (peer[0] if isinstance(peer, tuple) else "unknown").encode()
        self.exchange: _Exchange | None = None
        self.idle_since = _now()
        self.closed = False
        self._looping = False
        chan.listener = self.on_event

    def on_event(self) -> None:
        exchange = self.exchange
        if exchange is None:
            self.next_requests()
        elif exchange.waiting_for_body:
            try:
                exchange.body_arrived()
            except Exception:
                log.exception("unexpected error on a client connection")
                self.crash()

    def next_requests(self) -> None:
        # A loop, not recursion: answers made on the spot (errors, 503) would otherwise
        # nest one call per pipelined request.
        if self._looping:
            return
        self._looping = True
        try:
            while self.exchange is None and not self.closed and self._start_next():
                pass
        except Exception:
            log.exception("unexpected error on a client connection")
            self.crash()
        finally:
            self._looping = False

    def _start_next(self) -> bool:
        """Start the next buffered request; False when there is nothing to do for now."""
        chan = self.chan
        if self.proxy.closing:
            self.close()
            return False
        if chan.writing_paused:
            return False  # the client is not reading its answers; resume_writing calls back
        buf = chan.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end + 4 > HEAD_LIMIT:
            if end >= 0 or len(buf) >= HEAD_LIMIT:
                self.refuse(431, "request head larger than 64 KiB")
            elif chan.eof:
                if chan.error is None and buf.strip():
                    self.refuse(400, "incomplete request head")
                else:
                    self.close()
            return False
        head = chan.take(end + 4).lstrip(b"\r\n")  # RFC 9112 2.2: ignore leading empty lines
        if not head:
            return True
        try:
            req = _parse_request(head)
        except _BadMessage as exc:
            self.refuse(exc.status, exc.reason)
            return False
        req.client_ip = self.client_ip
        self.exchange = exchange = _Exchange(self.proxy, self, req)
        exchange.begin()
        return True

    def refuse(self, status: int, reason: str) -> None:
        self.chan.write(_error_response(status, reason, keep_alive=False))
        self.close()

    def exchange_done(self, outcome: _Outcome, now: float) -> None:
        self.exchange = None
        if outcome is _ABORT:
            self.close(abort=True)
        elif outcome is False or self.chan.lost:
            self.close()
        else:
            self.idle_since = now
            chan = self.chan
            if chan.buf or chan.eof or self.proxy.closing:
                self.next_requests()  # a pipelined request, or the end of the connection

    def close(self, *, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if abort:
            self.chan.abort()
        else:
            self.chan.close()
        self.proxy.forget(self)

    def crash(self) -> None:
        """After a bug: reset the client, end the exchange, keep the proxy serving."""
        exchange = self.exchange
        if exchange is not None:
            exchange.crash()
        self.exchange = None
        self.close(abort=True)


class _Exchange:
    """One request's trip: pick a backend, send, relay the answer, resend when safe.

    Buffered requests with short, length-delimited answers are handled in callbacks
    only; a coroutine takes over to connect, or to stream a body in either direction.
    """

    __slots__ = (
        "answer",
        "body_done",
        "deadline",
        "done",
        "entry",
        "pool",
        "proxy",
        "replay",
        "req",
        "reused",
        "sent_at",
        "session",
        "tried",
        "up",
        "waiting_for_body",
    )

    def __init__(self, proxy: RouterProxy, session: _Session, req: _Request) -> None:
        self.proxy = proxy
        self.session = session
        self.req = req
        self.replay: bytes | None = None  # the buffered body; None: streamed, cannot resend
        self.body_done = True  # the client's body is fully read, so its connection can go on
        self.waiting_for_body = False
        self.entry: _Entry | None = None
        self.pool: _Pool | None = None  # the entry's pool when the backend was chosen
        self.up: _Channel | None = None
        self.reused = False
        self.tried: set[str] | None = None  # backends that failed this request
        self.answer: _Response | None = None
        self.sent_at = 0.0
        self.deadline = 0.0  # for the sweep: body wait or response head wait; 0 = none
        self.done = False

    # ---------------------------------------------------------------- request side

    def begin(self) -> None:
        req = self.req
        if req.length == 0 and not req.chunked:
            self.replay = b""
            self.dispatch()
            return
        if req.expect_continue:
            self.session.chan.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if req.chunked or req.length > REPLAY_LIMIT:
            self.dispatch()  # streamed: replay stays None
        else:
            self.waiting_for_body = True
            self.deadline = _now() + IDLE_TIMEOUT
            self.body_arrived()

    def body_arrived(self) -> None:
        chan = self.session.chan
        if len(chan.buf) >= self.req.length:
            self.waiting_for_body = False
            self.deadline = 0.0
            self.replay = chan.take(self.req.length)
            self.dispatch()
        elif chan.eof:
            self.done = True
            self.session.exchange_done(False, 0.0)

    def dispatch(self) -> None:
        """Choose a backend and send, over a pooled connection when one is idle."""
        entry = self.proxy.table.acquire(self.tried or _NO_EXCLUSIONS)
        if entry is None:
            self.no_backend()
            return
        self.entry = entry
        self.pool = entry.pool
        if self.replay is not None:
            chan = entry.pool.take(_now())
            if chan is not None:
                self.send(chan, reused=True)
                return
        self.proxy.spawn(self, self.connect())

    async def connect(self) -> None:
        entry = self.entry
        assert entry is not None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, chan = await asyncio.get_running_loop().create_connection(
                    _Channel, entry.host, entry.port
                )
        except (OSError, TimeoutError):
            if not self.done:
                self.proxy.table.failed(entry, cooldown=True)
                self.next_backend()
            return
        if self.done:  # the client connection was reset meanwhile
            chan.close()
            return
        if self.replay is not None:
            self.send(chan, reused=False)
        else:
            await self.send_streamed(chan)

    def send(self, up: _Channel, *, reused: bool) -> None:
        assert self.entry is not None and self.replay is not None
        self.up = up
        self.reused = reused
        up.received = 0
        up.listener = self.on_upstream
        # One write, one segment: head and a small body travel together.
        up.write(self.proxy.upstream_head(self.req, self.entry) + self.replay)
        self.sent_at = _now()
        self.deadline = self.sent_at + RESPONSE_TIMEOUT

    async def send_streamed(self, up: _Channel) -> None:
        assert self.entry is not None
        req, client = self.req, self.session.chan
        self.up = up
        up.received = 0
        up.write(self.proxy.upstream_head(req, self.entry))
        try:
            if req.chunked:
                await _copy_chunked(client, up, True, _ClientFailed, _BackendFailed)
            else:
                await _copy_fixed(client, up, req.length, _ClientFailed, _BackendFailed)
        except _ClientFailed:
            # Reset, so the backend cannot take a cut-off body for a whole one.
            up.abort()
            self.up = None
            client.write(_error_response(400, "bad or incomplete request body", keep_alive=False))
            self.finish(False, reusable=False)
            return
        except _BackendFailed:
            # The backend stopped reading; it may still have answered (say, 413).
            self.body_done = False
        self.sent_at = _now()
        self.deadline = self.sent_at + RESPONSE_TIMEOUT
        up.listener = self.on_upstream
        self.on_upstream()  # whatever arrived while the body went out

    def next_backend(self) -> None:
        """The chosen backend failed before the request could matter: try another."""
        entry = self.entry
        assert entry is not None
        self.proxy.table.release(entry)
        if self.tried is None:
            self.tried = set()
        self.tried.add(entry.id)
        self.entry = self.pool = None
        self.dispatch()

    def no_backend(self) -> None:
        proxy, req = self.proxy, self.req
        # Without a buffered body the client's body is still unread: close after this.
        keep = req.keep_alive and self.replay is not None and not proxy.closing
        if self.tried:
            message = f"no backend of service {proxy.service!r} could take the request"
            self.session.chan.write(_error_response(502, message, keep_alive=keep))
        else:
            message = f"no ready backend for service {proxy.service!r}"
            self.session.chan.write(_error_response(503, message, keep_alive=keep))
        self.finish(keep, reusable=False)

    # ---------------------------------------------------------------- response side

    def on_upstream(self) -> None:
        try:
            self._on_upstream()
        except Exception:
            log.exception("unexpected error on a backend connection")
            self.session.crash()

    def _on_upstream(self) -> None:
        up, entry = self.up, self.entry
        assert up is not None and entry is not None
        answer = self.answer
        if answer is None:
            while True:  # interim answers (100, 103) are dropped: we sent our own 100
                buf = up.buf
                end = buf.find(b"\r\n\r\n")
                if end < 0 or end + 4 > HEAD_LIMIT:
                    if end >= 0 or len(buf) >= HEAD_LIMIT:
                        self.backend_failed("sent a response head larger than 64 KiB")
                    elif up.eof:
                        self.connection_failed()
                    return
                try:
                    answer = _parse_response(up.take(end + 4), self.req.method)
                    if answer.status == 101:
                        raise _BadMessage(502, "backend switched protocols without being asked")
                except _BadMessage:
                    self.backend_failed("sent a malformed response")
                    return
                if answer.status >= 200:
                    break
            self.answer = answer
            entry.latency[bisect_left(LATENCY_BOUNDS, _now() - self.sent_at)] += 1
            if answer.status >= 500:
                entry.responses_5xx += 1
                entry.errors += 1
            if answer.has_body and (answer.length is None or answer.length > COPY_SIZE):
                # Too big to buffer, or framed by chunks or by the close: stream it.
                self.deadline = 0.0
                up.listener = None
                keep = self.write_head(answer, b"")
                self.proxy.spawn(self, self.relay_body(answer, keep))
                return
        need = answer.length if answer.has_body and answer.length is not None else 0
        if len(up.buf) < need:
            if up.eof:
                # Nothing reached the client yet, so it still gets a clean 502.
                self.backend_failed("broke off its response")
            return
        keep = self.write_head(answer, up.take(need))
        reusable = answer.keep_alive and self.body_done and not up.buf and not up.eof
        self.finish(keep, reusable=reusable)

    def write_head(self, answer: _Response, body: bytes) -> bool:
        """Send the response head (and a short body) to the client; True if the client
        connection may carry another request afterwards."""
        req, entry = self.req, self.entry
        assert entry is not None
        has_body = answer.has_body
        keep = req.keep_alive and self.body_done and not self.proxy.closing
        out = [answer.start, answer.forward]
        if has_body and req.version == 11 and (answer.chunked or answer.close_delimited):
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif answer.length is not None:
            out.append(b"Content-Length: %d\r\n" % answer.length)
        elif has_body:
            keep = False  # an HTTP/1.0 client learns where the body ends by our close
        out.append(entry.tag)
        if not keep:
            out.append(b"Connection: close\r\n\r\n")
        elif req.version == 10:
            out.append(b"Connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        out.append(body)
        self.session.chan.write(b"".join(out))
        return keep

    async def relay_body(self, answer: _Response, keep: bool) -> None:
        up, client = self.up, self.session.chan
        assert up is not None and self.entry is not None
        chunk_out = self.req.version == 11
        try:
            if answer.chunked:
                await _copy_chunked(up, client, chunk_out, _BackendFailed, _ClientFailed)
            elif answer.length is not None:
                await _copy_fixed(up, client, answer.length, _BackendFailed, _ClientFailed)
            else:
                await _copy_until_close(up, client, chunk_out, _ClientFailed)
        except _BackendFailed:
            self.entry.errors += 1
            self.finish(_ABORT, reusable=False)
            return
        except _ClientFailed:
            self.finish(_ABORT, reusable=False)
            return
        reusable = (
            answer.keep_alive
            and not answer.close_delimited
            and self.body_done
            and not up.buf
            and not up.eof
        )
        self.finish(keep, reusable=reusable)

    # ---------------------------------------------------------------- failures

    def connection_failed(self) -> None:
        """The backend connection ended before a complete response head."""
        up, entry, table = self.up, self.entry, self.proxy.table
        assert up is not None and entry is not None
        kind = _failure_kind(up)
        decision = resend_decision(
            self.req.method,
            kind,
            reused=self.reused,
            replayable=self.replay is not None,
            answered=up.received > 0,
        )
        up.listener = None
        up.abort()
        self.up = None
        if decision == "fresh-connection":
            self.proxy.spawn(self, self.connect())  # same backend: it is not to blame
        elif decision == "next-backend":
            table.failed(entry, cooldown=True)
            self.next_backend()
        else:
            table.failed(entry, cooldown=False)
            self.fail_502(_FAILURE_TEXT[kind])

    def backend_failed(self, what: str) -> None:
        """The backend answered, but not usably: 502, no resend."""
        assert self.up is not None and self.entry is not None
        self.up.listener = None
        self.up.abort()
        self.up = None
        self.proxy.table.failed(self.entry, cooldown=False)
        self.fail_502(what)

    def fail_502(self, what: str) -> None:
        req = self.req
        keep = req.keep_alive and self.body_done and not self.proxy.closing
        message = f"backend of service {self.proxy.service!r} {what}"
        self.session.chan.write(_error_response(502, message, keep_alive=keep))
        self.finish(keep, reusable=False)

    # ---------------------------------------------------------------- the end

    def finish(self, outcome: _Outcome, *, reusable: bool) -> None:
        """Pool or close the backend connection, release the backend, hand the client
        connection back to its session."""
        if self.done:
            return
        self.done = True
        self.deadline = 0.0
        now = _now()
        up, entry = self.up, self.entry
        if up is not None:
            up.listener = None
            # Only a clean end goes back, to the pool it came from (a drain, a removal
            # or a new address replaced that pool) and only while the backend is ready.
            pooled = (
                reusable
                and entry is not None
                and entry.state == "ready"
                and entry.configured
                and self.pool is entry.pool
                and not self.proxy.closing
                and entry.pool.put(up, now)
            )
            if not pooled and outcome is _ABORT:
                up.abort()  # cut short: the backend must not take it for complete
            elif not pooled:
                up.close()
        if entry is not None:
            self.proxy.table.release(entry)
        self.session.exchange_done(outcome, now)

    def crash(self) -> None:
        if self.done:
            return
        self.done = True
        if self.up is not None:
            self.up.listener = None
            self.up.abort()
        if self.entry is not None:
            self.proxy.table.release(self.entry)


# --------------------------------------------------------------------------- the server


class Closable(Protocol):
    """Where connections come from (a listening server): closed first at shutdown."""

    def close(self) -> None: ...


class RouterProxy:
    """One worker's data plane: the client connections it is given, proxied to the
    backends of ``table`` (the supervisor serves the admin API and the state file)."""

    def __init__(self, service: str, port: int, table: BackendTable) -> None:
        self.service = service
        self.port = port
        self.table = table
        self.closing = False
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._all_closed = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    def begin_shutdown(self) -> None:
        """Stop taking requests; the run loop then drains the in-flight ones."""
        self.closing = True
        self._stop.set()

    async def serve(self, servers: Iterable[Closable]) -> None:
        """Serve until ``begin_shutdown``, then drain (bounded) and return."""
        sweeper = asyncio.create_task(self._sweep())
        await self._stop.wait()
        sweeper.cancel()
        for server in servers:
            server.close()
        self.table.close_pools()
        # Idle keep-alive connections hold no request: close them now. Busy ones
        # see ``closing`` after their response and close themselves.
        for session in list(self._sessions):
            if session.exchange is None:
                session.close()
        if self._sessions:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning(
                    "%d request(s) still in flight after %.0f s; cutting them",
                    len(self._sessions),
                    DRAIN_TIMEOUT,
                )
                for session in list(self._sessions):
                    session.crash()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)

    async def _sweep(self) -> None:
        # One periodic sweep instead of a timer per request: idle pooled connections
        # expire, response heads and request bodies time out, idle clients are let go
        # (a client trickling a head byte by byte is cut off just the same).
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self._sweep_once(_now())
            except Exception:
                log.exception("unexpected error while sweeping timeouts")

    def _sweep_once(self, now: float) -> None:
        for entry in self.table.entries():
            entry.pool.expire(now)
        idle_cutoff = now - IDLE_TIMEOUT
        for session in list(self._sessions):
            exchange = session.exchange
            if exchange is None:
                if session.idle_since < idle_cutoff:
                    session.close()
            elif exchange.deadline and exchange.deadline < now:
                if exchange.waiting_for_body:
                    session.crash()
                elif exchange.up is not None:
                    exchange.up.time_out()  # its connection_lost ends the exchange

    def client_channel(self) -> _Channel:
        """Protocol factory for the data-plane server."""
        return _Channel(on_made=self._accept)

    def _accept(self, chan: _Channel) -> None:
        if self.closing:  # accepted just before the listening socket closed
            chan.close()
            return
        self._sessions.add(_Session(self, chan))

    def forget(self, session: _Session) -> None:
        self._sessions.discard(session)
        if self.closing and not self._sessions:
            self._all_closed.set()

    def spawn(self, exchange: _Exchange, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for ``exchange`` as a task; a bug in it resets that client only."""
        task = asyncio.get_running_loop().create_task(self._guarded(exchange, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guarded(exchange: _Exchange, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            log.exception("unexpected error in a request")
            exchange.session.crash()

    def upstream_head(self, req: _Request, entry: _Entry) -> bytes:
        parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n", req.forward]
        if not req.has_host:
            parts.append(b"Host: " + entry.address.encode() + b"\r\n")
        xff = req.xff + b", " + req.client_ip if req.xff else req.client_ip
        parts.append(b"X-Forwarded-For: " + xff + b"\r\n")
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.length or req.method in _BODY_METHODS:
            parts.append(b"Content-Length: %d\r\n" % req.length)
        parts.append(b"Connection: keep-alive\r\n\r\n")
        return b"".join(parts)


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the event loop running this process."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


class AdminHandler(Protocol):
    """What the admin API serves: the supervisor of a router's worker proxies."""

    def health(self) -> dict[str, object]: ...

    async def get_backends(self) -> tuple[int, dict[str, object]]: ...

    async def put_backends(self, backends: list[Backend]) -> tuple[int, dict[str, object]]: ...


async def route_admin(
    handler: AdminHandler, method: bytes, target: bytes, body: bytes
) -> tuple[int, dict[str, object]]:
    path = target.split(b"?", 1)[0]
    if path == b"/health":
        if method != b"GET":
            return 405, {"error": "use GET /health"}
        return 200, handler.health()
    if path != b"/backends":
        return 404, {
            "error": f"no such resource {path.decode(errors='replace')!r}; "
            "try GET /health, GET /backends or PUT /backends"
        }
    if method == b"GET":
        return await handler.get_backends()
    if method != b"PUT":
        return 405, {"error": "use GET or PUT /backends"}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return 400, {"error": f"body is not valid JSON: {exc}"}
    if not isinstance(doc, dict) or set(doc) != {"backends"}:
        return 400, {"error": 'body must be a JSON object with exactly one key, "backends"'}
    try:
        backends = parse_backends(doc["backends"])
    except BackendSetError as exc:
        return 400, {"error": str(exc)}
    return await handler.put_backends(backends)


async def serve_admin_request(
    handler: AdminHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One admin request per connection (``start_unix_server`` callback, with the
    handler bound); the answer closes the connection."""
    try:
        try:
            async with asyncio.timeout(10.0):
                head = await reader.readuntil(b"\r\n\r\n")
                req = _parse_request(head)
                if req.chunked:
                    raise _BadMessage(411, "send the body with a Content-Length")
                if req.length > ADMIN_BODY_LIMIT:
                    raise _BadMessage(413, "body larger than 1 MiB")
                body = await reader.readexactly(req.length) if req.length else b""
            status, doc = await route_admin(handler, req.method, req.target, body)
        except _BadMessage as exc:
            status, doc = exc.status, {"error": exc.reason}
        except asyncio.LimitOverrunError:
            status, doc = 431, {"error": "request head larger than 64 KiB"}
        data = json.dumps(doc).encode()
        writer.write(
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (status, HTTPStatus(status).phrase.encode(), len(data), data)
        )
        await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    except Exception:
        log.exception("unexpected error on the admin socket")
    finally:
        writer.close()


# --------------------------------------------------------------------------- entry point


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


def _parse_listen(text: str) -> tuple[str, int]:
    host, port = split_address(text)
    return host, port


def _admin_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _raise_fd_limit() -> None:
    # Each proxied request holds two descriptors; use all the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die(code: int, message: str) -> int:
    print(f"graven-router: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the proxy until SIGTERM; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m graven.router.proxy", description="graven's embedded HTTP router"
    )
    parser.add_argument("--service", required=True)
    parser.add_argument("--listen", required=True, type=_parse_listen, metavar="HOST:PORT")
    parser.add_argument("--admin", metavar="SOCKET", help="the admin API's unix socket")
    parser.add_argument("--state", metavar="FILE", help="where the backend set is kept")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="proxy processes sharing the port (N > 1: this one supervises them)",
    )
    parser.add_argument(
        "--pid-file",
        metavar="FILE",
        help="the router's record (pid, port, start time); a worker that outlives its "
        "supervisor starts a new one and rewrites it, holding --lock-file",
    )
    parser.add_argument("--lock-file", metavar="FILE", help="serialises changes to --pid-file")
    # Internal: a listening socket inherited from a worker reviving its supervisor, and
    # a worker's CONTROL,LISTEN[,HANDOFF] descriptors.
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-fds", help=argparse.SUPPRESS)
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default=os.environ.get("GRAVEN_ROUTER_LOOP", "auto"),
        help="event loop: uvloop when installed (auto, the default; GRAVEN_ROUTER_LOOP "
        "sets it too), or the standard library's (asyncio)",
    )
    args = parser.parse_args(argv)
    if not is_valid_name(args.service):
        parser.error(f"--service: not a valid service name: {args.service!r}")
    if args.admin is None or args.state is None:
        parser.error("--admin and --state are required")
    if (args.pid_file is None) != (args.lock_file is None):
        parser.error("--pid-file and --lock-file go together")
    if not 1 <= args.workers <= 64:
        parser.error(f"--workers: expected 1-64 (got {args.workers})")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s graven-router[%(process)d] %(levelname)s %(message)s",
    )
    os.umask(0o077)  # the admin socket and state file are for the owner alone
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _raise_fd_limit()
    try:
        loop_factory = _loop_factory(args.loop)
    except ImportError:
        return _die(2, "--loop uvloop: uvloop is not installed (pip install uvloop)")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_dispatch(args))


async def _dispatch(args: argparse.Namespace) -> int:
    # Every configuration runs a supervisor: the process holding the port never runs
    # proxy code, so a proxy that dies leaves new connections queued, not refused.
    from graven.router import workers

    host, port = args.listen
    options = workers.RouterOptions(
        service=args.service,
        host=host,
        port=port,
        admin=Path(args.admin),
        state=Path(args.state),
        workers=args.workers,
        loop=args.loop,
        pid_file=Path(args.pid_file) if args.pid_file else None,
        lock_file=Path(args.lock_file) if args.lock_file else None,
    )
    if args.worker_fds is not None:
        return await workers.run_worker(options, args.worker_fds)
    return await workers.run_supervisor(options, args.listen_fd)


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's transports are C: about 15% more requests per second through the
    proxy than the standard library's (bench/RESULTS.md). Both pass the same tests."""
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise
        return asyncio.new_event_loop
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


if __name__ == "__main__":
    sys.exit(main())
