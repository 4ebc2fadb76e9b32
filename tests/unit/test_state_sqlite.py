"""What only the SQLite state adapter does: open state dirs written by earlier
versions (first schema, old gate JSON), read-only opening, and read errors said
plainly. The behaviour it shares with every adapter is in tests/contract."""

from __future__ import annotations

import ast
import json
import sqlite3
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

import pytest

from graven.errors import StoreError
from graven.ledger import sqlite as adapter
from graven.ledger.sqlite import SqliteStateStore
from graven.ledger.state import AnalysisGate, PauseGate, RolloutGate
from graven.model import Digest, HealthCheck, ServiceConfig
from graven.router.base import BackendStats

IMAGE = "sha256:" + "ab" * 32
CONFIG = ServiceConfig(replicas=1, port=18080, health=HealthCheck())


def first_version_db(path: Path) -> None:
    """A state database as the first version wrote it: no migrated column."""
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(adapter._SCHEMA)
        db.execute("INSERT INTO services VALUES ('web', 1, 1.0)")
        db.execute(
            "INSERT INTO releases VALUES ('web', 1, ?, 'web', ?, 'sha256:x', 1.0, 2.0)",
            (IMAGE, json.dumps(CONFIG.to_dict())),
        )
        db.execute(
            "INSERT INTO instances(id, service, release, image, host, port, pid, pid_start, "
            "started_at, state) VALUES ('web-r1-aaaa', 'web', 1, ?, '127.0.0.1', 30001, 4242, "
            "99, 1.5, 'healthy')",
            (IMAGE,),
        )
        db.execute(
            "INSERT INTO rollouts(service, kind, from_release, to_release, state, started_at, "
            "finished_at) VALUES ('web', 'deploy', NULL, 1, 'succeeded', 1.0, 2.0)"
        )


def test_a_first_version_database_reads_read_only_before_any_migration(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first_version_db(db)
    st = SqliteStateStore(db, read_only=True)
    (inst,) = st.live_instances("web")
    assert (inst.id, inst.restarts, inst.last_exit) == ("web-r1-aaaa", 0, "")
    record = st.instance("web-r1-aaaa")
    assert record is not None and (record.weight, record.preview, record.pid_start) == (
        100,
        False,
        99,
    )
    ro = st.last_rollout("web")
    assert ro is not None and (ro.step_index, ro.promoted, ro.gate) == (0, False, RolloutGate())
    assert st.releases("web")[0].healthy_at == 2.0
    st.close()


def test_a_first_version_database_is_migrated_and_works(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first_version_db(db)
    st = SqliteStateStore(db)
    assert st.weights("web") == {"web-r1-aaaa": 100}
    assert st.crashes("web").restarts == 0
    with st.transaction() as tx:
        assert tx.add_release("web", Digest(IMAGE), "web", CONFIG, 3.0).number == 2
        tx.set_weights({"web-r1-aaaa": 40})
        assert tx.record_crash("web", "exited with code 1", 4.0) == 1
        rid = tx.start_rollout("web", "deploy", 1, 2, 3.0)
        tx.set_rollout_gate(rid, RolloutGate(pause=PauseGate(until=9.0)))
    assert st.weights("web") == {"web-r1-aaaa": 40}
    assert st.rollout(rid).gate.pause == PauseGate(until=9.0)
    st.close()
    with closing(sqlite3.connect(db)) as raw:
        columns = {r[1] for r in raw.execute("PRAGMA table_info(rollouts)")}
    assert {"gate", "progressed_at", "step_index"} <= columns


def test_a_gate_written_by_an_earlier_controller_is_read(tmp_path: Path) -> None:
    """A rollout paused across an upgrade resumes where it was: the gate column keeps
    the JSON form earlier versions wrote."""
    db = tmp_path / "state.db"
    st = SqliteStateStore(db)
    with st.transaction() as tx:
        rid = tx.start_rollout("web", "deploy", 1, 2, 1.0)
    stats = BackendStats("web-r1-aaaa", "127.0.0.1:1", "ready", 0, 7, 1, 90, 1, (1, 2))
    old = {
        "pause": {"until": 30.0, "done": True},
        "analysis": {
            "key": [2, 1, 60.0],
            "started_at": 31.0,
            "start": [{**asdict(stats), "latency_buckets": [1, 2]}],
            "releases": {"web-r1-aaaa": 1},
        },
    }
    with closing(sqlite3.connect(db)) as raw, raw:
        raw.execute("UPDATE rollouts SET gate=? WHERE id=?", (json.dumps(old), rid))
    assert st.rollout(rid).gate == RolloutGate(
        pause=PauseGate(until=30.0, done=True),
        analysis=AnalysisGate(2, 1, 60.0, 31.0, (stats,), (("web-r1-aaaa", 1),)),
    )
    # And what this version writes is that same form.
    with st.transaction() as tx:
        tx.set_rollout_gate(rid, st.rollout(rid).gate)
    with closing(sqlite3.connect(db)) as raw:
        (text,) = raw.execute("SELECT gate FROM rollouts WHERE id=?", (rid,)).fetchone()
    assert json.loads(text) == old


@pytest.mark.parametrize(
    "text",
    ["not json", "[1, 2]", '{"pause": {"until": "soon"}}', '{"analysis": {"key": [1]}}'],
)
def test_a_gate_that_does_not_parse_reads_as_empty(tmp_path: Path, text: str) -> None:
    db = tmp_path / "state.db"
    st = SqliteStateStore(db)
    with st.transaction() as tx:
        rid = tx.start_rollout("web", "deploy", 1, 2, 1.0)
    with closing(sqlite3.connect(db)) as raw, raw:
        raw.execute("UPDATE rollouts SET gate=? WHERE id=?", (text, rid))
    assert st.rollout(rid).gate == RolloutGate()


def test_read_only_needs_a_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no state database") as info:
        SqliteStateStore(tmp_path / "state.db", read_only=True)
    assert info.value.hint is not None and "graven deploy" in info.value.hint
    assert not (tmp_path / "state.db").exists()


def test_a_read_only_store_refuses_writes_and_keeps_the_database(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    SqliteStateStore(db).close()
    st = SqliteStateStore(db, read_only=True)
    with pytest.raises(sqlite3.OperationalError), st.transaction() as tx:
        tx.set_desired("web", 1, 1.0)
    assert st.services() == {}


def test_a_database_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(StoreError, match=r"cannot (open|read) the state database"):
        st = SqliteStateStore(db, read_only=True)
        st.services()


def test_only_the_sqlite_adapter_imports_sqlite3() -> None:
    src = Path(adapter.__file__).parents[1]
    importers = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "sqlite3" for n in names):
                importers.add(path.relative_to(src).as_posix())
    assert importers == {"ledger/sqlite.py"}
