"""The embedded router: one small HTTP/1.1 reverse-proxy process per service.

Run as::

    python -m graven.router.proxy --service web --listen 127.0.0.1:8080 \\
        --admin STATE/routers/web.sock --state STATE/routers/web.json

Data plane
    Each client request goes to one backend in state ``ready``, chosen by smooth
    weighted round-robin. Every request gets a fresh backend connection with
    ``Connection: close``: a pooled connection could be stale after a backend
    restart, and a stale connection is the classic way a proxy drops a request.
    If connecting fails (or the backend resets the connection before answering and
    the request can safely be sent again) the request is retried on another ready
    backend, and the failing one sits out a short cooldown. ``drain`` backends get
    no new requests; their in-flight requests finish.

Admin API (HTTP/1.1 + JSON on the unix socket ``--admin``)
    ``GET /health``    -> ``{"ok": true, "pid": .., "service": .., "port": ..}``
    ``GET /backends``  -> ``{"service", "port", "backends": [{id, address, state,
    weight, inflight, requests, errors}]}``
    ``PUT /backends``  with ``{"backends": [{id, address, state, weight}]}`` replaces
    the set atomically, after persisting it to ``--state``.

Exit codes: 0 after SIGTERM (in-flight requests finish, at most 10 s), 2 bad
arguments, 3 cannot bind the port or the admin socket, 4 unreadable state file.
Nothing is written per request; errors go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
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
from collections.abc import Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

from graven.atomic import write_atomic
from graven.model import is_valid_name
from graven.router.base import Backend, BackendState

log = logging.getLogger("graven.router.proxy")

HEAD_LIMIT: Final = 64 * 1024  # request/response head, chunk-size lines, trailers
REPLAY_LIMIT: Final = 64 * 1024  # bodies up to this size are buffered so a retry can resend them
COPY_SIZE: Final = 64 * 1024
IDLE_TIMEOUT: Final = 60.0  # keep-alive connection waiting for its next request head
CONNECT_TIMEOUT: Final = 3.0
RESPONSE_TIMEOUT: Final = 300.0  # backend may think this long before its response head
COOLDOWN: Final = 2.0  # passive: a backend that refused a connection sits out this long
DRAIN_TIMEOUT: Final = 10.0  # on SIGTERM, in-flight requests get this long
ADMIN_BODY_LIMIT: Final = 1024 * 1024
MAX_WEIGHT: Final = 1000
EXIT_BIND: Final = 3
EXIT_STATE: Final = 4

# Methods that RFC 9110 calls idempotent: sending one twice is harmless.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
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
_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_HOSTNAME_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


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


class _Entry:
    """A backend plus the counters and balancer state the proxy keeps for it."""

    __slots__ = (
        "address",
        "configured",
        "cooldown_until",
        "current",
        "errors",
        "host",
        "id",
        "inflight",
        "port",
        "requests",
        "state",
        "weight",
    )

    def __init__(self, backend: Backend) -> None:
        self.id = backend.id
        self.inflight = 0
        self.requests = 0
        self.errors = 0
        self.current = 0  # smooth weighted round-robin accumulator
        self.cooldown_until = 0.0
        self.configured = True
        self.update(backend)

    def update(self, backend: Backend) -> None:
        self.address = backend.address
        self.host, self.port = split_address(backend.address)
        self.state: BackendState = backend.state
        self.weight = backend.weight
        self.configured = True


class BackendTable:
    """The live backend set: selection, counters, and entries kept until idle."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._ready: list[_Entry] = []

    def replace(self, backends: list[Backend]) -> None:
        """Swap in a new set. Counters of ids that stay are kept; removed backends with
        requests in flight stay (as ``drain``) until their last request ends."""
        fresh: dict[str, _Entry] = {}
        for b in backends:
            entry = self._entries.get(b.id)
            if entry is None:
                entry = _Entry(b)
            else:
                entry.update(b)
            fresh[b.id] = entry
        for bid, entry in self._entries.items():
            if bid not in fresh and entry.inflight > 0:
                entry.configured = False
                entry.state = "drain"
                fresh[bid] = entry
        self._entries = fresh
        self._ready = [
            e for e in fresh.values() if e.configured and e.state == "ready" and e.weight > 0
        ]

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
            }
            for e in self._entries.values()
        ]

    def acquire(self, exclude: set[str]) -> _Entry | None:
        """Pick a ready backend not in ``exclude`` and count the request on it.

        Backends cooling down after a failure are used only when no other is left:
        the cooldown is a hint, and trying a maybe-broken backend beats a 503.
        """
        ready = self._ready
        if len(ready) == 1 and not exclude:
            chosen: _Entry | None = ready[0]
        else:
            now = time.monotonic()
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
            entry.cooldown_until = time.monotonic() + COOLDOWN


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
    # Several equal values ("5, 5") are tolerated by RFC 9112; differing ones are not.
    found = {t.strip(b" \t") for v in values for t in v.split(b",")}
    if len(found) != 1:
        raise _BadMessage(status, "conflicting Content-Length")
    (text,) = found
    if not _DIGITS_RE.match(text):
        raise _BadMessage(status, "invalid Content-Length")
    return int(text)


def _parse_request(head: bytes) -> _Request:
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

    req = _Request()
    req.method = method
    req.target = target
    req.version = ver
    conn_tokens = _tokens(connection)
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
    if conn_tokens:
        named = set(conn_tokens)
        kept = [h for h in kept if h[0] not in named]
    req.forward = b"".join(name + b": " + value + b"\r\n" for _, name, value in kept)
    req.xff = b", ".join(xff)
    req.client_ip = b""
    return req


class _Response:
    __slots__ = ("chunked", "close_delimited", "forward", "length", "start", "status")

    status: int
    start: bytes  # b"HTTP/1.1 200 OK\r\n"
    forward: bytes
    chunked: bool
    close_delimited: bool
    length: int | None  # None: no Content-Length (or a bodiless response)


def _parse_response(head: bytes, method: bytes) -> _Response:
    start, headers = _split_head(head)
    parts = start.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise _BadMessage(502, "malformed status line from backend")
    if not parts[1].isdigit():
        raise _BadMessage(502, "malformed status line from backend")
    resp = _Response()
    resp.status = int(parts[1])
    reason = parts[2] if len(parts) == 3 else b""
    resp.start = b"HTTP/1.1 " + parts[1] + b" " + reason + b"\r\n"

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
    if connection:
        named = set(_tokens(connection))
        kept = [h for h in kept if h[0] not in named]
    resp.forward = b"".join(name + b": " + value + b"\r\n" for _, name, value in kept)

    resp.chunked = False
    resp.close_delimited = False
    resp.length = None
    bodiless = method == b"HEAD" or resp.status in (204, 304) or resp.status < 200
    if bodiless:
        # A HEAD answer's Content-Length describes the GET body; pass it through as is.
        if lengths and resp.status != 204 and resp.status >= 200:
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


def _has_body(resp: _Response, method: bytes) -> bool:
    return not (method == b"HEAD" or resp.status in (204, 304) or resp.status < 200)


# --------------------------------------------------------------------------- body copying


class _ClientFailed(Exception):
    """The client went away or sent a body we cannot frame."""


class _BackendFailed(Exception):
    """The backend went away or sent a body we cannot frame."""


class _BrokenBody(Exception):
    """The backend broke off a short body before the proxy answered the client."""


async def _read(src: asyncio.StreamReader, n: int, fail: type[Exception]) -> bytes:
    try:
        data = await src.read(n)
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise fail(str(exc)) from exc
    if not data:
        raise fail("connection closed mid-body")
    return data


async def _read_line(src: asyncio.StreamReader, fail: type[Exception]) -> bytes:
    try:
        return await src.readuntil(b"\r\n")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise fail(f"bad chunked framing: {exc}") from exc


async def _drain(dst: asyncio.StreamWriter, fail: type[Exception]) -> None:
    try:
        await dst.drain()
    except OSError as exc:
        raise fail(str(exc)) from exc


async def _copy_fixed(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
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
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
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
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
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


# --------------------------------------------------------------------------- the server


class _Retry:
    """Outcome: this backend failed before the request could matter; try another."""


class _Abort:
    """Outcome: a response was cut short; reset the client connection so the client
    cannot take a truncated body for a complete one."""


_RETRY: Final = _Retry()
_ABORT: Final = _Abort()
_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


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


class _Conn:
    __slots__ = ("busy", "idle_since", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.busy = False
        self.idle_since = time.monotonic()


class RouterProxy:
    """The proxy server: data plane on a TCP port, admin API on a unix socket."""

    def __init__(self, service: str, port: int, state_path: Path, table: BackendTable) -> None:
        self.service = service
        self.port = port
        self.state_path = state_path
        self.table = table
        self._conns: set[_Conn] = set()
        self._closing = False
        self._stop = asyncio.Event()
        self._put_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    def begin_shutdown(self) -> None:
        """Stop taking requests; the run loop then drains the in-flight ones."""
        self._closing = True
        self._stop.set()

    async def serve(self, servers: list[asyncio.AbstractServer]) -> None:
        """Serve until ``begin_shutdown``, then drain (bounded) and return."""
        sweeper = asyncio.create_task(self._sweep_idle())
        await self._stop.wait()
        sweeper.cancel()
        for server in servers:
            server.close()
        # Idle keep-alive connections hold no request: close them now. Busy ones
        # see ``_closing`` after their response and close themselves.
        for conn in list(self._conns):
            if not conn.busy:
                conn.task.cancel()
        tasks = {c.task for c in self._conns}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
            if pending:
                log.warning(
                    "%d request(s) still in flight after %.0f s; cutting them",
                    len(pending),
                    DRAIN_TIMEOUT,
                )
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=1.0)

    async def _sweep_idle(self) -> None:
        # One periodic sweep instead of a timer per request: the hot path arms no
        # timer while a keep-alive connection waits for its next request head (and a
        # client trickling a head byte by byte is cut off just the same).
        while True:
            await asyncio.sleep(IDLE_TIMEOUT / 4)
            cutoff = time.monotonic() - IDLE_TIMEOUT
            for conn in list(self._conns):
                if not conn.busy and conn.idle_since < cutoff:
                    conn.task.cancel()

    # ------------------------------------------------------------------ data plane

    async def handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One client connection: requests in sequence while keep-alive holds."""
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(task)
        self._conns.add(conn)
        peer = writer.get_extra_info("peername")
        client_ip = (peer[0] if isinstance(peer, tuple) else "unknown").encode()
        outcome: bool | _Abort = False
        try:
            while not self._closing:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(
                        _error_response(431, "request head larger than 64 KiB", keep_alive=False)
                    )
                    break
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        writer.write(
                            _error_response(400, "incomplete request head", keep_alive=False)
                        )
                    break
                except OSError:
                    break
                head = head.lstrip(b"\r\n")  # RFC 9112 2.2: ignore empty lines before a request
                if not head:
                    continue
                conn.busy = True
                try:
                    outcome = await self._handle_request(head, (reader, writer), client_ip)
                finally:
                    conn.busy = False
                    conn.idle_since = time.monotonic()
                if outcome is not True:
                    break
                await writer.drain()
        except asyncio.CancelledError:
            outcome = _ABORT if conn.busy else False
        except OSError:
            outcome = _ABORT
        except Exception:
            log.exception("unexpected error on a client connection")
            outcome = _ABORT
        finally:
            self._conns.discard(conn)
            if outcome is _ABORT:
                writer.transport.abort()
            else:
                writer.close()

    async def _handle_request(
        self, head: bytes, client: _Stream, client_ip: bytes
    ) -> bool | _Abort:
        """Answer one request. True: the client connection may carry another."""
        reader, writer = client
        try:
            req = _parse_request(head)
        except _BadMessage as exc:
            writer.write(_error_response(exc.status, exc.reason, keep_alive=False))
            await writer.drain()
            return False
        req.client_ip = client_ip

        if req.expect_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        replay: bytes | None = None  # None: the body is streamed, so it cannot be resent
        if not req.chunked and req.length <= REPLAY_LIMIT:
            try:
                replay = await reader.readexactly(req.length) if req.length else b""
            except (OSError, asyncio.IncompleteReadError):
                return False

        tried: set[str] = set()
        while True:
            entry = self.table.acquire(tried)
            if entry is None:
                break
            tried.add(entry.id)
            try:
                result = await self._forward(entry, req, replay, client)
            finally:
                self.table.release(entry)
            if not isinstance(result, _Retry):
                return result

        # Without a buffered body the client's body is still unread: close after this.
        keep = req.keep_alive and replay is not None and not self._closing
        if tried:
            message = f"no backend of service {self.service!r} could take the request"
            writer.write(_error_response(502, message, keep_alive=keep))
        else:
            message = f"no ready backend for service {self.service!r}"
            writer.write(_error_response(503, message, keep_alive=keep))
        await writer.drain()
        return keep

    def _upstream_head(self, req: _Request, entry: _Entry) -> bytes:
        parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n", req.forward]
        if not req.has_host:
            parts.append(b"Host: " + entry.address.encode() + b"\r\n")
        xff = req.xff + b", " + req.client_ip if req.xff else req.client_ip
        parts.append(b"X-Forwarded-For: " + xff + b"\r\n")
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.length or req.method in (b"POST", b"PUT", b"PATCH"):
            parts.append(b"Content-Length: %d\r\n" % req.length)
        parts.append(b"Connection: close\r\n\r\n")
        return b"".join(parts)

    async def _forward(
        self, entry: _Entry, req: _Request, replay: bytes | None, client: _Stream
    ) -> bool | _Abort | _Retry:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                backend = await asyncio.open_connection(entry.host, entry.port, limit=HEAD_LIMIT)
        except (OSError, TimeoutError):
            self.table.failed(entry, cooldown=True)
            return _RETRY
        complete = False
        try:
            result = await self._exchange(entry, req, replay, client, backend)
            complete = result is not _ABORT and not isinstance(result, _Retry)
            return result
        finally:
            # A cut-short exchange is reset, so the backend cannot mistake it for a
            # complete request.
            if complete:
                backend[1].close()
            else:
                backend[1].transport.abort()

    async def _exchange(
        self,
        entry: _Entry,
        req: _Request,
        replay: bytes | None,
        client: _Stream,
        backend: _Stream,
    ) -> bool | _Abort | _Retry:
        creader, cwriter = client
        breader, bwriter = backend
        body_done = True  # the client's body is fully read, so its connection can go on
        if replay is not None:
            # One write, one segment: head and a small body travel together.
            bwriter.write(self._upstream_head(req, entry) + replay)
        else:
            bwriter.write(self._upstream_head(req, entry))
            try:
                if req.chunked:
                    await _copy_chunked(creader, bwriter, True, _ClientFailed, _BackendFailed)
                else:
                    await _copy_fixed(creader, bwriter, req.length, _ClientFailed, _BackendFailed)
            except _ClientFailed:
                # Reset, so the backend cannot take a cut-off body for a whole one.
                bwriter.transport.abort()
                cwriter.write(
                    _error_response(400, "bad or incomplete request body", keep_alive=False)
                )
                return False
            except _BackendFailed:
                # The backend stopped reading; it may still have answered (say, 413).
                body_done = False

        try:
            async with asyncio.timeout(RESPONSE_TIMEOUT):
                resp, small_body = await self._read_response(breader, req.method)
        except asyncio.IncompleteReadError as exc:
            # A clean close is ambiguous (the application may have acted on the
            # request), so only an idempotent request is sent again after one.
            if replay is not None and not exc.partial and req.method in _IDEMPOTENT:
                self.table.failed(entry, cooldown=True)
                return _RETRY
            self.table.failed(entry, cooldown=False)
            return self._fail_502(req, cwriter, body_done, "closed the connection early")
        except ConnectionError:
            # A reset before any answer is what a backend closing its listening socket
            # does to connections still in its accept queue (or the kernel, to a socket
            # closed with our request unread): the application never saw the request,
            # so sending it again is safe whatever the method.
            if replay is not None:
                self.table.failed(entry, cooldown=True)
                return _RETRY
            self.table.failed(entry, cooldown=False)
            return self._fail_502(req, cwriter, body_done, "reset the connection")
        except (OSError, TimeoutError, asyncio.LimitOverrunError):
            self.table.failed(entry, cooldown=False)
            return self._fail_502(req, cwriter, body_done, "did not answer properly")
        except _BadMessage:
            self.table.failed(entry, cooldown=False)
            return self._fail_502(req, cwriter, body_done, "sent a malformed response")
        except _BrokenBody:
            self.table.failed(entry, cooldown=False)
            return self._fail_502(req, cwriter, body_done, "broke off its response")

        has_body = _has_body(resp, req.method)
        if resp.status >= 500:
            entry.errors += 1
        keep = req.keep_alive and body_done and not self._closing
        out = [resp.start, resp.forward]
        if has_body and req.version == 11 and (resp.chunked or resp.close_delimited):
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif resp.length is not None:
            out.append(b"Content-Length: %d\r\n" % resp.length)
        elif has_body:
            keep = False  # an HTTP/1.0 client learns where the body ends by our close
        out.append(b"X-Graven-Backend: " + entry.id.encode() + b"\r\n")
        if not keep:
            out.append(b"Connection: close\r\n\r\n")
        elif req.version == 10:
            out.append(b"Connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        out.append(small_body)
        cwriter.write(b"".join(out))
        if small_body or resp.length == 0:
            return keep

        chunk_out = req.version == 11
        try:
            if has_body and resp.chunked:
                await _copy_chunked(breader, cwriter, chunk_out, _BackendFailed, _ClientFailed)
            elif has_body and resp.length is not None:
                await _copy_fixed(breader, cwriter, resp.length, _BackendFailed, _ClientFailed)
            elif has_body:
                await _copy_until_close(breader, cwriter, chunk_out, _ClientFailed)
        except _BackendFailed:
            entry.errors += 1
            return _ABORT
        except _ClientFailed:
            return _ABORT
        return keep

    async def _read_response(
        self, breader: asyncio.StreamReader, method: bytes
    ) -> tuple[_Response, bytes]:
        """The response head and, when short and length-framed, its body: head and body
        then leave in one write, and a backend dying mid-body still gets a clean 502."""
        while True:
            head = await breader.readuntil(b"\r\n\r\n")
            resp = _parse_response(head, method)
            if resp.status == 101:
                raise _BadMessage(502, "backend switched protocols without being asked")
            # Interim answers (100, 103) are dropped: the proxy sent its own 100 Continue.
            if resp.status >= 200:
                break
        if resp.length is None or resp.length > COPY_SIZE or not _has_body(resp, method):
            return resp, b""
        try:
            return resp, await breader.readexactly(resp.length)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _BrokenBody(str(exc)) from exc

    def _fail_502(
        self, req: _Request, cwriter: asyncio.StreamWriter, body_consumed: bool, what: str
    ) -> bool:
        keep = req.keep_alive and body_consumed and not self._closing
        message = f"backend of service {self.service!r} {what}"
        cwriter.write(_error_response(502, message, keep_alive=keep))
        return keep

    # ------------------------------------------------------------------ admin API

    async def handle_admin(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One admin request per connection; the answer closes it."""
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
                status, doc = await self._admin_route(req.method, req.target, body)
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

    async def _admin_route(
        self, method: bytes, target: bytes, body: bytes
    ) -> tuple[int, dict[str, object]]:
        path = target.split(b"?", 1)[0]
        if path == b"/health":
            if method != b"GET":
                return 405, {"error": "use GET /health"}
            return 200, {"ok": True, "pid": os.getpid(), "service": self.service, "port": self.port}
        if path != b"/backends":
            return 404, {
                "error": f"no such resource {path.decode(errors='replace')!r}; "
                "try GET /health, GET /backends or PUT /backends"
            }
        if method == b"GET":
            return 200, self._backends_doc()
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
        async with self._put_lock:
            # Persist first: if the disk refuses, the change is refused as a whole and
            # memory and file keep agreeing.
            data = state_document(self.service, self.port, backends)
            try:
                await asyncio.to_thread(write_atomic, self.state_path, data, mode=0o600)
            except OSError as exc:
                return 500, {"error": f"cannot write state file {self.state_path}: {exc}"}
            self.table.replace(backends)
        return 200, self._backends_doc()

    def _backends_doc(self) -> dict[str, object]:
        return {"service": self.service, "port": self.port, "backends": self.table.snapshot()}


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


async def _run(args: argparse.Namespace) -> int:
    service: str = args.service
    host, port = args.listen
    admin_path = Path(args.admin)
    state_path = Path(args.state)
    try:
        backends = load_state(state_path)
    except (BackendSetError, OSError) as exc:
        return _die(
            EXIT_STATE,
            f"state file {state_path} is unusable: {exc}. Move it aside and restart; "
            "the controller sends the backend set again.",
        )
    table = BackendTable()
    table.replace(backends)
    proxy = RouterProxy(service, port, state_path, table)

    try:
        server = await asyncio.start_server(
            proxy.handle_client, host, port, limit=HEAD_LIMIT, backlog=1024, reuse_address=True
        )
    except OSError as exc:
        # asyncio wraps the errno text in a long sentence; the plain text reads better.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = " (another process holds the port)" if exc.errno == errno.EADDRINUSE else ""
        return _die(EXIT_BIND, f"cannot listen on {host}:{port}: {reason}{hint}")

    if admin_path.exists():
        if _admin_in_use(admin_path):
            server.close()
            return _die(EXIT_BIND, f"admin socket {admin_path} is in use by another router")
        admin_path.unlink()
    try:
        admin = await asyncio.start_unix_server(proxy.handle_admin, path=str(admin_path))
    except OSError as exc:
        server.close()
        return _die(EXIT_BIND, f"cannot bind admin socket {admin_path}: {exc.strerror or exc}")
    admin_ino = admin_path.stat().st_ino

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.begin_shutdown)
    print(
        f"graven-router: service {service} listening on {host}:{port}, admin {admin_path}, "
        f"{len(backends)} backend(s) from state",
        file=sys.stderr,
        flush=True,
    )
    await proxy.serve([server, admin])
    # Remove the socket only if it is still ours: a successor may have bound anew.
    with contextlib.suppress(OSError):
        if admin_path.stat().st_ino == admin_ino:
            admin_path.unlink()
    print(f"graven-router: service {service} stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the proxy until SIGTERM; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m graven.router.proxy", description="graven's embedded HTTP router"
    )
    parser.add_argument("--service", required=True)
    parser.add_argument("--listen", required=True, type=_parse_listen, metavar="HOST:PORT")
    parser.add_argument("--admin", required=True, metavar="SOCKET")
    parser.add_argument("--state", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    if not is_valid_name(args.service):
        parser.error(f"--service: not a valid service name: {args.service!r}")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s graven-router[%(process)d] %(levelname)s %(message)s",
    )
    os.umask(0o077)  # the admin socket and state file are for the owner alone
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _raise_fd_limit()
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
