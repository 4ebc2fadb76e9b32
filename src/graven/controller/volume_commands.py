"""Removing a named volume: the one change to a volume, ledgered like a deploy.

It runs in the controller so that it is ordered with the rollouts that start instances
on the volume: the check that nothing uses it, the removal and its ledger entry happen
between two engine steps, never during one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from graven.controller.results import VolumeRemoval
from graven.errors import UsageError
from graven.ledger.chain import LedgerEntry
from graven.ledger.state import StateTransaction
from graven.volumes import (
    delete_retired,
    find_volume,
    restore_retired,
    retire_volume,
    volumes_in_use,
)

if TYPE_CHECKING:
    from graven.controller.engine import Engine


async def remove_volume(
    engine: Engine, name: str, *, force: bool, actor: str, message: str
) -> VolumeRemoval:
    """Delete the named volume, unless a live or desired release uses it (``force``:
    even then; its instances keep what they have open, on a deleted directory)."""
    record = find_volume(engine.state_dir, name)
    users = volumes_in_use(engine.state).get(name, [])
    if users and not force:
        raise UsageError(
            f"volume {name} is in use by {', '.join(users)}",
            hint="Take those services down first ('graven down SERVICE'), or pass --force "
            "to delete it under them.",
        )
    record, doomed = retire_volume(engine.state_dir, name)
    now = engine.clock.now()

    def change(tx: StateTransaction) -> LedgerEntry:
        return LedgerEntry(
            at=now,
            actor=actor,
            action="volume-rm",
            service=record.service,
            message=message,
            details={
                "volume": name,
                "size": record.size,
                "created_by": record.release,
                "forced": force,
                "used_by": users,
            },
        )

    try:
        entry = engine.commands.record(record.service, change, wake=False)
    except BaseException:
        restore_retired(engine.state_dir, name, doomed)  # unrecorded: not removed
        raise
    await asyncio.to_thread(delete_retired, name, doomed)
    return VolumeRemoval(
        name=name,
        path=str(record.path),
        size=record.size,
        forced=force,
        used_by=tuple(users),
        ledger=entry.seq,
    )
