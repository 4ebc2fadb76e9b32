"""The ``process`` runtime: an instance is the image's entrypoint running as a host
process, in its own session and process group, from a read-only checkout of the image.

When graven runs as root and ``unshare`` exists, each instance gets a private mount
namespace in which its checkout is bind-mounted read-only, so not even root inside
the instance can modify the image. Otherwise the checkout's files are read-only by
mode only (which root ignores); ``graven verify`` still detects any change.

Instances outlive the controller: they are not its children in any way that matters
(new session; stdout/stderr go to a log file), and a restarted controller finds them
again by pid and the pid's kernel start time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from pathlib import Path

from graven import detached
from graven.errors import RuntimeFailure
from graven.model import release_id
from graven.runtime.base import Handle, LaunchSpec
from graven.runtime.limits import CgroupLimits, unenforced
from graven.store.base import ImageStore

# Runs inside the new mount namespace: make the checkout read-only, then become the entrypoint.
_READ_ONLY_SHIM = (
    'echo $$ > "$0" && mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" '
    '&& shift && exec "$@"'
)
# Without isolation: only the pid file. The instance writes it itself, before it becomes
# the entrypoint, so a controller killed right after the spawn still finds it.
_PID_SHIM = 'echo $$ > "$0" && exec "$@"'


class ProcessRuntime:
    """Runtime adapter for host processes."""

    def __init__(self, state_dir: Path, store: ImageStore) -> None:
        self.state_dir = state_dir
        self.store = store
        self.isolate = os.geteuid() == 0 and shutil.which("unshare") is not None
        self.limits = CgroupLimits(state_dir)

    def _instance_dir(self, instance_id: str) -> Path:
        return self.state_dir / "instances" / instance_id

    def log_path(self, instance_id: str) -> Path:
        """Where the instance's stdout and stderr go (the controller bounds its size)."""
        return self._instance_dir(instance_id) / "log"

    def checkout_dir(self, spec: LaunchSpec) -> Path:
        return self.state_dir / "checkouts" / spec.image.digest.hex

    def argv(self, spec: LaunchSpec, root: Path) -> list[str]:
        """The command line, resolved against the image first, then the host PATH."""
        entry = list(spec.image.config.entrypoint)
        program = entry[0]
        workdir = root / spec.image.config.workdir.lstrip("/")
        if program.startswith("/"):
            inside = root / program.lstrip("/")
            if inside.exists():
                program = str(inside)
        elif "/" in program:
            program = str(workdir / program)
        else:
            # Like the build's interpreter recording: the image's own PATH first.
            image_path = dict(spec.image.config.env).get("PATH", "/usr/local/bin:/usr/bin:/bin")
            candidates = [root / d.lstrip("/") / program for d in image_path.split(":") if d]
            own = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
            found = str(own) if own is not None else shutil.which(program)
            if found is None:
                raise RuntimeFailure(
                    f"{spec.instance_id}: entrypoint program {program!r} is neither in the image "
                    "nor on the host PATH",
                    hint="Fix the recipe's 'entrypoint' step, rebuild and deploy again.",
                )
            program = found
        return [program, *entry[1:]]

    def start(self, spec: LaunchSpec) -> Handle:
        root = self.checkout_dir(spec)
        self.store.checkout(spec.image.rootfs, root, read_only=True)
        workdir = root / spec.image.config.workdir.lstrip("/")
        if not workdir.is_dir():
            raise RuntimeFailure(
                f"{spec.instance_id}: workdir {spec.image.config.workdir} is not a directory "
                "in the image",
                hint="Fix the recipe's 'workdir' step.",
            )
        command = self.argv(spec, root)
        inst_dir = self._instance_dir(spec.instance_id)
        inst_dir.mkdir(parents=True, exist_ok=True)
        pid_file = str(inst_dir / "pid")
        if self.isolate:
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                _READ_ONLY_SHIM,
                pid_file,
                str(root),
                *command,
            ]
        else:
            argv = ["/bin/sh", "-c", _PID_SHIM, pid_file, *command]
        argv = self.limits.prepare(spec.instance_id, spec.resources, argv)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **dict(spec.image.config.env),
            **dict(spec.env),
            "PORT": str(spec.port),
            "HOST": spec.host,
            "GRAVEN_INSTANCE": spec.instance_id,
            "GRAVEN_SERVICE": spec.service,
            "GRAVEN_RELEASE": release_id(spec.service, spec.release),
            "GRAVEN_IMAGE": str(spec.image.digest),
        }
        # O_APPEND: the controller rotates the log by copy-truncate under the instance.
        with self.log_path(spec.instance_id).open("ab") as log:
            for missing in unenforced(spec.resources, self.limits.supported):
                log.write(
                    f"graven: {missing.controller} limit not enforced: {missing.reason}\n".encode()
                )
            try:
                proc = detached.spawn(argv, output=log, cwd=workdir, env=env, keep_exit_status=True)
            except OSError as exc:
                raise RuntimeFailure(
                    f"{spec.instance_id}: cannot start {command[0]}: {exc.strerror or exc}",
                    hint="Fix the recipe's 'entrypoint' step, rebuild and deploy again.",
                ) from exc
            except ValueError as exc:  # e.g. a NUL byte in an environment value
                raise RuntimeFailure(
                    f"{spec.instance_id}: cannot start {command[0]}: {exc}",
                    hint="Check the service's env in graven.yaml ('graven check' names the key).",
                ) from exc
        started = detached.start_time(proc.pid)
        if started is None:
            raise RuntimeFailure(
                f"{spec.instance_id}: exited at once; log:\n{self.log_tail(spec.instance_id)}"
            )
        return Handle(pid=proc.pid, pid_start=started)

    def alive(self, handle: Handle) -> bool:
        return _stamp(handle).running()

    def orphans(self, recorded: Collection[str]) -> list[tuple[str, Handle]]:
        """Instances that run but are not in ``recorded``: started by a controller that
        died before it could record them. Each wrote its pid file as it started."""
        found = []
        for pid_file in sorted((self.state_dir / "instances").glob("*/pid")):
            instance_id = pid_file.parent.name
            if instance_id in recorded:
                continue
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            started = detached.start_time(pid)
            # The pid may have been reused since: only a process that carries the
            # instance's own id in its environment is that instance.
            if started is not None and _environ_has(pid, f"GRAVEN_INSTANCE={instance_id}"):
                found.append((instance_id, Handle(pid, started)))
        return found

    def exit_reason(self, handle: Handle) -> str:
        """How a dead instance ended, when this process started it (else unknown)."""
        if self.alive(handle):
            return ""
        code = detached.exit_status(handle.pid)
        return self.limits.explain(handle.pid, "" if code is None else detached.describe_exit(code))

    def forget(self, handle: Handle) -> None:
        """Drop what is kept about a dead instance."""
        detached.forget(handle.pid)
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


def _environ_has(pid: int, entry: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return entry.encode() in environ.split(b"\0")


def _stamp(handle: Handle) -> detached.ProcessStamp:
    return detached.ProcessStamp(handle.pid, handle.pid_start)
