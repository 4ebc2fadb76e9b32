"""The ``runc`` runtime: each instance is an OCI container run by runc, sealed (see
``runc_bundle``: read-only image root, the image's user, no capabilities, seccomp,
its own PID/mount/IPC/UTS namespaces, cgroup limits).

Per instance, under the state dir's ``instances/<id>/``: ``bundle/config.json``
(written atomically), ``pid`` (the container's init, written by runc), ``handle`` (pid
and start time, once started), ``exit`` (runc's exit code, once it ended) and ``log``
(stdout and stderr, appended). runc keeps its own state under ``<state>/runc``
(``runc --root``), so graven never sees or touches another tool's containers.

runc runs in the foreground (``runc run --keep``), detached from the controller (its
own session, under a one-line host shell that writes its exit code), as the init's
parent: it reaps the init and exits with its status. The container and its cgroup are
kept until graven has read how it ended (``exit_reason``: the code, and whether the
memory or pids limit was hit) and deleted by ``forget`` or ``stop``. The handle is the
init's pid and start time, so a restarted controller adopts running containers as it
adopts processes, and learns how one that died meanwhile ended. Needs root and
tini-static.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Final

from graven import detached, volumes
from graven.atomic import write_atomic
from graven.errors import RuntimeFailure
from graven.model import Digest, Image
from graven.runtime.base import Handle, LaunchSpec
from graven.runtime.image_user import NOBODY, ImageUser, image_user
from graven.runtime.runc_bundle import MOUNT_POINTS, Rlimit, VolumeMount, bundle_config
from graven.store.base import ImageStore
from graven.store.tree_model import DIR_MODE, Tree, TreeEntry

RUNC_CANDIDATES: Final = ("runc", "/usr/sbin/runc", "/usr/bin/runc")
INIT_CANDIDATES: Final = ("/usr/bin/tini-static", "/usr/local/bin/tini-static")
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
START_WAIT: Final = 30.0  # seconds for runc to create and start a container
START_POLL: Final = 0.005
MAX_REASONS: Final = 512  # exit reasons of stopped instances kept in memory
DEFAULT_USER: Final = ImageUser(NOBODY, NOBODY)
_CONTAINER_ID = re.compile(r"[^A-Za-z0-9_.+-]")
_SIGNAL_OFFSET = 128  # runc (and tini) report "killed by signal N" as exit code 128 + N
# Runs runc and records its exit code where any later controller finds it.
_EXIT_RECORDER = (
    'exit_file=$1; shift; "$@"; code=$?; '
    'echo "$code" > "$exit_file.tmp" && mv "$exit_file.tmp" "$exit_file"; exit "$code"'
)


def container_id(instance_id: str) -> str:
    """runc's name for an instance: its id, with any character runc refuses replaced."""
    return _CONTAINER_ID.sub("_", instance_id) or "_"


def describe_runc_exit(code: int) -> str:
    """How an instance ended, from runc's exit code (``128 + N``: killed by signal N)."""
    if code > _SIGNAL_OFFSET:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(code - _SIGNAL_OFFSET).name}"
    return detached.describe_exit(code)


def current_rlimits() -> tuple[Rlimit, ...]:
    """The controller's own open-files limits: an instance gets no more (runc cannot
    raise a hard limit without CAP_SYS_RESOURCE, which root lacks on some machines)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (Rlimit("RLIMIT_NOFILE", soft, hard),)


def find_runc() -> str | None:
    return next((p for p in map(shutil.which, RUNC_CANDIDATES) if p), None)


def find_init() -> Path | None:
    return next((Path(p) for p in INIT_CANDIDATES if os.access(p, os.X_OK)), None)


def limits_hit(cgroup: str) -> list[str]:
    """What the cgroup v1 counters of ``cgroup`` (a cgroupsPath) say the instance ran
    into: ``out of memory`` (the kernel killed in it), ``pids limit`` (forks refused)."""
    found = []
    oom = _counters(CGROUP_ROOT / "memory" / cgroup.lstrip("/") / "memory.oom_control")
    if oom.get("oom_kill", 0) > 0:
        found.append("out of memory")
    pids = _counters(CGROUP_ROOT / "pids" / cgroup.lstrip("/") / "pids.events")
    if pids.get("max", 0) > 0:
        found.append("pids limit")
    return found


class RuncRuntime:
    """Runtime adapter for runc containers."""

    def __init__(self, state_dir: Path, store: ImageStore) -> None:
        self.state_dir = state_dir
        self.store = store
        self.runc_root = state_dir / "runc"
        # The runc processes this object started (to reap them), by init pid.
        self._runc: dict[int, subprocess.Popen[bytes]] = {}
        # The instances this object started, by handle (others: found by their files).
        self._ids: dict[Handle, str] = {}
        # How stopped instances ended, read before their container was deleted.
        self._reasons: dict[Handle, str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ paths

    def _instance_dir(self, instance_id: str) -> Path:
        return self.state_dir / "instances" / instance_id

    def log_path(self, instance_id: str) -> Path:
        """Where the instance's stdout and stderr go (the controller bounds its size)."""
        return self._instance_dir(instance_id) / "log"

    def bundle_dir(self, instance_id: str) -> Path:
        return self._instance_dir(instance_id) / "bundle"

    def checkout_dir(self, image: Image, tree: Digest) -> Path:
        # The image's own tree shares the checkout other runtimes use (and gc knows);
        # one with mount points added is a checkout of its own.
        name = image.digest.hex if tree == image.rootfs else f"{image.digest.hex}-{tree.hex[:16]}"
        return self.state_dir / "checkouts" / name

    def cgroups_path(self, instance_id: str) -> str:
        # cgroups are machine-wide: the state dir's name keeps two state dirs' instances
        # of the same id apart.
        state = detached.short_name(self.state_dir.absolute())
        return f"/graven/{state}-{container_id(instance_id)}"

    # ------------------------------------------------------------------ start

    @staticmethod
    def check_machine() -> tuple[str, Path]:
        """runc's path and tini-static's, once this machine can run runc instances;
        RuntimeFailure saying what is missing otherwise."""
        if os.geteuid() != 0:
            raise RuntimeFailure(
                f"the runc runtime needs root (graven runs as uid {os.geteuid()})",
                hint="Run the controller as root, or use GRAVEN_RUNTIME=process.",
            )
        runc = find_runc()
        if runc is None:
            raise RuntimeFailure(
                "the runc runtime needs runc, which is not installed",
                hint="Install it (apt-get install runc), or use GRAVEN_RUNTIME=process.",
            )
        init = find_init()
        if init is None:
            raise RuntimeFailure(
                "the runc runtime needs tini-static as the instances' init, which is not installed",
                hint="Install it (apt-get install tini), or use GRAVEN_RUNTIME=process.",
            )
        return runc, init

    def root_tree(self, image: Image, extra: Collection[str] = ()) -> Digest:
        """The image's tree with an empty directory at every mount point it lacks
        (runc would otherwise create them in the shared, read-only checkout)."""
        root = image.rootfs
        empty: TreeEntry | None = None
        for point in (*MOUNT_POINTS, *sorted(extra)):
            if self.store.lookup(root, point) is None:
                if empty is None:
                    empty = TreeEntry("", "dir", DIR_MODE, 0, digest=self.store.put_tree(Tree()))
                root = self.store.place(root, point, empty)
        return root

    def _volumes(self, spec: LaunchSpec, user: ImageUser) -> tuple[VolumeMount, ...]:
        # graven.volumes makes named volumes for the instance's user and refuses
        # symlinked or missing sources, for every runtime alike.
        mounts = volumes.prepare(self.state_dir, spec, user.uid, user.gid)
        return tuple(VolumeMount(m.source, m.target, m.read_only) for m in mounts)

    def start(self, spec: LaunchSpec) -> Handle:
        runc, init = self.check_machine()
        extra = {v.path for v in spec.volumes} | {t.path for t in spec.tmpfs}
        tree = self.root_tree(spec.image, extra)
        root = self.store.checkout(tree, self.checkout_dir(spec.image, tree), read_only=True)
        workdir = spec.image.config.workdir or "/"
        if not (root / workdir.lstrip("/")).is_dir():
            raise RuntimeFailure(
                f"{spec.instance_id}: workdir {workdir} is not a directory in the image",
                hint="Fix the recipe's 'workdir' step.",
            )
        # No user named: not root, but nobody (graven runs as root here, always).
        user = image_user(self.store, spec.image, default=DEFAULT_USER)
        config = bundle_config(
            spec,
            user,
            root=root,
            init=init,
            cgroups_path=self.cgroups_path(spec.instance_id),
            rlimits=current_rlimits(),
            volumes=self._volumes(spec, user),
            chmod=shutil.which("chmod") or "/bin/chmod",
        )
        inst_dir = self._instance_dir(spec.instance_id)
        bundle = self.bundle_dir(spec.instance_id)
        bundle.mkdir(parents=True, exist_ok=True)
        # Atomic, not durable: a bundle (like the handle below) serves only while the
        # machine is up, and a container does not outlive a reboot.
        write_atomic(bundle / "config.json", json.dumps(config).encode(), mode=0o600, durable=False)
        for old in ("pid", "handle", "exit"):
            (inst_dir / old).unlink(missing_ok=True)
        cid = container_id(spec.instance_id)
        self._delete_container(runc, cid)  # one an earlier runc left behind
        argv = [
            "/bin/sh",
            "-c",
            _EXIT_RECORDER,
            "graven-runc",
            str(inst_dir / "exit"),
            runc,
            "--root",
            str(self.runc_root),
            "run",
            "--keep",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(inst_dir / "pid"),
            cid,
        ]
        # O_APPEND: the controller rotates the log by copy-truncate under the instance.
        with self.log_path(spec.instance_id).open("ab") as log:
            try:
                proc = detached.spawn(argv, output=log, cwd=bundle)
            except OSError as exc:
                raise RuntimeFailure(
                    f"{spec.instance_id}: cannot run {runc}: {exc.strerror or exc}"
                ) from exc
        pid_file = inst_dir / "pid"
        pid = _await_pid(pid_file, proc)
        if pid is None:
            if proc.poll() is None:
                detached.kill_group(proc.pid)
            self._delete_container(runc, cid)
            raise RuntimeFailure(
                f"{spec.instance_id}: runc did not start the container; log:\n"
                f"{self.log_tail(spec.instance_id)}",
                hint="The log ends with runc's own message; 'graven check' validates the spec.",
            )
        started = detached.start_time(pid)
        if started is None:
            detached.wait_until((inst_dir / "exit").exists, detached.KILL_WAIT)
            how = _describe_exit_file(inst_dir / "exit") or "exited"
            self._delete_container(runc, cid)
            raise RuntimeFailure(
                f"{spec.instance_id}: {how} at once; log:\n{self.log_tail(spec.instance_id)}",
                hint="A runc instance sees only its image: the entrypoint and its interpreter "
                "must be inside it (see docs/runtimes.md).",
            )
        handle = Handle(pid=pid, pid_start=started)
        write_atomic(
            inst_dir / "handle", json.dumps([pid, started]).encode(), mode=0o600, durable=False
        )
        self._runc[pid] = proc
        self._ids[handle] = spec.instance_id
        return handle

    def _delete_container(self, runc: str, cid: str) -> None:
        """``runc delete --force``: the container's processes, state and cgroup go."""
        if not (self.runc_root / cid).exists():
            return
        subprocess.run(
            [runc, "--root", str(self.runc_root), "delete", "--force", cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=START_WAIT,
        )

    # ------------------------------------------------------------------ observe

    def alive(self, handle: Handle) -> bool:
        return _stamp(handle).running()

    def orphans(self, recorded: Collection[str]) -> list[tuple[str, Handle]]:
        """Instances that run but are not in ``recorded``: started by a controller that
        died before it could record them. runc wrote each one's pid file."""
        found = []
        for pid_file in sorted((self.state_dir / "instances").glob("*/pid")):
            instance_id = pid_file.parent.name
            if instance_id in recorded or not (pid_file.parent / "bundle").is_dir():
                continue
            pid = _read_pid(pid_file)
            started = None if pid is None else detached.start_time(pid)
            # The pid may have been reused since: only a process that carries the
            # instance's own id in its environment is that instance's init.
            if (
                pid is not None
                and started is not None
                and _environ_has(pid, f"GRAVEN_INSTANCE={instance_id}")
            ):
                found.append((instance_id, Handle(pid, started)))
        return found

    def _instance_of(self, handle: Handle) -> str | None:
        """The instance whose recorded handle is ``handle`` (None: not one of ours)."""
        if handle in self._ids:
            return self._ids[handle]
        for path in (self.state_dir / "instances").glob("*/handle"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()) == [handle.pid, handle.pid_start]:
                    return path.parent.name
        return None

    def exit_reason(self, handle: Handle) -> str:
        """How a dead instance ended (its code or signal, and a limit it hit), from
        what runc recorded; "" while it runs or when nothing was recorded."""
        if handle in self._reasons:
            return self._reasons[handle]
        if self.alive(handle):
            return ""
        instance_id = self._instance_of(handle)
        if instance_id is None:
            return ""
        self._reap(handle)
        exit_file = self._instance_dir(instance_id) / "exit"
        # The init is gone; runc records its status as soon as it has reaped it.
        detached.wait_until(exit_file.exists, detached.KILL_WAIT)
        reason = _describe_exit_file(exit_file)
        if not reason:
            return ""
        if hit := limits_hit(self.cgroups_path(instance_id)):
            reason += f" ({', '.join(hit)})"
        with self._lock:
            self._reasons[handle] = reason
        return reason

    def _reap(self, handle: Handle) -> None:
        # pop first: the controller calls from its loop and from worker threads.
        proc = self._runc.pop(handle.pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(detached.KILL_WAIT)
            detached.reap(proc.pid)

    def forget(self, handle: Handle) -> None:
        """Drop what is kept about a dead instance: its container, cgroup and exit."""
        if self.alive(handle):
            return
        with self._lock:
            self._reasons.pop(handle, None)
        instance_id = self._instance_of(handle)
        if instance_id is not None:
            self._remove(handle, instance_id)

    def _remove(self, handle: Handle, instance_id: str) -> None:
        """Delete a dead instance's container (and cgroup) and its handle and exit."""
        self._reap(handle)
        runc = find_runc()
        if runc is not None:
            self._delete_container(runc, container_id(instance_id))
        for name in ("exit", "handle"):
            (self._instance_dir(instance_id) / name).unlink(missing_ok=True)
        self._ids.pop(handle, None)

    # ------------------------------------------------------------------ stop

    def stop(self, handle: Handle, grace: float) -> None:
        """SIGTERM the container's init (tini passes it on), SIGKILL it after ``grace``
        seconds; once it is gone, note how it ended and delete the container."""
        try:
            gone = detached.stop(_stamp(handle), grace=grace)
        except PermissionError as exc:
            raise RuntimeFailure(
                f"not allowed to signal container init {handle.pid}: {exc}",
                hint="Run graven as root, as the runc runtime needs.",
            ) from exc
        instance_id = self._instance_of(handle)
        if not gone or instance_id is None:
            return  # still running (it was never signalled: another process has the pid)
        # Read how it ended before its container and counters go; kept here (a few
        # hundred at most) for the caller that asks next.
        reason = self.exit_reason(handle)
        self._remove(handle, instance_id)
        with self._lock:
            self._reasons[handle] = reason
            while len(self._reasons) > MAX_REASONS:
                del self._reasons[next(iter(self._reasons))]

    # ------------------------------------------------------------------ logs

    def log_tail(self, instance_id: str, lines: int = 20) -> str:
        path = self.log_path(instance_id)
        try:
            data = path.read_bytes()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _await_pid(pid_file: Path, runc: subprocess.Popen[bytes]) -> int | None:
    """The init's pid once runc has written it, or None if runc exits first or takes
    longer than START_WAIT. Polled finely: this wait is most of an instance's start."""
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        pid = _read_pid(pid_file)
        if pid is not None:
            return pid
        if runc.poll() is not None:
            return _read_pid(pid_file)
        time.sleep(START_POLL)
    return None


def _describe_exit_file(path: Path) -> str:
    try:
        return describe_runc_exit(int(path.read_text().strip()))
    except (OSError, ValueError):
        return ""


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _counters(path: Path) -> dict[str, int]:
    """``name value`` lines of a cgroup file, or nothing when it cannot be read."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[name] = int(value)
    return out


def _environ_has(pid: int, entry: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return entry.encode() in environ.split(b"\0")


def _stamp(handle: Handle) -> detached.ProcessStamp:
    return detached.ProcessStamp(handle.pid, handle.pid_start)
