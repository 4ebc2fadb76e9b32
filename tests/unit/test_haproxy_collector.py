"""The HAProxy latency collector's histograms, fed log lines directly."""

from __future__ import annotations

from graven.router.base import LATENCY_BOUNDS
from graven.router.haproxy.collector import LatencyCollector


def test_the_collector_buckets_log_lines() -> None:
    c = LatencyCollector()
    for line in (
        b"a 0 0\n",
        b"a 1 40\n",
        b"a 0 7000\n",
        b"a 0 -1\n",
        b"<NOSRV> -1 -1\n",
        b"junk\n",
    ):
        c.add_line(line)
    buckets = c.histograms["a"]
    assert len(buckets) == len(LATENCY_BOUNDS) + 1
    assert (buckets[0], buckets[LATENCY_BOUNDS.index(0.05)], buckets[-1], sum(buckets)) == (
        1,
        1,
        1,
        3,
    )
    c.answer("forget a")
    assert c.histograms == {}
