"""Persistent data outside the instance, end to end: the pg-notes example keeps its
notes in a real PostgreSQL server the test starts; every instance is replaced by a
deploy under load (no request fails, no note is lost) and again by a rollback, and
every note is still there, in the server, written by both releases."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pg8000.native
import pytest

from graven.testing.load import Load
from graven.testing.postgres import Postgres, postgres_bin, running_postgres
from tests.e2e.conftest import Project
from tests.e2e.examples_fixture import (
    call,
    deployed,
    example_project,
    service_status,
    write_spec,
)
from tests.requires import missing

pytestmark = pytest.mark.e2e

SERVICE = "notes"
CLIENT = "pg8000"


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    if postgres_bin() is None:
        missing("PostgreSQL's initdb is not installed (scripts/setup installs postgresql)")
    with running_postgres() as server:
        yield server


@pytest.fixture
def notes(tmp_path: Path) -> Iterator[Project]:
    for project in example_project(tmp_path, "pg-notes"):
        vendor(CLIENT, project.root / "app" / "vendor")
        yield project


def vendor(distribution: str, into: Path) -> None:
    """What 'pip install --target INTO DIST' would put there, copied from this test's
    own environment (where the dev extra installed it): the distribution and every one
    it requires, offline."""
    todo, seen = [distribution], set()
    while todo:
        dist = metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for file in dist.files or ():
            source = Path(str(dist.locate_file(file)))
            # Metadata too: scramp reads its own version from it.
            if ".." in file.parts or "__pycache__" in file.parts:
                continue
            target = into / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        for requirement in dist.requires or ():
            if "extra ==" not in requirement:
                todo.append(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0])


def rows(server: Postgres) -> list[tuple[int, str, str]]:
    """The notes as the server has them, read around graven and its instances."""
    conn = pg8000.native.Connection(
        server.user,
        host=server.host,
        port=server.port,
        password=server.password,
        database=server.database,
    )
    try:
        return [(i, t, v) for i, t, v in conn.run("SELECT id, text, by_version FROM notes")]
    finally:
        conn.close()


class Writer:
    """Adds notes one after another through the router while it runs: every one must
    be answered 201, whichever instance (of whichever release) takes it."""

    def __init__(self, project: Project, prefix: str, limit: int = 2000) -> None:
        self.project, self.prefix, self.limit = project, prefix, limit
        self.added: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.added) + len(self.failures) < self.limit:
            text = f"{self.prefix}-{len(self.added) + len(self.failures)}"
            try:
                status, body = call(self.project, "POST", body={"text": text})
            except OSError as exc:
                self.failures.append(f"{text}: {exc}")
                continue
            if status == 201:
                self.added.append(text)
            else:
                self.failures.append(f"{text}: HTTP {status} {body}")


def test_notes_in_postgres_survive_every_instance_being_replaced(
    notes: Project, postgres: Postgres
) -> None:
    project = notes
    write_spec(project, "pg-notes", VERSION="v1", **postgres.env())
    deployed(project, "deploy", "-m", "notes v1")
    for n in range(5):
        assert call(project, "POST", body={"text": f"first-{n}"})[0] == 201
    first = {i["id"] for i in service_status(project, SERVICE)["instances"]}

    # A deploy under load: reads and writes keep flowing while every instance is replaced.
    write_spec(project, "pg-notes", VERSION="v2", **postgres.env())
    with (
        Load(
            "127.0.0.1", project.port, path="/count", clients=3, min_requests=300, max_seconds=90
        ) as load,
        Writer(project, "during-deploy") as writer,
    ):
        deployed(project, "deploy", "-m", "notes v2")
    assert load.report.failed == 0, load.report.to_dict()
    assert writer.failures == [], writer.failures[:5]
    assert len(writer.added) > 0
    second = {i["id"] for i in service_status(project, SERVICE)["instances"]}
    assert not first & second, "a deploy replaces every instance"
    assert any('"v1"' in b for b in load.report.bodies) and any(
        '"v2"' in b for b in load.report.bodies
    )

    # A rollback replaces them all again.
    with Writer(project, "during-rollback") as back_writer:
        deployed(project, "rollback", SERVICE, "-m", "back to v1")
    assert back_writer.failures == [], back_writer.failures[:5]
    third = {i["id"] for i in service_status(project, SERVICE)["instances"]}
    assert not third & (first | second)
    status, body = call(project, "GET", "/count")
    assert status == 200 and body["version"] == "v1"

    # Every note is in the server, from both releases, exactly once.
    expected = [f"first-{n}" for n in range(5)] + writer.added + back_writer.added
    stored = rows(postgres)
    assert sorted(t for _, t, _ in stored) == sorted(expected)
    assert body["count"] == len(expected)
    assert {v for _, _, v in stored} == {"v1", "v2"}
    # Nothing of it lives with graven: the state dir holds no volume.
    assert not (project.state_dir / "volumes").exists()
