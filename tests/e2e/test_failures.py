"""Rollouts that cannot finish and instances that keep dying, with real processes: a
real listener holding the service's port, a real app that crashes on cue."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Project, eventually, free_port, pid_alive

pytestmark = pytest.mark.e2e


@pytest.fixture
def squatter(project: Project) -> Iterator[socket.socket]:
    """Something else listening on the service's port before graven deploys."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", project.port))
    sock.listen()
    yield sock
    sock.close()


def test_deploy_to_a_busy_port_fails_fast_with_the_reason(
    project: Project, squatter: socket.socket
) -> None:
    project.write_spec(replicas=1)
    project.graven("build")  # the deploy below is the rollout alone
    started = time.monotonic()
    # The subprocess timeout is the hang guard: a deploy that waits forever fails here.
    r = project.graven("deploy", "-m", "first", check=False, timeout=15)
    assert r.code == 1, r.stdout + r.stderr
    assert time.monotonic() - started < 15
    out = r.stdout + r.stderr
    assert f"port {project.port} on 127.0.0.1 is in use by pid {os.getpid()} (" in out, out
    assert "give hello another port in graven.yaml" in out
    assert "Traceback" not in out
    st = project.status()
    assert st["rollout"]["state"] == "failed"
    assert st["desired_release"] is None  # the failed first release is not desired
    assert eventually(lambda: project.status()["instances"] == [], 10)
    # The port's owner was left alone, and serves on.
    squatter.settimeout(2)
    with socket.create_connection(("127.0.0.1", project.port), timeout=2):
        pass
    # Once the port is free the same deploy goes through.
    squatter.close()
    r = project.graven("deploy", "-m", "port freed", timeout=60)
    assert project.status()["rollout"]["state"] == "succeeded"


def test_a_crash_looping_instance_backs_off_is_ledgered_and_recovers(
    project: Project, tmp_path: Path
) -> None:
    # A sealed instance sees no host path but its volumes: the signal dir is one.
    signals = tmp_path / "signals"
    signals.mkdir()
    crash = signals / "crash-now"
    project.write_spec(
        replicas=1,
        env={"CRASH_FILE": "/signals/crash-now"},
        volumes=[{"path": "/signals", "host": str(signals), "read_only": True}],
    )
    project.graven("deploy", "-m", "first")
    (first,) = project.status()["instances"]
    crash.touch()  # every instance of the service now exits with code 3

    def looping() -> bool:
        st = project.status()
        return bool(st["crash_looping"])

    assert eventually(looping, 60), project.status()
    st = project.status()
    assert st["restarts"] >= 3
    assert st["last_exit"].startswith("exited with code 3"), st
    human = project.graven("status", "hello").stdout
    assert "crash-looping" in human, human
    audit = project.graven("audit", "-o", "json").json()
    died = [e for e in audit["entries"] if e["action"] == "instance-died"]
    assert died and died[0]["details"]["instance"] == first["id"]
    assert died[0]["details"]["exit"] == "exited with code 3"
    # Replacements wait longer and longer: far fewer starts than seconds passed.
    crash.unlink()

    def serving() -> bool:
        inst = project.status()["instances"]
        return len(inst) == 1 and inst[0]["state"] == "healthy"

    assert eventually(serving, 60), project.status()
    (now,) = project.status()["instances"]
    assert now["restarts"] >= 3 and now["last_exit"].startswith("exited with code 3")


def test_an_instance_started_but_never_recorded_is_stopped_by_the_next_controller(
    project: Project,
) -> None:
    """A controller killed between spawning an instance and recording it left the
    process running, unrouted, past every 'graven down'."""
    from graven.controller.paths import store_root
    from graven.runtime.base import LaunchSpec
    from graven.runtime.process import ProcessRuntime
    from graven.store.cas import ContentStore

    project.write_spec(replicas=1)
    project.graven("deploy", "-m", "first")
    project.graven("down", "-m", "stop")
    store = ContentStore(store_root(project.state_dir))
    image = store.resolve("hello")
    # What the dead controller had done: the spawn, and nothing after it.
    runtime = ProcessRuntime(project.state_dir, store)
    handle = runtime.start(
        LaunchSpec("hello-r1-0rph", "hello", 1, image, (("VERSION", "v1"),), free_port())
    )
    assert pid_alive(handle.pid)
    project.graven("deploy", "-m", "again")
    assert eventually(lambda: not pid_alive(handle.pid), 10)
    log = (project.state_dir / "controller.log").read_text()
    assert "hello-r1-0rph" in log and "never recorded" in log
