"""A fake Runtime for fast controller tests: instances are records, not processes.

It holds to the Runtime contract (``graven.testing.contracts.runtime``) as the process
runtime does: handles carry a start time that ``alive`` and ``stop`` check, a stop
leaves an exit reason (SIGTERM, or SIGKILL for an instance that ignores it), and only
started instances have a log.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from graven.errors import RuntimeFailure
from graven.model import HealthCheck, Instance
from graven.runtime.base import Handle, LaunchSpec


@dataclass
class FakeRuntime:
    """Starts instances as records. Tests decide which are healthy and which die.

    ``healthy_ports`` answers the fake health probe; ``fail_start`` makes the next
    ``start`` raise; ``kill(pid)`` simulates a crash; instances whose id is in
    ``ignores_sigterm`` end only by SIGKILL when stopped.
    """

    started: list[LaunchSpec] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    running: dict[int, LaunchSpec] = field(default_factory=dict)
    healthy_ports: set[int] = field(default_factory=set)
    unhealthy_releases: set[int] = field(default_factory=set)
    ignores_sigterm: set[str] = field(default_factory=set)
    fail_start: bool = False
    exits: dict[int, str] = field(default_factory=dict)
    _next_pid: int = 1000
    _start_times: dict[int, int] = field(default_factory=dict)
    _logged: set[str] = field(default_factory=set)

    def start(self, spec: LaunchSpec) -> Handle:
        if self.fail_start:
            raise RuntimeFailure(f"{spec.instance_id}: cannot start (fake failure)")
        self._next_pid += 1
        pid = self._next_pid
        self.started.append(spec)
        self.running[pid] = spec
        self.exits.pop(pid, None)
        # Like a kernel start time: a pid's next life has another one.
        self._start_times[pid] = len(self.started)
        self._logged.add(spec.instance_id)
        if spec.release not in self.unhealthy_releases:
            self.healthy_ports.add(spec.port)
        return Handle(pid=pid, pid_start=self._start_times[pid])

    def alive(self, handle: Handle) -> bool:
        return handle.pid in self.running and self._start_times.get(handle.pid) == handle.pid_start

    def stop(self, handle: Handle, grace: float) -> None:
        if not self.alive(handle):
            return
        spec = self.running.pop(handle.pid)
        self.stopped.append(handle.pid)
        self.healthy_ports.discard(spec.port)
        ignored = spec.instance_id in self.ignores_sigterm
        self.exits[handle.pid] = "killed by SIGKILL" if ignored else "killed by SIGTERM"

    def kill(self, pid: int, how: str = "exited with code 1") -> None:
        spec = self.running.pop(pid)
        self.healthy_ports.discard(spec.port)
        self.exits[pid] = how

    def orphans(self, recorded: Collection[str]) -> list[tuple[str, Handle]]:
        return [
            (spec.instance_id, Handle(pid, self._start_times[pid]))
            for pid, spec in self.running.items()
            if spec.instance_id not in recorded
        ]

    def exit_reason(self, handle: Handle) -> str:
        return self.exits.get(handle.pid, "")

    def forget(self, handle: Handle) -> None:
        self.exits.pop(handle.pid, None)

    def log_tail(self, instance_id: str, lines: int = 20) -> str:
        return f"(fake log of {instance_id})" if instance_id in self._logged else ""

    async def probe(self, instance: Instance, check: HealthCheck) -> tuple[bool, str]:
        """Stands in for the health probe."""
        return (True, "HTTP 200") if instance.port in self.healthy_ports else (False, "HTTP 503")
