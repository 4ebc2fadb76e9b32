"""Health after cut-over: probes of routed instances, deaths and crash-loop back-off.

An instance that dies on its own is recorded (with how it ended) and replaced by the
next reconcile pass; consecutive deaths delay each replacement longer, so a service
that cannot stay up does not spin.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graven.ledger.chain import LedgerEntry
from graven.ledger.state import StateTransaction
from graven.model import Instance, release_id
from graven.runtime.base import Handle

if TYPE_CHECKING:
    from graven.controller.engine import Engine

log = logging.getLogger("graven.controller")

CONTROLLER_ACTOR = "graven-controller"

# Crash loops: the n-th consecutive unexpected death delays the replacement by
# BACKOFF_BASE * 2**(n-1) seconds, at most BACKOFF_MAX; instances that stay up for
# CRASH_RESET seconds end the loop. From CRASH_LOOP_AFTER deaths on it is shown as one.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
CRASH_RESET = 60.0
CRASH_LOOP_AFTER = 3


def backoff(restarts: int) -> float:
    """Seconds to wait before replacing an instance after ``restarts`` deaths in a row."""
    if restarts <= 0:
        return 0.0
    return float(min(BACKOFF_BASE * 2 ** min(restarts - 1, 30), BACKOFF_MAX))


@dataclass
class HealthMemory:
    failures: int = 0  # consecutive failed probes
    last: str = ""
    checked_at: float = float("-inf")
    passing: bool | None = None  # the last probe's verdict; None: not probed since routing


class HealthWatch:
    """Probes the engine's routed instances and counts their deaths."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state = engine.state
        self.clock = engine.clock
        self.memory: dict[str, HealthMemory] = {}  # instance id -> its probes so far

    async def loop(self) -> None:
        passes = 0
        while True:
            passes += 1
            try:
                await self.check_once()
                if passes % 50 == 0:  # every ~5 s: cheap, and a reset is not urgent
                    self.end_crash_loops()
            except Exception as exc:
                if not self.engine.upkeep.disk.refused(exc):  # a full disk is logged once
                    log.exception("health loop")
            if passes % 10 == 1:  # about once a second: logs and free space move slowly
                self.engine.keep_state_dir()
            await self.clock.sleep(0.1)

    async def check_once(self) -> None:
        checks = []
        for inst in self.state.live_instances():
            if inst.state != "healthy":
                continue
            mem = self.memory.setdefault(inst.id, HealthMemory())
            checks.append((inst, mem))
        results = await asyncio.gather(*(self._check(inst, mem) for inst, mem in checks))
        for service in {s for s in results if s}:
            self.engine.wake(service)

    async def _check(self, inst: Instance, mem: HealthMemory) -> str | None:
        runtime = self.engine.runtime
        handle = Handle(inst.pid, self.state.pid_start(inst.id))
        if not runtime.alive(handle):
            how = runtime.exit_reason(handle) or (
                "exited (status unknown: an earlier controller started it)"
            )
            runtime.forget(handle)
            self.instance_died(inst, how)
            self.engine.sync_router(inst.service)
            return inst.service
        cfg = self.state.release(inst.service, inst.release).config
        now = self.clock.monotonic()
        if now - mem.checked_at < cfg.health.interval:
            return None
        mem.checked_at = now
        ok, reason = await self.engine.probe(inst, cfg.health)
        mem.last = reason
        mem.passing = ok
        mem.failures = 0 if ok else mem.failures + 1
        if mem.failures >= cfg.health.unhealthy_threshold:
            with self.state.transaction() as tx:
                tx.set_instance_state(inst.id, "unhealthy", reason=f"health check: {reason}")
            self.engine.sync_router(inst.service)
            log.warning("%s unhealthy: %s", inst.id, reason)
            return inst.service
        return None

    # --- crash loops ---------------------------------------------------------------------

    def instance_died(self, inst: Instance, how: str) -> None:
        """``inst`` died on its own: record how, count it, and ledger its replacement."""
        now = self.clock.now()
        restarts = 0

        def died(tx: StateTransaction) -> LedgerEntry:
            nonlocal restarts
            tx.set_instance_state(inst.id, "stopped", at=now, reason=f"died: {how}")
            restarts = tx.record_crash(inst.service, how, now)
            return LedgerEntry(
                at=now,
                actor=CONTROLLER_ACTOR,
                action="instance-died",
                service=inst.service,
                release=release_id(inst.service, inst.release),
                image=str(inst.image),
                message=f"{inst.id} {how}; it is replaced by a new instance",
                details={
                    "instance": inst.id,
                    "exit": how,
                    "restarts": restarts,
                    "backoff_seconds": backoff(restarts),
                },
            )

        # The caller wakes the service once it has pushed the router's new set.
        self.engine.commands.record(inst.service, died, wake=False)
        log.warning(
            "%s %s (restart %d, next start in %gs)", inst.id, how, restarts, backoff(restarts)
        )

    def replacement_failed(self, service: str, how: str) -> None:
        """A replacement started while self-healing did not come up: one more crash."""
        with self.state.transaction() as tx:
            tx.record_crash(service, how, self.clock.now())

    def backoff_left(self, service: str) -> float:
        """Seconds until a dead instance of ``service`` may be replaced (0: now)."""
        crashes = self.state.crashes(service)
        if crashes.restarts == 0 or crashes.last_exit_at is None:
            return 0.0
        return crashes.last_exit_at + backoff(crashes.restarts) - self.clock.now()

    def end_crash_loops(self) -> None:
        """A service whose instances all stayed healthy for CRASH_RESET seconds since its
        last death is out of its crash loop: the next death starts the back-off anew."""
        now = self.clock.now()
        for service in self.state.services():
            crashes = self.state.crashes(service)
            if crashes.restarts == 0 or crashes.last_exit_at is None:
                continue
            if now - crashes.last_exit_at < max(CRASH_RESET, backoff(crashes.restarts)):
                continue
            live = self.state.live_instances(service)
            if live and all(i.state == "healthy" for i in live):
                with self.state.transaction() as tx:
                    tx.reset_crashes(service)
                log.info("%s: instances stayed up; crash loop over", service)
