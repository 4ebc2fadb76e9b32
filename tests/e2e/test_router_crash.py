"""The data plane survives its own crash: a router process killed with SIGKILL under
steady load, with the controller running and with it dead, refuses no connection.

The router is started by the controller (``graven deploy``); the victim is either the
proxy process that serves the traffic or the supervisor that holds the port. Load from
``graven.testing.load``: a few keep-alive clients, one request in flight each, so at
most one request per client may fail (the one on a connection the dead process held).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import pytest

from graven import detached
from graven.router.embedded import EmbeddedRouter
from graven.testing.load import Load
from tests.e2e.conftest import Project, eventually, pid_alive

pytestmark = pytest.mark.e2e

SERVICE = "hello"
CLIENTS = 3


def router_health(router: EmbeddedRouter) -> dict[str, Any] | None:
    try:
        status, doc = router._call(router._files(SERVICE), "GET", "/health", None, 5.0)
    except OSError:
        return None  # a supervisor being replaced: no admin socket for a moment
    return doc if status == 200 else None


@pytest.mark.parametrize("controller", ["controller-running", "controller-dead"])
@pytest.mark.parametrize("victim", ["proxy", "supervisor"])
def test_a_router_killed_under_load_refuses_no_connection(
    project: Project, victim: str, controller: str
) -> None:
    project.write_spec(replicas=2)
    project.graven("deploy", "-m", "first")
    router = EmbeddedRouter(project.state_dir)
    supervisor = router.pid(SERVICE)
    assert supervisor is not None
    doc = router_health(router)
    assert doc is not None
    serving = list(doc.get("workers") or [doc["pid"]])  # a lone proxy serves itself
    target = serving[0] if victim == "proxy" else supervisor
    seen = {pid: detached.start_time(pid) for pid in {supervisor, *serving}}
    controller_pid = project.controller_pid()
    assert controller_pid is not None
    if controller == "controller-dead":
        os.kill(controller_pid, signal.SIGKILL)
        assert eventually(lambda: not pid_alive(controller_pid))
    try:
        with Load("127.0.0.1", project.port, clients=CLIENTS, max_seconds=60) as load:
            assert eventually(lambda: load.report.sent >= 100, timeout=30)
            os.kill(target, signal.SIGKILL)
            assert eventually(lambda: load.report.sent >= 300, timeout=40), load.report.to_dict()
        report = load.report
        assert "ConnectionRefusedError" not in report.errors, report.to_dict()
        assert report.failed <= CLIENTS, report.to_dict()
        assert report.ok >= 300 - CLIENTS, report.to_dict()
        # Nothing but the router brought the router back.
        assert pid_alive(controller_pid) == (controller == "controller-running")

        def replaced() -> bool:
            doc = router_health(router)
            return doc is not None and target not in {doc["pid"], *doc.get("workers", [])}

        assert eventually(replaced, timeout=20)
        now = router_health(router)
        assert now is not None and router.pid(SERVICE) == now["pid"]
        # The old processes leave by themselves (a worker that replaced its supervisor
        # finishes its requests first).
        gone = [pid for pid in seen if pid != now["pid"] and pid not in now.get("workers", [])]
        assert eventually(lambda: not any(map(pid_alive, gone)), timeout=20)
        assert project.status()["instances"]  # the CLI still sees the service
    finally:
        for pid, started in seen.items():
            if started is not None and detached.start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
