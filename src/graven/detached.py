"""Detached processes: what graven leaves running (instances, routers, HAProxy and its
latency collector, the controller itself), started so they outlive whoever started
them, and found again later by any other graven process.

- ``spawn`` starts a process in a session (and process group) of its own, stdin from
  /dev/null, output to a log. Every child spawned here is kept in one table, so it is
  reaped (no zombie, no ResourceWarning) whichever object of this process looks at it
  next, and its exit status stays known when the caller asks for that.
- ``ProcessStamp`` is a pid with its kernel start time (field 22 of /proc/PID/stat):
  written to a record, it tells the very process that was started from one that
  reused its pid, so a restarted controller adopts what runs and signals nothing else.
- ``stop`` is bounded: a first signal (SIGTERM, or the program's own soft stop), a
  grace period, then SIGKILL, of the process or of its whole group.
- Unix socket addresses hold about 100 bytes: ``fits_socket_address`` tells when a
  path is too long, ``short_name`` names a stable place under /tmp instead, and
  ``private_dir`` makes sure such a place is this user's own (/tmp is shared).

Lean on purpose: every CLI verb imports it (through ``controller.paths``), so
``subprocess``, ``hashlib`` and ``tempfile`` are imported only where used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, NamedTuple

from graven.errors import GravenError

if TYPE_CHECKING:
    import subprocess

MAX_SOCKET_PATH: Final = 100  # sun_path holds 108 bytes; keep a margin
KILL_WAIT: Final = 5.0  # how long a SIGKILLed process may take to disappear
POLL: Final = 0.02


class ProcessStamp(NamedTuple):
    """A pid and its kernel start time: one process, never a later one with that pid.

    A NamedTuple rather than a dataclass: importing ``dataclasses`` is a large share of
    a lean CLI start, and this module is on that path."""

    pid: int
    start_time: int

    def running(self) -> bool:
        """True while this very process lives (zombies do not count)."""
        return is_running(self.pid, self.start_time)


class _Child(NamedTuple):
    proc: subprocess.Popen[bytes]
    keep_exit_status: bool


# Every process this process spawned, by pid. Module-level so that any object can reap
# them after the one that started them is gone.
_CHILDREN: dict[int, _Child] = {}


def _read_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` from /proc/PID/stat, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the
    # last ')' are plain: the state (field 3) first, the start time (field 22) 20th.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot), or None if it is gone.

    Zombies count as gone: they serve nothing. One that is our child is reaped here.
    """
    reap(pid)
    stat = _read_stat(pid)
    if stat is None:
        return None
    if stat[0] in ("Z", "X"):
        reap(pid, zombie=True)
        return None
    return stat[1]


def is_running(pid: int, started: int) -> bool:
    """True while ``pid`` is still the very process that started at ``started``."""
    return start_time(pid) == started


def stamp(pid: int) -> ProcessStamp | None:
    """``pid`` with its start time, or None if it is gone."""
    started = start_time(pid)
    return None if started is None else ProcessStamp(pid, started)


def reap(pid: int, *, zombie: bool = False) -> None:
    """Collect the exit status of ``pid`` if it is a child that has ended.

    A child spawned here is polled (and dropped from the table unless its exit status
    was asked to be kept). Any other pid is waited for only when ``zombie``: it is
    known to have ended, so no one else's ``wait`` can be waiting for it still."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.proc.poll() is not None and not child.keep_exit_status:
            del _CHILDREN[pid]
        return
    if zombie:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def exit_status(pid: int) -> int | None:
    """The return code of a child spawned here with ``keep_exit_status`` that has
    ended (negative: killed by that signal), or None (running, or not known here)."""
    child = _CHILDREN.get(pid)
    return None if child is None else child.proc.poll()


def forget(pid: int) -> None:
    """Drop what is kept about a child that has ended (its exit status)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.proc.poll() is not None:
        del _CHILDREN[pid]


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``killed by SIGKILL``, from a Popen return code."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


def describe_failed_start(proc: subprocess.Popen[bytes], answer_on: Path, waited: float) -> str:
    """Why a process that was to answer on ``answer_on`` within ``waited`` seconds is
    not up (asked before it is stopped): it did not answer, or how it ended."""
    if proc.poll() is None:
        return f"did not answer on {answer_on} within {waited:.0f} s"
    return f"exited with code {proc.returncode}"


def spawn(
    argv: Sequence[str],
    *,
    output: IO[bytes] | int | None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    keep_exit_status: bool = False,
    credentials: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached: a new session, stdin from /dev/null, stdout and stderr
    to ``output`` (a log file; None inherits ours), no other descriptor but
    ``pass_fds``. Raises what ``Popen`` raises (OSError, ValueError): the caller says
    what could not start, in its own terms.

    ``keep_exit_status``: keep the child's exit status after it ends until ``forget``
    (for callers that report how a process ended); otherwise it is dropped once reaped.
    ``credentials``: run as that ``(uid, gid)`` with no supplementary groups (needs root).
    """
    import subprocess  # not on a lean CLI start that starts nothing

    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
        close_fds=True,
        pass_fds=tuple(pass_fds),
        user=None if credentials is None else credentials[0],
        group=None if credentials is None else credentials[1],
        extra_groups=None if credentials is None else [],
    )
    track(proc, keep_exit_status=keep_exit_status)
    return proc


def spawn_logged(
    argv: Sequence[str], log: Path, *, cwd: Path | None = None
) -> tuple[int, subprocess.Popen[bytes]]:
    """``spawn`` with its output appended to the file ``log``, after a line that says
    when and what started. Returns the log's size before that line too: what the
    process wrote since is the tail to show when it fails to start."""
    with log.open("ab") as out:
        offset = out.tell()
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        out.write(f"--- {when} starting: {' '.join(argv)}\n".encode())
        out.flush()
        return offset, spawn(argv, output=out, cwd=cwd)


def track(proc: subprocess.Popen[bytes], *, keep_exit_status: bool = False) -> None:
    """Reap ``proc`` (a child started some other way) with those ``spawn`` started."""
    _CHILDREN[proc.pid] = _Child(proc, keep_exit_status)


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    *,
    unless_exited: subprocess.Popen[bytes] | None = None,
) -> bool:
    """Poll ``check`` until it is true (True), or ``timeout`` seconds pass or the
    child ``unless_exited`` ends first (False): how a caller awaits a process it
    started answering on its socket.

    For synchronous callers (worker threads, the CLI); async code waits on a Clock."""
    deadline = time.monotonic() + timeout
    while True:
        if unless_exited is not None and unless_exited.poll() is not None:
            return False
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def stop(
    target: ProcessStamp,
    *,
    grace: float,
    first: signal.Signals = signal.SIGTERM,
    group: bool = False,
) -> bool:
    """Send ``first`` to ``target`` (its whole process group when ``group``), wait up
    to ``grace`` seconds for it to end, then SIGKILL it and wait up to ``KILL_WAIT``.

    Only ``target`` is ever signalled: its start time is checked before each signal,
    so a pid reused in the meantime is left alone. True once it is gone. Raises
    ``PermissionError`` when the process is another user's.
    """
    for sig, wait in ((first, grace), (signal.SIGKILL, KILL_WAIT)):
        if not target.running():
            break
        try:
            if group:
                os.killpg(target.pid, sig)
            else:
                os.kill(target.pid, sig)
        except ProcessLookupError:
            break
        if wait_until(lambda: not target.running(), wait):
            break
    gone = not target.running()
    if gone:
        reap(target.pid)
    return gone


def stop_pid(
    pid: int, *, grace: float, first: signal.Signals = signal.SIGTERM, group: bool = False
) -> bool:
    """``stop`` the process that has ``pid`` now (its start time is read once here, so
    it is never confused with a later one). True once it is gone."""
    target = stamp(pid)
    return True if target is None else stop(target, grace=grace, first=first, group=group)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (a child of ours, still unreaped, so
    the pid cannot have been reused); nothing if it is gone or not ours to signal."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# ------------------------------------------------------------------ unix socket paths


def fits_socket_address(path: Path) -> bool:
    """True if ``path`` is short enough to bind or connect a unix socket to."""
    return len(os.fsencode(path.absolute())) <= MAX_SOCKET_PATH


def short_name(*parts: str | Path) -> str:
    """16 hex digits naming ``parts`` (a state dir, a service...): the same parts, the
    same name, so a later process finds a short socket place without any record."""
    import hashlib

    key = b"\0".join(os.fsencode(p) for p in parts)
    return hashlib.sha256(key).hexdigest()[:16]


def temp_dir() -> Path:
    """The system's directory for temporary files (``$TMPDIR``, else /tmp)."""
    import tempfile

    return Path(tempfile.gettempdir())


def private_dir(path: Path, *, what: str, error: type[GravenError], create: bool = True) -> Path:
    """Make sure ``path`` is a directory private to this user: created 0700 when
    ``create`` (a missing one is fine otherwise), then checked: not a symlink, owned by
    this uid, no access for group or others. In a shared place like /tmp, anything else
    could be another user's trap. Raises ``error`` naming ``what`` the directory is for.
    """
    try:
        if create:
            with contextlib.suppress(FileExistsError):  # whatever it is, it is checked next
                path.mkdir(mode=0o700)
        st = path.lstat()
    except FileNotFoundError:
        if not create:
            return path
        raise error(
            f"cannot create {what} {path}: its parent is missing",
            hint=f"Check that {path.parent} exists.",
        ) from None
    except OSError as exc:
        raise error(
            f"cannot create {what} {path}: {exc.strerror or exc}",
            hint=f"Check that {path.parent} exists and is writable.",
        ) from None
    import stat

    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a directory"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        problem = f"is open to other users (mode {st.st_mode & 0o777:o})"
    else:
        return path
    raise error(
        f"{what} {path} is not a private directory of this user: it {problem}",
        hint=f"Remove {path} (graven creates it again, mode 700), or use a shorter "
        "state directory path so the sockets fit in it.",
    )
