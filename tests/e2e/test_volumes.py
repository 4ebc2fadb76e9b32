"""Named volumes end to end, on the guestbook example (SQLite in the volume 'guestbook'
at /data), with real sealed instances: what r1 wrote, r2 reads after a deploy and r1
again after a rollback; it survives 'graven down' and a new controller; only
'graven volume rm' removes it, and is refused while a release uses it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.testing.net import eventually
from tests.e2e.conftest import Project
from tests.e2e.examples_fixture import (
    call,
    deployed,
    example_project,
    instance_uid,
    service_status,
    write_spec,
)

pytestmark = pytest.mark.e2e

SERVICE = "guestbook"


@pytest.fixture
def guestbook(tmp_path: Path) -> Iterator[Project]:
    yield from example_project(tmp_path, "guestbook")


def entries(project: Project) -> list[tuple[str, str]]:
    status, body = call(project, "GET")
    assert status == 200, body
    return [(e["name"], e["message"]) for e in body["entries"]]


def sign(project: Project, name: str, message: str) -> None:
    status, body = call(project, "POST", body={"name": name, "message": message})
    assert status == 201, body


def test_guestbook_entries_outlive_deploys_rollbacks_and_down(guestbook: Project) -> None:
    project = guestbook
    write_spec(project, "guestbook", VERSION="v1")
    r1 = deployed(project, "deploy", "-m", "guestbook v1")
    assert r1["release"] == "guestbook@r1"
    for n in range(3):
        sign(project, f"guest{n}", f"hello {n} from v1")
    written = [(f"guest{n}", f"hello {n} from v1") for n in range(3)]
    assert entries(project) == written

    # The volume is a directory of the state dir, given to the instances' (non-root) user.
    data = project.state_dir / "volumes" / "guestbook" / "data"
    first = service_status(project, SERVICE)
    uids = {instance_uid(i["pid"]) for i in first["instances"]}
    assert len(uids) == 1 and 0 not in uids, uids
    assert data.stat().st_uid in uids
    assert (data / "guestbook.db").is_file()
    assert first["volumes"] == [
        {"path": "/data", "name": "guestbook", "host": "", "read_only": False}
    ]
    assert "volumes: guestbook -> /data" in project.graven("status", SERVICE).stdout

    # A deploy replaces every instance; r2's instances read what r1's wrote.
    write_spec(project, "guestbook", VERSION="v2")
    assert deployed(project, "deploy", "-m", "guestbook v2")["release"] == "guestbook@r2"
    second = service_status(project, SERVICE)
    assert not {i["id"] for i in second["instances"]} & {i["id"] for i in first["instances"]}
    assert call(project, "GET")[1]["version"] == "v2"
    assert entries(project) == written
    sign(project, "guest3", "hello from v2")
    written.append(("guest3", "hello from v2"))

    # A rollback: r1's new instances read r2's entry too.
    assert deployed(project, "rollback", SERVICE, "-m", "back")["release"] == "guestbook@r1"
    assert call(project, "GET")[1]["version"] == "v1"
    assert entries(project) == written

    # In use: 'volume rm' refuses and deletes nothing.
    ls = project.graven("volume", "ls", "-o", "json").json()["volumes"]
    assert [(v["name"], v["release"], v["used_by"]) for v in ls] == [
        ("guestbook", "guestbook@r1", ["guestbook@r1"])
    ]
    refused = project.graven("volume", "rm", "guestbook", "-m", "nope", check=False)
    assert refused.code == 2
    assert "volume guestbook is in use by guestbook@r1" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (data / "guestbook.db").is_file()

    # 'graven down' stops everything, controller included, and keeps the volume.
    project.down_leaves_nothing()
    assert (data / "guestbook.db").is_file()
    write_spec(project, "guestbook", VERSION="v3")
    assert deployed(project, "deploy", "-m", "after down")["release"] == "guestbook@r3"
    assert entries(project) == written

    # Only 'graven volume rm' removes it (once no release needs it), ledgered; the next
    # deploy starts empty.
    project.graven("down", SERVICE, "-m", "before the wipe")
    removed = project.graven("volume", "rm", "guestbook", "-m", "wipe the guestbook", "-o", "json")
    assert removed.json()["name"] == "guestbook" and removed.json()["used_by"] == []
    assert not data.exists()
    assert project.graven("volume", "ls", "-o", "json").json()["volumes"] == []
    write_spec(project, "guestbook", VERSION="v4")
    deployed(project, "deploy", "-m", "fresh")
    assert entries(project) == []
    audit = project.graven("audit", "--verify", "-o", "json").json()["entries"]
    wipe = [e for e in audit if e["action"] == "volume-rm"]
    assert len(wipe) == 1
    assert wipe[0]["message"] == "wipe the guestbook" and wipe[0]["actor"] == "tester@ci"
    assert wipe[0]["details"]["volume"] == "guestbook"


def test_a_missing_host_directory_fails_the_rollout_naming_it(guestbook: Project) -> None:
    project = guestbook
    write_spec(project, "guestbook", VERSION="v1")
    deployed(project, "deploy", "-m", "v1")
    sign(project, "kept", "before the bad release")
    # r2 also wants a host directory that does not exist: its first instance fails to
    # start, the rollout goes back to r1, which keeps serving its data.
    missing = project.root / "no-such-dir"
    more = [{"host": str(missing), "path": "/srv/conf", "read_only": True}]
    write_spec(project, "guestbook", more_volumes=more, VERSION="v2")
    result = project.graven("deploy", "-m", "needs a host dir", "-o", "json", check=False)
    assert result.code == 1
    outcome = result.json()["results"][0]["rollout_result"]
    assert outcome["state"] == "failed"
    assert f"{missing} does not exist" in outcome["reason"]
    assert service_status(project, SERVICE)["desired_release"] == "guestbook@r1"
    assert eventually(lambda: entries(project) == [("kept", "before the bad release")], 10)
    assert not missing.exists()  # nothing made on the host's behalf
    assert os.path.isdir(project.state_dir / "volumes" / "guestbook" / "data")
