"""Desired-state commands: deploy, rollback, down, promote, abort, and the preview of a
deploy.

A command changes only what is desired, never what runs: it writes the change and its
ledger entry in one transaction and wakes the service's worker, which acts on it. Every
change goes through ``Commands.record``, the one path that does those three things.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from graven.controller.results import (
    AbortResult,
    DeployResult,
    DownResult,
    PlanView,
    PreviewResult,
    PromoteResult,
    RollbackResult,
)
from graven.errors import NotFoundError, UsageError
from graven.ledger.chain import LedgerEntry
from graven.ledger.state import StateTransaction
from graven.model import Digest, Release, ServiceConfig, release_id

if TYPE_CHECKING:
    from graven.controller.engine import Engine

# Writes a change inside the transaction it is given and returns its ledger entry.
Change = Callable[[StateTransaction], LedgerEntry]


class Commands:
    """The changes of desired state the API asks the engine for."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state = engine.state
        self.clock = engine.clock

    def record(self, service: str, change: Change, *, wake: bool = True) -> LedgerEntry:
        """Commit ``change`` and its ledger entry together, wake ``service``'s worker
        (unless ``wake`` is False) and move the ledger head."""
        with self.state.transaction() as tx:
            entry = tx.append_ledger(change(tx))
        if wake:
            self.engine.wake(service)
        self.engine.head.advance(entry)
        return entry

    def deploy(
        self,
        service: str,
        image: Digest,
        image_name: str,
        config: ServiceConfig,
        actor: str,
        message: str,
        details: Mapping[str, object],
    ) -> DeployResult:
        self.engine.store.get_image(image)  # refuse digests the store does not hold
        now = self.clock.now()
        content_hash = Release.hash_of(service, image, config)
        desired = self.state.desired_release(service)
        if desired is not None:
            current = self.state.release(service, desired)
            if current.content_hash == content_hash:
                # Same desired state again: nothing to do, nothing to record.
                running = self.state.running_rollout(service)
                return DeployResult(False, current.id, running.id if running else None)
        made: list[tuple[Release, int]] = []

        def change(tx: StateTransaction) -> LedgerEntry:
            release = tx.add_release(service, image, image_name, config, now)
            rollout = tx.start_rollout(service, "deploy", desired, release.number, now)
            tx.set_desired(service, release.number, now)
            made.append((release, rollout))
            return LedgerEntry(
                at=now,
                actor=actor,
                action="deploy",
                service=service,
                release=release.id,
                image=str(image),
                message=message,
                details={**details, "image_name": image_name, "rollout": rollout},
            )

        entry = self.record(service, change)
        release, rollout = made[0]
        return DeployResult(True, release.id, rollout, entry.seq)

    def rollback_target(self, service: str) -> int:
        desired = self.state.desired_release(service)
        if desired is None:
            raise UsageError(
                f"{service} is not deployed", hint=f"Run 'graven deploy {service}' first."
            )
        target = self.state.last_served_release(service, other_than=desired)
        if target is None:
            raise UsageError(
                f"{service} has no earlier release that served healthily",
                hint=f"Run 'graven releases {service}' and pick one with --to.",
            )
        return target

    def rollback(self, service: str, to: int | None, actor: str, message: str) -> RollbackResult:
        if service not in self.state.services():
            raise NotFoundError(f"service {service!r} was never deployed")
        target = to if to is not None else self.rollback_target(service)
        release = self.state.release(service, target)
        desired = self.state.desired_release(service)
        if desired == target:
            running = self.state.running_rollout(service)
            return RollbackResult(False, release.id, running.id if running else None)
        now = self.clock.now()
        rollouts: list[int] = []

        def change(tx: StateTransaction) -> LedgerEntry:
            rollout = tx.start_rollout(service, "rollback", desired, target, now)
            tx.set_desired(service, target, now)
            rollouts.append(rollout)
            return LedgerEntry(
                at=now,
                actor=actor,
                action="rollback",
                service=service,
                release=release.id,
                image=str(release.image),
                message=message,
                details={
                    "from": release_id(service, desired) if desired is not None else None,
                    "rollout": rollout,
                },
            )

        entry = self.record(service, change)
        return RollbackResult(True, release.id, rollouts[0], entry.seq)

    def down(self, service: str, actor: str, message: str) -> DownResult:
        services = self.state.services()
        if service not in services:
            raise NotFoundError(f"service {service!r} was never deployed")
        desired = services[service]
        routers = self.engine.router.running()
        if (
            desired is None
            and not self.state.live_instances(service)
            and service not in routers
            and f"{service}-preview" not in routers  # a router left over still goes
        ):
            return DownResult(False, service, None)
        now = self.clock.now()
        rollouts: list[int] = []

        def change(tx: StateTransaction) -> LedgerEntry:
            rollout = tx.start_rollout(service, "down", desired, None, now)
            tx.set_desired(service, None, now)
            rollouts.append(rollout)
            return LedgerEntry(
                at=now,
                actor=actor,
                action="down",
                service=service,
                release=release_id(service, desired) if desired else "",
                message=message,
                details={"rollout": rollout},
            )

        entry = self.record(service, change)
        return DownResult(True, service, rollouts[0], entry.seq)

    def promote(self, service: str, actor: str, message: str) -> PromoteResult:
        ro = self.state.running_rollout(service)
        if ro is None:
            raise UsageError(
                f"{service} has no rollout in progress to promote",
                hint=f"Run 'graven status {service}' to see its last rollout.",
            )
        now = self.clock.now()
        # A rollout taking the service down has no release to promote to.
        to = release_id(service, ro.to_release) if ro.to_release is not None else ""

        def change(tx: StateTransaction) -> LedgerEntry:
            tx.set_rollout_promoted(ro.id, True)
            return LedgerEntry(
                at=now,
                actor=actor,
                action="promote",
                service=service,
                release=to,
                message=message,
                details={"rollout": ro.id},
            )

        self.record(service, change)
        return PromoteResult(service, ro.id, to)

    def abort(self, service: str, actor: str, message: str) -> AbortResult:
        ro = self.state.running_rollout(service)
        if ro is None:
            raise UsageError(
                f"{service} has no rollout in progress to abort",
                hint=f"To go back to an earlier release, run 'graven rollback {service}'.",
            )
        now = self.clock.now()
        reason = f"aborted by {actor}: {message}"

        def change(tx: StateTransaction) -> LedgerEntry:
            tx.finish_rollout(ro.id, "aborted", reason, now, running_only=False)
            tx.set_desired(service, ro.from_release, now)
            return LedgerEntry(
                at=now,
                actor=actor,
                action="abort",
                service=service,
                release=release_id(service, ro.to_release) if ro.to_release is not None else "",
                message=message,
                details={
                    "rollout": ro.id,
                    "rolled_back_to": release_id(service, ro.from_release)
                    if ro.from_release
                    else None,
                },
            )

        self.record(service, change)
        return AbortResult(service, ro.id, reason)

    def preview(self, service: str, image: Digest, config: ServiceConfig) -> PreviewResult:
        """What deploying ``image`` with ``config`` would do now; changes nothing."""
        engine = self.engine
        content_hash = Release.hash_of(service, image, config)
        desired = self.state.desired_release(service)
        current = self.state.release(service, desired) if desired is not None else None
        if current is not None and current.content_hash == content_hash:
            return PreviewResult(False, current.id, PlanView.of(engine.plan(service)))
        numbers = [r.number for r in self.state.releases(service)]
        nxt = max(numbers, default=0) + 1
        plan = engine.plan_with(
            service, nxt, config, engine.observe(service), self.state.weights(service), None
        )
        changes = []
        if current is None:
            changes.append("first release")
        else:
            if current.image != image:
                changes.append(f"image {current.image.short} -> {image.short}")
            old, new = current.config.to_dict(), config.to_dict()
            changes += [
                f"{k}: {old[k]!r} -> {new[k]!r}"
                for k in sorted(new)
                if k != "env" and old[k] != new[k]
            ]
            changes += env_changes(current.config.env, config.env)
        return PreviewResult(
            True,
            current.id if current else None,
            PlanView.of(plan),
            to=release_id(service, nxt),
            changes=tuple(changes),
        )


def env_changes(old: tuple[tuple[str, str], ...], new: tuple[tuple[str, str], ...]) -> list[str]:
    """One line per changed variable; a secret shows as its reference, so a rotated
    secret is a visible change that reveals nothing."""
    before, after = dict(old), dict(new)
    out = []
    for key in sorted(before.keys() | after.keys()):
        if key not in after:
            out.append(f"env {key}: removed")
        elif key not in before:
            out.append(f"env {key}: added {after[key]!r}")
        elif before[key] != after[key]:
            out.append(f"env {key}: {before[key]!r} -> {after[key]!r}")
    return out
