"""An in-memory StateStore for fast unit tests of the controller: the same records
and the same transaction semantics as the SQLite adapter, nothing on disk.

A transaction works on a copy of the data and swaps it in on success, so an
exception inside ``transaction()`` leaves nothing behind. Reads inside an open
transaction (on its thread) see its writes, as they do in SQLite. The contract suite
in ``graven.testing.contracts.state`` holds both adapters to the same behaviour.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graven.errors import InternalError, NotFoundError
from graven.ledger.chain import LedgerEntry
from graven.ledger.state import (
    LIVE_STATES,
    Crashes,
    InstanceRecord,
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


@dataclass
class _Service:
    desired: int | None
    updated_at: float
    crashes: Crashes = field(default_factory=Crashes)


@dataclass
class _Data:
    services: dict[str, _Service] = field(default_factory=dict)
    releases: dict[tuple[str, int], ReleaseRecord] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    rollouts: dict[int, RolloutRecord] = field(default_factory=dict)
    ledger: list[LedgerEntry] = field(default_factory=list)
    next_rollout: int = 1


class MemoryStateStore:
    """StateStore in memory. Thread-safe: one lock, held for a whole transaction."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._data = _Data()
        self._open: _MemoryTransaction | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[_MemoryTransaction]:
        del durable  # nothing here waits for a disk
        with self._lock:
            if self._open is not None:
                raise InternalError("a state transaction is already open on this thread")
            before = self._data
            # Records are frozen; only the containers (and services) need copying.
            self._data = _Data(
                services={k: copy.copy(v) for k, v in before.services.items()},
                releases=dict(before.releases),
                instances=dict(before.instances),
                rollouts=dict(before.rollouts),
                ledger=list(before.ledger),
                next_rollout=before.next_rollout,
            )
            tx = self._open = _MemoryTransaction(self._data)
            try:
                yield tx
            except BaseException:
                self._data = before
                raise
            finally:
                tx.closed = True
                self._open = None

    # --- services ------------------------------------------------------------------------

    def services(self) -> dict[str, int | None]:
        with self._lock:
            return {name: s.desired for name, s in self._data.services.items()}

    def desired_release(self, service: str) -> int | None:
        with self._lock:
            s = self._data.services.get(service)
            return s.desired if s else None

    def crashes(self, service: str) -> Crashes:
        with self._lock:
            s = self._data.services.get(service)
            return s.crashes if s else Crashes()

    # --- releases ------------------------------------------------------------------------

    def releases(self, service: str) -> list[ReleaseRecord]:
        with self._lock:
            found = [self._deployed(r) for (s, _), r in self._data.releases.items() if s == service]
        return sorted(found, key=lambda r: r.number)

    def release_record(self, service: str, number: int) -> ReleaseRecord | None:
        with self._lock:
            record = self._data.releases.get((service, number))
            return self._deployed(record) if record is not None else None

    def _deployed(self, record: ReleaseRecord) -> ReleaseRecord:
        """``record`` with who deployed it and why, from its deploy's ledger entry."""
        for e in self._data.ledger:
            if e.action == "deploy" and e.release == record.id:
                return dataclasses.replace(record, actor=e.actor, message=e.message)
        return record

    def release(self, service: str, number: int) -> Release:
        with self._lock:
            record = self._data.releases.get((service, number))
        if record is None:
            raise NotFoundError(
                f"{service}@r{number} does not exist",
                hint=f"Run 'graven releases {service}' to list its releases.",
            )
        return record.release

    def last_served_release(self, service: str, *, other_than: int) -> int | None:
        with self._lock:
            for ro in sorted(self._data.rollouts.values(), key=lambda r: -r.id):
                if (
                    ro.service == service
                    and ro.state == "succeeded"
                    and ro.to_release is not None
                    and ro.to_release != other_than
                ):
                    return ro.to_release
        return None

    # --- instances -----------------------------------------------------------------------

    def live_instances(self, service: str | None = None) -> list[Instance]:
        with self._lock:
            live = [
                r.instance
                for r in self._data.instances.values()
                if r.state in LIVE_STATES and (service is None or r.instance.service == service)
            ]
        return sorted(live, key=lambda i: (i.started_at, i.id))

    def instance(self, instance_id: str) -> InstanceRecord | None:
        with self._lock:
            return self._data.instances.get(instance_id)

    def instance_ids(self) -> set[str]:
        with self._lock:
            return set(self._data.instances)

    def pid_start(self, instance_id: str) -> int:
        record = self.instance(instance_id)
        return record.pid_start if record else 0

    def weights(self, service: str) -> dict[str, int]:
        with self._lock:
            return {
                r.id: r.weight
                for r in self._data.instances.values()
                if r.instance.service == service and r.state in LIVE_STATES
            }

    def preview_instances(self, service: str) -> list[str]:
        with self._lock:
            return [
                r.id
                for r in self._data.instances.values()
                if r.instance.service == service and r.preview and r.state == "healthy"
            ]

    # --- rollouts ------------------------------------------------------------------------

    def rollout(self, rollout_id: int) -> RolloutRecord:
        with self._lock:
            found = self._data.rollouts.get(rollout_id)
        if found is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist")
        return found

    def running_rollout(self, service: str) -> RolloutRecord | None:
        with self._lock:
            running = [
                r
                for r in self._data.rollouts.values()
                if r.service == service and r.state == "running"
            ]
        return max(running, key=lambda r: r.id, default=None)

    def last_rollout(self, service: str) -> RolloutRecord | None:
        with self._lock:
            mine = [r for r in self._data.rollouts.values() if r.service == service]
        return max(mine, key=lambda r: r.id, default=None)

    # --- ledger --------------------------------------------------------------------------

    def ledger(self, service: str | None = None) -> list[LedgerEntry]:
        with self._lock:
            return [e for e in self._data.ledger if not service or e.service == service]


class _MemoryTransaction:
    """The writes of one open in-memory transaction (see ``StateTransaction``)."""

    def __init__(self, data: _Data) -> None:
        self._d = data
        self.closed = False

    def _data(self) -> _Data:
        if self.closed:
            raise InternalError("a state transaction was used after its 'with' block")
        return self._d

    def _update_instance(self, instance_id: str, **changes: object) -> None:
        d = self._data()
        if instance_id in d.instances:
            d.instances[instance_id] = dataclasses.replace(d.instances[instance_id], **changes)  # type: ignore[arg-type]

    def _update_rollout(self, rollout_id: int, **changes: object) -> None:
        d = self._data()
        if rollout_id in d.rollouts:
            d.rollouts[rollout_id] = dataclasses.replace(d.rollouts[rollout_id], **changes)  # type: ignore[arg-type]

    # --- services ------------------------------------------------------------------------

    def set_desired(self, service: str, release: int | None, at: float) -> None:
        d = self._data()
        s = d.services.get(service)
        if s is None:
            d.services[service] = _Service(release, at)
        else:
            s.desired, s.updated_at = release, at

    def record_crash(self, service: str, how: str, at: float) -> int:
        s = self._data().services.get(service)
        if s is None:
            return 0
        s.crashes = Crashes(s.crashes.restarts + 1, how, at)
        return s.crashes.restarts

    def reset_crashes(self, service: str) -> None:
        s = self._data().services.get(service)
        if s is not None and s.crashes.restarts > 0:
            s.crashes = dataclasses.replace(s.crashes, restarts=0)

    # --- releases ------------------------------------------------------------------------

    def add_release(
        self, service: str, image: Digest, image_name: str, config: ServiceConfig, at: float
    ) -> Release:
        d = self._data()
        number = max((n for s, n in d.releases if s == service), default=0) + 1
        release = Release(
            service=service,
            number=number,
            image=image,
            config=config,
            content_hash=Release.hash_of(service, image, config),
        )
        d.releases[(service, number)] = ReleaseRecord(release, image_name, at)
        return release

    def mark_release_healthy(self, service: str, number: int, at: float) -> None:
        d = self._data()
        record = d.releases.get((service, number))
        if record is not None and record.healthy_at is None:
            d.releases[(service, number)] = dataclasses.replace(record, healthy_at=at)

    # --- instances -----------------------------------------------------------------------

    def add_instance(self, instance: Instance, pid_start: int) -> None:
        d = self._data()
        if instance.id in d.instances:
            raise InternalError(f"instance {instance.id} is recorded already")
        d.instances[instance.id] = InstanceRecord(instance, pid_start)

    def set_instance_state(
        self, instance_id: str, state: InstanceState, *, at: float | None = None, reason: str = ""
    ) -> None:
        record = self._data().instances.get(instance_id)
        if record is None:
            return
        changes: dict[str, object] = {
            "instance": dataclasses.replace(record.instance, state=state),
            "reason": reason,
        }
        if state == "stopped":
            changes["stopped_at"] = at
        self._update_instance(instance_id, **changes)

    def set_weights(self, weights: dict[str, int], *, clear_preview: bool = False) -> None:
        for instance_id, weight in weights.items():
            if clear_preview:
                self._update_instance(instance_id, weight=weight, preview=False)
            else:
                self._update_instance(instance_id, weight=weight)

    def set_preview(self, instance_id: str, preview: bool) -> None:
        self._update_instance(instance_id, preview=preview)

    # --- rollouts ------------------------------------------------------------------------

    def start_rollout(
        self,
        service: str,
        kind: RolloutKind,
        from_release: int | None,
        to_release: int | None,
        at: float,
    ) -> int:
        d = self._data()
        for ro in list(d.rollouts.values()):
            if ro.service == service and ro.state == "running":
                self._update_rollout(ro.id, state="superseded", finished_at=at)
        rollout_id = d.next_rollout
        d.next_rollout += 1
        d.rollouts[rollout_id] = RolloutRecord(
            id=rollout_id,
            service=service,
            kind=kind,
            from_release=from_release,
            to_release=to_release,
            state="running",
            reason="",
            progress="",
            started_at=at,
            progressed_at=at,
        )
        return rollout_id

    def set_rollout_progress(
        self, rollout_id: int, *, progress: str | None = None, progressed_at: float | None = None
    ) -> None:
        if progress is not None:
            self._update_rollout(rollout_id, progress=progress)
        if progressed_at is not None:
            self._update_rollout(rollout_id, progressed_at=progressed_at)

    def set_rollout_step(self, rollout_id: int, step_index: int) -> None:
        self._update_rollout(rollout_id, step_index=step_index)

    def set_rollout_promoted(self, rollout_id: int, promoted: bool) -> None:
        self._update_rollout(rollout_id, promoted=promoted)

    def set_rollout_pause(self, rollout_id: int, paused_until: float | None) -> None:
        self._update_rollout(rollout_id, paused_until=paused_until)

    def set_rollout_gate(self, rollout_id: int, gate: RolloutGate) -> None:
        self._update_rollout(rollout_id, gate=gate)

    def set_rollout_switched(self, rollout_id: int, at: float) -> None:
        self._update_rollout(rollout_id, switched_at=at)

    def finish_rollout(
        self,
        rollout_id: int,
        state: RolloutState,
        reason: str,
        at: float,
        *,
        running_only: bool = True,
    ) -> None:
        ro = self._data().rollouts.get(rollout_id)
        if ro is None or (running_only and ro.state != "running"):
            return
        self._update_rollout(rollout_id, state=state, reason=reason, finished_at=at)

    # --- ledger --------------------------------------------------------------------------

    def append_ledger(self, entry: LedgerEntry) -> LedgerEntry:
        d = self._data()
        last = d.ledger[-1] if d.ledger else None
        sealed = entry.sealed(seq=last.seq + 1 if last else 1, prev_hash=last.hash if last else "")
        d.ledger.append(sealed)
        return sealed


if TYPE_CHECKING:  # mypy proves the fake implements the port

    def _is_a_state_store(store: MemoryStateStore) -> StateStore:
        return store


__all__ = ["MemoryStateStore"]
