"""The controller's reply types: their JSON is what the API always sent, every type
round-trips through it, and the client refuses a reply that does not fit its type."""

from __future__ import annotations

import asyncio
import json
import typing
from pathlib import Path

import pytest

from graven.controller import client as client_module
from graven.controller.api import Api
from graven.controller.client import ControllerClient
from graven.controller.results import (
    AbortResult,
    DeployResult,
    DownResult,
    DownResults,
    HealthReply,
    InstanceStatus,
    PlanView,
    PreviewResult,
    PromoteResult,
    ReleaseShare,
    Reply,
    RollbackResult,
    RolloutInstance,
    RolloutReply,
    RolloutView,
    ServiceStatus,
    ShutdownReply,
    StateDirView,
    StatusView,
    StepView,
    VolumeRemoval,
    VolumeView,
    from_json,
    to_json,
)
from graven.errors import ControllerError, NotFoundError
from tests.unit.test_engine import World, config


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


ROLLOUT = RolloutView(
    id=3,
    service="web",
    kind="deploy",
    from_release=1,
    to_release=2,
    state="running",
    reason="",
    progress="step 2/9: drain web-r1-aaaa",
    started_at=1700000000.5,
    finished_at=None,
    step_index=1,
    promoted=0,
    switched_at=None,
    paused_until=1700000030.0,
    progressed_at=1700000001.25,
)
INSTANCE = InstanceStatus(
    id="web-r2-bbbb",
    release="web@r2",
    image="sha256:" + "a" * 64,
    address="127.0.0.1:40001",
    pid=4242,
    state="degraded",
    started_at=1700000000.75,
    health="failing (1 in a row)",
    probe="HTTP 503",
    failed_probes=1,
    weight=100,
    traffic_percent=33.3,
    preview=False,
    restarts=2,
    last_exit="exited with code 1",
)
SERVICE = ServiceStatus(
    service="web",
    desired_release="web@r2",
    image="sha256:" + "a" * 64,
    image_name="web",
    replicas=3,
    url="http://127.0.0.1:18080/",
    preview_url=None,
    rollout=ROLLOUT,
    releases=(ReleaseShare("web@r2", 33.3, 1, 1, False, "live"),),
    restarts=2,
    last_exit="exited with code 1",
    crash_looping=False,
    next_start_in=2.0,
    problem=None,
    instances=(INSTANCE,),
    volumes=(VolumeView("/data", "web-data", "", False), VolumeView("/c", "", "/srv/c", True)),
)
PLAN = PlanView("web", 2, (StepView("start", "start a new instance of web@r2 (new-1)"),))

# One of each reply type the API serves, in the forms it takes.
SAMPLES: list[Reply] = [
    DeployResult(True, "web@r2", 3, 7),
    DeployResult(False, "web@r2", None),
    RollbackResult(True, "web@r1", 4, 8),
    RollbackResult(False, "web@r1", 4),
    DownResults((DownResult(True, "web", 5, 9), DownResult(False, "api", None))),
    PromoteResult("web", 3, "web@r2"),
    AbortResult("web", 3, "aborted by ana: errors"),
    PreviewResult(True, "web@r1", PLAN, to="web@r2", changes=("replicas: 2 -> 3",)),
    PreviewResult(True, None, PLAN, to="web@r1", changes=("first release",)),
    PreviewResult(False, "web@r1", PlanView("web", 1, ())),
    RolloutReply(ROLLOUT, (RolloutInstance("web-r2-bbbb", 2, "healthy"),)),
    StatusView((SERVICE,), state_dir=StateDirView("/srv/.graven", 10**9, 64 << 20, None, None)),
    StatusView((), controller="stopped"),
    HealthReply(ok=True, pid=99),
    ShutdownReply(ok=True),
    VolumeRemoval("web-data", "/srv/.graven/volumes/web-data/data", 4096, True, ("web@r2",), 12),
]


def test_every_reply_type_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(typing.get_args(Reply))


@pytest.mark.parametrize("reply", SAMPLES, ids=lambda r: type(r).__name__)
def test_every_reply_round_trips_through_its_json(reply: Reply) -> None:
    wire = json.loads(json.dumps(to_json(reply)))  # as it crosses the socket
    assert from_json(type(reply), wire) == reply


def test_the_json_keeps_the_keys_and_shapes_it_always_had() -> None:
    assert to_json(DeployResult(False, "web@r1", None)) == {
        "changed": False,
        "release": "web@r1",
        "rollout": None,
    }
    assert to_json(DeployResult(True, "web@r2", 3, 7)) == {
        "changed": True,
        "release": "web@r2",
        "rollout": 3,
        "ledger": 7,
    }
    assert to_json(PreviewResult(False, "web@r1", PlanView("web", 1, ()))) == {
        "changed": False,
        "from": "web@r1",
        "steps": {"service": "web", "release": 1, "steps": []},
    }
    assert list(to_json(PreviewResult(True, None, PLAN, to="web@r1", changes=()))) == [
        "changed",
        "from",
        "to",
        "changes",
        "steps",
    ]
    assert to_json(DownResults((DownResult(False, "web", None),))) == {
        "results": [{"changed": False, "service": "web", "rollout": None}]
    }
    assert list(to_json(StatusView((), controller="stopped"))) == ["services", "controller"]


def test_status_json_has_the_keys_it_always_had(world: World) -> None:
    world.deploy(world.v1, config(replicas=1))
    world.converge()
    status = to_json(asyncio.run(Api(world.engine, lambda: None).status({}, {})))
    [service] = status["services"]  # type: ignore[misc]
    assert list(service) == [  # type: ignore[call-overload]
        "service",
        "desired_release",
        "image",
        "image_name",
        "replicas",
        "url",
        "preview_url",
        "rollout",
        "releases",
        "restarts",
        "last_exit",
        "crash_looping",
        "next_start_in",
        "problem",
        "instances",
        "volumes",
        "warnings",
    ]
    assert list(service["instances"][0]) == [  # type: ignore[call-overload, index]
        "id",
        "release",
        "image",
        "address",
        "pid",
        "state",
        "started_at",
        "health",
        "probe",
        "failed_probes",
        "weight",
        "traffic_percent",
        "preview",
        "restarts",
        "last_exit",
    ]
    assert service["releases"] == [  # type: ignore[call-overload, index]
        {
            "release": "web@r1",
            "traffic_percent": 100.0,
            "instances": 1,
            "healthy": 1,
            "preview": False,
            "role": "live",
        }
    ]
    rollout = service["rollout"]  # type: ignore[call-overload, index]
    assert "gate" not in rollout and rollout["state"] == "succeeded"
    assert list(status["state_dir"]) == ["path", "free_bytes", "min_free_bytes", "problem", "hint"]  # type: ignore[arg-type]


# --- the client ------------------------------------------------------------------------


def answering(monkeypatch: pytest.MonkeyPatch, status: int, body: bytes) -> ControllerClient:
    """A client whose every request gets ``status`` and ``body`` (no socket)."""
    monkeypatch.setattr(client_module, "_exchange", lambda path, request, timeout: (status, body))
    return ControllerClient(Path("/nonexistent/state"))


@pytest.mark.parametrize(
    ("reply", "named"),
    [
        ({"changed": True, "rollout": 3}, "missing key 'release'"),
        ({"changed": "yes", "release": "web@r1", "rollout": 3}, "changed: expected true or false"),
        ({"changed": True, "release": 7, "rollout": 3}, "release: expected a string"),
        ({"changed": True, "release": "web@r1", "rollout": "3"}, "rollout: expected an integer"),
        ({"changed": True, "release": "web@r1", "rollout": True}, "rollout: expected an integer"),
        (["web@r1"], "the reply: expected an object"),
        (None, "the reply: expected an object"),
    ],
)
def test_the_client_refuses_a_malformed_deploy_reply(
    monkeypatch: pytest.MonkeyPatch, reply: object, named: str
) -> None:
    client = answering(monkeypatch, 200, json.dumps(reply).encode())
    with pytest.raises(ControllerError, match="malformed reply to /v1/rollback") as caught:
        client.rollback("web", actor="ana", message="why")
    assert named in caught.value.message


def test_the_client_names_the_bad_key_deep_in_a_status(monkeypatch: pytest.MonkeyPatch) -> None:
    data = to_json(SAMPLES[11])
    data["services"][0]["instances"][0]["pid"] = "4242"  # type: ignore[index, call-overload]
    client = answering(monkeypatch, 200, json.dumps(data).encode())
    with pytest.raises(ControllerError) as caught:
        client.status()
    assert "services[0].instances[0].pid: expected an integer, got '4242'" in caught.value.message


def test_the_client_refuses_replies_that_are_not_json_or_errors_that_are_not_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ControllerError, match="not JSON"):
        answering(monkeypatch, 200, b"<html>").health()
    with pytest.raises(ControllerError, match="HTTP 500"):
        answering(monkeypatch, 500, b'["boom"]').health()


def test_the_client_decodes_good_replies_and_raises_named_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for sample in SAMPLES:
        if isinstance(sample, StatusView):
            got: object = answering(monkeypatch, 200, json.dumps(to_json(sample)).encode()).status()
            assert got == sample
    down = DownResults((DownResult(True, "web", 5, 9),))
    client = answering(monkeypatch, 200, json.dumps(to_json(down)).encode())
    assert client.down(None, actor="ana", message="done") == down.results
    missing = {"error": "NotFoundError", "message": "service 'x' was never deployed"}
    with pytest.raises(NotFoundError, match="never deployed"):
        answering(monkeypatch, 409, json.dumps(missing).encode()).promote(
            "x", actor="ana", message="go"
        )


def test_the_api_answers_with_the_encoded_result(world: World) -> None:
    body = {
        "service": "web",
        "image": str(world.v1),
        "image_name": "web",
        "config": json.loads(json.dumps(config(replicas=1).to_dict())),
        "actor": "ana@host",
        "message": "first",
    }
    api = Api(world.engine, lambda: None)
    reply = asyncio.run(api.deploy(body, {}))
    assert isinstance(reply, DeployResult)
    assert from_json(DeployResult, json.loads(json.dumps(to_json(reply)))) == reply
    assert (reply.changed, reply.release, reply.ledger) == (True, "web@r1", 1)


def test_a_promoted_rollout_reads_back_through_the_client_as_it_always_did(world: World) -> None:
    """The store keeps ``promoted`` as a bool; the wire has always carried 0 or 1."""
    out = world.deploy(world.v1, config(replicas=1))
    assert out.rollout is not None
    with world.state.transaction() as tx:
        tx.set_rollout_promoted(out.rollout, True)
    status = to_json(asyncio.run(Api(world.engine, lambda: None).status({}, {})))
    rollout = status["services"][0]["rollout"]  # type: ignore[call-overload, index]
    assert rollout["promoted"] == 1 and rollout["promoted"] is not True  # type: ignore[index]
    decoded = from_json(StatusView, json.loads(json.dumps(status)), "reply to /v1/status")
    assert decoded.services[0].rollout is not None
    assert decoded.services[0].rollout.promoted == 1
