"""The embedded proxy's per-backend counters: latency buckets and what GET /backends shows."""

from __future__ import annotations

import pytest

from graven.router.base import LATENCY_BOUNDS, Backend, latency_bucket
from graven.router.proxy.backends import BackendTable

OVERFLOW = len(LATENCY_BOUNDS)


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, 0),
        (0.0004, 0),
        (0.001, 0),  # bounds are inclusive upper bounds, like Prometheus' "le"
        (0.0010001, 1),
        (0.002, 1),
        (0.0035, 2),
        (0.05, 5),
        (0.999, 9),
        (1.0, 9),
        (4.9, 11),
        (5.0, 11),
        (5.0001, OVERFLOW),
        (3600.0, OVERFLOW),
    ],
)
def test_latency_bucket(seconds: float, bucket: int) -> None:
    assert latency_bucket(seconds) == bucket


def test_every_bound_lands_in_its_own_bucket_and_just_above_in_the_next() -> None:
    for i, bound in enumerate(LATENCY_BOUNDS):
        assert latency_bucket(bound) == i
        assert latency_bucket(bound * 1.000001) == i + 1


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
