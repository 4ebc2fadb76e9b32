"""Kill -9 the controller at every step of every strategy (one run per step): the
restarted controller resumes the rollout (or rolls it back), under load, with zero
failed requests, and the service ends fully on one release."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from typing import Any

import pytest

from graven.model import BlueGreenConfig, CanaryConfig, CanaryStep
from graven.plan.blue_green import BlueGreenStatus, plan_blue_green
from graven.plan.canary import plan_canary
from graven.plan.rolling import ObservedInstance, plan_rolling
from graven.testing.load import Load
from tests.e2e.conftest import Project

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STRATEGIES: dict[str, dict[str, Any]] = {
    "rolling": {"type": "rolling"},
    "blue-green": {"type": "blue-green", "rollback_window": "2s"},
    "canary": {
        "type": "canary",
        "rollback_window": "2s",
        "steps": [{"weight": 50, "pause": "1s", "analysis": False}],
    },
}

_FLEET = [ObservedInstance("a", 1, "healthy"), ObservedInstance("b", 1, "healthy")]
# Steps a rollout reports while it runs (blue-green and canary are done at the switch).
_STEPS = {
    "rolling": len(plan_rolling("hello", 2, 2, _FLEET).steps),
    "blue-green": [
        s.kind
        for s in plan_blue_green(
            "hello",
            2,
            2,
            _FLEET,
            BlueGreenConfig(rollback_window=2.0),
            weights={},
            status=BlueGreenStatus(),
            now=0.0,
        ).steps
    ].index("switch")
    + 1,
    "canary": [
        s.kind
        for s in plan_canary(
            "hello", 2, 2, _FLEET, CanaryConfig((CanaryStep(50, 1.0, False),))
        ).steps
    ].index("switch")
    + 1,
}
CASES = [(name, step) for name, count in _STEPS.items() for step in range(1, count + 1)]


def _write(project: Project, strategy: str, version: str) -> None:
    project.write_spec(version, replicas=2, start_timeout=None, strategy=STRATEGIES[strategy])


def _rollout(project: Project, rollout_id: int) -> tuple[str, str]:
    with contextlib.closing(sqlite3.connect(project.state_dir / "state.db", timeout=5)) as db:
        row = db.execute(
            "SELECT state, progress FROM rollouts WHERE id=?", (rollout_id,)
        ).fetchone()
    return (row[0], row[1]) if row else ("", "")


def _settled(project: Project) -> str | None:
    """The release serving everything once nothing else runs, else None."""
    status = project.status()
    instances = status["instances"]
    if status["rollout"]["state"] == "running" or len(instances) != 2:
        return None
    if {i["state"] for i in instances} != {"healthy"}:
        return None
    releases = {i["release"] for i in instances}
    return releases.pop() if len(releases) == 1 else None


@pytest.mark.parametrize(("strategy", "step"), CASES, ids=[f"{s}-step{n}" for s, n in CASES])
def test_kill_controller_at_each_step(project: Project, strategy: str, step: int) -> None:
    _write(project, strategy, "v1")
    project.graven("deploy", "-m", "v1")
    _write(project, strategy, "v2")
    with Load("127.0.0.1", project.port, clients=2, min_requests=200, max_seconds=120) as load:
        out = project.graven("deploy", "-m", "v2", "--no-wait", "-o", "json").json()
        rollout_id = out["results"][0]["rollout"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state, progress = _rollout(project, rollout_id)
            if state != "running" or progress.startswith(f"step {step}/"):
                break
            time.sleep(0.01)
        pid = project.controller_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)  # the data plane runs on alone
        # A verb that changes state starts a controller ('status' only looks): the same
        # deploy again records nothing, and the new controller resumes the rollout.
        project.graven("deploy", "-m", "v2", "--detach")
        deadline = time.monotonic() + 90
        serving = None
        while time.monotonic() < deadline and serving is None:
            serving = _settled(project)
            time.sleep(0.2)
    assert serving in ("hello@r1", "hello@r2"), json.dumps(project.status(), indent=2)
    assert load.report.failed == 0, load.report.to_dict()
    # No duplicate survived the crash: exactly the replicas run, all recorded.
    with contextlib.closing(sqlite3.connect(project.state_dir / "state.db")) as db:
        live = db.execute(
            "SELECT COUNT(*) FROM instances WHERE state IN ('starting','healthy','draining')"
        ).fetchone()[0]
    assert live == 2
