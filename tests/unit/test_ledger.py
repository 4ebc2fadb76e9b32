"""The ledger's hash chain: any edit is detected at the entry that was edited."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from graven.errors import LedgerTampered
from graven.ledger.chain import LedgerEntry, verify_chain
from graven.ledger.sqlite import SqliteStateStore


def _store_with_entries(path: Path, count: int) -> SqliteStateStore:
    st = SqliteStateStore(path)
    for n in range(count):
        with st.transaction() as tx:
            tx.append_ledger(
                LedgerEntry(
                    at=1000.0 + n,
                    actor="ana@host",
                    action="deploy",
                    service="web",
                    release=f"web@r{n + 1}",
                    image="sha256:" + "ab" * 32,
                    message=f"change {n}",
                    details={"n": n},
                ),
            )
    return st


def test_chain_verifies(tmp_path: Path) -> None:
    st = _store_with_entries(tmp_path / "s.db", 5)
    entries = st.ledger()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert verify_chain(entries, (5, entries[-1].hash)) == 5
    assert entries[1].prev_hash == entries[0].hash


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "mallory@host"),
        ("message", "nothing to see"),
        ("at", 5.0),
        ("release", "web@r99"),
        ("image", "sha256:" + "cd" * 32),
        ("details", '{"n": 42}'),
        ("action", "rollback"),
    ],
)
def test_editing_any_column_is_detected_at_that_entry(
    tmp_path: Path, column: str, value: object
) -> None:
    path = tmp_path / "s.db"
    _store_with_entries(path, 5).close()
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE ledger SET {column}=? WHERE seq=3", (value,))
    with pytest.raises(LedgerTampered) as exc:
        verify_chain(SqliteStateStore(path).ledger())
    assert exc.value.seq == 3
    assert "#3" in exc.value.message


def test_rehashing_an_edited_entry_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    st = _store_with_entries(path, 4)
    forged = st.ledger()[1]
    forged = LedgerEntry(**{**forged.__dict__, "message": "forged", "hash": ""}).sealed(
        seq=2, prev_hash=forged.prev_hash
    )
    st.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE ledger SET message=?, hash=? WHERE seq=2", (forged.message, forged.hash))
    with pytest.raises(LedgerTampered) as exc:
        verify_chain(SqliteStateStore(path).ledger())
    assert exc.value.seq == 3


def test_deleting_entries_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    st = _store_with_entries(path, 5)
    head = (5, st.ledger()[-1].hash)
    st.close()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM ledger WHERE seq=5")
    with pytest.raises(LedgerTampered) as tail:
        verify_chain(SqliteStateStore(path).ledger(), head)
    assert tail.value.seq == 5
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM ledger WHERE seq=2")
    with pytest.raises(LedgerTampered) as middle:
        verify_chain(SqliteStateStore(path).ledger(), head)
    assert middle.value.seq == 2


def test_append_is_atomic_with_the_change(tmp_path: Path) -> None:
    st = _store_with_entries(tmp_path / "s.db", 1)
    with pytest.raises(RuntimeError), st.transaction() as tx:
        tx.append_ledger(LedgerEntry(at=1.0, actor="a", action="deploy", service="web"))
        raise RuntimeError("crash before commit")
    assert len(st.ledger()) == 1


def test_a_commit_that_does_not_wait_for_the_disk_is_still_atomic(tmp_path: Path) -> None:
    st = _store_with_entries(tmp_path / "s.db", 1)
    with pytest.raises(RuntimeError), st.transaction(durable=False) as tx:
        tx.append_ledger(LedgerEntry(at=2.0, actor="a", action="deploy", service="web"))
        raise RuntimeError("boom")
    assert len(st.ledger()) == 1
    with st.transaction(durable=False) as tx:
        tx.append_ledger(LedgerEntry(at=3.0, actor="a", action="deploy", service="web"))
    assert [e.seq for e in st.ledger()] == [1, 2]
    # Every other commit waits for the disk again.
    assert st._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
