"""The ``runc`` runtime: each instance is an OCI container run by runc, sealed (see
``runc_bundle``: read-only image root, the image's user, no capabilities, seccomp,
its own PID/mount/IPC/UTS namespaces, cgroup limits).

Per instance, under the state dir: ``instances/<id>/bundle/config.json`` (written
atomically), ``instances/<id>/pid`` (the container's init, written by runc) and
``instances/<id>/log`` (stdout and stderr, appended). runc keeps its own state under
``<state>/runc`` (``runc --root``), so graven never sees or touches another tool's
containers.

runc runs in the foreground, detached from the controller (its own session), as the
container's parent: it reaps the init, removes the container when it ends and exits
with the init's status, which is how a controller that started an instance learns how
it ended. The handle is the init's pid and start time, so a restarted controller adopts
running containers exactly as it adopts processes. Needs root and tini-static.
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
from collections.abc import Collection
from pathlib import Path
from typing import Final

from graven import detached
from graven.atomic import write_atomic
from graven.errors import RuntimeFailure
from graven.model import Digest, Image
from graven.runtime.base import Handle, LaunchSpec
from graven.runtime.image_user import NOBODY, ImageUser, image_user
from graven.runtime.runc_bundle import MOUNT_POINTS, Limits, Rlimit, bundle_config
from graven.store.base import ImageStore
from graven.store.tree_model import DIR_MODE, Tree, TreeEntry

RUNC_CANDIDATES: Final = ("runc", "/usr/sbin/runc", "/usr/bin/runc")
INIT_CANDIDATES: Final = ("/usr/bin/tini-static", "/usr/local/bin/tini-static")
START_WAIT: Final = 30.0  # seconds for runc to create and start a container
DEFAULT_USER: Final = ImageUser(NOBODY, NOBODY)
_CONTAINER_ID = re.compile(r"[^A-Za-z0-9_.+-]")
_SIGNAL_OFFSET = 128  # runc (and tini) report "killed by signal N" as exit code 128 + N


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


class RuncRuntime:
    """Runtime adapter for runc containers."""

    def __init__(self, state_dir: Path, store: ImageStore, *, limits: Limits | None = None) -> None:
        self.state_dir = state_dir
        self.store = store
        self.limits = limits
        self.runc_root = state_dir / "runc"
        # Containers this object started: init pid -> (its runc process, instance id).
        self._started: dict[int, tuple[subprocess.Popen[bytes], Handle, str]] = {}

    # ------------------------------------------------------------------ paths

    def _instance_dir(self, instance_id: str) -> Path:
        return self.state_dir / "instances" / instance_id

    def log_path(self, instance_id: str) -> Path:
        """Where the instance's stdout and stderr go (the controller bounds its size)."""
        return self._instance_dir(instance_id) / "log"

    def bundle_dir(self, instance_id: str) -> Path:
        return self._instance_dir(instance_id) / "bundle"

    def checkout_dir(self, image: Image) -> Path:
        return self.state_dir / "checkouts" / image.digest.hex

    def cgroups_path(self, instance_id: str) -> str:
        # cgroups are machine-wide: the state dir's name keeps two state dirs' instances
        # of the same id apart.
        return (
            f"/graven/{detached.short_name(self.state_dir.absolute())}-{container_id(instance_id)}"
        )

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

    def root_tree(self, image: Image) -> Digest:
        """The image's tree with an empty directory at every mount point it lacks:
        runc would otherwise create them in the shared checkout."""
        root = image.rootfs
        empty: TreeEntry | None = None
        for point in MOUNT_POINTS:
            if self.store.lookup(root, point) is None:
                if empty is None:
                    empty = TreeEntry("", "dir", DIR_MODE, 0, digest=self.store.put_tree(Tree()))
                root = self.store.place(root, point, empty)
        return root

    def start(self, spec: LaunchSpec) -> Handle:
        runc, init = self.check_machine()
        root = self.store.checkout(
            self.root_tree(spec.image), self.checkout_dir(spec.image), read_only=True
        )
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
            limits=self.limits,
            chmod=shutil.which("chmod") or "/bin/chmod",
        )
        bundle = self.bundle_dir(spec.instance_id)
        bundle.mkdir(parents=True, exist_ok=True)
        write_atomic(bundle / "config.json", json.dumps(config, indent=1).encode(), mode=0o600)
        pid_file = self._instance_dir(spec.instance_id) / "pid"
        pid_file.unlink(missing_ok=True)
        cid = container_id(spec.instance_id)
        self._delete_stale(runc, cid)
        argv = [
            runc,
            "--root",
            str(self.runc_root),
            "run",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(pid_file),
            cid,
        ]
        # O_APPEND: the controller rotates the log by copy-truncate under the instance.
        with self.log_path(spec.instance_id).open("ab") as log:
            try:
                proc = detached.spawn(argv, output=log, cwd=bundle, keep_exit_status=True)
            except OSError as exc:
                raise RuntimeFailure(
                    f"{spec.instance_id}: cannot run {runc}: {exc.strerror or exc}"
                ) from exc
        up = detached.wait_until(
            lambda: _read_pid(pid_file) is not None, START_WAIT, unless_exited=proc
        )
        if not up and _read_pid(pid_file) is None:
            if proc.poll() is None:
                detached.kill_group(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(detached.KILL_WAIT)
            detached.forget(proc.pid)
            raise RuntimeFailure(
                f"{spec.instance_id}: runc did not start the container; log:\n"
                f"{self.log_tail(spec.instance_id)}",
                hint="The log shows runc's own message first; 'graven check' validates the spec.",
            )
        pid = _read_pid(pid_file)
        started = None if pid is None else detached.start_time(pid)
        if pid is None or started is None:
            raise RuntimeFailure(
                f"{spec.instance_id}: exited at once; log:\n{self.log_tail(spec.instance_id)}"
            )
        handle = Handle(pid=pid, pid_start=started)
        self._started[pid] = (proc, handle, spec.instance_id)
        return handle

    def _delete_stale(self, runc: str, cid: str) -> None:
        """Remove what runc kept of an earlier container of this id (its runc was
        killed before it could clean up), so the new one can take the name."""
        if (self.runc_root / cid).exists():
            self._runc_delete(runc, cid)

    def _runc_delete(self, runc: str, cid: str) -> None:
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

    def exit_reason(self, handle: Handle) -> str:
        """How a dead instance ended, when this object started it (else unknown)."""
        started = self._started.get(handle.pid)
        if started is None or started[1] != handle or self.alive(handle):
            return ""
        proc = started[0]
        # The init is gone; runc reports its status as soon as it has cleaned up.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(detached.KILL_WAIT)
        code = detached.exit_status(proc.pid)
        return "" if code is None else describe_runc_exit(code)

    def forget(self, handle: Handle) -> None:
        """Drop what is kept about a dead instance."""
        started = self._started.get(handle.pid)
        if started is None or started[1] != handle or started[0].poll() is None:
            return
        detached.forget(started[0].pid)
        del self._started[handle.pid]

    # ------------------------------------------------------------------ stop

    def stop(self, handle: Handle, grace: float) -> None:
        """SIGTERM the container's init (tini passes it on), SIGKILL it after ``grace``
        seconds, then make sure runc has removed the container."""
        try:
            detached.stop(_stamp(handle), grace=grace)
        except PermissionError as exc:
            raise RuntimeFailure(
                f"not allowed to signal container init {handle.pid}: {exc}",
                hint="Run graven as root, as the runc runtime needs.",
            ) from exc
        started = self._started.get(handle.pid)
        if started is not None and started[1] == handle:
            with contextlib.suppress(subprocess.TimeoutExpired):
                started[0].wait(detached.KILL_WAIT)
            instance_id: str | None = started[2]
        else:
            instance_id = self._instance_of(handle)
        if instance_id is None:
            return
        cid = container_id(instance_id)
        pid = _read_pid(self._instance_dir(instance_id) / "pid")
        # Only a container whose init is gone: the handle may name a reused pid while
        # the real instance still runs.
        gone = pid is None or detached.start_time(pid) is None
        runc = find_runc()
        if gone and runc is not None and (self.runc_root / cid).exists():
            self._runc_delete(runc, cid)

    def _instance_of(self, handle: Handle) -> str | None:
        for pid_file in (self.state_dir / "instances").glob("*/pid"):
            if _read_pid(pid_file) == handle.pid:
                return pid_file.parent.name
        return None

    # ------------------------------------------------------------------ logs

    def log_tail(self, instance_id: str, lines: int = 20) -> str:
        path = self.log_path(instance_id)
        try:
            data = path.read_bytes()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _environ_has(pid: int, entry: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return entry.encode() in environ.split(b"\0")


def _stamp(handle: Handle) -> detached.ProcessStamp:
    return detached.ProcessStamp(handle.pid, handle.pid_start)
