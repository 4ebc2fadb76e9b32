"""The router supervisor's pure parts: summing the workers' counters, the worker's
answers to control messages (a malformed one is refused, never applied), the command
line a worker starts a new supervisor with, and what it may hand over."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from graven.router.base import LATENCY_BOUNDS, Backend, split_address
from graven.router.proxy.backends import BackendTable
from graven.router.proxy.entry import main
from graven.router.proxy.server import RouterProxy
from graven.router.workers import (
    RouterOptions,
    _control_reply,
    inherited_listener,
    merge_snapshots,
)

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
    proxy = RouterProxy("web", 8080, table)
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


def test_router_options_make_a_supervisor_command_line_the_proxy_parses_back() -> None:
    options = RouterOptions(
        service="web",
        host="::1",
        port=8080,
        admin=Path("/s/web.sock"),
        state=Path("/s/web.json"),
        workers=1,
        loop="auto",
        pid_file=Path("/s/web.pid"),
        lock_file=Path("/s/web.lock"),
    )
    argv = options.argv()
    assert argv[argv.index("--listen") + 1] == "[::1]:8080"
    assert split_address("[::1]:8080") == ("::1", 8080)
    assert argv[argv.index("--pid-file") + 1] == "/s/web.pid"
    assert argv[argv.index("--lock-file") + 1] == "/s/web.lock"
    bare = RouterOptions("web", "127.0.0.1", 8080, Path("a"), Path("b"), 2, "asyncio").argv()
    assert "--pid-file" not in bare and bare[bare.index("--workers") + 1] == "2"


def test_a_pid_file_without_its_lock_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--service", "web", "--listen", "127.0.0.1:1", "--admin", "a", "--state", "b",
              "--pid-file", "p"])  # fmt: skip
    assert exc.value.code == 2
    assert "--pid-file and --lock-file go together" in capsys.readouterr().err


def test_only_a_listening_tcp_socket_is_taken_over() -> None:
    with socket.socket() as plain, pytest.raises(OSError, match="not a listening TCP socket"):
        inherited_listener(os.dup(plain.fileno()))
    with socket.create_server(("127.0.0.1", 0)) as server:
        taken = inherited_listener(os.dup(server.fileno()))
        assert taken.getsockname() == server.getsockname()
        taken.close()
