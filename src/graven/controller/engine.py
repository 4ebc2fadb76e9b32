"""The controller's engine: compares desired with observed state and acts.

Level-triggered: every pass starts from what the state store and the processes say
now, never from what the previous pass intended. That is what makes a controller
killed mid-rollout safe to restart: the next pass plans from the instances it finds
and carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graven.atomic import write_atomic
from graven.clock import Clock
from graven.controller.paths import secrets_dir
from graven.controller.secret_store import SecretStore
from graven.controller.upkeep import Upkeep, log_files
from graven.errors import GravenError, NotFoundError, RouterError, RuntimeFailure, UsageError
from graven.ledger.chain import LedgerEntry
from graven.ledger.store import Rollout, StateStore
from graven.model import (
    Digest,
    HealthCheck,
    Instance,
    Release,
    RolloutState,
    ServiceConfig,
    release_id,
)
from graven.netports import port_holder
from graven.plan.blue_green import BlueGreenStatus, plan_flip_back
from graven.plan.rolling import ObservedInstance, plan_rolling
from graven.plan.steps import (
    Analyze,
    AwaitHealthy,
    Drain,
    KeepWarm,
    Pause,
    Plan,
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
from graven.plan.strategy import plan_release
from graven.rollout.analysis import AnalysisThresholds, judge
from graven.rollout.health import probe as run_probe
from graven.router.base import Backend, BackendStats, Router
from graven.runtime.base import Handle, LaunchSpec, Runtime
from graven.store.cas import ContentStore

log = logging.getLogger("graven.controller")

CONTROLLER_ACTOR = "graven-controller"
ROUTER_HOST = "127.0.0.1"  # where routers listen

Probe = Callable[[Instance, HealthCheck], Awaitable[tuple[bool, str]]]

# Steps only weighted strategies use; the rest start, route, drain and stop instances.
_TRAFFIC_STEPS = (SetWeights, Pause, Analyze, SwitchTraffic, KeepWarm, RoutePreview, RecordProgress)
# Steps that wait on purpose (for a person, a timer or a traffic window): the progress
# deadline does not run while a rollout is in one of them.
_WAIT_STEPS = (Pause, Analyze, KeepWarm)

# Crash loops: the n-th consecutive unexpected death delays the replacement by
# BACKOFF_BASE * 2**(n-1) seconds, at most BACKOFF_MAX; instances that stay up for
# CRASH_RESET seconds end the loop. From CRASH_LOOP_AFTER deaths on it is shown as one.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
CRASH_RESET = 60.0
CRASH_LOOP_AFTER = 3
DEFAULT_PROGRESS_DEADLINE = 600.0


def backoff(restarts: int) -> float:
    """Seconds to wait before replacing an instance after ``restarts`` deaths in a row."""
    if restarts <= 0:
        return 0.0
    return float(min(BACKOFF_BASE * 2 ** min(restarts - 1, 30), BACKOFF_MAX))


class StepFailed(Exception):
    """A plan step could not complete; ``reason`` is written for humans. ``exit`` says
    how the instance ended when the step failed because it died."""

    def __init__(self, reason: str, *, exit: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit = exit


@dataclass
class HealthMemory:
    failures: int = 0  # consecutive failed probes
    last: str = ""
    checked_at: float = float("-inf")
    passing: bool | None = None  # the last probe's verdict; None: not probed since routing


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
        store: ContentStore,
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
        self.health: dict[str, HealthMemory] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self.listeners: list[Callable[[str], None]] = []
        self._head: tuple[int, str] | None = None  # the newest ledger head to write out
        self._head_scheduled = False
        self._head_lock = threading.Lock()
        # Why the last pass of a service could not do its work (shown by status).
        self.problems: dict[str, str] = {}
        self._waiting: set[str] = set()  # services whose rollout is in a wait step
        self._deadlines: dict[str, tuple[float, Rollout]] = {}  # the step being applied
        self.upkeep = Upkeep(state_dir)
        self.secrets = SecretStore(secrets_dir(state_dir))

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
                self.state.set_instance_state(
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
            tg.create_task(self._health_loop())

    def wake(self, service: str) -> None:
        worker = self.workers.get(service)
        if worker is None:
            worker = self.workers[service] = ServiceWorker()
            if self._tasks is not None:
                worker.task = self._tasks.create_task(self._service_loop(service, worker))
        worker.wake.set()

    # --- desired-state changes (called by the API) ---------------------------------------

    def _record(self, db: Any, entry: LedgerEntry) -> LedgerEntry:
        sealed = self.state.append_ledger(db, entry)
        return sealed

    def _write_head(self, entry: LedgerEntry) -> None:
        """Record the ledger's head (``entry``, just committed) outside the database:
        ``audit --verify`` checks it to catch entries deleted from the end.

        In the controller the file is written on a worker thread, so neither the API
        reply nor the service worker this change woke waits for its two fsyncs. A head
        one entry behind (a crash in between) is one the verifier accepts; the change
        itself is durable in the database already."""
        self._head = (entry.seq, entry.hash)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the controller's loop (tools, tests)
            self._flush_head()
            return
        if not self._head_scheduled:
            self._head_scheduled = True
            loop.run_in_executor(None, self._flush_head)

    def _flush_head(self) -> None:
        # Under the lock the newest head is read and written, so a slower thread never
        # writes an older head over a newer one.
        with self._head_lock:
            self._head_scheduled = False
            if self._head is None:
                return
            seq, digest = self._head
            path = self.state_dir / "ledger.head"
            try:
                write_atomic(path, json.dumps({"seq": seq, "hash": digest}).encode(), mode=0o600)
            except OSError as exc:
                # The next change writes it again; the ledger is safe in the database.
                log.error("cannot write %s: %s", path, exc)  # noqa: TRY400 - no traceback needed

    def deploy(
        self,
        service: str,
        image: Digest,
        image_name: str,
        config: ServiceConfig,
        actor: str,
        message: str,
        details: dict[str, Any],
    ) -> dict[str, Any]:
        self.store.get_image(image)  # refuse digests the store does not hold
        now = self.clock.now()
        content_hash = Release.hash_of(service, image, config)
        desired = self.state.desired_release(service)
        if desired is not None:
            current = self.state.release(service, desired)
            if current.content_hash == content_hash:
                # Same desired state again: nothing to do, nothing to record.
                running = self.state.running_rollout(service)
                return {
                    "changed": False,
                    "release": current.id,
                    "rollout": running.id if running else None,
                }
        with self.state.transaction() as db:
            release = self.state.add_release(db, service, image, image_name, config, now)
            rollout = self.state.start_rollout(db, service, "deploy", desired, release.number, now)
            self.state.set_desired(db, service, release.number, now)
            entry = self._record(
                db,
                LedgerEntry(
                    at=now,
                    actor=actor,
                    action="deploy",
                    service=service,
                    release=release.id,
                    image=str(image),
                    message=message,
                    details={**details, "image_name": image_name, "rollout": rollout},
                ),
            )
        self.wake(service)
        self._write_head(entry)
        return {"changed": True, "release": release.id, "rollout": rollout, "ledger": entry.seq}

    def rollback_target(self, service: str) -> int:
        desired = self.state.desired_release(service)
        if desired is None:
            raise UsageError(
                f"{service} is not deployed", hint=f"Run 'graven deploy {service}' first."
            )
        rows = self.state._query(
            "SELECT to_release FROM rollouts WHERE service=? AND state='succeeded' "
            "AND to_release IS NOT NULL AND to_release != ? ORDER BY id DESC LIMIT 1",
            (service, desired),
        )
        if not rows:
            raise UsageError(
                f"{service} has no earlier release that served healthily",
                hint=f"Run 'graven releases {service}' and pick one with --to.",
            )
        return int(rows[0]["to_release"])

    def rollback(self, service: str, to: int | None, actor: str, message: str) -> dict[str, Any]:
        if service not in self.state.services():
            raise NotFoundError(f"service {service!r} was never deployed")
        target = to if to is not None else self.rollback_target(service)
        release = self.state.release(service, target)
        desired = self.state.desired_release(service)
        if desired == target:
            running = self.state.running_rollout(service)
            return {
                "changed": False,
                "release": release.id,
                "rollout": running.id if running else None,
            }
        now = self.clock.now()
        with self.state.transaction() as db:
            rollout = self.state.start_rollout(db, service, "rollback", desired, target, now)
            self.state.set_desired(db, service, target, now)
            entry = self._record(
                db,
                LedgerEntry(
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
                ),
            )
        self.wake(service)
        self._write_head(entry)
        return {"changed": True, "release": release.id, "rollout": rollout, "ledger": entry.seq}

    def down(self, service: str, actor: str, message: str) -> dict[str, Any]:
        services = self.state.services()
        if service not in services:
            raise NotFoundError(f"service {service!r} was never deployed")
        desired = services[service]
        routers = self.router.running()
        if (
            desired is None
            and not self.state.live_instances(service)
            and service not in routers
            and f"{service}-preview" not in routers  # a router left over still goes
        ):
            return {"changed": False, "service": service, "rollout": None}
        now = self.clock.now()
        with self.state.transaction() as db:
            rollout = self.state.start_rollout(db, service, "down", desired, None, now)
            self.state.set_desired(db, service, None, now)
            entry = self._record(
                db,
                LedgerEntry(
                    at=now,
                    actor=actor,
                    action="down",
                    service=service,
                    release=release_id(service, desired) if desired else "",
                    message=message,
                    details={"rollout": rollout},
                ),
            )
        self.wake(service)
        self._write_head(entry)
        return {"changed": True, "service": service, "rollout": rollout, "ledger": entry.seq}

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
        if leaving is None or self.state.release_row(service, leaving) is None:
            return False
        return self.state.release(service, leaving).config.strategy.weighted

    def _status_rollout(self, service: str, desired: int) -> Rollout | None:
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
        return self._plan_with(
            service, desired, cfg, observed, weights, self._status_rollout(service, desired)
        )

    def _plan_with(
        self,
        service: str,
        desired: int,
        cfg: ServiceConfig,
        observed: list[ObservedInstance],
        weights: dict[str, int],
        ro: Rollout | None,
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

    def preview(self, service: str, image: Digest, config: ServiceConfig) -> dict[str, Any]:
        """What deploying ``image`` with ``config`` would do now; changes nothing."""
        content_hash = Release.hash_of(service, image, config)
        desired = self.state.desired_release(service)
        current = self.state.release(service, desired) if desired is not None else None
        if current is not None and current.content_hash == content_hash:
            return {"changed": False, "from": current.id, "steps": self.plan(service).to_dict()}
        numbers = [r.number for r, _ in self.state.releases(service)]
        nxt = max(numbers, default=0) + 1
        plan = self._plan_with(
            service, nxt, config, self.observe(service), self.state.weights(service), None
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
        return {
            "changed": True,
            "from": current.id if current else None,
            "to": release_id(service, nxt),
            "changes": changes,
            "steps": plan.to_dict(),
        }

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
                self.state.mark_release_healthy(service, desired, self.clock.now())
            if rollout is not None:
                self._finish(rollout.id, service, "succeeded", "")
            self.problems.pop(service, None)
            return
        starts = any(isinstance(st, StartInstance) for st in plan.steps)
        if rollout is None and starts and self.backoff_left(service) > 0:
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
                self.state.set_rollout_progress(
                    rollout.id, f"step {n}/{total}: {shown.describe(service)}", at=self.clock.now()
                )
            try:
                if waits:
                    self._waiting.add(service)
                    try:
                        await self.apply(service, step, slots)
                    finally:
                        self._waiting.discard(service)
                    if rollout is not None:  # the deadline counts from the end of a wait
                        self.state.update_rollout(rollout.id, progressed_at=self.clock.now())
                else:
                    await self._apply_within_deadline(service, step, slots, rollout)
            except StepFailed as exc:
                if rollout is None and isinstance(step, (StartInstance, AwaitHealthy)):
                    self._replacement_failed(service, exc.exit or exc.reason.splitlines()[0])
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
        self, service: str, step: Step, slots: dict[str, str], rollout: Rollout | None
    ) -> None:
        if rollout is None:
            await self.apply(service, step, slots)
            return
        rollout = self.state.rollout(rollout.id)  # progressed_at moved since the pass began
        left = max(self._deadline_left(rollout), 0.0)
        # Steps that poll (start-up health) look at this deadline on the clock; the
        # timeout catches a step stuck in a call that never returns.
        self._deadlines[service] = (self.clock.now() + left, rollout)
        try:
            async with asyncio.timeout(left):
                await self.apply(service, step, slots)
        except TimeoutError:
            raise StepFailed(self._deadline_reason(service, rollout)) from None
        finally:
            self._deadlines.pop(service, None)

    def _deadline_hit(self, service: str) -> str | None:
        """The reason to give up if the rollout of ``service`` is past its deadline."""
        at = self._deadlines.get(service)
        if at is None or self.clock.now() < at[0]:
            return None
        return self._deadline_reason(service, at[1])

    def _progress_deadline(self, rollout: Rollout) -> float:
        if rollout.to_release is None:
            return DEFAULT_PROGRESS_DEADLINE
        return self.state.release(rollout.service, rollout.to_release).config.progress_deadline

    def _deadline_left(self, rollout: Rollout) -> float:
        since = rollout.progressed_at if rollout.progressed_at is not None else rollout.started_at
        return since + self._progress_deadline(rollout) - self.clock.now()

    def _deadline_reason(self, service: str, rollout: Rollout) -> str:
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
        self.state.finish_rollout(rollout_id, state, reason, self.clock.now())
        self._notify(service)

    def _notify(self, service: str) -> None:
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
        with self.state.transaction() as db:
            if rollout_id is not None:
                db.execute(
                    "UPDATE rollouts SET state='failed', reason=?, finished_at=? WHERE id=?",
                    (reason, now, rollout_id),
                )
            if self.state.desired_release(service) == desired:
                self.state.set_desired(db, service, back, now)
            entry = self._record(
                db,
                LedgerEntry(
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
                ),
            )
        self.wake(service)
        self._write_head(entry)

    # --- applying steps ------------------------------------------------------------------

    async def apply(self, service: str, step: object, slots: dict[str, str]) -> None:
        if isinstance(step, _TRAFFIC_STEPS):
            await self.apply_traffic_step(service, bind_slots(step, slots))
        elif isinstance(step, StartInstance):
            slots[step.slot] = await self.start_instance(service, step.release)
        elif isinstance(step, AwaitHealthy):
            await self.await_healthy(slots.get(step.target, step.target))
        elif isinstance(step, RouteTraffic):
            inst_id = slots.get(step.target, step.target)
            self.state.set_instance_state(inst_id, "healthy")
            self.sync_router(service)
        elif isinstance(step, Drain):
            await self.drain(service, step.target)
        elif isinstance(step, StopInstance):
            await self.stop_instance(service, step.target, reason="replaced")
        else:
            raise TypeError(f"unknown step {step!r}")

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
                env=self.secrets.reveal_env(release.config.env),  # the values, only here
                port=port,
            )
            handle = await asyncio.to_thread(self.runtime.start, spec)
        except GravenError as exc:
            raise StepFailed(exc.message + (f" ({exc.hint})" if exc.hint else "")) from exc
        crashes = self.state.crashes(service)
        self.state.add_instance(
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
        row = self.state.instance_row(inst_id)
        if row is None:
            raise StepFailed(f"instance {inst_id} is unknown")
        inst = StateStore._instance(row)
        return inst, Handle(inst.pid, int(row["pid_start"]))

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
            if (late := self._deadline_hit(inst.service)) is not None:
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
        self.state.set_instance_state(inst_id, "draining")
        self.sync_router(service)
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
        self.state.set_instance_state(inst_id, "stopped", at=self.clock.now(), reason=reason)
        self.health.pop(inst_id, None)
        self.sync_router(service)
        log.info("stopped %s (%s)", inst_id, reason)

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

    # --- weighted strategies: traffic steps ------------------------------------------------

    async def _hold(self, service: str, seconds: float, until: Callable[[], bool]) -> bool:
        """Wait up to ``seconds`` (None-free) for ``until``; False when superseded."""
        desired = self.state.desired_release(service)
        deadline = self.clock.monotonic() + seconds
        while self.clock.monotonic() < deadline:
            if self.state.desired_release(service) != desired:
                return False
            if until():
                return True
            # Woken at once by a new desire (a rollback in the window must not wait a slice).
            worker = self.workers.get(service)
            slice_ = min(0.05, max(deadline - self.clock.monotonic(), 0.0))
            if worker is not None and not worker.wake.is_set():
                await self.clock.wait(worker.wake, slice_)
            else:
                await self.clock.sleep(slice_)
        return self.state.desired_release(service) == desired

    def _promoted(self, rollout_id: int) -> bool:
        return bool(self.state.rollout(rollout_id).promoted)

    async def _await_promote(self, service: str, rollout_id: int, why: str) -> bool:
        self.state.update_rollout(
            rollout_id, progress=f"paused: {why}; run 'graven promote {service}' to go on"
        )
        while not self._promoted(rollout_id):
            if not await self._hold(service, 3600.0, lambda: self._promoted(rollout_id)):
                return False
        return True

    async def apply_traffic_step(self, service: str, step: Step) -> None:
        """Steps of blue-green and canary plans (see ``graven.plan.steps``)."""
        desired = self.state.desired_release(service)
        ro = self.state.running_rollout(service)
        cfg = self.state.release(service, desired).config if desired is not None else None
        if isinstance(step, SetWeights):
            live = {i.id for i in self.state.live_instances(service)}
            self.state.set_weights({t: w for t, w in step.weights if t in live})
            self.sync_router(service)
        elif isinstance(step, RoutePreview):
            self.state.set_preview(step.target, True)
            if cfg is not None and cfg.preview_port is not None:
                await asyncio.to_thread(self.sync_preview, service, cfg.preview_port)
        elif isinstance(step, SwitchTraffic):
            self.state.set_weights(
                {
                    i.id: 100 if i.release == step.to_release else 0
                    for i in self.state.live_instances(service)
                    if i.state == "healthy"
                },
                clear_preview=True,
            )
            self.sync_router(service)
            if cfg is not None and cfg.preview_port is not None:
                await asyncio.to_thread(self.sync_preview, service, cfg.preview_port)
            if ro is not None and ro.to_release == step.to_release:
                # All live traffic is on the new release: the rollout has done its job;
                # what follows (the warm window, retiring the old set) is housekeeping.
                self.state.finish_switch(ro.id, service, step.to_release, self.clock.now())
                self._notify(service)
        elif isinstance(step, KeepWarm):
            await self._hold(service, step.until_seconds, lambda: False)
        elif isinstance(step, RecordProgress):
            if ro is not None:
                # A new step: its pause and analysis start from nothing.
                self.state.update_rollout(ro.id, step_index=step.step_index, gate=None)
        elif isinstance(step, Pause):
            if ro is None:
                return
            if step.seconds is None:
                if not await self._await_promote(service, ro.id, step.reason):
                    return
            else:
                gate = self._gate(ro)
                pause = gate.get("pause")
                if isinstance(pause, dict) and pause.get("done"):
                    return  # done before a restart; its promote flag was reset then
                until = ro.paused_until or self.clock.now() + step.seconds
                gate["pause"] = {"until": until, "done": False}
                self.state.update_rollout(ro.id, paused_until=until, gate=json.dumps(gate))
                held = await self._hold(
                    service,
                    max(until - self.clock.now(), 0.0),
                    lambda: (
                        self._promoted(ro.id) and cfg is not None and cfg.strategy.name == "canary"
                    ),
                )
                if not held:
                    return
                gate["pause"] = {"until": until, "done": True}
                done: dict[str, Any] = {"paused_until": None, "gate": json.dumps(gate)}
                if cfg is not None and cfg.strategy.name == "canary":
                    done["promoted"] = 0  # a promote moves one step
                self.state.update_rollout(ro.id, **done)  # both or neither, across a crash
                return
            if cfg is not None and cfg.strategy.name == "canary":
                self.state.update_rollout(ro.id, promoted=0)  # a promote moves one step
        elif isinstance(step, Analyze):
            await self.analyze(service, step, ro.id if ro else None)

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
        gate = self._gate(ro) if ro is not None else {}
        key = [step.canary_release, step.baseline_release, step.window]
        releases = {i.id: i.release for i in self.state.live_instances(service)}
        saved = gate.get("analysis")
        if isinstance(saved, dict) and saved.get("key") == key:
            started_at = float(saved["started_at"])
            start = [
                BackendStats(**{**b, "latency_buckets": tuple(b["latency_buckets"])})
                for b in saved["start"]
            ]
            releases = {**saved["releases"], **releases}
        else:
            start = await asyncio.to_thread(self.router.stats, service)
            started_at = self.clock.now()
            if ro is not None:
                gate["analysis"] = {
                    "key": key,
                    "started_at": started_at,
                    "start": [asdict(b) for b in start],
                    "releases": releases,
                }
                self.state.update_rollout(ro.id, gate=json.dumps(gate))
        left = max(started_at + step.window - self.clock.now(), 0.0)
        if not await self._hold(service, left, lambda: False):
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
            if await self._await_promote(service, rollout_id, why):
                self.state.update_rollout(rollout_id, promoted=0)

    def _gate(self, ro: Rollout) -> dict[str, Any]:
        """How far the current step's timed pause and analysis got (persisted, so a
        restarted controller neither repeats a finished pause nor restarts a window)."""
        try:
            gate = json.loads(ro.gate) if ro.gate else {}
        except ValueError:
            return {}
        return gate if isinstance(gate, dict) else {}

    # --- manual gates ----------------------------------------------------------------------

    def promote(self, service: str, actor: str, message: str) -> dict[str, Any]:
        ro = self.state.running_rollout(service)
        if ro is None:
            raise UsageError(
                f"{service} has no rollout in progress to promote",
                hint=f"Run 'graven status {service}' to see its last rollout.",
            )
        now = self.clock.now()
        # A rollout taking the service down has no release to promote to.
        to = release_id(service, ro.to_release) if ro.to_release is not None else ""
        with self.state.transaction() as db:
            db.execute("UPDATE rollouts SET promoted=1 WHERE id=?", (ro.id,))
            entry = self._record(
                db,
                LedgerEntry(
                    at=now,
                    actor=actor,
                    action="promote",
                    service=service,
                    release=to,
                    message=message,
                    details={"rollout": ro.id},
                ),
            )
        self.wake(service)
        self._write_head(entry)
        return {"service": service, "rollout": ro.id, "release": to}

    def abort(self, service: str, actor: str, message: str) -> dict[str, Any]:
        ro = self.state.running_rollout(service)
        if ro is None:
            raise UsageError(
                f"{service} has no rollout in progress to abort",
                hint=f"To go back to an earlier release, run 'graven rollback {service}'.",
            )
        now = self.clock.now()
        reason = f"aborted by {actor}: {message}"
        with self.state.transaction() as db:
            db.execute(
                "UPDATE rollouts SET state='aborted', reason=?, finished_at=? WHERE id=?",
                (reason, now, ro.id),
            )
            self.state.set_desired(db, service, ro.from_release, now)
            entry = self._record(
                db,
                LedgerEntry(
                    at=now,
                    actor=actor,
                    action="abort",
                    service=service,
                    release=release_id(service, ro.to_release) if ro.to_release is not None else "",
                    message=message,
                    details={
                        "rollout": ro.id,
                        "rolled_back_to": (
                            release_id(service, ro.from_release) if ro.from_release else None
                        ),
                    },
                ),
            )
        self.wake(service)
        self._write_head(entry)
        return {"service": service, "rollout": ro.id, "reason": reason}

    # --- crash loops ------------------------------------------------------------------------

    def _instance_died(self, inst: Instance, how: str) -> None:
        """``inst`` died on its own: record how, count it, and ledger its replacement."""
        now = self.clock.now()
        with self.state.transaction() as db:
            self.state.mark_stopped(db, inst.id, at=now, reason=f"died: {how}")
            restarts = self.state.record_crash(db, inst.service, how, now)
            entry = self._record(
                db,
                LedgerEntry(
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
                ),
            )
        self._write_head(entry)
        log.warning(
            "%s %s (restart %d, next start in %gs)", inst.id, how, restarts, backoff(restarts)
        )

    def _replacement_failed(self, service: str, how: str) -> None:
        """A replacement started while self-healing did not come up: one more crash."""
        with self.state.transaction() as db:
            self.state.record_crash(db, service, how, self.clock.now())

    def backoff_left(self, service: str) -> float:
        """Seconds until a dead instance of ``service`` may be replaced (0: now)."""
        crashes = self.state.crashes(service)
        if crashes.restarts == 0 or crashes.last_exit_at is None:
            return 0.0
        return crashes.last_exit_at + backoff(crashes.restarts) - self.clock.now()

    def _end_crash_loops(self) -> None:
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
                self.state.reset_crashes(service)
                log.info("%s: instances stayed up; crash loop over", service)

    # --- health after cut-over -----------------------------------------------------------

    async def _health_loop(self) -> None:
        passes = 0
        while True:
            passes += 1
            try:
                await self.check_health_once()
                if passes % 50 == 0:  # every ~5 s: cheap, and a reset is not urgent
                    self._end_crash_loops()
            except Exception as exc:
                if not self.upkeep.disk.refused(exc):  # a full disk is logged once, not here
                    log.exception("health loop")
            if passes % 10 == 1:  # about once a second: logs and free space move slowly
                self.keep_state_dir()
            await self.clock.sleep(0.1)

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

    async def check_health_once(self) -> None:
        checks = []
        for inst in self.state.live_instances():
            if inst.state != "healthy":
                continue
            mem = self.health.setdefault(inst.id, HealthMemory())
            checks.append((inst, mem))
        results = await asyncio.gather(*(self._check(inst, mem) for inst, mem in checks))
        for service in {s for s in results if s}:
            self.wake(service)

    async def _check(self, inst: Instance, mem: HealthMemory) -> str | None:
        handle = Handle(inst.pid, self.state.pid_start(inst.id))
        if not self.runtime.alive(handle):
            how = self.runtime.exit_reason(handle) or (
                "exited (status unknown: an earlier controller started it)"
            )
            self.runtime.forget(handle)
            self._instance_died(inst, how)
            self.sync_router(inst.service)
            return inst.service
        cfg = self.state.release(inst.service, inst.release).config
        now = self.clock.monotonic()
        if now - mem.checked_at < cfg.health.interval:
            return None
        mem.checked_at = now
        ok, reason = await self.probe(inst, cfg.health)
        mem.last = reason
        mem.passing = ok
        mem.failures = 0 if ok else mem.failures + 1
        if mem.failures >= cfg.health.unhealthy_threshold:
            self.state.set_instance_state(inst.id, "unhealthy", reason=f"health check: {reason}")
            self.sync_router(inst.service)
            log.warning("%s unhealthy: %s", inst.id, reason)
            return inst.service
        return None


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
