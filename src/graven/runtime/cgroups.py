"""Control groups, as data: where each controller lives, what to write to limit an
instance, and how to read back what the kernel did. No I/O here except ``detect``,
which reads ``/proc/self/mounts`` and the cgroup2 root's ``cgroup.controllers``.

graven uses three controllers: ``memory``, ``pids`` and ``cpu``. On a cgroup v1 (or
hybrid) machine each is its own mount (``/sys/fs/cgroup/memory``...); on a cgroup v2
machine they are listed in the unified hierarchy's ``cgroup.controllers``. A controller
bound to a v1 mount is never also usable in v2, so each one is taken from wherever it
is. An instance's group is ``graven/<state key>/<instance id>`` under each mount: the
state key (a hash of the state dir) keeps two state dirs on one machine from sweeping
each other's groups.

File contents per version:

    limit    cgroup v1                                   cgroup v2
    memory   memory.limit_in_bytes, memory.memsw.*       memory.max, memory.swap.max = 0
    pids     pids.max                                    pids.max
    cpu      cpu.cfs_period_us, cpu.cfs_quota_us         cpu.max = "QUOTA PERIOD"

What happened is read from ``memory.oom_control`` (v1, ``oom_kill N``) or
``memory.events`` (v2), and ``pids.events`` (``max N``: forks refused) in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from graven.disk import human_size
from graven.model import Resources

Controller = Literal["memory", "pids", "cpu"]
CONTROLLERS: Final[tuple[Controller, ...]] = ("memory", "pids", "cpu")
CPU_PERIOD_US: Final = 100_000
MIN_CPU_QUOTA_US: Final = 1_000  # the kernel refuses a smaller quota
GROUP_PARENT: Final = "graven"


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller can be used: its mount and the cgroup version."""

    controller: Controller
    mount: Path
    version: Literal[1, 2]


@dataclass(frozen=True)
class CgroupLayout:
    """The controllers this machine mounts, and why the others cannot be used."""

    hierarchies: tuple[Hierarchy, ...] = ()
    missing: tuple[tuple[Controller, str], ...] = ()

    def of(self, controller: Controller) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.controller == controller), None)

    def why_not(self, controller: Controller) -> str:
        return dict(self.missing).get(controller, "")

    @property
    def version(self) -> str:
        """``v1``, ``v2``, ``hybrid`` (both in use) or ``none``, for reports."""
        versions = {h.version for h in self.hierarchies}
        if not versions:
            return "none"
        return "hybrid" if len(versions) == 2 else f"v{versions.pop()}"


def parse_mounts(text: str) -> tuple[dict[Controller, Path], Path | None]:
    """From ``/proc/self/mounts`` text: the v1 mount of each of our controllers, and the
    cgroup2 mount (or None)."""
    v1: dict[Controller, Path] = {}
    unified: Path | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, fstype, options = _unescape(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup2" and unified is None:
            unified = Path(mount)
        elif fstype == "cgroup":
            for name in CONTROLLERS:
                if name in options and name not in v1:
                    v1[name] = Path(mount)
    return v1, unified


def layout_of(
    v1: Mapping[Controller, Path], unified: Path | None, v2_controllers: Iterable[str]
) -> CgroupLayout:
    """Which hierarchy serves each controller (pure; ``detect`` supplies the facts)."""
    in_v2 = set(v2_controllers)
    found: list[Hierarchy] = []
    missing: list[tuple[Controller, str]] = []
    for name in CONTROLLERS:
        if name in v1:
            found.append(Hierarchy(name, v1[name], 1))
        elif unified is not None and name in in_v2:
            found.append(Hierarchy(name, unified, 2))
        elif unified is not None:
            missing.append((name, f"the {name} controller is not enabled in {unified}"))
        else:
            missing.append((name, f"no {name} cgroup is mounted (neither v1 nor v2)"))
    return CgroupLayout(tuple(found), tuple(missing))


def detect(
    mounts: Path = Path("/proc/self/mounts"),
    read: Callable[[Path], str] = lambda p: p.read_text(),
) -> CgroupLayout:
    """The layout of this machine's cgroups (an empty one if /proc cannot be read)."""
    try:
        v1, unified = parse_mounts(read(mounts))
    except OSError:
        return CgroupLayout(
            missing=tuple((c, "/proc/self/mounts cannot be read") for c in CONTROLLERS)
        )
    available: list[str] = []
    if unified is not None:
        try:
            available = read(unified / "cgroup.controllers").split()
        except OSError:
            available = []
    return layout_of(v1, unified, available)


def _unescape(field: str) -> str:
    # /proc/self/mounts writes a space as \040, a tab as \011 and so on.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


# --- what to write ----------------------------------------------------------------------


@dataclass(frozen=True)
class LimitWrite:
    """One value written to one file of an instance's group; ``optional`` files are
    written only where the kernel has them (swap accounting may be off)."""

    controller: Controller
    file: str
    value: str
    optional: bool = False


def cpu_quota_us(cores: float, period_us: int = CPU_PERIOD_US) -> int:
    """Microseconds of CPU time per period for ``cores`` cores."""
    return max(MIN_CPU_QUOTA_US, round(cores * period_us))


def limit_writes(resources: Resources, layout: CgroupLayout) -> list[LimitWrite]:
    """The files to write, in order, to give a group the ``resources`` limits, for the
    controllers the layout has (the caller reports the others)."""
    writes: list[LimitWrite] = []
    memory, pids, cpu = layout.of("memory"), layout.of("pids"), layout.of("cpu")
    if resources.memory is not None and memory is not None:
        size = str(resources.memory)
        if memory.version == 1:
            # memsw (memory + swap) may not be below the memory limit: memory first.
            writes.append(LimitWrite("memory", "memory.limit_in_bytes", size))
            writes.append(LimitWrite("memory", "memory.memsw.limit_in_bytes", size, optional=True))
        else:
            writes.append(LimitWrite("memory", "memory.max", size))
            writes.append(LimitWrite("memory", "memory.swap.max", "0", optional=True))
    if resources.pids is not None and pids is not None:
        writes.append(LimitWrite("pids", "pids.max", str(resources.pids)))
    if resources.cpu is not None and cpu is not None:
        quota = str(cpu_quota_us(resources.cpu))
        if cpu.version == 1:
            writes.append(LimitWrite("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
            writes.append(LimitWrite("cpu", "cpu.cfs_quota_us", quota))
        else:
            writes.append(LimitWrite("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
    return writes


def controllers_for(resources: Resources) -> list[Controller]:
    """The controllers the ``resources`` limits need."""
    wanted = {"memory": resources.memory, "pids": resources.pids, "cpu": resources.cpu}
    return [c for c in CONTROLLERS if wanted[c] is not None]


def group_dir(hierarchy: Hierarchy, state_key: str, instance_id: str) -> Path:
    return hierarchy.mount / GROUP_PARENT / state_key / instance_id


# --- what happened ----------------------------------------------------------------------


def parse_keyed(text: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``key value`` per line) as numbers; others dropped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def parse_limit(text: str) -> int | None:
    """A limit file's value (``max`` and v1's huge "unlimited" are None)."""
    value = text.split(maxsplit=1)[0] if text.split() else ""
    if not value.isdigit() or int(value) >= 2**62:
        return None
    return int(value)


@dataclass(frozen=True)
class LimitEvents:
    """What the kernel did to an instance because of its limits."""

    oom_kills: int = 0
    memory_limit: int | None = None
    forks_refused: int = 0
    pids_limit: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {
            "oom_kills": self.oom_kills,
            "memory_limit": self.memory_limit,
            "forks_refused": self.forks_refused,
            "pids_limit": self.pids_limit,
        }


def mebibytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / (1024 * 1024):g} MiB" if n >= 1024 * 1024 else human_size(n)


def explain_exit(how: str, events: LimitEvents) -> str:
    """``how`` an instance ended (``killed by SIGKILL``...), told in terms of the limit
    that ended it when one did: ``killed: out of memory (limit 32 MiB)``."""
    parts: list[str] = []
    if events.oom_kills:
        limit = f"limit {mebibytes(events.memory_limit)}"
        if how in ("", "killed by SIGKILL"):
            parts.append(f"killed: out of memory ({limit})")
            how = ""
        else:
            killed = "1 process" if events.oom_kills == 1 else f"{events.oom_kills} processes"
            parts.append(f"out of memory: {killed} killed ({limit})")
    if events.forks_refused:
        limit_text = "?" if events.pids_limit is None else str(events.pids_limit)
        parts.append(f"fork refused: pids limit {limit_text} reached")
    if how:
        parts.insert(0, how)
    return "; ".join(parts)
