"""One worker's data plane in the embedded proxy: ``RouterProxy`` takes the client
connections it is given, keeps their sessions, sweeps timeouts and idle pooled
connections once a second, and drains in-flight requests at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Final, Protocol

from graven.router.proxy.backends import BackendTable, _Entry
from graven.router.proxy.channel import _Channel
from graven.router.proxy.exchange import IDLE_TIMEOUT, _Exchange, _Session
from graven.router.proxy.http1 import _Request

log = logging.getLogger(__name__)

DRAIN_TIMEOUT: Final = 10.0  # on SIGTERM, in-flight requests get this long
SWEEP_INTERVAL: Final = 1.0  # how often timeouts and pool expiry are checked
# Methods whose requests announce their body's length even when it is empty.
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
_now = time.monotonic


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
