"""Run one recipe ``run`` command isolated, with the image tree as its root.

The builder checks the image out into a writable directory and hands it here; the
command runs under bubblewrap (``bwrap``) with that directory bind-mounted as ``/``,
in fresh user, pid, ipc, uts, cgroup and network namespaces, with a clean
environment, a private ``/proc``, a minimal ``/dev`` and an empty ``/tmp`` (a tmpfs:
what the command leaves there is not part of the image). Whatever it writes anywhere
else lands in the tree, and only there.

Which shell runs the command (decided per step, from the tree):

``isolated``
    The tree has its own ``/bin/sh``: everything the command runs comes from the
    image, as in ``docker build``.
``isolated, host /usr read-only``
    The tree has no shell (a ``scratch`` image that was only copied into): the host's
    runtime is bound read-only under the tree (each directory of ``/usr`` except
    ``/usr/local``, the ``/bin``, ``/lib*`` symlinks of a merged-/usr system, and
    ``/etc/alternatives`` where the tree has none) so host tools work, while writes
    still land only in the tree. Nothing else of the host's ``/etc`` is there. Image
    files under those host directories are hidden while the command runs (never
    changed). The mount points this needs are removed again afterwards, so they never
    reach the image.
``on the host, not isolated``
    bubblewrap is missing or cannot create namespaces here, and the user allowed the
    unsafe fallback (``GRAVEN_UNSAFE_HOST_RUN=1``): the command runs on the host
    with the checkout as its working directory, as graven's first cut did. Without
    that permission the step fails with a ``SandboxUnavailable`` saying how to
    install bubblewrap.

Network is off (an empty network namespace: not even the host's loopback) unless the
step asks for it; then the host's network is shared, and for a tree without its own
``/etc/resolv.conf`` and ``/etc/hosts`` the host's are bound read-only, so names
resolve.

The sandbox is deterministic where the kernel lets it be: fixed hostname, fresh pid
numbering, ``SOURCE_DATE_EPOCH=0``, no inherited environment.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Literal

from graven.detached import kill_group
from graven.errors import BuildError

UNSAFE_HOST_RUN_ENV = "GRAVEN_UNSAFE_HOST_RUN"
BWRAP_ENV = "GRAVEN_BWRAP"
DEFAULT_TIMEOUT = 3600.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME = "graven-build"
INSTALL_HINT = (
    "Install bubblewrap (Debian/Ubuntu: 'apt-get install bubblewrap'; Fedora: "
    "'dnf install bubblewrap'), or, if you accept that run steps see and can change "
    f"the host, set {UNSAFE_HOST_RUN_ENV}=1."
)
# Top-level directories of the host runtime; symlinks into /usr on merged-/usr systems.
_RUNTIME_TOP = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_RUNTIME_ETC = ("etc/alternatives",)
_NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts")
_PROBE_TIMEOUT = 10.0
_SYMLINK_HOPS = 40


class RunMode(StrEnum):
    """How a run step ran; its value is what step summaries say."""

    ISOLATED = "isolated"
    HOST_RUNTIME = "isolated, host /usr read-only"
    HOST = "on the host, not isolated"


class SandboxUnavailable(BuildError):
    """bubblewrap cannot be used here and the unsafe host fallback is not allowed."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"run steps are isolated with bubblewrap, which is unavailable: {reason}",
            hint=INSTALL_HINT,
        )
        self.reason = reason


@dataclass(frozen=True)
class StepRun:
    """What a run command did: exit status (negative: killed by that signal), its
    combined stdout and stderr, the mode it ran in and whether it hit its timeout."""

    returncode: int
    output: bytes
    mode: RunMode
    timed_out: bool = False


@dataclass(frozen=True)
class Mount:
    """One bubblewrap mount: ``ro-bind`` host ``source`` at ``dest``, or ``symlink``
    ``dest`` -> ``source``."""

    kind: Literal["ro-bind", "ro-bind-try", "symlink"]
    source: str
    dest: str


# --- deciding -------------------------------------------------------------------------------


def bwrap_path() -> str | None:
    """The bubblewrap binary: ``$GRAVEN_BWRAP`` if set, else ``bwrap`` on PATH."""
    explicit = os.environ.get(BWRAP_ENV)
    if explicit is not None:
        return explicit or None
    return shutil.which("bwrap")


def host_run_allowed() -> bool:
    """Whether the user allowed the unsafe host fallback (``GRAVEN_UNSAFE_HOST_RUN=1``)."""
    return os.environ.get(UNSAFE_HOST_RUN_ENV, "").strip().lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=8)
def _probe(bwrap: str) -> str | None:
    argv = [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--",
        "/bin/sh",
        "-c",
        ":",
    ]
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
    except OSError as e:
        return f"cannot run {bwrap}: {e.strerror or e}"
    except subprocess.TimeoutExpired:
        return f"{bwrap} did not start a sandbox within {_PROBE_TIMEOUT:g}s"
    if proc.returncode != 0:
        text = proc.stdout.decode("utf-8", errors="replace").strip().splitlines()
        detail = text[-1] if text else f"exit code {proc.returncode}"
        return f"{bwrap} cannot create a sandbox here: {detail}"
    return None


def sandbox_problem(bwrap: str | None = None) -> str | None:
    """Why bubblewrap (``bwrap``, default: ``bwrap_path()``) cannot isolate run steps
    here, or None when it can. Probed once per binary and process (~20 ms)."""
    bwrap = bwrap or bwrap_path()
    if bwrap is None:
        return "bwrap is not installed (not found on PATH)"
    return _probe(bwrap)


def runs_on_host(*, allow_host: bool | None = None, bwrap: str | None = None) -> bool:
    """True when run steps will run unisolated on the host: no working sandbox here,
    and the unsafe fallback is allowed (``allow_host``, default from the environment)."""
    allowed = host_run_allowed() if allow_host is None else allow_host
    return allowed and sandbox_problem(bwrap) is not None


# --- running --------------------------------------------------------------------------------


def run_step(
    root: Path,
    workdir: str,
    env: Iterable[tuple[str, str]],
    command: str,
    *,
    network: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    allow_host: bool | None = None,
    bwrap: str | None = None,
) -> StepRun:
    """Run ``/bin/sh -c command`` with the directory ``root`` as ``/``.

    ``workdir`` is the absolute working directory inside the tree (it must exist);
    ``env`` the image's environment (``PATH`` defaults to the usual system path,
    ``HOME`` to ``/root``). ``network`` shares the host's network. The command is
    killed after ``timeout`` seconds. SandboxUnavailable when bubblewrap cannot be
    used and the host fallback is not allowed (``allow_host``, default
    ``GRAVEN_UNSAFE_HOST_RUN``).
    """
    root = Path(root)
    bwrap = bwrap if bwrap is not None else bwrap_path()
    problem = sandbox_problem(bwrap)
    if problem is not None or bwrap is None:
        if not (host_run_allowed() if allow_host is None else allow_host):
            raise SandboxUnavailable(problem or "bwrap is not installed")
        return _run_on_host(root, workdir, env, command, timeout)

    runtime: list[Mount] = []
    if resolves_to_file(root, "/bin/sh"):
        mode, shell = RunMode.ISOLATED, "/bin/sh"
    else:
        mode = RunMode.HOST_RUNTIME
        shell, runtime = host_runtime(root)
    if network:
        runtime += [
            Mount("ro-bind-try", path, path)
            for path in _NETWORK_FILES
            if not os.path.lexists(root / path.lstrip("/"))
        ]
    argv = bwrap_argv(
        bwrap,
        root,
        workdir=workdir,
        env=sandbox_env(env),
        command=command,
        network=network,
        shell=shell,
        mounts=runtime,
    )
    created = _absent_mount_points(root, [*_BASE_MOUNT_POINTS, *(m.dest for m in runtime)])
    try:
        returncode, output, timed_out = _execute(argv, cwd=None, env={}, timeout=timeout)
    finally:
        _remove_mount_points(root, created, runtime)
    return StepRun(returncode, output, mode, timed_out)


def sandbox_env(env: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The environment a sandboxed command gets: the image's, plus defaults."""
    out = dict(env)
    out.setdefault("PATH", DEFAULT_PATH)
    out.setdefault("HOME", "/root")
    out["SOURCE_DATE_EPOCH"] = "0"
    return list(out.items())


_BASE_MOUNT_POINTS = ("/proc", "/dev", "/tmp")


def bwrap_argv(
    bwrap: str,
    root: Path,
    *,
    workdir: str,
    env: Sequence[tuple[str, str]],
    command: str,
    network: bool,
    shell: str = "/bin/sh",
    mounts: Sequence[Mount] = (),
) -> list[str]:
    """The bubblewrap command line for one run step (pure)."""
    argv = [bwrap, "--bind", str(root), "/"]
    for mount in mounts:
        argv += [f"--{mount.kind}", mount.source, mount.dest]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--unshare-all"]
    if network:
        argv.append("--share-net")
    argv += [
        "--hostname",
        HOSTNAME,
        "--die-with-parent",
        "--new-session",
        "--chdir",
        workdir,
        "--clearenv",
    ]
    for name, value in env:
        argv += ["--setenv", name, value]
    return [*argv, "--", shell, "-c", command]


def host_runtime(root: Path, host: Path = Path("/")) -> tuple[str, list[Mount]]:
    """The host shell's path and the read-only mounts that make host tools work in a
    tree without its own runtime. ``/usr/local`` stays the image's own."""
    mounts: list[Mount] = []
    usr = host / "usr"
    for child in sorted(usr.iterdir()) if usr.is_dir() else []:
        if child.name == "local" or child.is_symlink() or not child.is_dir():
            continue
        mounts.append(Mount("ro-bind", str(child), f"/usr/{child.name}"))
    for name in _RUNTIME_TOP:
        path = host / name
        if path.is_symlink():
            if not os.path.lexists(root / name):
                mounts.append(Mount("symlink", os.readlink(path), f"/{name}"))  # noqa: PTH115
        elif path.is_dir():  # a host without merged /usr
            mounts.append(Mount("ro-bind", str(path), f"/{name}"))
    for extra in _RUNTIME_ETC:
        # Debian's alternatives: /usr/bin/awk -> /etc/alternatives/awk -> /usr/bin/mawk.
        if (host / extra).is_dir() and not os.path.lexists(root / extra):
            mounts.append(Mount("ro-bind", str(host / extra), f"/{extra}"))
    # Call the shell by its place under /usr when it is there: the tree may have a
    # /bin directory of its own, which then hides the host's /bin symlink.
    shell = Path(os.path.realpath(host / "bin" / "sh"))
    if shell.is_relative_to(usr) and not shell.is_relative_to(usr / "local"):
        return "/" + str(shell.relative_to(host)), mounts
    return "/bin/sh", mounts


def resolves_to_file(root: Path, path: str) -> bool:
    """Whether ``path`` names an executable regular file in the tree at ``root``,
    following symlinks as the sandbox would (absolute targets start at ``root``)."""
    parts = [p for p in PurePosixPath(path).parts if p != "/"]
    current = root
    hops = 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / name
        try:
            st = os.lstat(candidate)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _SYMLINK_HOPS:
                return False
            target = os.readlink(candidate)  # noqa: PTH115
            if target.startswith("/"):
                current = root
            parts = [p for p in PurePosixPath(target).parts if p != "/"] + parts
            continue
        if parts and not stat.S_ISDIR(st.st_mode):
            return False
        current = candidate
    try:
        st = current.stat()  # no symlinks left on the way
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


# --- mount points ---------------------------------------------------------------------------


def _absent_mount_points(root: Path, dests: Iterable[str]) -> list[Path]:
    """Paths bubblewrap will create in the tree to mount at ``dests`` (mount points and
    their missing parents). A symlink on the way is refused: bubblewrap would follow
    it, out of the place the mount was meant for."""
    created: list[Path] = []
    for dest in dests:
        path = root
        parts = PurePosixPath(dest).parts[1:]
        for depth, part in enumerate(parts):
            path = path / part
            if not os.path.lexists(path):
                if path not in created:
                    created.append(path)
            elif path.is_symlink():
                raise BuildError(
                    f"cannot run the command: the sandbox mounts {dest}, but "
                    f"/{'/'.join(parts[: depth + 1])} is a symlink in the image",
                    hint="Make it a directory in the image (or remove it) before this step.",
                )
    return created


def _remove_mount_points(root: Path, created: list[Path], mounts: Iterable[Mount]) -> None:
    """Remove what bubblewrap created in the tree, so mount points never reach the
    image; anything the command put there (it cannot, under a mount) is kept."""
    links = {root / m.dest.lstrip("/"): m.source for m in mounts if m.kind == "symlink"}
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            if os.readlink(path) == links.get(path):  # noqa: PTH115
                path.unlink()
        elif stat.S_ISDIR(st.st_mode):
            if not any(path.iterdir()):
                path.rmdir()
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            path.unlink()


# --- processes ------------------------------------------------------------------------------


def _run_on_host(
    root: Path, workdir: str, env: Iterable[tuple[str, str]], command: str, timeout: float
) -> StepRun:
    cwd = root.joinpath(*PurePosixPath(workdir).parts[1:])
    # Host PATH wins: the command runs on the host and must find the host's tools.
    run_env = {**dict(env), "PATH": os.environ.get("PATH", os.defpath)}
    run_env["SOURCE_DATE_EPOCH"] = "0"
    returncode, output, timed_out = _execute(
        ["/bin/sh", "-c", command], cwd=cwd, env=run_env, timeout=timeout
    )
    return StepRun(returncode, output, RunMode.HOST, timed_out)


def _execute(
    argv: list[str], *, cwd: Path | None, env: dict[str, str], timeout: float
) -> tuple[int, bytes, bool]:
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group to kill on timeout
        )
    except OSError as e:
        raise BuildError(f"cannot run {argv[0]}: {e.strerror or e}") from e
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        output, _ = proc.communicate()
        return proc.returncode, output, True
    except BaseException:
        kill_group(proc.pid)
        proc.wait()
        raise
    return proc.returncode, output, False
