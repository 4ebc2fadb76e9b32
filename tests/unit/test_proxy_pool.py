"""The embedded proxy's idle-connection pools: reuse order, expiry, bounds, and the
backend-set changes (drain, removal, new address) that must close them at once."""

from __future__ import annotations

import asyncio

from graven.router.base import Backend
from graven.router.proxy.backends import (
    POOL_IDLE_TIMEOUT,
    POOL_SIZE,
    BackendTable,
    _Entry,
    _Pool,
)
from graven.router.proxy.channel import _Channel


class FakeTransport(asyncio.Transport):
    """Records how the connection ended; nothing is sent anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: str | None = None

    def close(self) -> None:
        self.ended = self.ended or "closed"

    def abort(self) -> None:
        self.ended = self.ended or "reset"

    def is_closing(self) -> bool:
        return self.ended is not None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass


def channel() -> tuple[_Channel, FakeTransport]:
    transport = FakeTransport()
    chan = _Channel()
    chan.connection_made(transport)
    return chan, transport


def test_the_most_recently_used_connection_goes_first() -> None:
    pool = _Pool()
    (old, _), (new, _) = channel(), channel()
    assert pool.put(old, now=100.0) and pool.put(new, now=101.0)
    assert pool.take(now=102.0) is new
    assert pool.take(now=102.0) is old
    assert pool.take(now=102.0) is None


def test_connections_idle_too_long_are_closed_not_reused() -> None:
    pool = _Pool()
    (old, old_t), (new, new_t) = channel(), channel()
    pool.put(old, now=100.0)
    pool.put(new, now=102.0)
    pool.expire(now=100.0 + POOL_IDLE_TIMEOUT)
    assert (old_t.ended, new_t.ended, len(pool)) == ("closed", None, 1)
    # Taking checks the age too, so a connection never outlives the timeout by a sweep.
    assert pool.take(now=102.0 + POOL_IDLE_TIMEOUT) is None
    assert (new_t.ended, len(pool)) == ("closed", 0)


def test_the_pool_is_bounded() -> None:
    pool = _Pool()
    for _ in range(POOL_SIZE):
        assert pool.put(channel()[0], now=1.0)
    assert not pool.put(channel()[0], now=1.0)
    assert len(pool) == POOL_SIZE


def test_any_event_on_an_idle_connection_discards_it() -> None:
    pool = _Pool()
    (closed_by_backend, t1), (chatty, t2), (kept, t3) = channel(), channel(), channel()
    for chan in (closed_by_backend, chatty, kept):
        pool.put(chan, now=1.0)
    closed_by_backend.eof_received()
    chatty.data_received(b"HTTP/1.1 200 OK\r\n")  # bytes nobody asked for: framing doubt
    assert (t1.ended, t2.ended, t3.ended) == ("closed", "reset", None)
    assert pool.take(now=1.0) is kept
    assert pool.take(now=1.0) is None


def test_a_closed_pool_closes_its_connections_and_keeps_no_more() -> None:
    pool = _Pool()
    chan, transport = channel()
    pool.put(chan, now=1.0)
    pool.close()
    assert transport.ended == "closed"
    late, late_t = channel()
    assert not pool.put(late, now=1.0)
    assert late_t.ended is None  # the caller closes what the pool refused


def pooled(entry: _Entry) -> FakeTransport:
    chan, transport = channel()
    assert entry.pool.put(chan, now=1.0)
    return transport


def entry_of(table: BackendTable, backend_id: str) -> _Entry:
    return next(e for e in table.entries() if e.id == backend_id)


def test_draining_removing_or_moving_a_backend_closes_its_idle_connections() -> None:
    table = BackendTable()
    table.replace(
        [
            Backend("stays", "127.0.0.1:1"),
            Backend("drains", "127.0.0.1:2"),
            Backend("goes", "127.0.0.1:3"),
            Backend("moves", "127.0.0.1:4"),
        ]
    )
    entries = {bid: entry_of(table, bid) for bid in ("stays", "drains", "goes", "moves")}
    transports = {bid: pooled(e) for bid, e in entries.items()}
    pools = {bid: e.pool for bid, e in entries.items()}

    table.replace(
        [
            Backend("stays", "127.0.0.1:1", weight=5),
            Backend("drains", "127.0.0.1:2", "drain"),
            Backend("moves", "127.0.0.1:44"),
        ]
    )
    assert {bid: t.ended for bid, t in transports.items()} == {
        "stays": None,
        "drains": "closed",
        "goes": "closed",
        "moves": "closed",
    }
    # The old pools refuse connections that come back from requests still in flight.
    assert entries["stays"].pool is pools["stays"]
    for bid in ("drains", "goes", "moves"):
        assert pools[bid].closed
        assert not pools[bid].put(channel()[0], now=1.0)
