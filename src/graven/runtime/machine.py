"""What this machine offers instances: which runtimes run here, and which isolation
features and resource limits they can use, each with a plain sentence and a fix when
it is missing. ``graven runtime`` shows the report; ``graven check`` warns with it.

``probe_machine`` gathers the facts (runs ``bwrap`` and ``runc --version`` once, reads
/proc and the cgroup mounts); ``report_of`` turns facts into the report and is pure,
so every sentence is tested on made-up machines.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from graven.errors import SpecProblem
from graven.runtime.cgroups import CgroupLayout, detect
from graven.runtime.limits import LimitSupport, support
from graven.runtime.runc import find_init, find_runc

if TYPE_CHECKING:
    from graven.spec.loader import LoadedSpec

_PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class MachineFacts:
    """The raw facts the report is made of."""

    root: bool
    bwrap: str | None = None  # path, when found
    bwrap_error: str = ""  # why a trial sandbox failed ("" when it worked)
    sealing: str = ""  # how the process runtime isolates, in its own words
    sealed: bool = False
    sealing_probed: bool = False  # the process runtime can seal here, if the machine allows
    runc: str | None = None
    runc_version: str = ""
    runc_error: str = ""
    runc_init: str | None = None  # tini-static, the init runc instances run under
    max_user_namespaces: int | None = None
    overlayfs: bool = False
    cgroups: CgroupLayout = field(default_factory=CgroupLayout)
    limits: tuple[LimitSupport, ...] = ()


@dataclass(frozen=True)
class Feature:
    """One thing the machine has or lacks; ``fix`` says what to do when it lacks it."""

    name: str
    available: bool
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "available": self.available,
            "detail": self.detail,
        }
        if self.fix:
            out["fix"] = self.fix
        return out


@dataclass(frozen=True)
class MachineReport:
    runtimes: tuple[Feature, ...]
    features: tuple[Feature, ...]
    cgroups: str  # v1, v2, hybrid, none

    def feature(self, name: str) -> Feature | None:
        return next((f for f in (*self.runtimes, *self.features) if f.name == name), None)

    def to_dict(self) -> dict[str, object]:
        return {
            "runtimes": [f.to_dict() for f in self.runtimes],
            "features": [f.to_dict() for f in self.features],
            "cgroups": self.cgroups,
        }


def report_of(facts: MachineFacts) -> MachineReport:
    """The report of a machine with these facts (pure)."""
    process = Feature("process", True, "instances run as host processes from the image")
    if facts.runc is None:
        runc = Feature(
            "runc", False, "runc is not installed", "apt-get install runc (and run graven as root)"
        )
    elif facts.runc_error:
        runc = Feature(
            "runc",
            False,
            f"{facts.runc} does not run: {facts.runc_error}",
            "reinstall runc (apt-get install --reinstall runc)",
        )
    elif not facts.root:
        runc = Feature(
            "runc", False, f"{facts.runc_version} found, but it needs root", "run graven as root"
        )
    elif facts.runc_init is None:
        runc = Feature(
            "runc",
            False,
            f"{facts.runc_version} found, but tini-static (the instances' init) is not",
            "apt-get install tini",
        )
    else:
        runc = Feature(
            "runc", True, f"{facts.runc_version} ({facts.runc}); choose it with GRAVEN_RUNTIME=runc"
        )
    sealed = Feature(
        "sealed instances",
        facts.sealed,
        f"process runtime isolation: {facts.sealing or 'none'}",
        _sealing_fix(facts) if facts.sealing_probed and not facts.sealed else "",
    )
    features = [sealed, _userns(facts), _bwrap(facts), _cgroups(facts)]
    for limit in facts.limits:
        name = f"{limit.controller} limit"
        if limit.enforced:
            features.append(Feature(name, True, f"resources.{limit.controller} is enforced"))
        else:
            features.append(
                Feature(
                    name,
                    False,
                    f"resources.{limit.controller} is not enforced: {limit.reason}",
                    _limit_fix(limit, facts),
                )
            )
    features.append(
        Feature("overlayfs", True, "the kernel has overlayfs")
        if facts.overlayfs
        else Feature(
            "overlayfs", False, "the kernel has no overlayfs", "modprobe overlay (as root)"
        )
    )
    return MachineReport((process, runc), tuple(features), facts.cgroups.version)


def _userns(facts: MachineFacts) -> Feature:
    n = facts.max_user_namespaces
    if n is None:
        return Feature(
            "user namespaces",
            False,
            "the kernel has no user namespaces",
            "use a kernel built with CONFIG_USER_NS",
        )
    if n == 0:
        return Feature(
            "user namespaces",
            False,
            "user namespaces are turned off (user.max_user_namespaces = 0)",
            "sysctl -w user.max_user_namespaces=15000",
        )
    return Feature("user namespaces", True, f"up to {n} (user.max_user_namespaces)")


def _bwrap(facts: MachineFacts) -> Feature:
    if facts.bwrap is None:
        return Feature("bubblewrap", False, "bwrap is not installed", "apt-get install bubblewrap")
    if facts.bwrap_error:
        return Feature(
            "bubblewrap",
            False,
            f"{facts.bwrap} cannot make a sandbox: {facts.bwrap_error}",
            "allow user namespaces for this user, or run graven as root",
        )
    return Feature("bubblewrap", True, f"{facts.bwrap} makes sandboxes")


def _cgroups(facts: MachineFacts) -> Feature:
    layout = facts.cgroups
    if not layout.hierarchies:
        return Feature(
            "cgroups",
            False,
            "no memory, pids or cpu cgroup is mounted",
            "mount cgroup2 on /sys/fs/cgroup (or the v1 controllers)",
        )
    where = ", ".join(f"{h.controller} (v{h.version}, {h.mount})" for h in layout.hierarchies)
    return Feature("cgroups", True, f"{layout.version}: {where}")


def _sealing_fix(facts: MachineFacts) -> str:
    if facts.bwrap is None:
        return "apt-get install bubblewrap"
    return "run graven as root, or allow user namespaces for this user"


def _limit_fix(limit: LimitSupport, facts: MachineFacts) -> str:
    hierarchy = facts.cgroups.of(limit.controller)
    if hierarchy is None:
        return (
            f"mount the {limit.controller} cgroup controller (cgroup v2: write "
            f"+{limit.controller} to the root's cgroup.subtree_control)"
        )
    return "run graven as root"


# --- gathering the facts ------------------------------------------------------------------


def probe_machine() -> MachineFacts:
    """This machine's facts (a few ms, plus one trial sandbox and ``runc --version``)."""
    root = os.geteuid() == 0
    bwrap = shutil.which("bwrap")
    bwrap_error = _try_bwrap(bwrap) if bwrap else ""
    probed, sealed, sealing = _sealing(root)
    runc = find_runc()
    init = find_init()
    runc_version, runc_error = _runc_version(runc) if runc else ("", "")
    layout = detect()
    return MachineFacts(
        root=root,
        bwrap=bwrap,
        bwrap_error=bwrap_error,
        sealing=sealing,
        sealed=sealed,
        sealing_probed=probed,
        runc=runc,
        runc_version=runc_version,
        runc_error=runc_error,
        runc_init=None if init is None else str(init),
        max_user_namespaces=_read_int(Path("/proc/sys/user/max_user_namespaces")),
        overlayfs=_has_overlayfs(),
        cgroups=layout,
        limits=tuple(support(layout, root=root)),
    )


def _sealing(root: bool) -> tuple[bool, bool, str]:
    """How the process runtime isolates instances here, by its own probe when it has
    one: (probed, sealed, in its words)."""
    try:
        isolation = importlib.import_module("graven.runtime.isolation")
    except ImportError:
        if root and shutil.which("unshare"):
            return False, False, "a read-only mount of the image (unshare); not sealed"
        return False, False, "none (the image is read-only by file mode only)"
    found = isolation.probe()
    return True, bool(found.sealed), str(found.describe())


def _try_bwrap(bwrap: str) -> str:
    argv = [bwrap, "--ro-bind", "/", "/", "--unshare-user", "--unshare-pid", "--", "/bin/true"]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode == 0:
        return ""
    said = done.stderr.strip().splitlines()
    return said[-1].removeprefix("bwrap: ") if said else f"exit code {done.returncode}"


def _runc_version(runc: str) -> tuple[str, str]:
    try:
        done = subprocess.run(
            [runc, "--version"],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return "", str(exc)
    first = done.stdout.strip().splitlines()[:1]
    if done.returncode != 0 or not first:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return "", said[0]
    return first[0], ""


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _has_overlayfs() -> bool:
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["overlay"] for line in text.splitlines())


# --- what a spec asks of the machine -------------------------------------------------------


def spec_warnings(loaded: LoadedSpec, facts: MachineFacts) -> list[SpecProblem]:
    """A warning for each resource limit a service asks that this machine cannot
    enforce (``isolation: required`` is warned about beside, by the isolation probe)."""
    found: list[SpecProblem] = []
    missing = {s.controller: s for s in facts.limits if not s.enforced}
    for name, service in sorted(loaded.spec.services.items()):
        asked = service.resources.to_resources()
        wanted = {"memory": asked.memory, "pids": asked.pids, "cpu": asked.cpu}
        for controller, value in wanted.items():
            if value is None or controller not in missing:
                continue
            key = f"services.{name}.resources.{controller}"
            found.append(
                SpecProblem(
                    str(loaded.path),
                    loaded.line_of(key),
                    key,
                    f"cannot be enforced on this machine ({missing[controller].reason}); "
                    "instances start without it ('graven runtime' says more)",
                )
            )
    return found
