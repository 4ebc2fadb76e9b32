"""Blue-green and canary rollouts through the CLI, real processes, real router, under
continuous bounded load."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import pytest

from graven.testing.load import Load
from tests.e2e.conftest import Project, eventually, free_port

pytestmark = pytest.mark.e2e


def blue_green(*, auto: bool, preview: int) -> dict[str, Any]:
    return {
        "type": "blue-green",
        "rollback_window": "10m",
        "auto_promote": auto,
        "preview_port": preview,
    }


CANARY: dict[str, Any] = {
    "type": "canary",
    "rollback_window": "10m",
    "steps": [
        {"weight": 25, "pause": "1s", "analysis": False},
        {"weight": 50, "analysis": True},
    ],
    "analysis": {"window": "3s", "min_requests": 30, "max_error_rate": 0.05},
}


def write(
    project: Project, version: str, strategy: dict[str, Any], error_rate: float = 0.0
) -> None:
    project.write_spec(
        version,
        replicas=2,
        start_timeout=None,
        strategy=strategy,
        env={"ERROR_RATE": str(error_rate)},
    )


def versions(report: object) -> set[str]:
    import json

    out = set()
    for body in report.bodies:  # type: ignore[attr-defined]
        with contextlib.suppress(ValueError, KeyError):
            out.add(json.loads(body)["version"])
    return out


def test_blue_green_with_promote_and_instant_rollback(routed_project: Project) -> None:
    preview = free_port()
    write(routed_project, "v1", blue_green(auto=True, preview=preview))
    routed_project.graven("deploy", "-m", "v1")
    write(routed_project, "v2", blue_green(auto=False, preview=preview))
    with Load(
        "127.0.0.1", routed_project.port, clients=3, min_requests=500, max_seconds=90
    ) as load:
        paused = routed_project.graven("deploy", "-m", "v2 behind preview", "-o", "json").json()
        assert paused["results"][0]["rollout_result"]["progress"].startswith("paused")
        # The new set answers on the preview port while live traffic stays on v1.
        with Load("127.0.0.1", preview, clients=1, min_requests=20, max_seconds=30) as peek:
            pass
        assert versions(peek.report) == {"v2"} and peek.report.failed == 0
        routed_project.graven("promote", "hello", "-m", "preview looks right")
        time.sleep(0.5)
    assert load.report.failed == 0, load.report.to_dict()
    assert versions(load.report) == {"v1", "v2"}
    status = routed_project.status()
    assert status["desired_release"] == "hello@r2"
    # r1 is still running, warm and idle: a rollback is only a traffic switch.
    assert {i["release"] for i in status["instances"]} == {"hello@r1", "hello@r2"}
    with Load(
        "127.0.0.1", routed_project.port, clients=3, min_requests=500, max_seconds=60
    ) as load:
        started = time.monotonic()
        routed_project.graven("rollback", "hello", "-m", "back to v1")
        took = time.monotonic() - started
    assert load.report.failed == 0, load.report.to_dict()
    assert routed_project.status()["desired_release"] == "hello@r1"
    assert took < 30  # a switch, not a re-roll (timing goals live in bench/)
    actions = [e["action"] for e in routed_project.graven("audit", "-o", "json").json()["entries"]]
    assert actions == ["deploy", "deploy", "promote", "rollback"]
    routed_project.down_leaves_nothing()


def test_canary_to_full_replacement_under_load(routed_project: Project) -> None:
    write(routed_project, "v1", CANARY)
    routed_project.graven("deploy", "-m", "v1")
    write(routed_project, "v2", CANARY)
    with Load(
        "127.0.0.1", routed_project.port, clients=3, min_requests=800, max_seconds=120
    ) as load:
        result = routed_project.graven(
            "deploy", "-m", "canary v2", "-o", "json", timeout=180
        ).json()
    assert result["results"][0]["rollout_result"]["state"] == "succeeded"
    assert load.report.failed == 0, load.report.to_dict()
    status = routed_project.status()
    assert status["desired_release"] == "hello@r2"
    assert versions(load.report) == {"v1", "v2"}
    routed_project.down_leaves_nothing()


def test_a_failing_canary_aborts_by_itself_and_says_why(routed_project: Project) -> None:
    write(routed_project, "v1", CANARY)
    routed_project.graven("deploy", "-m", "v1")
    write(routed_project, "v2", CANARY, error_rate=0.5)
    with Load("127.0.0.1", routed_project.port, clients=3, min_requests=300, max_seconds=120):
        result = routed_project.graven("deploy", "-m", "bad canary", check=False, timeout=180)
    assert result.code == 1
    assert "analysis failed" in result.stdout + result.stderr
    status = routed_project.status()
    assert status["desired_release"] == "hello@r1"
    assert status["rollout"]["state"] == "failed"
    assert "analysis failed" in status["rollout"]["reason"]
    text = routed_project.graven("status").stdout
    assert "analysis failed" in text
    ledger = routed_project.graven("audit", "-o", "json").json()["entries"]
    assert ledger[-1]["action"] == "rollout-failed"
    assert "analysis failed" in ledger[-1]["message"]
    # After the abort, v1 serves everything again.
    with Load(
        "127.0.0.1", routed_project.port, clients=2, min_requests=100, max_seconds=30
    ) as after:
        pass
    assert after.report.failed == 0 and versions(after.report) == {"v1"}
    routed_project.down_leaves_nothing()


def test_rolling_deploy_and_rollback_under_load(routed_project: Project) -> None:
    rolling = {"type": "rolling", "max_surge": 1}
    write(routed_project, "v1", rolling)
    routed_project.graven("deploy", "-m", "v1")
    write(routed_project, "v2", rolling)
    with Load(
        "127.0.0.1", routed_project.port, clients=3, min_requests=500, max_seconds=90
    ) as load:
        routed_project.graven("deploy", "-m", "v2")
    assert load.report.failed == 0, load.report.to_dict()
    assert versions(load.report) == {"v1", "v2"}
    with Load(
        "127.0.0.1", routed_project.port, clients=3, min_requests=500, max_seconds=90
    ) as load:
        routed_project.graven("rollback", "hello", "-m", "back")
    assert load.report.failed == 0, load.report.to_dict()
    assert routed_project.status()["desired_release"] == "hello@r1"
    routed_project.down_leaves_nothing()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_aborted_blue_green_leaves_no_preview_router(routed_project: Project) -> None:
    preview = free_port()
    write(routed_project, "v1", blue_green(auto=True, preview=preview))
    routed_project.graven("deploy", "-m", "v1")
    write(routed_project, "v2", blue_green(auto=False, preview=preview))
    paused = routed_project.graven("deploy", "-m", "v2 behind preview", "-o", "json").json()
    assert paused["results"][0]["rollout_result"]["progress"].startswith("paused")
    assert listening(preview)
    routed_project.graven("abort", "hello", "-m", "preview looks wrong")
    assert eventually(lambda: routed_project.status()["rollout"]["state"] == "aborted")
    # Back on v1 alone, the preview route goes with the set behind it.
    assert eventually(
        lambda: {i["release"] for i in routed_project.status()["instances"]} == {"hello@r1"}, 60
    )
    assert eventually(lambda: not listening(preview), 30), "the preview router still listens"
    routed_project.down_leaves_nothing()
