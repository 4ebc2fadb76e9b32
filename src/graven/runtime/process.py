"""The ``process`` runtime: an instance is the image's entrypoint, sealed by bubblewrap.

A sealed instance (see ``runtime/isolation.py`` for when this machine can seal):

- its root is the image's read-only checkout, and nothing else of the host's: a
  read-only tmpfs ``/`` holding a read-only bind of each of the image's top-level
  entries (so an image needs no mount points of its own), a fresh ``/proc`` and
  ``/dev``, its own writable tmpfs ``/tmp`` and ``/run``; the state dir, the ledger,
  the host's ``/etc`` and other instances' files are not there to name;
- its own pid, ipc, uts, cgroup and mount namespaces (so it can signal no other
  process), and a user namespace when it runs as a non-root uid; the host's network,
  so it listens on ``HOST:PORT`` as before;
- no capabilities, ``no_new_privs``, a session of its own; the image's ``user`` (a
  numeric uid, or a name from the image's own ``/etc/passwd``), or ``nobody`` (65534)
  when graven is root and the image names none;
- exactly the image's env, the spec's env and graven's ``PORT``/``HOST``/``GRAVEN_*``;
  never the host's ``PATH``: the entrypoint is found in the image only.

The handle is bubblewrap's first process inside the new pid namespace (its pid 1, a
tiny init that reaps and passes on the app's exit): it leads the instance's process
group, so SIGTERM to the group reaches the app for a graceful drain, and when it ends
the kernel ends everything else in the namespace. Bubblewrap writes that pid (and at
the end the exit code) to the instance's pid file itself, as a JSON line, before the
app runs: a controller killed right after the spawn still finds the instance.

Where the machine cannot seal, an instance runs as a plain host process from its
checkout (the entrypoint still resolved inside the image), and ``status`` and
``check`` say so.

Instances outlive the controller (new session, output to a log file, never
``--die-with-parent``), and a restarted controller finds them again by pid and the
pid's kernel start time.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from graven import detached
from graven.build.interpreter import DEFAULT_IMAGE_PATH, program_in_image
from graven.errors import GravenError, RuntimeFailure
from graven.model import release_id
from graven.runtime.base import Handle, LaunchSpec
from graven.runtime.image_user import NOBODY, ImageUser, image_user
from graven.runtime.isolation import IsolationSupport, probe
from graven.runtime.limits import CgroupLimits, unenforced
from graven.store.base import ImageStore
from graven.volumes import check_mount_points, prepare

# Unsealed only: the instance writes its pid itself, before it becomes the entrypoint.
_PID_SHIM = 'echo $$ > "$0" && exec "$@"'
# The runtime's own mounts; an image's entries of these names are not bound.
_RUNTIME_MOUNTS = frozenset({"proc", "dev", "tmp", "run"})
# As root, bubblewrap runs as the instance's uid (the uid the host then sees; in its
# user namespace it can still make the rest). First, in a private mount namespace,
# the image tree is bound where that uid can reach it.
_STAGE = "/mnt"
_STAGE_SHIM = (
    f"set -e; mount -t tmpfs -o mode=0755 graven {_STAGE}; mkdir {_STAGE}/root; "
    f'mount --bind "$0" {_STAGE}/root; uid=$1; gid=$2; n=$3; shift 3; i=0; '
    f'while [ "$i" -lt "$n" ]; do mkdir {_STAGE}/v$i; mount --bind "$1" {_STAGE}/v$i; '
    "shift; i=$((i + 1)); done; "
    'exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"'
)
_CHILD_PID_WAIT = 10.0  # seconds bubblewrap may take to report its child
_BWRAP_SIGNALLED = 128  # bubblewrap exits 128+N when the app was killed by signal N
_ENTRY_HINT = "Fix the recipe's 'entrypoint' step, rebuild and deploy again."


class ProcessRuntime:
    """Runtime adapter for sealed host processes (unsealed where the machine cannot)."""

    def __init__(
        self, state_dir: Path, store: ImageStore, isolation: IsolationSupport | None = None
    ):
        self.state_dir = state_dir
        self.store = store
        self._isolation = isolation
        # Handle pid -> the pid this process spawned (bubblewrap's outer process, or the
        # instance itself when unsealed) and the pid file: how an instance it started ended.
        self._started: dict[int, tuple[int, Path]] = {}
        self.limits = CgroupLimits(state_dir)

    @property
    def isolation(self) -> IsolationSupport:
        """Whether instances started here are sealed (probed at first use)."""
        if self._isolation is None:
            self._isolation = probe()
        return self._isolation

    def _instance_dir(self, instance_id: str) -> Path:
        return self.state_dir / "instances" / instance_id

    def log_path(self, instance_id: str) -> Path:
        """Where the instance's stdout and stderr go (the controller bounds its size)."""
        return self._instance_dir(instance_id) / "log"

    def checkout_dir(self, spec: LaunchSpec) -> Path:
        return self.state_dir / "checkouts" / spec.image.digest.hex

    def command(self, spec: LaunchSpec) -> tuple[list[str], str]:
        """The command line as the instance sees it: the program as found inside the
        image (never on the host's PATH), its arguments, then the image's ``cmd``; and
        the program's real path in the image."""
        config = spec.image.config
        try:
            program, real = program_in_image(self.store, spec.image.rootfs, config)
        except GravenError as exc:
            raise RuntimeFailure(
                f"{spec.instance_id}: {exc.message}", hint=exc.hint or _ENTRY_HINT
            ) from None
        return [program, *config.entrypoint[1:], *config.cmd], real

    def user(self, spec: LaunchSpec, root: Path) -> ImageUser | None:
        """Who the instance runs as: the image's user, else ``nobody`` when graven is
        root; None: as graven's own user."""
        default = ImageUser(NOBODY, NOBODY)
        if not spec.image.config.user:
            return default if os.geteuid() == 0 else None
        try:
            return image_user(self.store, spec.image, default=default)
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"{spec.instance_id}: {exc.message}", hint=exc.hint) from None

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        return {
            "PATH": DEFAULT_IMAGE_PATH,
            "LANG": "C.UTF-8",
            **dict(spec.image.config.env),
            **dict(spec.env),
            "PORT": str(spec.port),
            "HOST": spec.host,
            "GRAVEN_INSTANCE": spec.instance_id,
            "GRAVEN_SERVICE": spec.service,
            "GRAVEN_RELEASE": release_id(spec.service, spec.release),
            "GRAVEN_IMAGE": str(spec.image.digest),
        }

    def start(self, spec: LaunchSpec) -> Handle:
        root = self.checkout_dir(spec)
        self.store.checkout(spec.image.rootfs, root, read_only=True)
        workdir = spec.image.config.workdir
        if not (root / workdir.lstrip("/")).is_dir():
            raise RuntimeFailure(
                f"{spec.instance_id}: workdir {workdir} is not a directory in the image",
                hint="Fix the recipe's 'workdir' step.",
            )
        command, real = self.command(spec)
        user = self.user(spec, root)
        inst_dir = self._instance_dir(spec.instance_id)
        inst_dir.mkdir(parents=True, exist_ok=True)
        pid_file = inst_dir / "pid"
        env = self.environment(spec)
        isolation = self.isolation
        if spec.isolation == "required" and not isolation.sealed:
            raise RuntimeFailure(
                f"{spec.instance_id}: the service requires isolation, and this machine cannot "
                f"seal instances: {isolation.reason}",
                hint="Install bubblewrap and allow user namespaces (or run graven as root), "
                "or set 'isolation: auto' to run unsealed.",
            )
        if (spec.volumes or spec.tmpfs) and not isolation.sealed:
            raise RuntimeFailure(
                f"{spec.instance_id}: volumes and tmpfs need sealed instances, and this machine "
                f"cannot seal: {isolation.reason}",
                hint="Install bubblewrap and allow user namespaces (or run graven as root).",
            )
        # O_APPEND: the controller rotates the log by copy-truncate under the instance.
        with self.log_path(spec.instance_id).open("ab") as log:
            for missing in unenforced(spec.resources, self.limits.supported):
                log.write(
                    f"graven: {missing.controller} limit not enforced: {missing.reason}\n".encode()
                )
            log.flush()
            if isolation.sealed:
                return self._start_sealed(spec, root, command, user, env, log.fileno(), pid_file)
            # As named when that stays in the checkout (a multi-call binary reads its
            # name), else the real path: an absolute symlink would lead to the host's.
            named = root / command[0].lstrip("/")
            inside = Path(os.path.realpath(named)).is_relative_to(root.resolve())
            program = named if inside else root / real.lstrip("/")
            host_command = [str(program), *command[1:]]
            argv = ["/bin/sh", "-c", _PID_SHIM, str(pid_file), *host_command]
            argv = self.limits.prepare(spec.instance_id, spec.resources, argv)
            with _spawning(spec, command[0]):
                proc = detached.spawn(
                    argv, output=log, cwd=root / workdir.lstrip("/"), env=env, keep_exit_status=True
                )
        started = detached.start_time(proc.pid)
        if started is None:
            raise RuntimeFailure(
                f"{spec.instance_id}: exited at once; log:\n{self.log_tail(spec.instance_id)}"
            )
        self._started[proc.pid] = (proc.pid, pid_file)
        return Handle(pid=proc.pid, pid_start=started)

    def volume_sources(self, spec: LaunchSpec, user: ImageUser | None) -> list[Path]:
        """The host directory of each of ``spec``'s volumes, in order: a named volume
        is made on first use under the state dir, owned by the instance's user
        (``graven.volumes.prepare``, which also checks host directories)."""
        uid, gid = (user.uid, user.gid) if user is not None else (os.geteuid(), os.getegid())
        return [mount.source for mount in prepare(self.state_dir, spec, uid, gid)]

    def sealed_argv(
        self,
        spec: LaunchSpec,
        root: Path,
        command: list[str],
        user: ImageUser | None,
        status_fd: int,
    ) -> list[str]:
        """The command line that starts the instance sealed, its root the image tree
        at ``root`` (see the module docstring), with the spec's volumes and tmpfs."""
        staged = os.geteuid() == 0 and user is not None and user.uid != 0
        check_mount_points(root, spec, runtime_dirs=_RUNTIME_MOUNTS)
        sources = self.volume_sources(spec, user)
        # bubblewrap runs as the instance's uid then, and that uid cannot walk the
        # private state dir: a mount namespace of its own shows it the tree (and the
        # volumes) under STAGE.
        seen_at = Path(_STAGE) / "root" if staged else root
        argv = [self.isolation.bwrap, "--tmpfs", "/"]
        for name, target in _top_level(root):
            if target is not None:
                argv += ["--symlink", target, f"/{name}"]
            else:
                argv += ["--ro-bind", str(seen_at / name), f"/{name}"]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        own_tmpfs = {t.path for t in spec.tmpfs}
        for default in ("/tmp", "/run"):
            if default not in own_tmpfs:
                argv += ["--tmpfs", default]
        mounts = [(t.path, ["--size", str(t.size), "--tmpfs", t.path]) for t in spec.tmpfs]
        for index, (volume, source) in enumerate(zip(spec.volumes, sources, strict=True)):
            seen = Path(_STAGE) / f"v{index}" if staged else source
            bind = "--ro-bind" if volume.read_only else "--bind"
            mounts.append((volume.path, [bind, str(seen), volume.path]))
        for _path, mount in sorted(mounts):  # outer paths first: /data before /data/cache
            argv += mount
        argv += ["--remount-ro", "/"]
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if user is not None and (user.uid != 0 or os.geteuid() != 0):
            argv += ["--unshare-user", "--uid", str(user.uid), "--gid", str(user.gid)]
            argv += ["--disable-userns"]
        elif user is None:
            argv += ["--unshare-user", "--disable-userns"]  # not root: bubblewrap needs one
        argv += ["--hostname", spec.instance_id[:64], "--new-session", "--cap-drop", "ALL"]
        argv += ["--chdir", spec.image.config.workdir, "--json-status-fd", str(status_fd)]
        argv += ["--", *command]
        if not staged:
            return argv
        assert user is not None
        return [
            *("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c"),
            _STAGE_SHIM,
            str(root),
            str(user.uid),
            str(user.gid),
            str(len(sources)),
            *map(str, sources),
            *argv,
        ]

    def _start_sealed(
        self,
        spec: LaunchSpec,
        root: Path,
        command: list[str],
        user: ImageUser | None,
        env: dict[str, str],
        log_fd: int,
        pid_file: Path,
    ) -> Handle:
        # The pid file is bubblewrap's status stream: the child's pid as soon as it
        # exists, its exit code at the end (a file: nobody need keep reading it).
        status_fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            argv = self.sealed_argv(spec, root, command, user, status_fd)
            argv = self.limits.prepare(spec.instance_id, spec.resources, argv)
            with _spawning(spec, command[0]):
                proc = detached.spawn(
                    argv, output=log_fd, env=env, pass_fds=(status_fd,), keep_exit_status=True
                )
        finally:
            os.close(status_fd)
        child = _wait_child_pid(pid_file, proc.pid)
        started = None if child is None else detached.start_time(child)
        if child is None or started is None:
            raise RuntimeFailure(
                f"{spec.instance_id}: exited at once; log:\n{self.log_tail(spec.instance_id)}",
                hint=_ENTRY_HINT,
            )
        self._started[child] = (proc.pid, pid_file)
        return Handle(pid=child, pid_start=started)

    def alive(self, handle: Handle) -> bool:
        return _stamp(handle).running()

    def orphans(self, recorded: Collection[str]) -> list[tuple[str, Handle]]:
        """Instances that run but are not in ``recorded``: started by a controller that
        died before it could record them. Each has its pid in its pid file."""
        found = []
        for pid_file in sorted((self.state_dir / "instances").glob("*/pid")):
            instance_id = pid_file.parent.name
            if instance_id in recorded:
                continue
            pid = read_pid_file(pid_file)[0]
            if pid is None:
                continue
            started = detached.start_time(pid)
            # The pid may have been reused since: only a process that carries the
            # instance's own id in its environment is that instance.
            if started is not None and _environ_has(pid, f"GRAVEN_INSTANCE={instance_id}"):
                found.append((instance_id, Handle(pid, started)))
        return found

    def exit_reason(self, handle: Handle) -> str:
        """How a dead instance ended, when this process started it (else unknown)."""
        spawned = self._started.get(handle.pid)
        if spawned is None:
            return "" if self.alive(handle) else self.limits.explain(handle.pid, "")
        outer, pid_file = spawned
        if outer != handle.pid and not self.alive(handle):
            # bubblewrap's outer process ends right after the instance it watched.
            detached.wait_until(lambda: detached.exit_status(outer) is not None, 1.0)
        code = detached.exit_status(outer)
        if code is None:
            return ""
        if outer != handle.pid:
            # Sealed: bubblewrap reports the app's exit code, and a death by signal N
            # as 128+N, like a shell.
            reported = read_pid_file(pid_file)[1]
            code = reported if reported is not None else code
            if code > _BWRAP_SIGNALLED:
                code = _BWRAP_SIGNALLED - code
        return self.limits.explain(handle.pid, detached.describe_exit(code))

    def forget(self, handle: Handle) -> None:
        """Drop what is kept about a dead instance."""
        spawned = self._started.get(handle.pid)
        if spawned is not None and detached.exit_status(spawned[0]) is not None:
            del self._started[handle.pid]
            detached.forget(spawned[0])
        self.limits.release_pid(handle.pid)

    def stop(self, handle: Handle, grace: float) -> None:
        """SIGTERM the instance's process group, SIGKILL it after ``grace`` seconds."""
        try:
            detached.stop(_stamp(handle), grace=grace, group=True)
        except PermissionError as exc:
            raise RuntimeFailure(
                f"not allowed to signal process group {handle.pid}: {exc}",
                hint="Run graven as the user that started the instance.",
            ) from exc
        self.limits.release_pid(handle.pid)

    def log_tail(self, instance_id: str, lines: int = 20) -> str:
        path = self.log_path(instance_id)
        try:
            data = path.read_bytes()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def read_pid_file(path: Path) -> tuple[int | None, int | None]:
    """(the instance's handle pid, its exit code once bubblewrap reported one) from a
    pid file: bubblewrap's JSON status lines, or a bare pid (unsealed)."""
    try:
        text = path.read_text()
    except OSError:
        return None, None
    pid = code = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.isdigit():
            pid = int(line)
            continue
        with contextlib.suppress(ValueError, AttributeError):
            doc = json.loads(line)
            if isinstance(doc.get("child-pid"), int):
                pid = doc["child-pid"]
            if isinstance(doc.get("exit-code"), int):
                code = doc["exit-code"]
    return pid, code


def _top_level(root: Path) -> list[tuple[str, str | None]]:
    """The checkout's top-level entries but the runtime's own mount points, as
    (name, symlink target or None)."""
    entries: list[tuple[str, str | None]] = []
    with os.scandir(root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if entry.name not in _RUNTIME_MOUNTS:
                target = os.readlink(entry.path) if entry.is_symlink() else None  # noqa: PTH115
                entries.append((entry.name, target))
    return entries


def _wait_child_pid(pid_file: Path, outer: int) -> int | None:
    """The sandbox's first pid once bubblewrap wrote it; None if bubblewrap ended first."""
    deadline = time.monotonic() + _CHILD_PID_WAIT
    delay = 0.001
    while time.monotonic() < deadline:
        pid = read_pid_file(pid_file)[0]
        if pid is not None:
            return pid
        if detached.exit_status(outer) is not None:
            return read_pid_file(pid_file)[0]
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return None


@contextlib.contextmanager
def _spawning(spec: LaunchSpec, program: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise RuntimeFailure(
            f"{spec.instance_id}: cannot start {program}: {exc.strerror or exc}", hint=_ENTRY_HINT
        ) from exc
    except ValueError as exc:  # e.g. a NUL byte in an environment value
        raise RuntimeFailure(
            f"{spec.instance_id}: cannot start {program}: {exc}",
            hint="Check the service's env in graven.yaml ('graven check' names the key).",
        ) from exc


def _environ_has(pid: int, entry: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return entry.encode() in environ.split(b"\0")


def _stamp(handle: Handle) -> detached.ProcessStamp:
    return detached.ProcessStamp(handle.pid, handle.pid_start)
