"""The embedded proxy's per-backend counters: what GET /backends shows, and how they
follow a backend across set changes (the buckets themselves: test_router_base.py)."""

from __future__ import annotations

from graven.router.base import LATENCY_BOUNDS, Backend, latency_bucket
from graven.router.proxy.backends import BackendTable

OVERFLOW = len(LATENCY_BOUNDS)


def test_the_snapshot_reports_weights_and_zeroed_histograms() -> None:
    table = BackendTable()
    table.replace([Backend("a", "127.0.0.1:1", weight=30), Backend("b", "127.0.0.1:2", "drain")])
    snap = {row["id"]: row for row in table.snapshot()}
    assert snap["a"] == {
        "id": "a",
        "address": "127.0.0.1:1",
        "state": "ready",
        "weight": 30,
        "inflight": 0,
        "requests": 0,
        "errors": 0,
        "responses_5xx": 0,
        "latency_buckets": [0] * (OVERFLOW + 1),
        "idle_connections": 0,
    }
    assert snap["b"]["state"] == "drain"


def test_counters_survive_a_new_set_and_go_with_the_backend() -> None:
    table = BackendTable()
    table.replace([Backend("a", "127.0.0.1:1"), Backend("b", "127.0.0.1:2")])
    entry = table.acquire()
    assert entry is not None
    entry.latency[latency_bucket(0.003)] += 1
    entry.responses_5xx += 1
    table.release(entry)

    table.replace([Backend(entry.id, "127.0.0.1:1", weight=500)])
    (row,) = table.snapshot()
    assert (row["requests"], row["responses_5xx"], row["weight"]) == (1, 1, 500)
    assert row["latency_buckets"] == [0, 0, 1] + [0] * (OVERFLOW - 2)
