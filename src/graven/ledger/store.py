"""The SQLite state store: desired state, observed instances, releases, rollouts and
the hash-chained ledger, in one WAL database so every change is one transaction.

The controller is the only writer; the CLI opens it read-only for ``audit`` and
``releases`` so those work while the controller is down.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graven.disk import disk_error
from graven.errors import DiskError, GravenError, NotFoundError, StoreError
from graven.ledger.chain import LedgerEntry, chain_hash
from graven.model import (
    LIVE_STATES,
    Digest,
    Instance,
    InstanceState,
    Release,
    RolloutKind,
    RolloutState,
    ServiceConfig,
    release_id,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY,
    desired_release INTEGER,          -- NULL: the service is down
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    service TEXT NOT NULL,
    number INTEGER NOT NULL,
    image TEXT NOT NULL,
    image_name TEXT NOT NULL,
    config TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    healthy_at REAL,                  -- first time it fully served: rollback candidates
    PRIMARY KEY (service, number)
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    release INTEGER NOT NULL,
    image TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    pid_start INTEGER NOT NULL,
    started_at REAL NOT NULL,
    state TEXT NOT NULL,
    stopped_at REAL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_live ON instances(service, state);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_release INTEGER,
    to_release INTEGER,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    service TEXT NOT NULL,
    release TEXT NOT NULL,
    image TEXT NOT NULL,
    message TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""

# Columns added after the first schema: (table, column, definition).
_MIGRATIONS = (
    ("instances", "weight", "INTEGER NOT NULL DEFAULT 100"),
    ("instances", "preview", "INTEGER NOT NULL DEFAULT 0"),
    ("rollouts", "step_index", "INTEGER NOT NULL DEFAULT 0"),
    ("rollouts", "promoted", "INTEGER NOT NULL DEFAULT 0"),
    ("rollouts", "switched_at", "REAL"),
    ("rollouts", "paused_until", "REAL"),
    # JSON: how far the current step's timed pause and analysis got (see Engine).
    ("rollouts", "gate", "TEXT"),
    # When the rollout last completed a step: its progress deadline counts from here.
    ("rollouts", "progressed_at", "REAL"),
    # Crash loops: how many times the instances before this one died unexpectedly
    # (consecutively), and how the last one ended.
    ("instances", "restarts", "INTEGER NOT NULL DEFAULT 0"),
    ("instances", "last_exit", "TEXT NOT NULL DEFAULT ''"),
    ("services", "restarts", "INTEGER NOT NULL DEFAULT 0"),
    ("services", "last_exit", "TEXT NOT NULL DEFAULT ''"),
    ("services", "last_exit_at", "REAL"),
)


@dataclass(frozen=True)
class Rollout:
    id: int
    service: str
    kind: RolloutKind
    from_release: int | None
    to_release: int | None
    state: RolloutState
    reason: str
    progress: str
    started_at: float
    finished_at: float | None
    step_index: int = 0
    promoted: int = 0
    switched_at: float | None = None
    paused_until: float | None = None
    gate: str | None = None
    progressed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        del out["gate"]  # controller bookkeeping, not status
        return out


@dataclass(frozen=True)
class Crashes:
    """A service's crash loop: consecutive unexpected deaths, and how the last one ended."""

    restarts: int = 0
    last_exit: str = ""
    last_exit_at: float | None = None


class StateStore:
    """SQLite (WAL) state store. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            if read_only:
                if not path.exists():
                    raise StoreError(
                        f"no state database at {path}",
                        hint="Nothing was deployed from this project yet: run 'graven deploy'.",
                    )
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                for table, column, definition in _MIGRATIONS:
                    have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from exc
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic unit of change: all of it lands, or none of it.

        ``durable=False`` commits without waiting for the disk (WAL, synchronous=NORMAL):
        still atomic and ordered, and made durable by the next durable commit, but an
        OS crash or power cut may lose it. Only for what is shown, never acted on."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args))
            except sqlite3.Error as exc:
                raise self._read_error(exc) from exc

    def _read_error(self, exc: sqlite3.Error) -> GravenError:
        """A failed read, said plainly. Reading a WAL database may need to write its
        shared-memory file, so a full filesystem can break reads too."""
        refused = disk_error(exc, self.path.parent)
        if refused is not None:
            return refused
        try:
            full = os.statvfs(self.path.parent).f_bavail == 0
        except OSError:
            full = False
        if full:
            return DiskError(
                f"cannot read the state database {self.path}: {exc} "
                f"(its filesystem is full: 0 bytes free)",
                hint="Free space on that filesystem, then retry. Running instances keep "
                "serving meanwhile.",
                errno=errno.ENOSPC,
            )
        return StoreError(
            f"cannot read the state database {self.path}: {exc}",
            hint="Check the disk and the file's permissions; 'graven audit --verify' "
            "checks the ledger once it reads again.",
        )

    # --- services (desired state) -------------------------------------------------------

    def services(self) -> dict[str, int | None]:
        return {r["name"]: r["desired_release"] for r in self._query("SELECT * FROM services")}

    def desired_release(self, service: str) -> int | None:
        rows = self._query("SELECT desired_release FROM services WHERE name=?", (service,))
        return rows[0]["desired_release"] if rows else None

    @staticmethod
    def set_desired(db: sqlite3.Connection, service: str, release: int | None, at: float) -> None:
        db.execute(
            "INSERT INTO services(name, desired_release, updated_at) VALUES (?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET desired_release=excluded.desired_release, "
            "updated_at=excluded.updated_at",
            (service, release, at),
        )

    def crashes(self, service: str) -> Crashes:
        rows = self._query(
            "SELECT restarts, last_exit, last_exit_at FROM services WHERE name=?", (service,)
        )
        if not rows:
            return Crashes()
        r = rows[0]
        return Crashes(int(r["restarts"]), str(r["last_exit"]), r["last_exit_at"])

    @staticmethod
    def record_crash(db: sqlite3.Connection, service: str, how: str, at: float) -> int:
        """One more unexpected death in a row for ``service``; returns the new count."""
        db.execute(
            "UPDATE services SET restarts=restarts+1, last_exit=?, last_exit_at=? WHERE name=?",
            (how, at, service),
        )
        row = db.execute("SELECT restarts FROM services WHERE name=?", (service,)).fetchone()
        return int(row[0]) if row else 0

    def reset_crashes(self, service: str) -> None:
        """The service's instances stay up again: the crash loop (and its back-off) is over."""
        with self.transaction() as db:
            db.execute("UPDATE services SET restarts=0 WHERE name=? AND restarts>0", (service,))

    # --- releases -----------------------------------------------------------------------

    @staticmethod
    def _release(row: sqlite3.Row) -> Release:
        return Release(
            service=row["service"],
            number=row["number"],
            image=Digest(row["image"]),
            config=ServiceConfig.from_dict(json.loads(row["config"])),
            content_hash=row["content_hash"],
        )

    def releases(self, service: str) -> list[tuple[Release, sqlite3.Row]]:
        rows = self._query("SELECT * FROM releases WHERE service=? ORDER BY number", (service,))
        return [(self._release(r), r) for r in rows]

    def release(self, service: str, number: int) -> Release:
        rows = self._query("SELECT * FROM releases WHERE service=? AND number=?", (service, number))
        if not rows:
            raise NotFoundError(
                f"{release_id(service, number)} does not exist",
                hint=f"Run 'graven releases {service}' to list its releases.",
            )
        return self._release(rows[0])

    def release_row(self, service: str, number: int) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM releases WHERE service=? AND number=?", (service, number))
        return rows[0] if rows else None

    @staticmethod
    def add_release(
        db: sqlite3.Connection,
        service: str,
        image: Digest,
        image_name: str,
        config: ServiceConfig,
        at: float,
    ) -> Release:
        (last,) = db.execute(
            "SELECT COALESCE(MAX(number), 0) FROM releases WHERE service=?", (service,)
        ).fetchone()
        release = Release(
            service=service,
            number=int(last) + 1,
            image=image,
            config=config,
            content_hash=Release.hash_of(service, image, config),
        )
        db.execute(
            "INSERT INTO releases(service, number, image, image_name, config, content_hash, "
            "created_at) VALUES (?,?,?,?,?,?,?)",
            (
                service,
                release.number,
                str(image),
                image_name,
                json.dumps(config.to_dict(), sort_keys=True),
                release.content_hash,
                at,
            ),
        )
        return release

    def mark_release_healthy(self, service: str, number: int, at: float) -> None:
        with self.transaction() as db:
            self._mark_release_healthy(db, service, number, at)

    @staticmethod
    def _mark_release_healthy(db: sqlite3.Connection, service: str, number: int, at: float) -> None:
        db.execute(
            "UPDATE releases SET healthy_at=COALESCE(healthy_at, ?) WHERE service=? AND number=?",
            (at, service, number),
        )

    # --- instances (observed state) -----------------------------------------------------

    @staticmethod
    def _instance(row: sqlite3.Row) -> Instance:
        return Instance(
            id=row["id"],
            service=row["service"],
            release=row["release"],
            image=Digest(row["image"]),
            host=row["host"],
            port=row["port"],
            pid=row["pid"],
            started_at=row["started_at"],
            state=row["state"],
            restarts=row["restarts"],
            last_exit=row["last_exit"],
        )

    def live_instances(self, service: str | None = None) -> list[Instance]:
        marks = ",".join("?" * len(LIVE_STATES))
        if service is None:
            rows = self._query(
                f"SELECT * FROM instances WHERE state IN ({marks}) ORDER BY started_at, id",  # noqa: S608
                LIVE_STATES,
            )
        else:
            rows = self._query(
                f"SELECT * FROM instances WHERE service=? AND state IN ({marks}) "  # noqa: S608
                "ORDER BY started_at, id",
                (service, *LIVE_STATES),
            )
        return [self._instance(r) for r in rows]

    def instance_ids(self) -> set[str]:
        """Every instance ever recorded, live or not."""
        return {r["id"] for r in self._query("SELECT id FROM instances")}

    def pid_start(self, instance_id: str) -> int:
        rows = self._query("SELECT pid_start FROM instances WHERE id=?", (instance_id,))
        return int(rows[0]["pid_start"]) if rows else 0

    def instance_row(self, instance_id: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM instances WHERE id=?", (instance_id,))
        return rows[0] if rows else None

    def add_instance(self, inst: Instance, pid_start: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO instances(id, service, release, image, host, port, pid, pid_start, "
                "started_at, state, restarts, last_exit) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    inst.id,
                    inst.service,
                    inst.release,
                    str(inst.image),
                    inst.host,
                    inst.port,
                    inst.pid,
                    pid_start,
                    inst.started_at,
                    inst.state,
                    inst.restarts,
                    inst.last_exit,
                ),
            )

    @staticmethod
    def mark_stopped(
        db: sqlite3.Connection, instance_id: str, *, at: float | None, reason: str
    ) -> None:
        """``set_instance_state(..., "stopped")`` inside the caller's transaction."""
        db.execute(
            "UPDATE instances SET state='stopped', stopped_at=?, reason=? WHERE id=?",
            (at, reason, instance_id),
        )

    def set_instance_state(
        self, instance_id: str, state: InstanceState, *, at: float | None = None, reason: str = ""
    ) -> None:
        with self.transaction() as db:
            if state == "stopped":
                self.mark_stopped(db, instance_id, at=at, reason=reason)
            else:
                db.execute(
                    "UPDATE instances SET state=?, reason=? WHERE id=?",
                    (state, reason, instance_id),
                )

    # --- rollouts -----------------------------------------------------------------------

    @staticmethod
    def _rollout(row: sqlite3.Row) -> Rollout:
        return Rollout(**{k: row[k] for k in row.keys()})  # noqa: SIM118

    @staticmethod
    def start_rollout(
        db: sqlite3.Connection,
        service: str,
        kind: RolloutKind,
        from_release: int | None,
        to_release: int | None,
        at: float,
    ) -> int:
        # A newer desire supersedes whatever rollout was running for the service.
        db.execute(
            "UPDATE rollouts SET state='superseded', finished_at=? "
            "WHERE service=? AND state='running'",
            (at, service),
        )
        cur = db.execute(
            "INSERT INTO rollouts(service, kind, from_release, to_release, state, started_at, "
            "progressed_at) VALUES (?,?,?,?, 'running', ?, ?)",
            (service, kind, from_release, to_release, at, at),
        )
        return int(cur.lastrowid or 0)

    def rollout(self, rollout_id: int) -> Rollout:
        rows = self._query("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        if not rows:
            raise NotFoundError(f"rollout {rollout_id} does not exist")
        return self._rollout(rows[0])

    def running_rollout(self, service: str) -> Rollout | None:
        rows = self._query(
            "SELECT * FROM rollouts WHERE service=? AND state='running' ORDER BY id DESC LIMIT 1",
            (service,),
        )
        return self._rollout(rows[0]) if rows else None

    def last_rollout(self, service: str) -> Rollout | None:
        rows = self._query(
            "SELECT * FROM rollouts WHERE service=? ORDER BY id DESC LIMIT 1", (service,)
        )
        return self._rollout(rows[0]) if rows else None

    def update_rollout(self, rollout_id: int, **fields: Any) -> None:
        """Persist rollout status fields (step_index, promoted, switched_at, paused_until,
        gate)."""
        allowed = {
            "step_index",
            "promoted",
            "switched_at",
            "paused_until",
            "progress",
            "gate",
            "progressed_at",
        }
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"unknown rollout fields {sorted(set(fields) - allowed)}")
        assignments = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db:
            db.execute(
                f"UPDATE rollouts SET {assignments} WHERE id=?",  # noqa: S608 - names checked
                (*fields.values(), rollout_id),
            )

    def weights(self, service: str) -> dict[str, int]:
        rows = self._query(
            "SELECT id, weight FROM instances WHERE service=? AND state IN "
            "('starting','healthy','unhealthy','draining')",
            (service,),
        )
        return {r["id"]: int(r["weight"]) for r in rows}

    def set_weights(self, weights: dict[str, int], *, clear_preview: bool = False) -> None:
        """Router weights of several instances, in one transaction (a traffic switch is
        one change, and on the rollback path every fsync counts)."""
        with self.transaction() as db:
            sql = (
                "UPDATE instances SET weight=?, preview=0 WHERE id=?"
                if clear_preview
                else "UPDATE instances SET weight=? WHERE id=?"
            )
            db.executemany(
                sql,
                [(w, i) for i, w in weights.items()],
            )

    def set_preview(self, instance_id: str, preview: bool) -> None:
        with self.transaction() as db:
            db.execute("UPDATE instances SET preview=? WHERE id=?", (int(preview), instance_id))

    def preview_instances(self, service: str) -> list[str]:
        rows = self._query(
            "SELECT id FROM instances WHERE service=? AND preview=1 AND state='healthy'",
            (service,),
        )
        return [r["id"] for r in rows]

    def set_rollout_progress(self, rollout_id: int, progress: str, *, at: float) -> None:
        """The step a rollout is at, for people, and when it got there (its progress
        deadline counts from then). Written before every step, so it does not wait for
        the disk: the next pass re-plans from what runs anyway."""
        with self.transaction(durable=False) as db:
            db.execute(
                "UPDATE rollouts SET progress=?, progressed_at=? WHERE id=?",
                (progress, at, rollout_id),
            )

    def finish_rollout(self, rollout_id: int, state: RolloutState, reason: str, at: float) -> None:
        with self.transaction() as db:
            self._finish_rollout(db, rollout_id, state, reason, at)

    @staticmethod
    def _finish_rollout(
        db: sqlite3.Connection, rollout_id: int, state: RolloutState, reason: str, at: float
    ) -> None:
        db.execute(
            "UPDATE rollouts SET state=?, reason=?, finished_at=? WHERE id=? AND state='running'",
            (state, reason, at, rollout_id),
        )

    def finish_switch(self, rollout_id: int, service: str, release: int, at: float) -> None:
        """A weighted rollout's traffic switch is done: when it happened (the rollback
        window starts), the release's first healthy time, and the rollout succeeded,
        in one transaction."""
        with self.transaction() as db:
            db.execute("UPDATE rollouts SET switched_at=? WHERE id=?", (at, rollout_id))
            self._mark_release_healthy(db, service, release, at)
            self._finish_rollout(db, rollout_id, "succeeded", "", at)

    # --- ledger -------------------------------------------------------------------------

    @staticmethod
    def append_ledger(db: sqlite3.Connection, entry: LedgerEntry) -> LedgerEntry:
        """Append inside the caller's transaction, so the change and its record land together."""
        row = db.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, "")
        entry = entry.sealed(seq=seq, prev_hash=prev)
        db.execute(
            "INSERT INTO ledger(seq, at, actor, action, service, release, image, message, "
            "details, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                entry.seq,
                entry.at,
                entry.actor,
                entry.action,
                entry.service,
                entry.release,
                entry.image,
                entry.message,
                json.dumps(entry.details, sort_keys=True),
                entry.prev_hash,
                entry.hash,
            ),
        )
        return entry

    def ledger(self, service: str | None = None) -> list[LedgerEntry]:
        if service:
            rows = self._query("SELECT * FROM ledger WHERE service=? ORDER BY seq", (service,))
        else:
            rows = self._query("SELECT * FROM ledger ORDER BY seq")
        out = []
        for r in rows:
            try:
                details = json.loads(r["details"])
            except ValueError:
                details = {"unparseable": r["details"]}
            out.append(
                LedgerEntry(
                    seq=r["seq"],
                    at=r["at"],
                    actor=r["actor"],
                    action=r["action"],
                    service=r["service"],
                    release=r["release"],
                    image=r["image"],
                    message=r["message"],
                    details=details if isinstance(details, dict) else {"value": details},
                    prev_hash=r["prev_hash"],
                    hash=r["hash"],
                )
            )
        return out


__all__ = ["LIVE_STATES", "Crashes", "Rollout", "StateStore", "chain_hash"]
