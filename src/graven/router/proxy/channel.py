"""One TCP connection of the embedded proxy, client or backend side, as an
``asyncio.Protocol`` whose receive buffer both protocol callbacks and coroutines read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from graven.router.proxy.http1 import HEAD_LIMIT

if TYPE_CHECKING:
    from graven.router.proxy.backends import _Pool

READ_HIGH_WATER: Final = 256 * 1024  # stop reading a socket whose buffer holds this much
READ_LOW_WATER: Final = 64 * 1024  # ... and read again once it is down to this


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
