"""The waiting verbs' ``-o json``, pinned byte for byte: ``rollback`` (the lean path's
function), ``deploy``, ``promote`` and ``status -w``, each waiting for a rollout that
runs, then ends. The CLI reads the controller's replies as typed values; what it prints
must stay what scripts have always parsed (the replies as the controller sent them,
with ``rollout_result`` attached).

The controller here answers from canned replies, encoded as the API encodes them
(``to_json`` of its result types), by method and path; a poll gets the next reply."""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from graven.cli import deploy_cmds, rollouts
from graven.cli.context import AppContext
from graven.cli.main import main
from graven.cli.output import Output
from graven.controller import client as client_module
from graven.controller.paths import controller_socket
from graven.controller.results import (
    DeployResult,
    HealthReply,
    PromoteResult,
    ReleaseShare,
    RollbackResult,
    RolloutInstance,
    RolloutReply,
    RolloutView,
    ServiceStatus,
    StatusView,
    to_json,
)
from graven.errors import ControllerError
from graven.spec import scaffold
from graven.testing.specs import hello_spec

RUNNING = RolloutView(
    id=4,
    service="hello",
    kind="rollback",
    from_release=2,
    to_release=1,
    state="running",
    reason="",
    progress="step 1/2: switch traffic to hello@r1",
    started_at=1700000000.25,
    finished_at=None,
    progressed_at=1700000000.5,
)
SUCCEEDED = dataclasses.replace(
    RUNNING,
    state="succeeded",
    progress="step 2/2: stop hello-r2-aaaa",
    finished_at=1700000001.0,
    step_index=2,
    switched_at=1700000000.75,
)
PAUSED = dataclasses.replace(
    RUNNING, kind="deploy", progress="paused: awaiting promote", step_index=3
)
LIFTED = dataclasses.replace(PAUSED, promoted=1)  # promoted, the engine not yet moved on


def status_of(rollout: RolloutView) -> StatusView:
    return StatusView(
        (
            ServiceStatus(
                service="hello",
                desired_release="hello@r1",
                image="sha256:" + "a" * 64,
                image_name="hello",
                replicas=1,
                url="http://127.0.0.1:18080/",
                preview_url=None,
                rollout=rollout,
                releases=(ReleaseShare("hello@r1", 100.0, 1, 1, False, "live"),),
                restarts=0,
                last_exit="",
                crash_looping=False,
                next_start_in=None,
                problem=None,
                instances=(),
            ),
        )
    )


class CannedController:
    """Answers each request with the next canned reply for its method and path (the
    last one again once the others are used; a dict goes out as it is); records what
    was asked."""

    def __init__(self, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.replies: dict[tuple[str, str], list[object]] = {
            ("GET", "/v1/health"): [HealthReply(ok=True, pid=1)]
        }
        self.asked: list[str] = []
        state_dir.mkdir(exist_ok=True)
        controller_socket(state_dir, create=True).touch()  # exists: "a controller runs"
        monkeypatch.setattr(client_module, "_exchange", self._exchange)
        monkeypatch.setattr(time, "sleep", lambda seconds: None)  # between polls

    def answer(self, method: str, path: str, *replies: object) -> None:
        self.replies[(method, path)] = list(replies)

    def _exchange(self, path: Path, request: bytes, timeout: float) -> tuple[int, bytes]:
        method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ")
        self.asked.append(f"{method} {target}")
        queue = self.replies[(method, urlsplit(target).path)]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        return 200, json.dumps(reply if isinstance(reply, dict) else to_json(reply)).encode()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    scaffold(tmp_path)
    (tmp_path / "graven.yaml").write_text(hello_spec(port=18080, version="v2", replicas=1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAVEN_ACTOR", "ana@ci")
    return tmp_path


@pytest.fixture
def controller(project: Path, monkeypatch: pytest.MonkeyPatch) -> CannedController:
    return CannedController(project / ".graven", monkeypatch)


def polls(controller: CannedController) -> int:
    return sum(a.startswith("GET /v1/rollout?") for a in controller.asked)


def graven(*argv: str) -> None:
    try:
        main(list(argv))
    except SystemExit as exc:
        assert exc.code in (0, None)


ROLLBACK_WAITED = """\
{
  "results": [
    {
      "changed": true,
      "ledger": 9,
      "release": "hello@r1",
      "rollout": 4,
      "rollout_result": {
        "finished_at": 1700000001.0,
        "from_release": 2,
        "id": 4,
        "kind": "rollback",
        "paused_until": null,
        "progress": "step 2/2: stop hello-r2-aaaa",
        "progressed_at": 1700000000.5,
        "promoted": 0,
        "reason": "",
        "service": "hello",
        "started_at": 1700000000.25,
        "state": "succeeded",
        "step_index": 2,
        "switched_at": 1700000000.75,
        "to_release": 1
      },
      "service": "hello"
    }
  ],
  "url": "http://127.0.0.1:18080/"
}
"""


def test_rollback_json_with_its_wait(
    project: Path, controller: CannedController, capsys: pytest.CaptureFixture[str]
) -> None:
    controller.answer("POST", "/v1/rollback", RollbackResult(True, "hello@r1", 4, 9))
    instances = (RolloutInstance("hello-r1-bbbb", 1, "healthy"),)
    controller.answer(
        "GET",
        "/v1/rollout",
        RolloutReply(RUNNING, instances),
        RolloutReply(SUCCEEDED, instances),
    )
    controller.answer("GET", "/v1/status", status_of(SUCCEEDED))
    app = AppContext(state_dir_option=project / ".graven")
    code = rollouts.rollback(app, "hello", None, "bad v2", no_wait=False, out=Output("json"))
    assert (code, capsys.readouterr().out) == (0, ROLLBACK_WAITED)
    assert polls(controller) == 2


def test_rollback_json_without_a_wait_or_a_change(
    project: Path, controller: CannedController, capsys: pytest.CaptureFixture[str]
) -> None:
    controller.answer(
        "POST",
        "/v1/rollback",
        RollbackResult(True, "hello@r1", 4, 9),
        RollbackResult(False, "hello@r1", None),
    )
    controller.answer("GET", "/v1/status", status_of(RUNNING))
    app = AppContext(state_dir_option=project / ".graven")
    for _ in range(2):
        rollouts.rollback(app, "hello", 1, "back", no_wait=True, out=Output("json"))
    assert capsys.readouterr().out == (
        '{\n  "results": [\n    {\n      "changed": true,\n      "ledger": 9,\n'
        '      "release": "hello@r1",\n      "rollout": 4,\n      "service": "hello"\n'
        '    }\n  ],\n  "url": "http://127.0.0.1:18080/"\n}\n'
        '{\n  "results": [\n    {\n      "changed": false,\n'
        '      "release": "hello@r1",\n      "rollout": null,\n      "service": "hello"\n'
        '    }\n  ],\n  "url": "http://127.0.0.1:18080/"\n}\n'
    )
    assert polls(controller) == 0


def test_a_failed_rollback_exits_1_with_its_reason(
    project: Path, controller: CannedController, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = dataclasses.replace(SUCCEEDED, state="failed", reason="no healthy instance")
    controller.answer("POST", "/v1/rollback", RollbackResult(True, "hello@r1", 4, 9))
    controller.answer("GET", "/v1/rollout", RolloutReply(failed, ()))
    controller.answer("GET", "/v1/status", status_of(failed))
    app = AppContext(state_dir_option=project / ".graven")
    assert rollouts.rollback(app, "hello", None, "x", no_wait=False, out=Output("json")) == 1
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert result["rollout_result"] == to_json(failed)


def test_a_rollout_reply_that_does_not_fit_is_a_controller_error_naming_the_key(
    project: Path, controller: CannedController
) -> None:
    """Polled replies are checked as the others are (indexing raw JSON, a reply from
    a mismatched controller was a KeyError deep in the wait)."""
    controller.answer("POST", "/v1/rollback", RollbackResult(True, "hello@r1", 4, 9))
    without_state = {k: v for k, v in to_json(RUNNING).items() if k != "state"}
    controller.answer("GET", "/v1/rollout", {"rollout": without_state, "instances": []})
    app = AppContext(state_dir_option=project / ".graven")
    with pytest.raises(ControllerError) as caught:
        rollouts.rollback(app, "hello", None, "x", no_wait=False, out=Output("json"))
    assert caught.value.message == (
        "the controller sent a malformed reply to /v1/rollout: rollout: missing key 'state'"
    )
    assert caught.value.hint


DEPLOY_WAITED = """\
{
  "results": [
    {
      "changed": true,
      "ledger": 3,
      "release": "hello@r2",
      "rollout": 4,
      "rollout_result": {
        "finished_at": null,
        "from_release": 2,
        "id": 4,
        "kind": "deploy",
        "paused_until": null,
        "progress": "paused: awaiting promote",
        "progressed_at": 1700000000.5,
        "promoted": 0,
        "reason": "",
        "service": "hello",
        "started_at": 1700000000.25,
        "state": "running",
        "step_index": 3,
        "switched_at": null,
        "to_release": 1
      },
      "service": "hello"
    }
  ],
  "url": "http://127.0.0.1:18080/",
  "urls": {
    "hello": "http://127.0.0.1:18080/"
  }
}
"""


def test_deploy_json_with_its_wait_to_a_manual_gate(
    project: Path,
    controller: CannedController,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A paused rollout ends the deploy's wait; the JSON carries where it paused."""
    candidate = {"service": "hello", "image": "sha256:" + "a" * 64, "image_name": "hello"}
    monkeypatch.setattr(deploy_cmds, "release_candidates", lambda app, names, out: [candidate])
    controller.answer("POST", "/v1/deploy", DeployResult(True, "hello@r2", 4, 3))
    controller.answer("GET", "/v1/rollout", RolloutReply(RUNNING, ()), RolloutReply(PAUSED, ()))
    controller.answer("GET", "/v1/status", status_of(PAUSED))
    graven("deploy", "-m", "v2", "-o", "json")
    assert capsys.readouterr().out == DEPLOY_WAITED
    assert polls(controller) == 2


def test_promote_json_waits_past_the_gate_it_lifted(
    project: Path, controller: CannedController, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gate promote lifted still reads "paused" until the engine moves on: promote
    waits past it, to the end (or the next gate)."""
    controller.answer("POST", "/v1/promote", PromoteResult("hello", 4, "hello@r2"))
    controller.answer("GET", "/v1/rollout", RolloutReply(LIFTED, ()), RolloutReply(SUCCEEDED, ()))
    graven("promote", "hello", "-o", "json")
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "release": "hello@r2",
        "rollout": 4,
        "rollout_result": to_json(SUCCEEDED),
        "service": "hello",
    }
    assert polls(controller) == 2


def test_status_watch_json_is_the_status_after_the_wait(
    project: Path, controller: CannedController, capsys: pytest.CaptureFixture[str]
) -> None:
    controller.answer("GET", "/v1/status", status_of(RUNNING), status_of(SUCCEEDED))
    controller.answer("GET", "/v1/rollout", RolloutReply(RUNNING, ()), RolloutReply(SUCCEEDED, ()))
    graven("status", "-w", "-o", "json")
    printed = capsys.readouterr().out
    assert printed == json.dumps(to_json(status_of(SUCCEEDED)), indent=2, sort_keys=True) + "\n"
    assert json.loads(printed)["services"][0]["rollout"]["state"] == "succeeded"
    assert polls(controller) == 2


def test_the_cli_reads_controller_replies_only_through_the_typed_client() -> None:
    """No verb calls ``ControllerClient.request`` and indexes the JSON itself: a reply
    is checked once, in the client, and a malformed one is a ControllerError."""
    cli = Path(rollouts.__file__).parent
    raw = [
        f"{path.name}:{node.lineno}"
        for path in sorted(cli.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "request"
    ]
    assert raw == []
