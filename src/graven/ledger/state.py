"""The StateStore port: desired state, releases, observed instances, rollouts and the
hash-chained ledger, as value types.

Readers return frozen records; every write goes through a unit of work::

    with state.transaction() as tx:
        release = tx.add_release(service, image, image_name, config, now)
        tx.set_desired(service, release.number, now)
        tx.append_ledger(entry)

All of a transaction lands, or none of it. Adapters: ``graven.ledger.sqlite`` (the
embedded default, one WAL file in the state dir) and ``graven.testing.state`` (in
memory, for unit tests). A new adapter (PostgreSQL) implements both Protocols here,
passes ``graven.testing.contracts.state.StateStoreContract`` and is chosen in
``open_state_store``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from graven.ledger.chain import LedgerEntry
from graven.model import (
    LIVE_STATES,
    Digest,
    Instance,
    InstanceState,
    Release,
    RolloutKind,
    RolloutState,
    ServiceConfig,
)
from graven.router.base import BackendStats


@dataclass(frozen=True)
class ReleaseRecord:
    """A release as recorded: the release itself, the image name it was deployed
    from, when it was created and when it first served fully (None: never, so it is
    no rollback candidate), and who deployed it and why (from its ledger entry)."""

    release: Release
    image_name: str
    created_at: float
    healthy_at: float | None = None
    actor: str = ""
    message: str = ""

    @property
    def id(self) -> str:
        return self.release.id

    @property
    def number(self) -> int:
        return self.release.number


@dataclass(frozen=True)
class InstanceRecord:
    """An instance as recorded, with what only the controller needs: the process's
    start time (to tell it from a reused pid), why it stopped, and its traffic."""

    instance: Instance
    pid_start: int
    stopped_at: float | None = None
    reason: str = ""
    weight: int = 100  # router weight, 0-100
    preview: bool = False  # behind the preview route of a blue-green rollout

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def state(self) -> str:
        return self.instance.state


@dataclass(frozen=True)
class Crashes:
    """A service's crash loop: consecutive unexpected deaths, and how the last one ended."""

    restarts: int = 0
    last_exit: str = ""
    last_exit_at: float | None = None


# --- rollout gates ------------------------------------------------------------------------


@dataclass(frozen=True)
class PauseGate:
    """A timed pause of the current step: when it ends, and whether it ended (a
    restarted controller does not pause again)."""

    until: float
    done: bool = False


@dataclass(frozen=True)
class AnalysisGate:
    """The traffic window an analysis step judges, from its start: the window's key
    (canary release, baseline release, seconds), when it started, the router's
    counters then, and which release each instance served (instances stopped during
    the window still count)."""

    canary_release: int
    baseline_release: int
    window: float
    started_at: float
    start: tuple[BackendStats, ...] = ()
    releases: tuple[tuple[str, int], ...] = ()

    def matches(self, canary_release: int, baseline_release: int, window: float) -> bool:
        """Is this the window of that step (and not of an earlier one)?"""
        return (self.canary_release, self.baseline_release, self.window) == (
            canary_release,
            baseline_release,
            window,
        )


@dataclass(frozen=True)
class RolloutGate:
    """How far the current step's timed pause and analysis got; persisted so a
    restarted controller neither repeats a finished pause nor restarts a window.
    Empty at each new step. A manual gate (waiting for 'graven promote') is the
    rollout's ``promoted`` flag, not part of this."""

    pause: PauseGate | None = None
    analysis: AnalysisGate | None = None

    @property
    def empty(self) -> bool:
        return self.pause is None and self.analysis is None


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout: a plan being applied toward ``to_release`` (None: taking down)."""

    id: int
    service: str
    kind: RolloutKind
    from_release: int | None
    to_release: int | None
    state: RolloutState
    reason: str
    progress: str
    started_at: float
    finished_at: float | None = None
    step_index: int = 0
    promoted: bool = False
    switched_at: float | None = None
    paused_until: float | None = None
    gate: RolloutGate = field(default_factory=RolloutGate)
    progressed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Status fields (the gate is controller bookkeeping, not status)."""
        return {
            "id": self.id,
            "service": self.service,
            "kind": self.kind,
            "from_release": self.from_release,
            "to_release": self.to_release,
            "state": self.state,
            "reason": self.reason,
            "progress": self.progress,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "step_index": self.step_index,
            "promoted": int(self.promoted),
            "switched_at": self.switched_at,
            "paused_until": self.paused_until,
            "progressed_at": self.progressed_at,
        }


# --- the port ------------------------------------------------------------------------------


class StateTransaction(Protocol):
    """The writes of one transaction. Valid only inside its ``with`` block."""

    # services (desired state) and their crash loops
    def set_desired(self, service: str, release: int | None, at: float) -> None:
        """``release`` becomes what ``service`` should run (None: the service is down)."""

    def record_crash(self, service: str, how: str, at: float) -> int:
        """One more unexpected death in a row for ``service``; returns the new count
        (0 for a service that was never deployed)."""

    def reset_crashes(self, service: str) -> None:
        """The service's instances stay up again: its crash loop is over."""

    # releases
    def add_release(
        self, service: str, image: Digest, image_name: str, config: ServiceConfig, at: float
    ) -> Release:
        """The service's next release (numbers count from 1 per service)."""

    def mark_release_healthy(self, service: str, number: int, at: float) -> None:
        """The release fully served at ``at``; only its first time is kept."""

    # instances
    def add_instance(self, instance: Instance, pid_start: int) -> None: ...

    def set_instance_state(
        self, instance_id: str, state: InstanceState, *, at: float | None = None, reason: str = ""
    ) -> None:
        """A new state; ``at`` is recorded as the stop time when ``state`` is "stopped"."""

    def set_weights(self, weights: dict[str, int], *, clear_preview: bool = False) -> None:
        """Router weights of several instances; ``clear_preview`` takes them off the
        preview route too (a traffic switch)."""

    def set_preview(self, instance_id: str, preview: bool) -> None: ...

    # rollouts
    def start_rollout(
        self,
        service: str,
        kind: RolloutKind,
        from_release: int | None,
        to_release: int | None,
        at: float,
    ) -> int:
        """A running rollout; it supersedes the one running for ``service``, if any.
        Returns its id."""

    def set_rollout_progress(
        self, rollout_id: int, *, progress: str | None = None, progressed_at: float | None = None
    ) -> None:
        """The step a rollout is at (for people) and/or when it last made progress
        (its progress deadline counts from then); a field left None is kept."""

    def set_rollout_step(self, rollout_id: int, step_index: int) -> None: ...

    def set_rollout_promoted(self, rollout_id: int, promoted: bool) -> None:
        """A person promoted the rollout past its manual gate (or the flag is spent)."""

    def set_rollout_pause(self, rollout_id: int, paused_until: float | None) -> None: ...

    def set_rollout_gate(self, rollout_id: int, gate: RolloutGate) -> None: ...

    def set_rollout_switched(self, rollout_id: int, at: float) -> None:
        """A weighted rollout switched all traffic: its rollback window starts."""

    def finish_rollout(
        self,
        rollout_id: int,
        state: RolloutState,
        reason: str,
        at: float,
        *,
        running_only: bool = True,
    ) -> None:
        """The rollout ended in ``state``. ``running_only``: only if it is still
        running (one that was superseded stays so)."""

    # ledger
    def append_ledger(self, entry: LedgerEntry) -> LedgerEntry:
        """``entry`` sealed into the chain (next seq, previous hash), as stored."""


class StateStore(Protocol):
    """Where the controller keeps what should run, what runs, and what happened."""

    def transaction(self, *, durable: bool = True) -> AbstractContextManager[StateTransaction]:
        """One atomic unit of change: all of it lands, or none of it (an exception in
        the block writes nothing). Transactions do not nest.

        ``durable=False`` may commit without waiting for the disk: still atomic and
        ordered, but an OS crash may lose it. Only for what is shown, never acted on."""

    def close(self) -> None: ...

    # services
    def services(self) -> dict[str, int | None]:
        """Every service ever deployed and its desired release (None: down)."""

    def desired_release(self, service: str) -> int | None: ...

    def crashes(self, service: str) -> Crashes: ...

    # releases
    def releases(self, service: str) -> list[ReleaseRecord]:
        """The service's releases, oldest first."""

    def release(self, service: str, number: int) -> Release:
        """Raises NotFoundError for a release that does not exist."""

    def release_record(self, service: str, number: int) -> ReleaseRecord | None: ...

    def last_served_release(self, service: str, *, other_than: int) -> int | None:
        """The newest release other than ``other_than`` that a rollout brought to
        serve successfully: the default rollback target."""

    # instances
    def live_instances(self, service: str | None = None) -> list[Instance]:
        """Instances not stopped, oldest first."""

    def instance(self, instance_id: str) -> InstanceRecord | None:
        """Any instance ever recorded, live or not."""

    def instance_ids(self) -> set[str]:
        """Every instance ever recorded, live or not."""

    def pid_start(self, instance_id: str) -> int:
        """The recorded start time of the instance's process (0: unknown instance)."""

    def weights(self, service: str) -> dict[str, int]:
        """Router weights of the live instances of ``service``."""

    def preview_instances(self, service: str) -> list[str]:
        """Healthy instances behind the preview route of ``service``."""

    # rollouts
    def rollout(self, rollout_id: int) -> RolloutRecord:
        """Raises NotFoundError for a rollout that does not exist."""

    def running_rollout(self, service: str) -> RolloutRecord | None: ...

    def last_rollout(self, service: str) -> RolloutRecord | None: ...

    # ledger
    def ledger(self, service: str | None = None) -> list[LedgerEntry]:
        """Entries in chain order (by seq)."""


def open_state_store(path: Path, *, read_only: bool = False) -> StateStore:
    """The state store at ``path``: the SQLite adapter (the only durable one so far).
    ``read_only`` opens an existing database for looking (StoreError when absent)."""
    from graven.ledger.sqlite import SqliteStateStore

    return SqliteStateStore(path, read_only=read_only)


__all__ = [
    "LIVE_STATES",
    "AnalysisGate",
    "Crashes",
    "InstanceRecord",
    "PauseGate",
    "ReleaseRecord",
    "RolloutGate",
    "RolloutRecord",
    "StateStore",
    "StateTransaction",
    "open_state_store",
]
