"""Read-only answers while no controller runs: ``status`` and ``plan`` from the state
store, opened read-only.

A verb that only looks must not start a controller (one started for a look would
then stay up with nothing to do). The engine built here is never run: it plans and
reports over what the store records, and nothing in it starts, stops or writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from graven.clock import RealClock
from graven.controller.api import Api
from graven.controller.engine import Engine
from graven.controller.paths import state_db, store_root
from graven.controller.results import (
    InstanceStatus,
    PreviewResult,
    StateDirView,
    StatusView,
    from_json,
)
from graven.errors import NotFoundError
from graven.ledger.state import StateStore, open_state_store
from graven.router.base import Router
from graven.runtime.base import Handle
from graven.runtime.isolation import describe_isolation
from graven.runtime.process import ProcessRuntime
from graven.store.cas import ContentStore

STOPPED = "stopped"


def _recorded_router(state_dir: Path) -> Router:
    """The router kind this state dir runs, as the controller chose and recorded it;
    only its ``running()`` (pid files and liveness) is used here."""
    recorded = state_dir / "router"
    kind = recorded.read_text().strip() if recorded.exists() else "embedded"
    if kind == "haproxy":
        from graven.router.haproxy.adapter import HAProxyRouter

        return HAProxyRouter(state_dir)
    from graven.router.embedded import EmbeddedRouter

    return EmbeddedRouter(state_dir)


def routers_running(state_dir: Path) -> dict[str, int]:
    """The routers of this state dir that run (name -> port), controller or not."""
    return _recorded_router(state_dir).running()


def _engine(state_dir: Path, state: StateStore) -> Engine:
    store = ContentStore(store_root(state_dir))
    return Engine(
        state_dir,
        state,
        store,
        ProcessRuntime(state_dir, store),
        _recorded_router(state_dir),
        RealClock(),
    )


def _state(state_dir: Path) -> StateStore:
    db = state_db(state_dir)
    # Nothing deployed yet: an empty store in memory answers as the real one would.
    return (
        open_state_store(db, read_only=True) if db.exists() else open_state_store(Path(":memory:"))
    )


def stopped_status(state_dir: Path, service: str | None) -> StatusView:
    """What ``GET /v1/status`` answers, from the records, marked ``controller: stopped``.

    With no controller nothing watches health, so each instance's state is what was
    last recorded, except one whose process is gone: that one says ``not running``."""
    state = _state(state_dir)
    try:
        engine = _engine(state_dir, state)
        if service is not None and service not in state.services():
            raise NotFoundError(
                f"service {service!r} was never deployed",
                hint="Run 'graven status' to list deployed services.",
            )

        def as_recorded(inst: InstanceStatus) -> InstanceStatus:
            handle = Handle(inst.pid, state.pid_start(inst.id))
            if engine.runtime.alive(handle):
                return inst
            return dataclasses.replace(inst, state="not running")

        services = tuple(
            dataclasses.replace(s, instances=tuple(as_recorded(i) for i in s.instances))
            for s in Api(engine, lambda: None).engine_status(service)
        )
        state_dir_view = None
        if state_dir.is_dir():  # as the controller reports it
            state_dir_view = from_json(
                StateDirView, engine.upkeep.disk.report(), "state dir report"
            )
    finally:
        state.close()
    return StatusView(
        services,
        controller=STOPPED,
        state_dir=state_dir_view,
        isolation=describe_isolation(engine.runtime),
    )


def stopped_plan(state_dir: Path, candidate: Mapping[str, object]) -> PreviewResult:
    """What ``POST /v1/plan`` answers for ``candidate``, planned from the records."""
    # As the controller would get it: the wire form (lists, not tuples).
    wire = json.loads(json.dumps(candidate))
    state = _state(state_dir)
    try:
        engine = _engine(state_dir, state)
        return engine.commands.preview(*Api(engine, lambda: None)._candidate(wire))
    finally:
        state.close()
