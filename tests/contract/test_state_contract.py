"""The StateStore port's contract, run against every adapter: the in-memory fake and
SQLite (a real database file on a temp dir)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from graven.ledger.sqlite import SqliteStateStore
from graven.ledger.state import StateStore
from graven.testing.contracts.state import StateStoreContract
from graven.testing.state import MemoryStateStore


class TestMemoryStateStore(StateStoreContract):
    persists = False

    @pytest.fixture
    def store(self) -> MemoryStateStore:
        return MemoryStateStore()

    @pytest.fixture
    def reopen(self, store: MemoryStateStore) -> Callable[[], StateStore]:
        def again() -> StateStore:
            store.close()
            return MemoryStateStore()

        return again


class TestSqliteStateStore(StateStoreContract):
    persists = True

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[SqliteStateStore]:
        st = SqliteStateStore(tmp_path / "state" / "state.db")
        yield st
        st.close()

    @pytest.fixture
    def reopen(self, store: SqliteStateStore) -> Iterator[Callable[[], StateStore]]:
        opened: list[SqliteStateStore] = []

        def again() -> StateStore:
            store.close()
            opened.append(SqliteStateStore(store.path))
            return opened[-1]

        yield again
        for st in opened:
            st.close()
