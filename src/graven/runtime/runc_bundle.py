"""The OCI runtime config (``config.json``) of one runc instance, as pure data.

``bundle_config`` turns a launch spec, the resolved image user and a few paths into
the document runc reads; nothing here touches the filesystem or runs anything, so every
sealing decision is a unit-tested value:

- the root is the image's read-only checkout (``root.readonly``); writable places are
  size-bounded tmpfs mounts (``/tmp``, ``/run``, ``/dev/shm``: mode 1777, the
  instance's only), all ``nosuid,nodev``;
- the process runs as the image's user with no capabilities at all (every set empty),
  ``noNewPrivileges``, and rlimits no higher than the controller's own;
- a seccomp filter refuses the calls a sealed instance has no use for (mounting,
  namespaces, modules, keyrings, clocks, reboot);
- ``/proc`` and ``/sys`` are mounted with the kernel's sensitive files masked and the
  tunables read-only; ``/dev`` is a tmpfs with runc's default device nodes only;
- its own PID, mount, IPC and UTS namespaces; the host's network namespace unless a
  namespace path is given (instances listen on ``HOST:PORT`` as they would unsealed);
- an init (tini, bind-mounted read-only at ``/dev/init``) is PID 1 and forwards
  signals, so SIGTERM stops a program that installs no handler of its own;
- memory, pids and CPU limits go to the instance's own cgroup;
- the service's own tmpfs paths (bounded, mode 1777) and volumes (bind mounts of host
  directories, ``nosuid,nodev``, read-only when asked) are the only other writable places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from graven.model import Resources, Tmpfs, release_id
from graven.runtime.base import LaunchSpec
from graven.runtime.image_user import ImageUser

OCI_VERSION: Final = "1.0.2"
INIT_PATH: Final = "/dev/init"  # inside the container; /dev is the instance's own tmpfs
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TMPFS_SIZE: Final = 64 << 20  # bytes per tmpfs mount, unless the caller says otherwise
CPU_PERIOD: Final = 100_000  # microseconds: the CFS period the CPU quota is a share of

# What the kernel exposes in /proc and /sys that no service needs and some would abuse:
# masked (bind of an empty file or dir over it) or read-only.
MASKED_PATHS: Final = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)
READONLY_PATHS: Final = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)
# Mount points the bundle mounts over: the image needs them as directories (the
# runtime adds empty ones to the checked-out tree, so runc never writes the checkout).
MOUNT_POINTS: Final = ("/dev", "/proc", "/run", "/sys", "/tmp")

# Calls a sealed instance never needs; refused with EPERM. With no capabilities most
# fail anyway: the filter is the second wall, and it also closes unprivileged paths
# (user namespaces via unshare/clone, keyrings, userfaultfd, perf).
DENIED_SYSCALLS: Final = (
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "umount2",
    "unshare",
    "userfaultfd",
)
CLONE_NEWUSER: Final = 0x10000000
EPERM: Final = 1


@dataclass(frozen=True)
class Rlimit:
    """One ``process.rlimits`` entry, e.g. ``Rlimit("RLIMIT_NOFILE", 1024, 20000)``."""

    kind: str
    soft: int
    hard: int


@dataclass(frozen=True)
class VolumeMount:
    """A volume as the bundle mounts it: a host directory at a path in the instance."""

    source: Path
    destination: str
    read_only: bool = False


def instance_env(spec: LaunchSpec, user: ImageUser) -> list[str]:
    """The instance's environment: the image's, the service's, then what graven tells
    every instance. Nothing comes from the controller's own environment."""
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOME": user.home}
    env.update(spec.image.config.env)
    env.update(spec.env)
    env.update(
        {
            "PORT": str(spec.port),
            "HOST": spec.host,
            "GRAVEN_INSTANCE": spec.instance_id,
            "GRAVEN_SERVICE": spec.service,
            "GRAVEN_RELEASE": release_id(spec.service, spec.release),
            "GRAVEN_IMAGE": str(spec.image.digest),
        }
    )
    return [f"{k}={v}" for k, v in env.items()]


def _tmpfs(
    destination: str, size: int, *, mode: str = "1777", noexec: bool = False
) -> dict[str, Any]:
    options = ["nosuid", "nodev", f"mode={mode}", f"size={size}"]
    if noexec:
        options.insert(2, "noexec")
    return {"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": options}


def mounts(
    init: Path,
    tmpfs_size: int,
    tmpfs: tuple[Tmpfs, ...] = (),
    volumes: tuple[VolumeMount, ...] = (),
) -> list[dict[str, Any]]:
    """The mounts in the order runc applies them: /proc, a minimal /dev, the init,
    /sys read-only, the writable tmpfs places, then the service's tmpfs and volumes."""
    return [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "noexec", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        _tmpfs("/dev/shm", tmpfs_size, noexec=True),
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": INIT_PATH,
            "type": "bind",
            "source": str(init),
            "options": ["bind", "ro", "nosuid", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        _tmpfs("/tmp", tmpfs_size),
        _tmpfs("/run", tmpfs_size),
        *(_tmpfs(t.path, t.size) for t in tmpfs),
        *(
            {
                "destination": v.destination,
                "type": "bind",
                "source": str(v.source),
                "options": ["rbind", "ro" if v.read_only else "rw", "nosuid", "nodev"],
            }
            for v in volumes
        ),
    ]


def seccomp_profile() -> dict[str, Any]:
    """Allow by default; refuse ``DENIED_SYSCALLS`` and clone(CLONE_NEWUSER) with EPERM."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [
                    {
                        "index": 0,
                        "value": CLONE_NEWUSER,
                        "valueTwo": CLONE_NEWUSER,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            },
            # clone3 passes its flags in memory a filter cannot read: make libc fall
            # back to clone, which the rule above does read.
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},  # ENOSYS
        ],
    }


def cgroup_resources(limits: Resources) -> dict[str, Any]:
    """``linux.resources``: no device access beyond runc's defaults, and the limits."""
    out: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if limits.memory is not None:
        # memory+swap equal to memory: the limit cannot be dodged by swapping.
        out["memory"] = {"limit": limits.memory, "swap": limits.memory}
    if limits.pids is not None:
        out["pids"] = {"limit": limits.pids}
    if limits.cpu is not None:
        out["cpu"] = {"quota": max(1000, round(limits.cpu * CPU_PERIOD)), "period": CPU_PERIOD}
    return out


def bundle_config(
    spec: LaunchSpec,
    user: ImageUser,
    *,
    root: Path,
    init: Path,
    cgroups_path: str,
    rlimits: tuple[Rlimit, ...],
    volumes: tuple[VolumeMount, ...] = (),
    network_namespace: Path | None = None,
    tmpfs_size: int = TMPFS_SIZE,
    chmod: str = "/bin/chmod",
) -> dict[str, Any]:
    """The ``config.json`` that runs ``spec`` sealed (see the module docstring).

    ``root``: the image's read-only checkout; ``init``: the host's tini-static;
    ``cgroups_path``: unique on this machine; ``rlimits``: at most the caller's own
    limits (runc cannot raise a hard limit without CAP_SYS_RESOURCE); ``volumes``: the
    spec's volumes with their host directories; ``network_namespace``: a namespace path
    to join, None for the host network. Limits and tmpfs mounts come from ``spec``."""
    config = spec.image.config
    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    if network_namespace is not None:
        namespaces.append({"type": "network", "path": str(network_namespace)})
    writable = ("/tmp", "/run", *(t.path for t in spec.tmpfs))
    user_doc: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        user_doc["additionalGids"] = list(user.additional_gids)
    return {
        "ociVersion": OCI_VERSION,
        # runc gives a tmpfs the mode of the directory it covers (the read-only
        # checkout's 0555); this hook runs inside the new mount namespace, on the tmpfs.
        "hooks": {
            "createContainer": [
                {
                    "path": chmod,
                    "args": ["chmod", "1777", *(f"{root}{p}" for p in writable)],
                }
            ]
        },
        "process": {
            "terminal": False,
            "user": user_doc,
            "args": [INIT_PATH, "--", *config.entrypoint, *config.cmd],
            "env": instance_env(spec, user),
            "cwd": config.workdir or "/",
            "capabilities": {
                "bounding": [],
                "effective": [],
                "inheritable": [],
                "permitted": [],
                "ambient": [],
            },
            "rlimits": [{"type": r.kind, "soft": r.soft, "hard": r.hard} for r in rlimits],
            "noNewPrivileges": True,
        },
        "root": {"path": str(root), "readonly": True},
        "hostname": spec.instance_id[:63],  # the kernel keeps 64 bytes
        "mounts": mounts(init, tmpfs_size, spec.tmpfs, volumes),
        "annotations": {
            "dev.graven.instance": spec.instance_id,
            "dev.graven.service": spec.service,
            "dev.graven.image": str(spec.image.digest),
        },
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": cgroup_resources(spec.resources),
            "seccomp": seccomp_profile(),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
