"""A model of the controller applying weighted plans (blue-green, canary), checking the
invariants every strategy owes after each step. The traffic semantics are the ones
``graven.plan.steps`` documents."""

from __future__ import annotations

from dataclasses import dataclass, field

from graven.plan.rolling import ObservedInstance
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
)


@dataclass
class World:
    """What runs, the router's weight table, and what the controller persists."""

    replicas: int
    fleet: dict[str, ObservedInstance]
    table: dict[str, int] = field(default_factory=dict)
    clock: float = 0.0
    promoted: bool = False
    switched_at: float | None = None
    step_index: int = 0
    preview: set[str] = field(default_factory=set)
    floor: int = 0
    started: set[str] = field(default_factory=set)  # instances plans started
    applied: list[Step] = field(default_factory=list)
    _ids: int = 0

    @classmethod
    def of(cls, replicas: int, observed: list[ObservedInstance], table: dict[str, int]) -> World:
        world = cls(replicas, {i.id: i for i in observed}, dict(table))
        world.floor = min(replicas, world.serving())
        return world

    # --- views ----------------------------------------------------------------------------

    def observed(self) -> list[ObservedInstance]:
        return list(self.fleet.values())

    def weight(self, inst_id: str) -> int:
        return self.table.get(inst_id, 100)

    def routed(self, release: int | None = None) -> list[ObservedInstance]:
        return [
            i
            for i in self.fleet.values()
            if i.state == "healthy" and (release is None or i.release == release)
        ]

    def serving(self) -> int:
        return sum(1 for i in self.routed() if self.weight(i.id) > 0)

    def share(self, release: int) -> float:
        total = sum(self.weight(i.id) for i in self.routed())
        assert total > 0, "no live traffic goes anywhere"
        return 100 * sum(self.weight(i.id) for i in self.routed(release)) / total

    def live(self) -> int:
        return sum(1 for i in self.fleet.values() if i.state != "draining")

    def summary(self) -> list[tuple[int, str, int]]:
        """(release, state, weight) of every instance, sorted."""
        return sorted((i.release, i.state, self.weight(i.id)) for i in self.fleet.values())

    # --- applying -------------------------------------------------------------------------

    def run(
        self, plan: Plan, slots: dict[str, str] | None = None, limit: int | None = None
    ) -> None:
        slots = {} if slots is None else slots
        for step in plan.steps[:limit]:
            self.apply(step, slots)

    def _id(self, target: str, slots: dict[str, str]) -> str:
        return slots.get(target, target)

    def apply(self, step: Step, slots: dict[str, str]) -> None:
        self.applied.append(step)
        if isinstance(step, StartInstance):
            self._ids += 1
            new_id = f"n{self._ids}"
            slots[step.slot] = new_id
            self.started.add(new_id)
            self.fleet[new_id] = ObservedInstance(new_id, step.release, "starting")
            assert self.live() <= 2 * self.replicas, "surged above twice the replicas"
        elif isinstance(step, AwaitHealthy):
            inst = self.fleet[self._id(step.target, slots)]
            assert inst.state in ("starting", "healthy")
        elif isinstance(step, RouteTraffic):
            key = self._id(step.target, slots)
            inst = self.fleet[key]
            assert inst.state in ("starting", "healthy")
            self.fleet[key] = ObservedInstance(key, inst.release, "healthy")
        elif isinstance(step, SetWeights):
            for target, weight in step.weights:
                key = self._id(target, slots)
                assert key in self.fleet, f"weight for an unknown target {target}"
                assert 0 <= weight <= 1000
                self.table[key] = weight
        elif isinstance(step, RoutePreview):
            key = self._id(step.target, slots)
            assert self.fleet[key].state == "healthy", "previewed an unrouted instance"
            self.preview.add(key)
        elif isinstance(step, SwitchTraffic):
            for inst in self.routed():
                self.table[inst.id] = 100 if inst.release == step.to_release else 0
            self.switched_at = self.clock
        elif isinstance(step, Drain):
            inst = self.fleet[step.target]
            self.fleet[step.target] = ObservedInstance(inst.id, inst.release, "draining")
        elif isinstance(step, StopInstance):
            inst = self.fleet.pop(step.target)
            assert inst.state != "healthy", "stopped an instance that was still routed"
            self.table.pop(inst.id, None)
            self.preview.discard(inst.id)
        elif isinstance(step, KeepWarm):
            self.clock += step.until_seconds
        elif isinstance(step, Pause):
            if step.seconds is None:
                self.promoted = True  # the operator promotes
            else:
                self.clock += step.seconds
        elif isinstance(step, Analyze):
            self.clock += step.window
        elif isinstance(step, RecordProgress):
            # Steps go forward; partial steps are skipped only once nothing else serves.
            assert step.step_index > self.step_index, "repeated a canary step"
            self.step_index = step.step_index
        else:
            raise AssertionError(f"unknown step {step!r}")
        # Traffic only ever goes to healthy instances (the router holds no others), and
        # never fewer of them serve than the floor.
        assert self.serving() >= self.floor, (
            f"{self.serving()} serving, below the floor of {self.floor} after {step}"
        )
