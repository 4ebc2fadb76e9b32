"""Applies plan steps: one handler per step type, looked up by the step's type.

A plan (``graven.plan``) is pure data; this module turns each of its steps into
effects on the runtime, the router and the state store. A step type without a
handler is refused at once (``tests/unit/test_rollout_apply.py`` holds every step
type in ``graven.plan.steps`` to one).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from graven.clock import Clock
from graven.errors import GravenError, InternalError, RuntimeFailure
from graven.ledger.state import RolloutGate, StateStore
from graven.model import HealthCheck, Instance
from graven.plan.steps import (
    Analyze,
    AwaitHealthy,
    Drain,
    KeepWarm,
    Pause,
    RecordProgress,
    RoutePreview,
    RouteTraffic,
    SetWeights,
    StartInstance,
    Step,
    StopInstance,
    SwitchTraffic,
    bind_slots,
)
from graven.rollout.failure import StepFailed
from graven.rollout.gates import GateHost, Gates
from graven.router.base import Router
from graven.runtime.base import Handle, LaunchSpec, Runtime
from graven.store.base import ImageStore

log = logging.getLogger("graven.controller")

Probe = Callable[[Instance, HealthCheck], Awaitable[tuple[bool, str]]]
Env = tuple[tuple[str, str], ...]
Slots = dict[str, str]  # slot name -> the instance started for it
_Handler = Callable[[str, Any, Slots], Awaitable[None]]


class RolloutHost(GateHost, Protocol):
    """What applying steps needs of the controller that runs the rollout."""

    def sync_router(self, service: str) -> None:
        """Push the router's backend set as the state store says it should be."""
        ...

    def sync_preview(self, service: str, port: int) -> None:
        """Push the preview route's backend set."""
        ...

    def deadline_hit(self, service: str) -> str | None:
        """Why to give up now if the rollout of ``service`` is past its deadline."""
        ...

    def notify(self, service: str) -> None:
        """A rollout of ``service`` has done its job."""
        ...

    def instance_stopped(self, inst_id: str) -> None:
        """``inst_id`` is stopped: forget what was watched of it."""
        ...


class Applier:
    """Applies one plan step at a time for the controller."""

    def __init__(
        self,
        state: StateStore,
        store: ImageStore,
        runtime: Runtime,
        router: Router,
        clock: Clock,
        probe: Probe,
        reveal_env: Callable[[Env], Env],
        host: RolloutHost,
    ) -> None:
        self.state = state
        self.store = store
        self.runtime = runtime
        self.router = router
        self.clock = clock
        self.probe = probe
        self.reveal_env = reveal_env
        self.host = host
        self.gates = Gates(state, router, clock, host)
        self.handlers: Mapping[type, _Handler] = {
            StartInstance: self._start,
            AwaitHealthy: self._await_healthy,
            RouteTraffic: self._route,
            Drain: self._drain,
            StopInstance: self._stop,
            SetWeights: self._set_weights,
            RoutePreview: self._route_preview,
            SwitchTraffic: self._switch,
            KeepWarm: self._keep_warm,
            RecordProgress: self._record_progress,
            Pause: self._pause,
            Analyze: self._analyze,
        }

    async def apply(self, service: str, step: Step, slots: Slots) -> None:
        """Apply ``step`` of ``service``'s plan; a started instance binds its slot."""
        handler = self.handlers.get(type(step))
        if handler is None:
            raise InternalError(f"no handler for plan step {step!r}")
        await handler(service, bind_slots(step, slots), slots)

    # --- instances ---------------------------------------------------------------------

    async def _start(self, service: str, step: StartInstance, slots: Slots) -> None:
        slots[step.slot] = await self.start_instance(service, step.release)

    async def _await_healthy(self, service: str, step: AwaitHealthy, slots: Slots) -> None:
        await self.await_healthy(step.target)

    async def _route(self, service: str, step: RouteTraffic, slots: Slots) -> None:
        with self.state.transaction() as tx:
            tx.set_instance_state(step.target, "healthy")
        self.host.sync_router(service)

    async def _drain(self, service: str, step: Drain, slots: Slots) -> None:
        await self.drain(service, step.target)

    async def _stop(self, service: str, step: StopInstance, slots: Slots) -> None:
        await self.stop_instance(service, step.target, reason="replaced")

    def _free_port(self) -> int:
        used = {i.port for i in self.state.live_instances()}
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in used:
                return port
        raise RuntimeFailure("no free loopback port for a new instance")

    async def start_instance(self, service: str, number: int) -> str:
        release = self.state.release(service, number)
        image = self.store.get_image(release.image)
        inst_id = Instance.new_id(service, number, secrets.token_hex(2))
        port = self._free_port()
        try:
            spec = LaunchSpec(
                instance_id=inst_id,
                service=service,
                release=number,
                image=image,
                env=self.reveal_env(release.config.env),  # the values, only here
                port=port,
                resources=release.config.resources,
                volumes=release.config.volumes,
                tmpfs=release.config.tmpfs,
                isolation=release.config.isolation,
            )
            handle = await asyncio.to_thread(self.runtime.start, spec)
        except GravenError as exc:
            raise StepFailed(exc.message + (f" ({exc.hint})" if exc.hint else "")) from exc
        crashes = self.state.crashes(service)
        with self.state.transaction() as tx:
            tx.add_instance(
                Instance(
                    id=inst_id,
                    service=service,
                    release=number,
                    image=release.image,
                    host=spec.host,
                    port=port,
                    pid=handle.pid,
                    started_at=self.clock.now(),
                    state="starting",
                    restarts=crashes.restarts,
                    last_exit=crashes.last_exit,
                ),
                handle.pid_start,
            )
        log.info("started %s (pid %d, port %d)", inst_id, handle.pid, port)
        return inst_id

    def _handle(self, inst_id: str) -> tuple[Instance, Handle]:
        record = self.state.instance(inst_id)
        if record is None:
            raise StepFailed(f"instance {inst_id} is unknown")
        inst = record.instance
        return inst, Handle(inst.pid, record.pid_start)

    async def await_healthy(self, inst_id: str) -> None:
        inst, handle = self._handle(inst_id)
        cfg = self.state.release(inst.service, inst.release).config
        hc = cfg.health
        deadline = self.clock.monotonic() + hc.start_timeout
        streak = 0
        reason = "never answered"
        while self.clock.monotonic() < deadline:
            if not self.runtime.alive(handle):
                tail = self.runtime.log_tail(inst_id)
                how = self.runtime.exit_reason(handle) or "exited"
                self.runtime.forget(handle)
                await self.stop_instance(inst.service, inst_id, reason=f"{how} while starting")
                raise StepFailed(
                    f"{inst_id} {how} before it became healthy; last log lines:\n{tail}",
                    exit=f"{how} while starting",
                )
            if (late := self.host.deadline_hit(inst.service)) is not None:
                await self.stop_instance(inst.service, inst_id, reason="progress deadline")
                raise StepFailed(late)
            ok, reason = await self.probe(inst, hc)
            streak = streak + 1 if ok else 0
            if streak >= hc.healthy_threshold:
                return
            # Probe eagerly while starting: a fast boot should not wait a whole interval.
            await self.clock.sleep(min(hc.interval, 0.1) if not ok else hc.interval)
        await self.stop_instance(inst.service, inst_id, reason="failed its start-up health check")
        raise StepFailed(
            f"{inst_id} did not pass health check GET {hc.path} within "
            f"{hc.start_timeout:g}s (last result: {reason})"
        )

    async def drain(self, service: str, inst_id: str) -> None:
        inst, _ = self._handle(inst_id)
        cfg = self.state.release(service, inst.release).config
        with self.state.transaction() as tx:
            tx.set_instance_state(inst_id, "draining")
        self.host.sync_router(service)
        deadline = self.clock.monotonic() + cfg.drain_timeout
        while self.clock.monotonic() < deadline:
            stats = await asyncio.to_thread(self.router.stats, service)
            if not any(s.id == inst_id and s.inflight > 0 for s in stats):
                return
            await self.clock.sleep(0.05)
        log.warning("%s: drain timeout reached with requests in flight", inst_id)

    async def stop_instance(self, service: str, inst_id: str, *, reason: str) -> None:
        inst, handle = self._handle(inst_id)
        cfg = self.state.release(service, inst.release).config
        if inst.state == "healthy":
            # Never stop a routed instance: drain it first.
            await self.drain(service, inst_id)
        await asyncio.to_thread(self.runtime.stop, handle, cfg.stop_grace)
        with self.state.transaction() as tx:
            tx.set_instance_state(inst_id, "stopped", at=self.clock.now(), reason=reason)
        self.host.instance_stopped(inst_id)
        self.host.sync_router(service)
        log.info("stopped %s (%s)", inst_id, reason)

    # --- weighted strategies: traffic steps ----------------------------------------------

    def _preview_port(self, service: str) -> int | None:
        """The preview port of the desired release (None: none)."""
        desired = self.state.desired_release(service)
        if desired is None:
            return None
        return self.state.release(service, desired).config.preview_port

    async def _set_weights(self, service: str, step: SetWeights, slots: Slots) -> None:
        live = {i.id for i in self.state.live_instances(service)}
        with self.state.transaction() as tx:
            tx.set_weights({t: w for t, w in step.weights if t in live})
        self.host.sync_router(service)

    async def _route_preview(self, service: str, step: RoutePreview, slots: Slots) -> None:
        with self.state.transaction() as tx:
            tx.set_preview(step.target, True)
        if port := self._preview_port(service):
            await asyncio.to_thread(self.host.sync_preview, service, port)

    async def _switch(self, service: str, step: SwitchTraffic, slots: Slots) -> None:
        ro = self.state.running_rollout(service)
        port = self._preview_port(service)
        with self.state.transaction() as tx:
            tx.set_weights(
                {
                    i.id: 100 if i.release == step.to_release else 0
                    for i in self.state.live_instances(service)
                    if i.state == "healthy"
                },
                clear_preview=True,
            )
        self.host.sync_router(service)
        if port:
            await asyncio.to_thread(self.host.sync_preview, service, port)
        if ro is not None and ro.to_release == step.to_release:
            # All live traffic is on the new release: the rollout has done its job;
            # what follows (the warm window, retiring the old set) is housekeeping.
            # When it switched (the rollback window starts), the release's first
            # healthy time, and the rollout's success: one change.
            now = self.clock.now()
            with self.state.transaction() as tx:
                tx.set_rollout_switched(ro.id, now)
                tx.mark_release_healthy(service, step.to_release, now)
                tx.finish_rollout(ro.id, "succeeded", "", now)
            self.host.notify(service)

    async def _keep_warm(self, service: str, step: KeepWarm, slots: Slots) -> None:
        await self.gates.hold(service, step.until_seconds, lambda: False)

    async def _record_progress(self, service: str, step: RecordProgress, slots: Slots) -> None:
        if (ro := self.state.running_rollout(service)) is not None:
            # A new step: its pause and analysis start from nothing.
            with self.state.transaction() as tx:
                tx.set_rollout_step(ro.id, step.step_index)
                tx.set_rollout_gate(ro.id, RolloutGate())

    async def _pause(self, service: str, step: Pause, slots: Slots) -> None:
        desired = self.state.desired_release(service)
        cfg = self.state.release(service, desired).config if desired is not None else None
        await self.gates.pause(service, step, self.state.running_rollout(service), cfg)

    async def _analyze(self, service: str, step: Analyze, slots: Slots) -> None:
        ro = self.state.running_rollout(service)
        await self.gates.analyze(service, step, ro.id if ro else None)
