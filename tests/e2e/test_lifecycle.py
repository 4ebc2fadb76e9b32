"""The whole lifecycle through the CLI, on embedded defaults, under real traffic."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from graven.testing.load import Load
from tests.e2e.conftest import Project, eventually, pid_alive

pytestmark = pytest.mark.e2e


def _deploy_under_load(project: Project, *args: str, min_requests: int = 500) -> tuple[object, ...]:
    with Load(
        "127.0.0.1", project.port, clients=4, min_requests=min_requests, max_seconds=90
    ) as load:
        result = project.graven(*args, "-o", "json", timeout=120)
    return result, load.report


def test_deploy_and_rollback_under_load_drop_nothing(project: Project) -> None:
    first = project.graven("deploy", "-m", "first", "-o", "json").json()
    assert first["results"][0]["release"] == "hello@r1"
    assert first["results"][0]["rollout_result"]["state"] == "succeeded"
    v1 = project.status()
    assert len(v1["instances"]) == 3
    assert {i["state"] for i in v1["instances"]} == {"healthy"}

    project.write_spec("v2")
    _, report = _deploy_under_load(project, "deploy", "-m", "ship v2")
    assert report.failed == 0, report.to_dict()
    assert report.sent >= 500
    v2 = project.status()
    assert v2["desired_release"] == "hello@r2"
    assert not {i["id"] for i in v2["instances"]} & {i["id"] for i in v1["instances"]}, (
        "instances must be replaced, never reused"
    )
    assert v2["image"] != v1["image"]
    assert any("v1" in body for body in report.bodies) and any("v2" in b for b in report.bodies)

    _, report = _deploy_under_load(project, "rollback", "hello", "-m", "back to v1")
    assert report.failed == 0, report.to_dict()
    assert report.sent >= 500
    back = project.status()
    assert back["desired_release"] == "hello@r1"
    assert back["image"] == v1["image"]

    audit = project.graven("audit", "--verify", "-o", "json").json()
    actions = [(e["action"], e["release"], e["actor"]) for e in audit["entries"]]
    assert actions[:3] == [
        ("deploy", "hello@r1", "tester@ci"),
        ("deploy", "hello@r2", "tester@ci"),
        ("rollback", "hello@r1", "tester@ci"),
    ]
    assert audit["verified"] is True


def test_same_deploy_twice_does_nothing(project: Project) -> None:
    project.graven("deploy", "-m", "first")
    before = project.status()
    again = project.graven("deploy", "-m", "again", "-o", "json").json()
    assert again["results"][0]["changed"] is False
    assert project.status()["instances"] == before["instances"]
    build = project.graven("build", "-o", "json").json()
    assert build["images"][0]["steps_run"] == 0
    audit = project.graven("audit", "-o", "json").json()
    assert [e["action"] for e in audit["entries"]] == ["deploy"]
    plan = project.graven("plan", "-o", "json").json()
    assert plan["plans"][0]["changed"] is False


def test_controller_kill9_drops_nothing_and_is_adopted(project: Project) -> None:
    project.graven("deploy", "-m", "first")
    before = project.status()
    pid = project.controller_pid()
    assert pid is not None
    with Load("127.0.0.1", project.port, clients=3, min_requests=600, max_seconds=60) as load:
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)  # traffic flows with no controller at all
    assert load.report.failed == 0, load.report.to_dict()
    # A verb that changes state starts a controller ('status' only looks); the same
    # deploy again records nothing.
    same = project.graven("deploy", "-m", "first", "--detach", "-o", "json").json()
    assert same["results"][0]["changed"] is False
    after = project.status()
    assert project.controller_pid() != pid
    time.sleep(3)  # give a wrongly-duplicating controller the time to do it
    again = project.status()
    ids = lambda s: sorted((i["id"], i["pid"]) for i in s["instances"])  # noqa: E731
    assert ids(after) == ids(before) == ids(again)
    db = sqlite3.connect(project.state_dir / "state.db")
    (count,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
    assert count == 3, "the restarted controller started duplicates"


def test_failed_health_rolls_back_with_a_reason(project: Project) -> None:
    project.graven("deploy", "-m", "first")
    project.write_spec("v2", health_path="/does-not-exist", start_timeout="3s")
    with Load("127.0.0.1", project.port, clients=2, min_requests=100, max_seconds=60) as load:
        result = project.graven("deploy", "-m", "broken", check=False)
    assert result.code == 1
    assert "did not pass health check" in result.stdout + result.stderr
    assert load.report.failed == 0
    status = project.status()
    assert status["desired_release"] == "hello@r1"
    assert status["rollout"]["state"] == "failed"
    audit = project.graven("audit", "--verify", "-o", "json").json()
    failed = [e for e in audit["entries"] if e["action"] == "rollout-failed"]
    assert failed and "health check" in failed[0]["message"]


@pytest.mark.needs_root("entering an instance's namespaces needs root")
def test_instances_run_from_read_only_checkout(project: Project) -> None:
    project.graven("deploy", "-m", "first")
    inst = project.status()["instances"][0]
    app = project.state_dir / "checkouts" / inst["image"].removeprefix("sha256:") / "app" / "app.py"
    assert app.exists()
    # In the instance's mount namespace and root, even host root with every capability
    # cannot write the image (the image's own Python, from the host-python base, runs).
    python = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    script = "open('/app/app.py', 'a').write('tampered')"
    probe = subprocess.run(
        ["nsenter", "-t", str(inst["pid"]), "-m", "-r", "--", python, "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0
    assert "Read-only file system" in probe.stderr, probe.stderr
    assert "tampered" not in app.read_text()


# --- watching, detaching, and what outlives the CLI -----------------------------------


def slow_start(project: Project, seconds: int) -> None:
    """Make the example service take ``seconds`` before it listens."""
    app = project.root / "app" / "app.py"
    text = app.read_text()
    marker = 'VERSION = os.environ.get("VERSION", "dev")'
    assert marker in text
    app.write_text(
        text.replace(marker, f'__import__("time").sleep(float("{seconds}"))\n{marker}', 1)
    )


def interrupt_after(proc: subprocess.Popen[str], line_starts: str) -> tuple[int, str]:
    """Send SIGINT to ``proc`` once its stderr has a line starting with
    ``line_starts``; its exit code and all of its stderr."""
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:  # bounded: the process ends (or the test's timeout hits)
        seen.append(line)
        if line.lstrip().startswith(line_starts):
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + rest


def test_ctrl_c_stops_watching_and_the_rollout_goes_on(project: Project) -> None:
    project.write_spec(replicas=1, start_timeout="60s")
    slow_start(project, 8)
    code, err = interrupt_after(project.spawn("deploy", "-m", "slow start"), "hello: step")
    assert code == 130, err
    assert (
        "stopped watching; the rollout goes on — 'graven status -w' to follow, "
        "'graven abort hello' to stop it"
    ) in err
    assert "Traceback" not in err
    # Watching again, and stopping that, stops nothing either.
    code, err = interrupt_after(project.spawn("status", "-w"), "following")
    assert code == 130, err
    assert "stopped watching" in err and "Traceback" not in err
    followed = project.graven("status", "-w", "-o", "json", timeout=120)
    service = followed.json()["services"][0]
    assert service["rollout"]["state"] == "succeeded"
    assert [i["state"] for i in service["instances"]] == ["healthy"]
    # The lean rollback path says and does the same.
    project.write_spec("v2", replicas=1, start_timeout="60s")
    project.graven("deploy", "-m", "v2", "--detach")
    assert project.graven("status", "-w", timeout=120).code == 0
    code, err = interrupt_after(project.spawn("rollback", "hello", "--to", "1"), "hello: step")
    assert code == 130, err
    assert "stopped watching; the rollout goes on" in err and "'graven abort hello'" in err
    assert "Traceback" not in err
    followed = project.graven("status", "-w", "-o", "json", timeout=120)
    assert followed.json()["services"][0]["desired_release"] == "hello@r1"
    assert followed.json()["services"][0]["rollout"]["state"] == "succeeded"
    project.down_leaves_nothing()


def test_detach_returns_at_once_and_status_w_exits_with_the_outcome(project: Project) -> None:
    detached = project.graven("deploy", "-m", "first", "--detach", "-o", "json").json()
    assert "rollout_result" not in detached["results"][0]
    assert project.graven("status", "-w", check=False).code == 0
    assert project.status()["rollout"]["state"] == "succeeded"
    project.write_spec("v2", health_path="/does-not-exist", start_timeout="3s")
    project.graven("deploy", "-m", "broken", "--detach")
    watched = project.graven("status", "-w", "-o", "json", check=False)
    assert watched.code == 1, watched.stderr
    assert watched.json()["services"][0]["rollout"]["state"] == "failed"
    # --no-wait stays an alias, on the lean rollback path too.
    project.graven("rollback", "hello", "--to", "1", "--no-wait")
    project.down_leaves_nothing()


def test_read_only_verbs_start_no_controller(project: Project) -> None:
    project.graven("deploy", "-m", "first")
    project.graven("down", "hello")  # the service stops; the controller is told to stop
    project.graven("down")
    pid = project.controller_pid()
    assert pid is not None
    assert eventually(lambda: not pid_alive(pid), 15)
    for verb in (["status"], ["plan"], ["images"], ["releases", "hello"], ["audit"]):
        result = project.graven(*verb)
        assert project.controller_pid() == pid and not pid_alive(pid), verb
        assert "Traceback" not in result.stderr
    status = project.graven("status", "-o", "json").json()
    assert status["controller"] == "stopped"
    assert status["services"][0]["desired_release"] is None
    assert "controller: stopped" in project.graven("status").stdout
    plan = project.graven("plan", "-o", "json").json()
    assert plan["controller"] == "stopped"
    assert plan["plans"][0]["changed"] is True
    assert not (project.state_dir / "controller.sock").exists()


def test_an_idle_controller_exits_but_never_while_a_service_runs(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAVEN_CONTROLLER_IDLE", "1")
    project.graven("deploy", "-m", "first")
    pid = project.controller_pid()
    assert pid is not None
    time.sleep(4)  # several idle periods: a controller with live services stays
    assert pid_alive(pid)
    assert project.status()["instances"][0]["state"] == "healthy"
    # Once nothing runs, it goes by itself (no 'graven down' to tell it to).
    project.graven("down", "hello")
    assert eventually(lambda: not pid_alive(pid), 30), "the idle controller never exited"
    log = (project.state_dir / "controller.log").read_text()
    assert "nothing to do for 1s: exiting" in log
