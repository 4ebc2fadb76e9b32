"""port_holder: who listens on a port, found through /proc, with a real listener."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.netports import PortHolder, descends_from, port_holder


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket of this process listening on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


def own_name() -> str:
    return Path(f"/proc/{os.getpid()}/comm").read_text().strip()


def test_a_port_held_by_this_process_names_it(listener: socket.socket) -> None:
    port = listener.getsockname()[1]

    holder = port_holder("127.0.0.1", port)

    assert holder is not None
    assert holder.pids == (os.getpid(),)
    assert holder.name == own_name()
    assert holder.describe() == (
        f"port {port} on 127.0.0.1 is in use by pid {os.getpid()} ({own_name()})"
    )


def test_a_free_port_has_no_holder(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    listener.close()

    assert port_holder("127.0.0.1", port) is None


def test_a_wildcard_listener_holds_the_port_on_loopback() -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        s.listen()
        port = s.getsockname()[1]

        holder = port_holder("127.0.0.1", port)

    assert holder is not None
    assert holder.pid == os.getpid()


def test_another_loopback_address_is_not_held(listener: socket.socket) -> None:
    assert port_holder("127.0.0.2", listener.getsockname()[1]) is None


def test_a_bound_socket_that_does_not_listen_is_still_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

        holder = port_holder("127.0.0.1", port)

    assert holder == PortHolder("127.0.0.1", port)
    assert holder.describe() == f"port {port} on 127.0.0.1 is in use"


def test_an_owner_that_cannot_be_seen_is_reported_without_a_pid(
    listener: socket.socket, tmp_path: Path
) -> None:
    # A /proc whose process directories are unreadable (as another user's are).
    port = listener.getsockname()[1]
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    for table in ("tcp", "tcp6"):
        (proc / "net" / table).write_text(Path(f"/proc/net/{table}").read_text())

    holder = port_holder("127.0.0.1", port, proc=proc)

    assert holder == PortHolder("127.0.0.1", port)


def test_descends_from() -> None:
    me, parent = os.getpid(), os.getppid()

    assert descends_from(me, me)
    assert descends_from(me, parent)
    assert not descends_from(parent, me)
