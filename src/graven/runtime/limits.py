"""Resource limits of process-based instances, enforced with control groups.

``CgroupLimits`` is what a runtime uses around its spawn:

- ``prepare`` creates the instance's groups (one per hierarchy, see
  :mod:`graven.runtime.cgroups`), writes its limits, and wraps the command line in a
  tiny shell shim that writes its own pid into each group's ``cgroup.procs`` and only
  then execs the rest. The instance's first process is in its groups before it runs
  any code of the image, so everything it ever forks is too: nothing escapes by
  forking, daemonizing or leaving the process group.
- ``explain`` turns an exit into its cause (``killed: out of memory (limit 32 MiB)``)
  from the groups' event counters, which survive the instance.
- ``release`` kills whatever is still in the groups (a child that left the process
  group) and removes them; ``sweep_cgroups`` removes the empty groups a crashed
  controller left behind.

A limit the machine cannot enforce (not root, no such controller) is not an error
here: ``support`` says which limits can be enforced and why the others cannot, and the
runtime writes that sentence into the instance's log when it starts it anyway.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from graven import detached
from graven.errors import RuntimeFailure
from graven.model import Resources
from graven.runtime.cgroups import (
    CONTROLLERS,
    GROUP_PARENT,
    CgroupLayout,
    Controller,
    LimitEvents,
    controllers_for,
    detect,
    explain_exit,
    group_dir,
    limit_writes,
    parse_keyed,
    parse_limit,
)

# Runs first: join each group named before "--", then become the rest of the command.
JOIN_SHIM: Final = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
)
_EMPTY_WAIT = 2.0  # seconds for killed leftovers to leave a group before it is removed


@dataclass(frozen=True)
class LimitSupport:
    """Whether one kind of limit can be enforced here, and if not, why."""

    controller: Controller
    enforced: bool
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"limit": self.controller, "enforced": self.enforced}
        if self.reason:
            out["reason"] = self.reason
        return out


def support(layout: CgroupLayout, *, root: bool | None = None) -> list[LimitSupport]:
    """For memory, pids and cpu: can this machine enforce the limit for an instance?"""
    is_root = os.geteuid() == 0 if root is None else root
    out = []
    for controller in CONTROLLERS:
        hierarchy = layout.of(controller)
        if hierarchy is None:
            out.append(LimitSupport(controller, False, layout.why_not(controller)))
        elif not is_root and not os.access(hierarchy.mount, os.W_OK):
            why = f"{hierarchy.mount} is not writable by uid {os.geteuid()}: run graven as root"
            out.append(LimitSupport(controller, False, why))
        else:
            out.append(LimitSupport(controller, True))
    return out


def unenforced(resources: Resources, supported: list[LimitSupport]) -> list[LimitSupport]:
    """The limits ``resources`` asks for that cannot be enforced here."""
    wanted = set(controllers_for(resources))
    return [s for s in supported if s.controller in wanted and not s.enforced]


@functools.cache
def machine_support() -> tuple[LimitSupport, ...]:
    """``support`` for this machine, probed once per process."""
    return tuple(support(detect()))


def limit_warnings(resources: Resources) -> tuple[str, ...]:
    """What ``graven status`` says of the limits ``resources`` asks that this machine
    cannot enforce (instances start without them)."""
    if not resources.limited:
        return ()
    return tuple(
        f"resources.{s.controller} is not enforced on this machine: {s.reason}"
        for s in unenforced(resources, list(machine_support()))
    )


class CgroupLimits:
    """Control groups of one state dir's instances (see the module docstring)."""

    def __init__(self, state_dir: Path, layout: CgroupLayout | None = None) -> None:
        self.state_dir = state_dir
        self.key = detached.short_name(state_dir.absolute())
        self.layout = detect() if layout is None else layout
        self.supported = support(self.layout)

    def groups(self, instance_id: str, controllers: list[Controller] | None = None) -> list[Path]:
        """The instance's group directories, one per distinct mount."""
        wanted = CONTROLLERS if controllers is None else controllers
        dirs: list[Path] = []
        for h in self.layout.hierarchies:
            if h.controller in wanted:
                d = group_dir(h, self.key, instance_id)
                if d not in dirs:
                    dirs.append(d)
        return dirs

    def prepare(self, instance_id: str, resources: Resources, argv: list[str]) -> list[str]:
        """Create and limit the instance's groups; ``argv`` wrapped to join them first.
        Unchanged when nothing is asked or nothing can be enforced."""
        enforced = {s.controller for s in self.supported if s.enforced}
        wanted = [c for c in controllers_for(resources) if c in enforced]
        if not wanted:
            return argv
        dirs = self.groups(instance_id, wanted)
        try:
            for d in dirs:
                self._make_group(d)
            for write in limit_writes(resources, self.layout):
                if write.controller not in wanted:
                    continue
                h = self.layout.of(write.controller)
                assert h is not None
                target = group_dir(h, self.key, instance_id) / write.file
                if write.optional and not target.exists():
                    continue
                target.write_text(write.value)
        except OSError as exc:
            self.release(instance_id)
            raise RuntimeFailure(
                f"{instance_id}: cannot set its resource limits: {exc.strerror or exc} "
                f"({exc.filename})",
                hint="'graven runtime' shows which limits this machine can enforce.",
            ) from exc
        return [
            "/bin/sh",
            "-c",
            JOIN_SHIM,
            "graven-limits",
            *(str(d / "cgroup.procs") for d in dirs),
            "--",
            *argv,
        ]

    def _make_group(self, d: Path) -> None:
        mount = d.parents[2]
        parent = mount / GROUP_PARENT
        if any(h.version == 2 and h.mount == mount for h in self.layout.hierarchies):
            # v2: a controller is usable in a group only if every ancestor enables it.
            used = " ".join(f"+{h.controller}" for h in self.layout.hierarchies if h.mount == mount)
            for level in (mount, parent, parent / self.key):
                level.mkdir(exist_ok=True)
                (level / "cgroup.subtree_control").write_text(used)
        d.mkdir(parents=True, exist_ok=True)

    def events(self, instance_id: str) -> LimitEvents:
        """What the kernel did to the instance because of its limits (zeros if its
        groups are gone or were never made)."""
        oom = forks = 0
        memory_limit = pids_limit = None
        if (h := self.layout.of("memory")) is not None:
            d = group_dir(h, self.key, instance_id)
            name, limit = (
                ("memory.oom_control", "memory.limit_in_bytes")
                if h.version == 1
                else ("memory.events", "memory.max")
            )
            oom = parse_keyed(_read(d / name)).get("oom_kill", 0)
            memory_limit = parse_limit(_read(d / limit))
        if (h := self.layout.of("pids")) is not None:
            d = group_dir(h, self.key, instance_id)
            forks = parse_keyed(_read(d / "pids.events")).get("max", 0)
            pids_limit = parse_limit(_read(d / "pids.max"))
        return LimitEvents(oom, memory_limit, forks, pids_limit)

    def explain(self, pid: int, how: str) -> str:
        """``how`` the instance whose first process was ``pid`` ended, with the limit
        that ended it when one did."""
        instance_id = self.instance_of_pid(pid)
        if instance_id is None:
            return how
        return explain_exit(how, self.events(instance_id))

    def instance_of_pid(self, pid: int) -> str | None:
        """The instance whose pid file names ``pid`` (each instance writes its own)."""
        for pid_file in (self.state_dir / "instances").glob("*/pid"):
            if pid in pids_named(_read(pid_file)):
                return pid_file.parent.name
        return None

    def release(self, instance_id: str) -> bool:
        """Kill what is left in the instance's groups and remove them; True when they
        are gone (or never existed)."""
        gone = True
        for d in self.groups(instance_id):
            gone = remove_group(d) and gone
            with contextlib.suppress(OSError):  # the state dir's level, once it is empty
                d.parent.rmdir()
        return gone

    def release_pid(self, pid: int) -> None:
        """``release`` the instance whose first process was ``pid``."""
        if (instance_id := self.instance_of_pid(pid)) is not None:
            self.release(instance_id)


def pids_named(text: str) -> set[int]:
    """The pids a pid file names: a bare pid per line (written by a shim), or
    bubblewrap's JSON status lines (``{"child-pid": N}``)."""
    found = set()
    for raw in text.splitlines():
        line = raw.strip()
        if line.isdigit():
            found.add(int(line))
        elif line.startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                child = json.loads(line).get("child-pid")
                if isinstance(child, int):
                    found.add(child)
    return found


def remove_group(d: Path, wait: float = _EMPTY_WAIT) -> bool:
    """SIGKILL every process in the group ``d``, then remove it; True once it is gone."""
    if not d.is_dir():
        return True
    kill = d / "cgroup.kill"
    deadline = time.monotonic() + wait
    while True:
        pids = _pids_in(d)
        if not pids:
            break
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    try:
        d.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # still busy: the sweep at the next controller start tries again
    return True


def sweep_cgroups(state_dir: Path, layout: CgroupLayout | None = None) -> list[Path]:
    """Remove this state dir's empty instance groups (left by a controller that died):
    run at controller start, before it starts anything. The groups removed."""
    layout = detect() if layout is None else layout
    key = detached.short_name(state_dir.absolute())
    removed: list[Path] = []
    for mount in {h.mount for h in layout.hierarchies}:
        base = mount / GROUP_PARENT / key
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            if _pids_in(d):
                continue
            with contextlib.suppress(OSError):
                d.rmdir()
                removed.append(d)
    return removed


def _pids_in(d: Path) -> list[int]:
    return [int(p) for p in _read(d / "cgroup.procs").split() if p.isdigit()]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
