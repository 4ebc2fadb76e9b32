"""The gates of a rollout: timed pauses, manual promotes and the analysis window.

A gate's progress is persisted with the rollout (the ``gate`` record), so a restarted
controller neither repeats a finished pause nor restarts an analysis window: it waits
only what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from graven.clock import Clock
from graven.ledger.state import (
    AnalysisGate,
    PauseGate,
    RolloutGate,
    RolloutRecord,
    StateStore,
)
from graven.model import ServiceConfig
from graven.plan.steps import Analyze, Pause
from graven.rollout.analysis import AnalysisThresholds, judge
from graven.rollout.failure import StepFailed
from graven.router.base import Router

log = logging.getLogger("graven.controller")


class GateHost(Protocol):
    """What a gate needs of the controller that runs the rollout."""

    def wake_event(self, service: str) -> asyncio.Event | None:
        """The event set when ``service`` has new desired state (None: no worker)."""
        ...


class Gates:
    """Waits of a rollout that a person, a timer or a traffic window ends."""

    def __init__(self, state: StateStore, router: Router, clock: Clock, host: GateHost) -> None:
        self.state = state
        self.router = router
        self.clock = clock
        self.host = host

    async def hold(self, service: str, seconds: float, until: Callable[[], bool]) -> bool:
        """Wait up to ``seconds`` for ``until``; False when superseded."""
        desired = self.state.desired_release(service)
        deadline = self.clock.monotonic() + seconds
        while self.clock.monotonic() < deadline:
            if self.state.desired_release(service) != desired:
                return False
            if until():
                return True
            # Woken at once by a new desire (a rollback in the window must not wait a slice).
            wake = self.host.wake_event(service)
            slice_ = min(0.05, max(deadline - self.clock.monotonic(), 0.0))
            if wake is not None and not wake.is_set():
                await self.clock.wait(wake, slice_)
            else:
                await self.clock.sleep(slice_)
        return self.state.desired_release(service) == desired

    def promoted(self, rollout_id: int) -> bool:
        return self.state.rollout(rollout_id).promoted

    async def await_promote(self, service: str, rollout_id: int, why: str) -> bool:
        """Hold until ``graven promote``; False when superseded."""
        with self.state.transaction() as tx:
            tx.set_rollout_progress(
                rollout_id, progress=f"paused: {why}; run 'graven promote {service}' to go on"
            )
        while not self.promoted(rollout_id):
            if not await self.hold(service, 3600.0, lambda: self.promoted(rollout_id)):
                return False
        return True

    async def pause(
        self, service: str, step: Pause, ro: RolloutRecord | None, cfg: ServiceConfig | None
    ) -> None:
        """A timed pause, or one until ``graven promote`` (``step.seconds`` None)."""
        if ro is None:
            return
        canary = cfg is not None and cfg.strategy.name == "canary"
        if step.seconds is None:
            if not await self.await_promote(service, ro.id, step.reason):
                return
        else:
            gate = ro.gate
            if gate.pause is not None and gate.pause.done:
                return  # done before a restart; its promote flag was reset then
            until = ro.paused_until or self.clock.now() + step.seconds
            with self.state.transaction() as tx:
                tx.set_rollout_pause(ro.id, until)
                tx.set_rollout_gate(ro.id, replace(gate, pause=PauseGate(until)))
            held = await self.hold(
                service,
                max(until - self.clock.now(), 0.0),
                lambda: self.promoted(ro.id) and canary,
            )
            if not held:
                return
            with self.state.transaction() as tx:  # all or nothing, across a crash
                tx.set_rollout_pause(ro.id, None)
                tx.set_rollout_gate(ro.id, replace(gate, pause=PauseGate(until, done=True)))
                if canary:
                    tx.set_rollout_promoted(ro.id, False)  # a promote moves one step
            return
        if canary:
            with self.state.transaction() as tx:
                tx.set_rollout_promoted(ro.id, False)  # a promote moves one step

    async def analyze(self, service: str, step: Analyze, rollout_id: int | None) -> None:
        """Judge the canary's traffic against the baseline's over ``step.window``.

        The window's start (time, router counters, instance releases) is persisted, so
        a restarted controller waits only what is left of it and judges the whole window.
        """
        desired = self.state.desired_release(service)
        cfg = self.state.release(service, desired).config if desired is not None else None
        if cfg is None:
            return
        ro = self.state.rollout(rollout_id) if rollout_id is not None else None
        gate = ro.gate if ro is not None else RolloutGate()
        releases = {i.id: i.release for i in self.state.live_instances(service)}
        saved = gate.analysis
        if saved is not None and saved.matches(
            step.canary_release, step.baseline_release, step.window
        ):
            started_at = saved.started_at
            start = list(saved.start)
            releases = {**dict(saved.releases), **releases}
        else:
            start = await asyncio.to_thread(self.router.stats, service)
            started_at = self.clock.now()
            if ro is not None:
                window = AnalysisGate(
                    canary_release=step.canary_release,
                    baseline_release=step.baseline_release,
                    window=step.window,
                    started_at=started_at,
                    start=tuple(start),
                    releases=tuple(releases.items()),
                )
                with self.state.transaction() as tx:
                    tx.set_rollout_gate(ro.id, replace(gate, analysis=window))
        left = max(started_at + step.window - self.clock.now(), 0.0)
        if not await self.hold(service, left, lambda: False):
            return
        end = await asyncio.to_thread(self.router.stats, service)
        releases.update({i.id: i.release for i in self.state.live_instances(service)})
        verdict = judge(
            start,
            end,
            releases,
            canary_release=step.canary_release,
            baseline_release=step.baseline_release,
            thresholds=AnalysisThresholds(
                max_error_rate=cfg.analysis.max_error_rate,
                max_p99_seconds=cfg.analysis.max_p99,
                min_requests=cfg.analysis.min_requests,
            ),
        )
        log.info("%s: analysis %s: %s", service, verdict.outcome, "; ".join(verdict.reasons))
        if verdict.outcome == "fail":
            raise StepFailed("analysis failed: " + "; ".join(verdict.reasons))
        if verdict.outcome == "inconclusive" and rollout_id is not None:
            why = "analysis inconclusive (" + "; ".join(verdict.reasons) + ")"
            if await self.await_promote(service, rollout_id, why):
                with self.state.transaction() as tx:
                    tx.set_rollout_promoted(rollout_id, False)
