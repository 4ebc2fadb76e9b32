"""The HAProxy adapter's pure planning: server names, weights on haproxy's scale and
the order of runtime-API commands that changes a backend set."""

from __future__ import annotations

import pytest

from graven.router.base import Backend
from graven.router.haproxy.plan import (
    Desired,
    ServerRow,
    backend_id,
    haproxy_weights,
    plan_changes,
    server_name,
)


@pytest.mark.parametrize(
    ("bid", "name"),
    [("web-r7-3f2a", "web-r7-3f2a"), ("a@b", "a:ab"), ("h:1", "h::1"), ("x:a@", "x::a:a")],
)
def test_server_names_round_trip(bid: str, name: str) -> None:
    assert server_name(bid) == name
    assert backend_id(name) == bid


def test_weights_scale_against_the_largest() -> None:
    backends = [
        Backend("a", "127.0.0.1:1", weight=100),
        Backend("b", "127.0.0.1:2", weight=300),
        Backend("c", "127.0.0.1:3", weight=0),
        Backend("d", "127.0.0.1:4", weight=1),
    ]
    assert haproxy_weights(backends) == {"a": 85, "b": 256, "c": 0, "d": 1}
    assert haproxy_weights([Backend("a", "127.0.0.1:1", weight=0)]) == {"a": 0}


def test_a_swap_adds_first_and_drains_last() -> None:
    rows = [
        ServerRow("old", "127.0.0.1:1", "no check", 256, 2, 10, 0, 0),
        ServerRow("idle", "127.0.0.1:3", "DRAIN", 256, 0, 10, 0, 0),
    ]
    desired = [Desired(Backend("new", "127.0.0.1:2"), "127.0.0.1:2")]
    assert [s.command for s in plan_changes("web", desired, rows)] == [
        "add server web/new 127.0.0.1:2 weight 256 pool-max-conn -1 pool-purge-delay 5s",
        "set server web/new state ready",
        "set server web/old state drain",
        "set server web/idle state maint",
        "del server web/idle",
    ]


def test_a_weight_switch_raises_before_it_lowers() -> None:
    # Blue-green: the old set (listed first) goes to weight 0, the new set to 100.
    rows = [
        ServerRow("old", "127.0.0.1:1", "no check", 256, 0, 0, 0, 0),
        ServerRow("new", "127.0.0.1:2", "no check", 0, 0, 0, 0, 0),
    ]
    desired = [
        Desired(Backend("old", "127.0.0.1:1", weight=0), "127.0.0.1:1"),
        Desired(Backend("new", "127.0.0.1:2", weight=100), "127.0.0.1:2"),
    ]
    assert [s.command for s in plan_changes("web", desired, rows)] == [
        "set weight web/new 256",
        "set weight web/old 0",
    ]


def test_a_server_is_drained_before_its_weight_moves() -> None:
    rows = [ServerRow("a", "127.0.0.1:1", "no check", 256, 0, 0, 0, 0)]
    desired = [Desired(Backend("a", "127.0.0.1:5", "drain", 50), "127.0.0.1:5")]
    assert [s.command for s in plan_changes("web", desired, rows)] == [
        "set server web/a addr 127.0.0.1 port 5",
        "set server web/a state drain",
    ]
    rows = [ServerRow("a", "[::1]:1", "DRAIN", 10, 0, 0, 0, 0)]
    desired = [
        Desired(Backend("a", "[::1]:1", weight=50), "[::1]:1"),
        Desired(Backend("b", "[::1]:2", weight=100), "[::1]:2"),
    ]
    assert [s.command for s in plan_changes("web", desired, rows)] == [
        "set weight web/a 128",
        "set server web/a state ready",
        "add server web/b [::1]:2 weight 256 pool-max-conn -1 pool-purge-delay 5s",
        "set server web/b state ready",
    ]
    assert (
        plan_changes("web", desired[:1], [ServerRow("a", "[::1]:1", "no check", 256, 0, 0, 0, 0)])
        == []
    )
