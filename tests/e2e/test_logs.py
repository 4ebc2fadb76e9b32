"""``graven logs`` on real instance logs: lines of a service's instances by time,
``--tail``, ``--since`` exact to the times shown, the logs of a replaced instance, and
``-f`` picking up the instances a deploy starts, ending cleanly on Ctrl-C."""

from __future__ import annotations

import json
import queue
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from graven.logtimes import marks_path, parse_marks
from tests.e2e.conftest import Project, eventually

pytestmark = pytest.mark.e2e


def lines(project: Project, *args: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = project.graven("logs", *args, "-o", "json").json()["lines"]
    return found


def test_logs_tail_since_and_a_replaced_instance(project: Project) -> None:
    project.write_spec(replicas=2)
    project.graven("deploy", "-m", "first")
    ids = {i["id"] for i in project.status()["instances"]}
    # Until the controller's first mark, a line's time is its file's last write (see
    # graven.logtimes); the first mark holds the 'serving' line to one time for good.
    logs = [project.state_dir / "instances" / i / "log" for i in ids]

    def serving_marked(log: Path) -> bool:
        data = log.read_bytes()
        at = data.find(b"version v1 serving on")
        if at < 0 or not marks_path(log).exists():
            return False
        end = data.index(b"\n", at) + 1
        totals = [m.total for m in parse_marks(marks_path(log).read_text(errors="replace"))]
        return bool(totals) and max(totals) >= end

    assert eventually(lambda: all(serving_marked(log) for log in logs), 30)
    every = lines(project, "hello")
    assert {ln["instance"] for ln in every} == ids
    assert [ln["time"] for ln in every] == sorted(ln["time"] for ln in every)
    serving = [ln for ln in every if "version v1 serving on" in ln["line"]]
    assert len(serving) == 2
    # Health checks keep logging; a line written after the last 'serving' line exists.
    latest = max(ln["time"] for ln in serving)
    assert eventually(lambda: any(ln["time"] > latest for ln in lines(project, "hello")), 30)
    assert max(ln["time"] for ln in lines(project, "hello") if "serving on" in ln["line"]) == latest
    after = lines(project, "hello", "--since", latest.replace("Z", "1Z"))  # 0.1 ms later
    assert after and all(ln["time"] > latest for ln in after)
    assert not any("serving on" in ln["line"] for ln in after)
    assert len(lines(project, "hello", "--tail", "3")) == 3
    human = project.graven("logs", "hello", "--tail", "1").stdout.splitlines()
    assert len(human) == 1 and any(i in human[0] for i in ids), human
    # One instance by its id; after a deploy replaced it, its log is still there.
    old = sorted(ids)[0]
    project.write_spec("v2", replicas=2)
    project.graven("deploy", "-m", "second")
    assert old not in {i["id"] for i in project.status()["instances"]}
    own = lines(project, old)
    assert {ln["instance"] for ln in own} == {old}
    assert any(f"{old}: stopped" in ln["line"] for ln in own)
    r = project.graven("logs", "no-such-service", check=False)
    assert r.code == 2 and "no service or instance named 'no-such-service'" in r.stderr


def test_follow_sees_the_instances_a_deploy_starts_and_ends_on_ctrl_c(project: Project) -> None:
    project.write_spec(replicas=1)
    project.graven("deploy", "-m", "first")
    (first,) = project.status()["instances"]
    follower = project.spawn("logs", "hello", "-f", "-o", "json")
    seen: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert follower.stdout is not None
        for text in follower.stdout:
            seen.put(json.loads(text))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        got: list[dict[str, Any]] = []

        def saw(check: Any) -> bool:
            while not seen.empty():
                got.append(seen.get())
            return any(check(ln) for ln in got)

        assert eventually(lambda: saw(lambda ln: ln["instance"] == first["id"]), 30)
        project.write_spec("v2", replicas=1)
        project.graven("deploy", "-m", "second")
        (second,) = project.status()["instances"]
        assert second["id"] != first["id"]
        assert eventually(
            lambda: saw(
                lambda ln: ln["instance"] == second["id"] and "version v2 serving" in ln["line"]
            ),
            30,
        ), got[-5:]
        assert saw(lambda ln: ln["instance"] == first["id"] and "stopped" in ln["line"])
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=20) == 0
        assert follower.stderr is not None
        assert "Traceback" not in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=10)
