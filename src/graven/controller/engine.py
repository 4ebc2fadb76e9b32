"""The controller's engine: compares desired with observed state and acts.

Level-triggered: every pass starts from what the state store and the processes say
now, never from what the previous pass intended. That is what makes a controller
killed mid-rollout safe to restart: the next pass plans from the instances it finds
and carries on.

The engine runs one worker per service (plan, then apply step by step within the
progress deadline) and owns what the rest use: the router's backend sets. Around it:
``controller.commands`` records desired-state changes, ``rollout.apply`` applies each
step (``rollout.gates`` its waits), ``controller.health_watch`` probes routed instances
and paces crash loops, and ``ledger.head`` writes the ledger head.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from graven.clock import Clock
from graven.controller.commands import Commands
from graven.controller.health_watch import CONTROLLER_ACTOR, HealthWatch
from graven.controller.paths import secrets_dir
from graven.controller.secret_store import SecretStore
from graven.controller.upkeep import Upkeep, log_files
from graven.errors import GravenError, RouterError
from graven.ledger.chain import LedgerEntry
from graven.ledger.head import LedgerHead
from graven.ledger.state import RolloutRecord, StateStore, StateTransaction
from graven.model import RolloutState, ServiceConfig, release_id
from graven.netports import port_holder
from graven.plan.blue_green import BlueGreenStatus, plan_flip_back
from graven.plan.rolling import ObservedInstance, plan_rolling
from graven.plan.steps import (
    Analyze,
    AwaitHealthy,
    KeepWarm,
    Pause,
    Plan,
    StartInstance,
    Step,
    bind_slots,
)
from graven.plan.strategy import plan_release
from graven.rollout.apply import Applier, Probe
from graven.rollout.failure import StepFailed
from graven.rollout.health import probe as run_probe
from graven.router.base import Backend, Router
from graven.runtime.base import Handle, Runtime
from graven.store.base import ImageStore

log = logging.getLogger("graven.controller")

ROUTER_HOST = "127.0.0.1"  # where routers listen

# Steps that wait on purpose (for a person, a timer or a traffic window): the progress
# deadline does not run while a rollout is in one of them.
_WAIT_STEPS = (Pause, Analyze, KeepWarm)
DEFAULT_PROGRESS_DEADLINE = 600.0


@dataclass
class ServiceWorker:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Engine:
    """Desired state in, effects out. One worker task per service."""

    def __init__(
        self,
        state_dir: Path,
        state: StateStore,
        store: ImageStore,
        runtime: Runtime,
        router: Router,
        clock: Clock,
        probe: Probe = run_probe,
    ) -> None:
        self.probe = probe
        self.state_dir = state_dir
        self.state = state
        self.store = store
        self.runtime = runtime
        self.router = router
        self.clock = clock
        self.workers: dict[str, ServiceWorker] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self.listeners: list[Callable[[str], None]] = []
        # Why the last pass of a service could not do its work (shown by status).
        self.problems: dict[str, str] = {}
        self._waiting: set[str] = set()  # services whose rollout is in a wait step
        self._deadlines: dict[str, tuple[float, RolloutRecord]] = {}  # the step being applied
        self.upkeep = Upkeep(state_dir)
        self.secrets = SecretStore(secrets_dir(state_dir))
        self.head = LedgerHead(state_dir)
        self.commands = Commands(self)
        self.health_watch = HealthWatch(self)
        self.applier = Applier(
            state, store, runtime, router, clock, probe, self.secrets.reveal_env, self
        )

    # --- start-up ------------------------------------------------------------------------

    def adopt(self) -> None:
        """Reconcile the records with the processes that really run (after a restart)."""
        recorded = self.state.instance_ids()
        for inst_id, handle in self.runtime.orphans(recorded):
            # Started, never recorded, never routed: the controller died in between.
            log.warning("stopping %s (pid %d): started but never recorded", inst_id, handle.pid)
            self.runtime.stop(handle, 5.0)
        for inst in self.state.live_instances():
            handle = Handle(inst.pid, self.state.pid_start(inst.id))
            if self.runtime.alive(handle):
                log.info("adopted %s (pid %d)", inst.id, inst.pid)
            else:
                with self.state.transaction() as tx:
                    tx.set_instance_state(
                        inst.id, "stopped", at=self.clock.now(), reason="not running at start-up"
                    )
        for service, release in self.state.services().items():
            if release is not None:
                self.sync_router(service)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            for service in self.state.services():
                self.wake(service)
            tg.create_task(self.health_watch.loop())

    def wake(self, service: str) -> None:
        worker = self.workers.get(service)
        if worker is None:
            worker = self.workers[service] = ServiceWorker()
            if self._tasks is not None:
                worker.task = self._tasks.create_task(self._service_loop(service, worker))
        worker.wake.set()

    def wake_event(self, service: str) -> asyncio.Event | None:
        worker = self.workers.get(service)
        return worker.wake if worker is not None else None

    # --- the per-service loop ------------------------------------------------------------

    async def _service_loop(self, service: str, worker: ServiceWorker) -> None:
        while True:
            try:
                async with asyncio.timeout(2.0):
                    await worker.wake.wait()
            except TimeoutError:
                pass
            worker.wake.clear()
            try:
                await self.reconcile(service)
            except GravenError as exc:
                log.error("%s: %s", service, exc.message)  # noqa: TRY400 - expected, no traceback
                self.problems[service] = exc.message
                self._overdue(service)
                await self.clock.sleep(1.0)
            except Exception as exc:
                if self.upkeep.disk.refused(exc):  # a full disk is logged once, not here
                    self.problems[service] = f"cannot write the state dir: {exc}"
                else:
                    log.exception("%s: reconcile failed", service)
                    self.problems[service] = f"internal error: {exc!r} (see controller.log)"
                self._overdue(service)
                await self.clock.sleep(1.0)

    def observe(self, service: str) -> list[ObservedInstance]:
        return [
            ObservedInstance(i.id, i.release, i.state) for i in self.state.live_instances(service)
        ]

    def _returning(self, service: str, desired: int) -> bool:
        """Is the service going back (rollback, abort, failed rollout) from a release
        rolled out with traffic weights? Then going back is a traffic switch."""
        last = self.state.last_rollout(service)
        if last is None:
            return False
        if last.kind == "rollback" and last.to_release == desired:
            leaving = last.from_release
        elif last.state in ("failed", "aborted") and last.from_release == desired:
            leaving = last.to_release
        else:
            return False
        if leaving is None or self.state.release_record(service, leaving) is None:
            return False
        return self.state.release(service, leaving).config.strategy.weighted

    def _status_rollout(self, service: str, desired: int) -> RolloutRecord | None:
        """The rollout that brought ``desired``: its persisted status drives re-planning."""
        last = self.state.last_rollout(service)
        return last if last is not None and last.to_release == desired else None

    def plan(self, service: str) -> Plan:
        desired = self.state.desired_release(service)
        observed = self.observe(service)
        if desired is None:
            return plan_rolling(service, None, 0, observed)
        cfg = self.state.release(service, desired).config
        weights = self.state.weights(service)
        if self._returning(service, desired):
            return plan_flip_back(service, desired, cfg.replicas, observed, weights=weights)
        return self.plan_with(
            service, desired, cfg, observed, weights, self._status_rollout(service, desired)
        )

    def plan_with(
        self,
        service: str,
        desired: int,
        cfg: ServiceConfig,
        observed: list[ObservedInstance],
        weights: dict[str, int],
        ro: RolloutRecord | None,
    ) -> Plan:
        """The plan of ``cfg``'s strategy toward release ``desired``."""
        return plan_release(
            service,
            desired,
            cfg,
            observed,
            weights=weights,
            status=BlueGreenStatus(
                promoted=bool(ro.promoted) if ro else False,
                switched_at=ro.switched_at if ro else None,
            ),
            step_index=ro.step_index if ro else 0,
            now=self.clock.now(),
        )

    async def reconcile(self, service: str) -> None:
        """One level-triggered pass: plan from what is, apply until done or superseded."""
        desired = self.state.desired_release(service)
        if desired is not None:
            cfg = self.state.release(service, desired).config
            try:
                await asyncio.to_thread(self.router.ensure, service, cfg.port)
            except GravenError as exc:
                # A router that cannot listen (the port is taken) fails the rollout at
                # once: no retry fixes it until someone frees the port.
                rollout = self.state.running_rollout(service)
                reason = await asyncio.to_thread(self._router_failure, service, cfg.port, exc)
                if rollout is None:
                    raise RouterError(reason) from exc
                self._fail(service, desired, rollout.id, reason)
                return
        plan = self.plan(service)
        rollout = self.state.running_rollout(service)
        if plan.empty:
            await asyncio.to_thread(self._retire_preview, service)
            if desired is None:
                await asyncio.to_thread(self.router.stop, service)
            elif rollout is not None:
                with self.state.transaction() as tx:
                    tx.mark_release_healthy(service, desired, self.clock.now())
            if rollout is not None:
                self._finish(rollout.id, service, "succeeded", "")
            self.problems.pop(service, None)
            return
        starts = any(isinstance(st, StartInstance) for st in plan.steps)
        if rollout is None and starts and self.health_watch.backoff_left(service) > 0:
            # Self-healing after instances died waits out the crash loop's back-off
            # (status shows the loop and when the next start is).
            return
        slots: dict[str, str] = {}
        total = len(plan.steps)
        for n, step in enumerate(plan.steps, start=1):
            if self.state.desired_release(service) != desired:
                return  # superseded: the next pass plans toward the new desire
            waits = isinstance(step, _WAIT_STEPS)
            if rollout is not None:
                if not waits and self._overdue(service):
                    return
                shown = bind_slots(step, slots)
                # Written before every step, so it does not wait for the disk: the next
                # pass re-plans from what runs anyway.
                with self.state.transaction(durable=False) as tx:
                    tx.set_rollout_progress(
                        rollout.id,
                        progress=f"step {n}/{total}: {shown.describe(service)}",
                        progressed_at=self.clock.now(),
                    )
            try:
                if waits:
                    self._waiting.add(service)
                    try:
                        await self.applier.apply(service, step, slots)
                    finally:
                        self._waiting.discard(service)
                    if rollout is not None:  # the deadline counts from the end of a wait
                        with self.state.transaction() as tx:
                            tx.set_rollout_progress(rollout.id, progressed_at=self.clock.now())
                else:
                    await self._apply_within_deadline(service, step, slots, rollout)
            except StepFailed as exc:
                if rollout is None and isinstance(step, (StartInstance, AwaitHealthy)):
                    self.health_watch.replacement_failed(
                        service, exc.exit or exc.reason.splitlines()[0]
                    )
                self._fail(service, desired, rollout.id if rollout else None, exc.reason)
                return
        self.problems.pop(service, None)
        # A preview route outlives no preview set: an abort or a down retires the new
        # set without the switch that would otherwise stop it.
        await asyncio.to_thread(self._retire_preview, service)
        self.wake(service)  # verify convergence on the next pass

    def _router_failure(self, service: str, port: int, exc: GravenError) -> str:
        """Why the router of ``service`` could not start, naming who holds its port."""
        holder = port_holder(ROUTER_HOST, port)
        if holder is None or self.router.running().get(service) == port:
            return exc.message + (f"; {exc.hint}" if exc.hint else "")
        who = f"pid {holder.pid}" if holder.pid is not None else "the process that holds it"
        return (
            f"the router of {service} cannot listen: {holder.describe()}. Stop {who}, or "
            f"give {service} another port in graven.yaml, then deploy again"
        )

    async def _apply_within_deadline(
        self, service: str, step: Step, slots: dict[str, str], rollout: RolloutRecord | None
    ) -> None:
        if rollout is None:
            await self.applier.apply(service, step, slots)
            return
        rollout = self.state.rollout(rollout.id)  # progressed_at moved since the pass began
        left = max(self._deadline_left(rollout), 0.0)
        # Steps that poll (start-up health) look at this deadline on the clock; the
        # timeout catches a step stuck in a call that never returns.
        self._deadlines[service] = (self.clock.now() + left, rollout)
        try:
            async with asyncio.timeout(left):
                await self.applier.apply(service, step, slots)
        except TimeoutError:
            raise StepFailed(self._deadline_reason(service, rollout)) from None
        finally:
            self._deadlines.pop(service, None)

    def deadline_hit(self, service: str) -> str | None:
        """The reason to give up if the rollout of ``service`` is past its deadline."""
        at = self._deadlines.get(service)
        if at is None or self.clock.now() < at[0]:
            return None
        return self._deadline_reason(service, at[1])

    def _progress_deadline(self, rollout: RolloutRecord) -> float:
        if rollout.to_release is None:
            return DEFAULT_PROGRESS_DEADLINE
        return self.state.release(rollout.service, rollout.to_release).config.progress_deadline

    def _deadline_left(self, rollout: RolloutRecord) -> float:
        since = rollout.progressed_at if rollout.progressed_at is not None else rollout.started_at
        return since + self._progress_deadline(rollout) - self.clock.now()

    def _deadline_reason(self, service: str, rollout: RolloutRecord) -> str:
        current = self.state.rollout(rollout.id)
        reason = (
            f"no progress for {self._progress_deadline(rollout):g}s (the progress deadline) "
            f"at {current.progress or 'its first step'}"
        )
        if problem := self.problems.get(service):
            reason += f"; last error: {problem}"
        return (
            f"{reason}. Find the cause in 'graven status {service}' and the instance logs; "
            "raise the service's progress_deadline if it needs longer"
        )

    def _overdue(self, service: str) -> bool:
        """Fail the running rollout if it made no progress within its deadline."""
        rollout = self.state.running_rollout(service)
        if rollout is None or service in self._waiting or self._deadline_left(rollout) > 0:
            return False
        self._fail(service, rollout.to_release, rollout.id, self._deadline_reason(service, rollout))
        return True

    def _finish(self, rollout_id: int, service: str, state: RolloutState, reason: str) -> None:
        with self.state.transaction() as tx:
            tx.finish_rollout(rollout_id, state, reason, self.clock.now())
        self.notify(service)

    def notify(self, service: str) -> None:
        """Tell the listeners that a rollout of ``service`` ended."""
        for listener in self.listeners:
            listener(service)

    def _fail(self, service: str, desired: int | None, rollout_id: int | None, reason: str) -> None:
        """A rollout step failed: record why and go back to the release that served before."""
        now = self.clock.now()
        rollout = self.state.rollout(rollout_id) if rollout_id else None
        back = rollout.from_release if rollout else None
        if rollout is None or rollout.kind == "down":
            # Self-healing or taking down: nothing to roll back to; try again next pass.
            log.error("%s: %s", service, reason)
            return
        failing = rollout.id

        def failed(tx: StateTransaction) -> LedgerEntry:
            tx.finish_rollout(failing, "failed", reason, now, running_only=False)
            if self.state.desired_release(service) == desired:
                tx.set_desired(service, back, now)
            return LedgerEntry(
                at=now,
                actor=CONTROLLER_ACTOR,
                action="rollout-failed",
                service=service,
                release=release_id(service, desired) if desired else "",
                message=reason,
                details={
                    "rollout": rollout_id,
                    "rolled_back_to": release_id(service, back) if back else None,
                },
            )

        self.commands.record(service, failed)

    def sync_router(self, service: str) -> None:
        """Push the router's backend set as the state store says it should be."""
        if self.state.desired_release(service) is None and not self.state.live_instances(service):
            return
        weights = self.state.weights(service)
        backends = []
        for inst in self.state.live_instances(service):
            if inst.state == "healthy":
                backends.append(Backend(inst.id, inst.address, "ready", weights.get(inst.id, 100)))
            elif inst.state == "draining":
                backends.append(Backend(inst.id, inst.address, "drain", 0))
        if service not in self.router.running():
            return
        self.router.set_backends(service, backends)

    def _retire_preview(self, service: str) -> None:
        """Stop ``service``'s preview router when no instance is left behind it."""
        name = f"{service}-preview"
        if name in self.router.running() and not self.state.preview_instances(service):
            self.router.stop(name)

    def sync_preview(self, service: str, port: int) -> None:
        """The preview route: the new set of a blue-green rollout, before the switch."""
        name = f"{service}-preview"
        preview = set(self.state.preview_instances(service))
        if not preview:
            self.router.stop(name)
            return
        self.router.ensure(name, port)
        self.router.set_backends(
            name,
            [
                Backend(i.id, i.address, "ready")
                for i in self.state.live_instances(service)
                if i.id in preview
            ],
        )

    def instance_stopped(self, inst_id: str) -> None:
        self.health_watch.memory.pop(inst_id, None)

    # --- state dir upkeep ------------------------------------------------------------------

    def keep_state_dir(self) -> None:
        """Bound the logs of live instances and routers; watch the state dir's space."""
        try:
            instances = [inst.id for inst in self.state.live_instances()]
            logs = log_files(self.runtime, instances) + log_files(
                self.router, sorted(self.state.services())
            )
            self.upkeep.pass_once(logs)
        except Exception as exc:
            if not self.upkeep.disk.refused(exc):
                log.exception("state dir upkeep")
