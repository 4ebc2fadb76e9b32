"""The router supervisor's pure parts: summing the workers' counters, and the worker's
answers to control messages (a malformed one is refused, never applied)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from graven.router.base import LATENCY_BOUNDS, Backend
from graven.router.proxy import BackendTable, RouterProxy
from graven.router.workers import _control_reply, merge_snapshots

BUCKETS = len(LATENCY_BOUNDS) + 1


def item(bid: str, requests: int, *, state: str = "ready", inflight: int = 0) -> dict[str, object]:
    buckets = [0] * BUCKETS
    buckets[0] = requests
    return {
        "id": bid,
        "address": "127.0.0.1:1",
        "state": state,
        "weight": 100,
        "inflight": inflight,
        "requests": requests,
        "errors": 1,
        "responses_5xx": 1,
        "latency_buckets": buckets,
        "idle_connections": 2,
    }


def test_counters_are_summed_per_backend_in_configured_order() -> None:
    configured = [Backend("b", "127.0.0.1:2", weight=5), Backend("a", "127.0.0.1:1")]
    merged = merge_snapshots(configured, [[item("a", 3), item("b", 4)], [item("a", 10)]])
    assert [m["id"] for m in merged] == ["b", "a"]
    b, a = merged
    assert (b["requests"], b["weight"], b["latency_buckets"][0]) == (4, 5, 4)
    assert (a["requests"], a["errors"], a["idle_connections"], a["latency_buckets"][0]) == (
        13,
        2,
        4,
        13,
    )


def test_a_removed_backend_still_draining_in_one_worker_is_listed_after() -> None:
    configured = [Backend("new", "127.0.0.1:2")]
    merged = merge_snapshots(configured, [[item("old", 7, state="drain", inflight=1)], []])
    assert [(m["id"], m["state"], m["inflight"], m["requests"]) for m in merged] == [
        ("new", "ready", 0, 0),
        ("old", "drain", 1, 7),
    ]


def test_no_worker_answering_still_lists_the_configured_set() -> None:
    merged = merge_snapshots([Backend("a", "127.0.0.1:1", state="drain")], [])
    assert [(m["id"], m["state"], m["requests"]) for m in merged] == [("a", "drain", 0)]


def control(proxy: RouterProxy, message: object) -> dict[str, object]:
    async def run() -> dict[str, object]:
        first = asyncio.get_running_loop().create_future()
        return _control_reply(proxy, json.dumps(message).encode(), first)

    return asyncio.run(run())


def test_control_messages_apply_good_sets_and_refuse_bad_ones() -> None:
    table = BackendTable()
    proxy = RouterProxy("web", 8080, Path("/nonexistent"), table)
    good = {"op": "put", "backends": [{"id": "a", "address": "127.0.0.1:1"}]}
    reply = control(proxy, good)
    assert reply["ok"] is True and [b["id"] for b in reply["backends"]] == ["a"]  # type: ignore[attr-defined]
    for bad in (
        {"op": "put", "backends": [{"id": "b", "address": "nope"}]},
        {"op": "put"},
        {"op": "explode"},
        ["not", "an", "object"],
    ):
        reply = control(proxy, bad)
        assert reply["ok"] is False, bad
        assert "error" in reply
    assert [e.id for e in table.entries()] == ["a"]  # nothing bad was applied
    assert control(proxy, {"op": "get"})["ok"] is True
