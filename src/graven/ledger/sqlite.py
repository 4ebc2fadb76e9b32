"""The SQLite adapter of the StateStore port: one WAL database in the state dir, so
every change is one transaction and survives a crash.

The controller is the only writer; the CLI opens it read-only for ``audit``,
``releases`` and ``status`` so those work while the controller is down. This is the
only module of graven that speaks SQL (or imports ``sqlite3``). The schema only
grows: columns added later are migrated in on open, so a state dir of any earlier
version opens and works.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graven.disk import disk_error
from graven.errors import DiskError, GravenError, InternalError, NotFoundError, StoreError
from graven.ledger.chain import LedgerEntry
from graven.ledger.state import (
    LIVE_STATES,
    AnalysisGate,
    Crashes,
    InstanceRecord,
    PauseGate,
    ReleaseRecord,
    RolloutGate,
    RolloutRecord,
    StateStore,
)
from graven.model import (
    Digest,
    Instance,
    InstanceState,
    Release,
    RolloutKind,
    RolloutState,
    ServiceConfig,
)
from graven.router.base import BackendStats

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
    # JSON of a RolloutGate (see _gate_json): how far the current step's timed pause
    # and analysis got.
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

_LIVE_MARKS = ",".join("?" * len(LIVE_STATES))

# A release row with who deployed it and why: from its deploy's ledger entry.
_RELEASES = """
SELECT r.*,
    (SELECT l.actor FROM ledger l WHERE l.service=r.service AND l.action='deploy'
        AND l.release=r.service || '@r' || r.number ORDER BY l.seq LIMIT 1) AS actor,
    (SELECT l.message FROM ledger l WHERE l.service=r.service AND l.action='deploy'
        AND l.release=r.service || '@r' || r.number ORDER BY l.seq LIMIT 1) AS message
FROM releases r"""


class SqliteStateStore:
    """SQLite (WAL) state store. Thread-safe: one connection guarded by a lock, held
    for a whole transaction."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._open: _SqliteTransaction | None = None
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
    def transaction(self, *, durable: bool = True) -> Iterator[_SqliteTransaction]:
        with self._lock:
            if self._open is not None:
                raise InternalError("a state transaction is already open on this thread")
            if not durable:
                # WAL with synchronous=NORMAL: committed in order, synced by the next
                # durable commit.
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                tx = self._open = _SqliteTransaction(self._db)
                try:
                    yield tx
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                finally:
                    tx.closed = True
                    self._open = None
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
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

    # --- services ------------------------------------------------------------------------

    def services(self) -> dict[str, int | None]:
        return {r["name"]: r["desired_release"] for r in self._query("SELECT * FROM services")}

    def desired_release(self, service: str) -> int | None:
        rows = self._query("SELECT desired_release FROM services WHERE name=?", (service,))
        return rows[0]["desired_release"] if rows else None

    def crashes(self, service: str) -> Crashes:
        rows = self._query(
            "SELECT restarts, last_exit, last_exit_at FROM services WHERE name=?", (service,)
        )
        if not rows:
            return Crashes()
        r = rows[0]
        return Crashes(int(r["restarts"]), str(r["last_exit"]), r["last_exit_at"])

    # --- releases ------------------------------------------------------------------------

    def releases(self, service: str) -> list[ReleaseRecord]:
        rows = self._query(
            f"{_RELEASES} WHERE r.service=? ORDER BY r.number",
            (service,),
        )
        return [_release_record(r) for r in rows]

    def release_record(self, service: str, number: int) -> ReleaseRecord | None:
        rows = self._query(
            f"{_RELEASES} WHERE r.service=? AND r.number=?",
            (service, number),
        )
        return _release_record(rows[0]) if rows else None

    def release(self, service: str, number: int) -> Release:
        # On every health check and reconcile pass: the release row alone, no ledger.
        rows = self._query("SELECT * FROM releases WHERE service=? AND number=?", (service, number))
        if not rows:
            raise NotFoundError(
                f"{service}@r{number} does not exist",
                hint=f"Run 'graven releases {service}' to list its releases.",
            )
        return _release(rows[0])

    def last_served_release(self, service: str, *, other_than: int) -> int | None:
        rows = self._query(
            "SELECT to_release FROM rollouts WHERE service=? AND state='succeeded' "
            "AND to_release IS NOT NULL AND to_release != ? ORDER BY id DESC LIMIT 1",
            (service, other_than),
        )
        return int(rows[0]["to_release"]) if rows else None

    # --- instances -----------------------------------------------------------------------

    def live_instances(self, service: str | None = None) -> list[Instance]:
        if service is None:
            rows = self._query(
                f"SELECT * FROM instances WHERE state IN ({_LIVE_MARKS}) ORDER BY started_at, id",  # noqa: S608
                LIVE_STATES,
            )
        else:
            rows = self._query(
                f"SELECT * FROM instances WHERE service=? AND state IN ({_LIVE_MARKS}) "  # noqa: S608
                "ORDER BY started_at, id",
                (service, *LIVE_STATES),
            )
        return [_instance(r) for r in rows]

    def instance(self, instance_id: str) -> InstanceRecord | None:
        rows = self._query("SELECT * FROM instances WHERE id=?", (instance_id,))
        if not rows:
            return None
        r = rows[0]
        return InstanceRecord(
            instance=_instance(r),
            pid_start=int(r["pid_start"]),
            stopped_at=r["stopped_at"],
            reason=str(r["reason"]),
            weight=int(_column(r, "weight", 100)),
            preview=bool(_column(r, "preview", 0)),
        )

    def instance_ids(self) -> set[str]:
        return {r["id"] for r in self._query("SELECT id FROM instances")}

    def pid_start(self, instance_id: str) -> int:
        rows = self._query("SELECT pid_start FROM instances WHERE id=?", (instance_id,))
        return int(rows[0]["pid_start"]) if rows else 0

    def weights(self, service: str) -> dict[str, int]:
        rows = self._query(
            f"SELECT id, weight FROM instances WHERE service=? AND state IN ({_LIVE_MARKS})",  # noqa: S608
            (service, *LIVE_STATES),
        )
        return {r["id"]: int(r["weight"]) for r in rows}

    def preview_instances(self, service: str) -> list[str]:
        rows = self._query(
            "SELECT id FROM instances WHERE service=? AND preview=1 AND state='healthy'",
            (service,),
        )
        return [r["id"] for r in rows]

    # --- rollouts ------------------------------------------------------------------------

    def rollout(self, rollout_id: int) -> RolloutRecord:
        rows = self._query("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        if not rows:
            raise NotFoundError(f"rollout {rollout_id} does not exist")
        return _rollout(rows[0])

    def running_rollout(self, service: str) -> RolloutRecord | None:
        rows = self._query(
            "SELECT * FROM rollouts WHERE service=? AND state='running' ORDER BY id DESC LIMIT 1",
            (service,),
        )
        return _rollout(rows[0]) if rows else None

    def last_rollout(self, service: str) -> RolloutRecord | None:
        rows = self._query(
            "SELECT * FROM rollouts WHERE service=? ORDER BY id DESC LIMIT 1", (service,)
        )
        return _rollout(rows[0]) if rows else None

    # --- ledger --------------------------------------------------------------------------

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


class _SqliteTransaction:
    """The writes of one open SQLite transaction (see ``StateTransaction``)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.closed = False

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        if self.closed:
            raise InternalError("a state transaction was used after its 'with' block")
        return self._db.execute(sql, args)

    # --- services ------------------------------------------------------------------------

    def set_desired(self, service: str, release: int | None, at: float) -> None:
        self._execute(
            "INSERT INTO services(name, desired_release, updated_at) VALUES (?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET desired_release=excluded.desired_release, "
            "updated_at=excluded.updated_at",
            (service, release, at),
        )

    def record_crash(self, service: str, how: str, at: float) -> int:
        self._execute(
            "UPDATE services SET restarts=restarts+1, last_exit=?, last_exit_at=? WHERE name=?",
            (how, at, service),
        )
        row = self._execute("SELECT restarts FROM services WHERE name=?", (service,)).fetchone()
        return int(row[0]) if row else 0

    def reset_crashes(self, service: str) -> None:
        self._execute("UPDATE services SET restarts=0 WHERE name=? AND restarts>0", (service,))

    # --- releases ------------------------------------------------------------------------

    def add_release(
        self, service: str, image: Digest, image_name: str, config: ServiceConfig, at: float
    ) -> Release:
        (last,) = self._execute(
            "SELECT COALESCE(MAX(number), 0) FROM releases WHERE service=?", (service,)
        ).fetchone()
        release = Release(
            service=service,
            number=int(last) + 1,
            image=image,
            config=config,
            content_hash=Release.hash_of(service, image, config),
        )
        self._execute(
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
        self._execute(
            "UPDATE releases SET healthy_at=COALESCE(healthy_at, ?) WHERE service=? AND number=?",
            (at, service, number),
        )

    # --- instances -----------------------------------------------------------------------

    def add_instance(self, instance: Instance, pid_start: int) -> None:
        self._execute(
            "INSERT INTO instances(id, service, release, image, host, port, pid, pid_start, "
            "started_at, state, restarts, last_exit) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                instance.id,
                instance.service,
                instance.release,
                str(instance.image),
                instance.host,
                instance.port,
                instance.pid,
                pid_start,
                instance.started_at,
                instance.state,
                instance.restarts,
                instance.last_exit,
            ),
        )

    def set_instance_state(
        self, instance_id: str, state: InstanceState, *, at: float | None = None, reason: str = ""
    ) -> None:
        if state == "stopped":
            self._execute(
                "UPDATE instances SET state='stopped', stopped_at=?, reason=? WHERE id=?",
                (at, reason, instance_id),
            )
        else:
            self._execute(
                "UPDATE instances SET state=?, reason=? WHERE id=?", (state, reason, instance_id)
            )

    def set_weights(self, weights: dict[str, int], *, clear_preview: bool = False) -> None:
        if self.closed:
            raise InternalError("a state transaction was used after its 'with' block")
        sql = (
            "UPDATE instances SET weight=?, preview=0 WHERE id=?"
            if clear_preview
            else "UPDATE instances SET weight=? WHERE id=?"
        )
        self._db.executemany(sql, [(w, i) for i, w in weights.items()])

    def set_preview(self, instance_id: str, preview: bool) -> None:
        self._execute("UPDATE instances SET preview=? WHERE id=?", (int(preview), instance_id))

    # --- rollouts ------------------------------------------------------------------------

    def start_rollout(
        self,
        service: str,
        kind: RolloutKind,
        from_release: int | None,
        to_release: int | None,
        at: float,
    ) -> int:
        self._execute(
            "UPDATE rollouts SET state='superseded', finished_at=? "
            "WHERE service=? AND state='running'",
            (at, service),
        )
        cur = self._execute(
            "INSERT INTO rollouts(service, kind, from_release, to_release, state, started_at, "
            "progressed_at) VALUES (?,?,?,?, 'running', ?, ?)",
            (service, kind, from_release, to_release, at, at),
        )
        return int(cur.lastrowid or 0)

    def set_rollout_progress(
        self, rollout_id: int, *, progress: str | None = None, progressed_at: float | None = None
    ) -> None:
        if progress is not None:
            self._execute("UPDATE rollouts SET progress=? WHERE id=?", (progress, rollout_id))
        if progressed_at is not None:
            self._execute(
                "UPDATE rollouts SET progressed_at=? WHERE id=?", (progressed_at, rollout_id)
            )

    def set_rollout_step(self, rollout_id: int, step_index: int) -> None:
        self._execute("UPDATE rollouts SET step_index=? WHERE id=?", (step_index, rollout_id))

    def set_rollout_promoted(self, rollout_id: int, promoted: bool) -> None:
        self._execute("UPDATE rollouts SET promoted=? WHERE id=?", (int(promoted), rollout_id))

    def set_rollout_pause(self, rollout_id: int, paused_until: float | None) -> None:
        self._execute("UPDATE rollouts SET paused_until=? WHERE id=?", (paused_until, rollout_id))

    def set_rollout_gate(self, rollout_id: int, gate: RolloutGate) -> None:
        self._execute("UPDATE rollouts SET gate=? WHERE id=?", (_gate_json(gate), rollout_id))

    def set_rollout_switched(self, rollout_id: int, at: float) -> None:
        self._execute("UPDATE rollouts SET switched_at=? WHERE id=?", (at, rollout_id))

    def finish_rollout(
        self,
        rollout_id: int,
        state: RolloutState,
        reason: str,
        at: float,
        *,
        running_only: bool = True,
    ) -> None:
        sql = "UPDATE rollouts SET state=?, reason=?, finished_at=? WHERE id=?"
        self._execute(
            sql + " AND state='running'" if running_only else sql, (state, reason, at, rollout_id)
        )

    # --- ledger --------------------------------------------------------------------------

    def append_ledger(self, entry: LedgerEntry) -> LedgerEntry:
        row = self._execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, "")
        entry = entry.sealed(seq=seq, prev_hash=prev)
        self._execute(
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


# --- rows to records ------------------------------------------------------------------------


def _column(row: sqlite3.Row, name: str, default: Any) -> Any:
    """``row[name]``, or ``default`` for a column a read-only, not yet migrated
    database lacks."""
    return row[name] if name in row.keys() else default  # noqa: SIM118 - Row has no __contains__ by name


def _release(row: sqlite3.Row) -> Release:
    return Release(
        service=row["service"],
        number=row["number"],
        image=Digest(row["image"]),
        config=ServiceConfig.from_dict(json.loads(row["config"])),
        content_hash=row["content_hash"],
    )


def _release_record(row: sqlite3.Row) -> ReleaseRecord:
    return ReleaseRecord(
        release=_release(row),
        image_name=row["image_name"],
        created_at=row["created_at"],
        healthy_at=row["healthy_at"],
        actor=row["actor"] or "",
        message=row["message"] or "",
    )


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
        restarts=int(_column(row, "restarts", 0)),
        last_exit=str(_column(row, "last_exit", "")),
    )


def _rollout(row: sqlite3.Row) -> RolloutRecord:
    return RolloutRecord(
        id=row["id"],
        service=row["service"],
        kind=row["kind"],
        from_release=row["from_release"],
        to_release=row["to_release"],
        state=row["state"],
        reason=row["reason"],
        progress=row["progress"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        step_index=int(_column(row, "step_index", 0)),
        promoted=bool(_column(row, "promoted", 0)),
        switched_at=_column(row, "switched_at", None),
        paused_until=_column(row, "paused_until", None),
        gate=_parse_gate(_column(row, "gate", None)),
        progressed_at=_column(row, "progressed_at", None),
    )


# --- the gate column ------------------------------------------------------------------------
# {"pause": {"until": T, "done": B},
#  "analysis": {"key": [CANARY, BASELINE, WINDOW], "started_at": T,
#               "start": [BackendStats as a dict, ...], "releases": {INSTANCE: RELEASE}}}
# NULL is the empty gate. A gate that does not parse is read as empty: the step then
# starts its pause or window again, which is safe.


def _gate_json(gate: RolloutGate) -> str | None:
    if gate.empty:
        return None
    doc: dict[str, Any] = {}
    if gate.pause is not None:
        doc["pause"] = {"until": gate.pause.until, "done": gate.pause.done}
    if (a := gate.analysis) is not None:
        doc["analysis"] = {
            "key": [a.canary_release, a.baseline_release, a.window],
            "started_at": a.started_at,
            "start": [asdict(b) for b in a.start],
            "releases": dict(a.releases),
        }
    return json.dumps(doc)


def _parse_gate(text: str | None) -> RolloutGate:
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        return RolloutGate()
    if not isinstance(doc, dict):
        return RolloutGate()
    return RolloutGate(pause=_parse_pause(doc.get("pause")), analysis=_parse_analysis(doc))


def _parse_pause(raw: object) -> PauseGate | None:
    if not isinstance(raw, dict):
        return None
    try:
        return PauseGate(until=float(raw["until"]), done=bool(raw.get("done")))
    except (KeyError, TypeError, ValueError):
        return None


def _parse_analysis(doc: dict[str, Any]) -> AnalysisGate | None:
    raw = doc.get("analysis")
    if not isinstance(raw, dict):
        return None
    try:
        canary, baseline, window = raw["key"]
        return AnalysisGate(
            canary_release=int(canary),
            baseline_release=int(baseline),
            window=float(window),
            started_at=float(raw["started_at"]),
            start=tuple(
                BackendStats(**{**b, "latency_buckets": tuple(b.get("latency_buckets", ()))})
                for b in raw["start"]
            ),
            releases=tuple((str(k), int(v)) for k, v in dict(raw["releases"]).items()),
        )
    except (KeyError, TypeError, ValueError):
        return None


if TYPE_CHECKING:  # mypy proves the adapter implements the port

    def _is_a_state_store(store: SqliteStateStore) -> StateStore:
        return store


__all__ = ["SqliteStateStore"]
