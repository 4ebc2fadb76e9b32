"""A client connection's requests through the embedded proxy: the session that takes
them one at a time, and each request's exchange with a backend (choose, send, relay,
resend when safe), with the body copying and the resend rule they use.

See the package docstring for when a request is sent again and why.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Final, Literal

from graven.router.base import LATENCY_BOUNDS
from graven.router.proxy.backends import _NO_EXCLUSIONS, _Entry, _Pool
from graven.router.proxy.channel import _Channel
from graven.router.proxy.http1 import (
    HEAD_LIMIT,
    _BadMessage,
    _error_response,
    _parse_request,
    _parse_response,
    _Request,
    _Response,
)

if TYPE_CHECKING:
    from graven.router.proxy.server import RouterProxy

log = logging.getLogger(__name__)

REPLAY_LIMIT: Final = 64 * 1024  # bodies up to this size are buffered so a retry can resend them
COPY_SIZE: Final = 64 * 1024
IDLE_TIMEOUT: Final = 60.0  # keep-alive connection waiting for its next request head
CONNECT_TIMEOUT: Final = 3.0
RESPONSE_TIMEOUT: Final = 300.0  # backend may think this long before its response head

# Methods that RFC 9110 calls idempotent: sending one twice is harmless.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_HEX_RE: Final = re.compile(rb"^[0-9A-Fa-f]{1,15}$")
_now = time.monotonic


# --------------------------------------------------------------------------- body copying


class _ClientFailed(Exception):
    """The client went away or sent a body we cannot frame."""


class _BackendFailed(Exception):
    """The backend went away or sent a body we cannot frame."""


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


# --------------------------------------------------------------------------- exchanges


class _Abort:
    """Outcome: a response was cut short; reset the client connection so the client
    cannot take a truncated body for a complete one."""


_ABORT: Final = _Abort()
# What an exchange leaves its client connection with: True, carry on; False, close
# after the answer; _ABORT, reset.
_Outcome = bool | _Abort


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
