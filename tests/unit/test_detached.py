"""graven.detached: spawning in a session of its own, pid + start-time stamps, bounded
stop, reaping, short socket paths and the private-directory check.

The processes are real and short-lived; every wait is a bounded poll on a condition
(never a sleep that a slow machine could outrun), and each test stops what it starts.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven import detached
from graven.controller.paths import controller_socket
from graven.errors import ControllerError, GravenError, RouterError

# A child that says it is ready (so a signal cannot land before its handler is set),
# then waits for a signal for at most 60 s (bounded even if a test fails to stop it).
IGNORES_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
WAITS = "import sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n"


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[list[detached.ProcessStamp]]:
    """Stamps of what a test started; whatever still runs at teardown is killed."""
    stamps: list[detached.ProcessStamp] = []
    yield stamps
    for s in stamps:
        if s.running():
            os.killpg(s.pid, signal.SIGKILL)
        detached.wait_until(lambda s=s: not s.running(), 10)  # type: ignore[misc]
        detached.forget(s.pid)


def start(
    tmp_path: Path, script: str, spawned: list[detached.ProcessStamp], *, keep: bool = False
) -> detached.ProcessStamp:
    log = tmp_path / f"log-{len(spawned)}"
    with log.open("ab") as out:
        proc = detached.spawn([sys.executable, "-c", script], output=out, keep_exit_status=keep)
    stamp = detached.stamp(proc.pid)
    assert stamp is not None
    spawned.append(stamp)
    if "ready" in script:
        assert detached.wait_until(lambda: b"ready" in log.read_bytes(), 30), log.read_text()
    return stamp


def test_a_spawned_process_leads_a_session_of_its_own(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    stamp = start(tmp_path, WAITS, spawned)
    assert os.getsid(stamp.pid) == stamp.pid != os.getsid(0)
    assert os.getpgid(stamp.pid) == stamp.pid
    assert stamp.running()


def test_the_stamp_tells_the_process_from_a_reused_pid(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    stamp = start(tmp_path, WAITS, spawned)
    assert detached.start_time(stamp.pid) == stamp.start_time
    assert detached.is_running(stamp.pid, stamp.start_time)
    # The same pid with another start time is another process: not running.
    assert not detached.is_running(stamp.pid, stamp.start_time + 1)
    assert not detached.ProcessStamp(stamp.pid, stamp.start_time - 1).running()


def test_a_missing_pid_has_no_start_time() -> None:
    # Beyond pid_max: never a process.
    assert detached.start_time(2**30) is None
    assert detached.stamp(2**30) is None


def test_the_stat_parser_copes_with_spaces_and_parens_in_the_name(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    odd = tmp_path / "a b) (c"
    odd.symlink_to(sys.executable)
    with (tmp_path / "log").open("ab") as out:
        proc = detached.spawn([str(odd), "-c", WAITS], output=out)
    stamp = detached.stamp(proc.pid)
    assert stamp is not None
    spawned.append(stamp)
    assert detached.wait_until(lambda: b"ready" in (tmp_path / "log").read_bytes(), 30)
    assert ") (" in Path(f"/proc/{proc.pid}/stat").read_text()
    assert detached.start_time(proc.pid) == stamp.start_time


def test_an_ended_child_is_reaped_and_its_status_kept_when_asked(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    stamp = start(tmp_path, "import sys; sys.exit(3)", spawned, keep=True)
    assert detached.wait_until(lambda: not stamp.running(), 30)
    # Reaped: no zombie left behind in /proc.
    assert not Path(f"/proc/{stamp.pid}").exists()
    assert detached.exit_status(stamp.pid) == 3
    detached.forget(stamp.pid)
    assert detached.exit_status(stamp.pid) is None


def test_an_ended_child_not_asked_to_keep_its_status_is_dropped(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    stamp = start(tmp_path, "pass", spawned)
    assert detached.wait_until(lambda: not stamp.running(), 30)
    assert detached.exit_status(stamp.pid) is None
    assert stamp.pid not in detached._CHILDREN


def test_stop_ends_a_process_with_sigterm(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    stamp = start(tmp_path, WAITS, spawned, keep=True)
    assert detached.stop(stamp, grace=30)
    assert not stamp.running()
    assert detached.exit_status(stamp.pid) == -signal.SIGTERM


def test_stop_kills_one_that_ignores_sigterm_after_the_grace(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    stamp = start(tmp_path, IGNORES_TERM, spawned, keep=True)
    assert detached.stop(stamp, grace=0.0)
    assert detached.exit_status(stamp.pid) == -signal.SIGKILL


def test_stop_of_a_group_reaches_its_members(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    # The leader starts a member of its group that ignores SIGTERM, and waits for it.
    member_pid = tmp_path / "member"
    script = (
        "import subprocess, sys, time\n"
        f"m = subprocess.Popen([sys.executable, '-c', {IGNORES_TERM!r}])\n"
        f"open({str(member_pid)!r}, 'w').write(str(m.pid))\n"
        "m.wait()\n"
    )
    leader = start(tmp_path, script, spawned)
    assert detached.wait_until(lambda: member_pid.exists() and member_pid.read_text() != "", 30)
    member = detached.stamp(int(member_pid.read_text()))
    assert member is not None
    assert os.getpgid(member.pid) == leader.pid
    assert detached.stop(leader, grace=0.0, group=True)
    assert detached.wait_until(lambda: not member.running(), 30)


def test_stop_of_what_is_gone_is_a_no_op(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    stamp = start(tmp_path, "pass", spawned)
    assert detached.wait_until(lambda: not stamp.running(), 30)
    assert detached.stop(stamp, grace=0.0)
    assert detached.stop(stamp, grace=0.0)


def test_stop_leaves_a_reused_pid_alone(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    live = start(tmp_path, WAITS, spawned)
    # A record of an earlier process with this pid: nothing is signalled.
    assert detached.stop(detached.ProcessStamp(live.pid, live.start_time - 1), grace=0.0)
    assert live.running()


def test_spawn_logged_says_what_started_and_where_its_output_begins(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"earlier run\n")
    offset, proc = detached.spawn_logged([sys.executable, "-c", "print('hello')"], log)
    assert proc.wait(timeout=30) == 0
    detached.forget(proc.pid)
    assert offset == len(b"earlier run\n")
    header, output = log.read_bytes()[offset:].decode().splitlines()
    assert header.startswith("--- ") and header.endswith(
        f"starting: {sys.executable} -c print('hello')"
    )
    assert output == "hello"


def test_a_failed_start_is_described(tmp_path: Path, spawned: list[detached.ProcessStamp]) -> None:
    stamp = start(tmp_path, WAITS, spawned)
    live = detached._CHILDREN[stamp.pid].proc
    sock = tmp_path / "admin.sock"
    assert detached.describe_failed_start(live, sock, 2.0) == f"did not answer on {sock} within 2 s"
    with (tmp_path / "log").open("ab") as out:
        ended = detached.spawn([sys.executable, "-c", "raise SystemExit(4)"], output=out)
    ended.wait(timeout=30)
    assert detached.describe_failed_start(ended, sock, 2.0) == "exited with code 4"


def test_stop_pid_of_a_gone_pid_is_done() -> None:
    assert detached.stop_pid(2**30, grace=0.0)


def test_wait_until_gives_up_when_the_child_exits(
    tmp_path: Path, spawned: list[detached.ProcessStamp]
) -> None:
    with (tmp_path / "log").open("ab") as out:
        proc = detached.spawn([sys.executable, "-c", "pass"], output=out)
    assert not detached.wait_until(lambda: False, 60, unless_exited=proc)
    assert proc.returncode == 0


def test_wait_until_is_bounded() -> None:
    assert not detached.wait_until(lambda: False, 0.0)
    assert detached.wait_until(lambda: True, 0.0)


def test_exit_descriptions() -> None:
    assert detached.describe_exit(0) == "exited with code 0"
    assert detached.describe_exit(-9) == "killed by SIGKILL"
    assert detached.describe_exit(-200) == "killed by signal 200"


# ------------------------------------------------------------------ socket paths


def test_socket_paths_that_do_not_fit_are_told(tmp_path: Path) -> None:
    assert detached.fits_socket_address(Path("/tmp/x.sock"))
    assert not detached.fits_socket_address(Path("/tmp") / ("d" * 100) / "x.sock")


def test_short_names_are_stable_and_distinct(tmp_path: Path) -> None:
    assert detached.short_name(tmp_path) == detached.short_name(tmp_path)
    assert detached.short_name(tmp_path, "web") != detached.short_name(tmp_path, "api")
    assert len(detached.short_name(tmp_path)) == 16


def test_private_dir_is_created_private(tmp_path: Path) -> None:
    made = detached.private_dir(tmp_path / "socks", what="socket directory", error=RouterError)
    assert made.is_dir()
    assert made.stat().st_mode & 0o777 == 0o700


def test_a_missing_private_dir_is_fine_unless_it_is_to_be_made(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    assert detached.private_dir(missing, what="d", error=RouterError, create=False) == missing
    assert not missing.exists()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: (p.mkdir(), p.chmod(0o777)), "open to other users"),
        (lambda p: (p.mkdir(), p.chmod(0o750)), "open to other users"),
        (lambda p: (p.with_name("real").mkdir(mode=0o700), p.symlink_to("real")), "symlink"),
        (lambda p: p.write_text(""), "not a directory"),
    ],
)
def test_a_directory_that_is_not_private_is_refused_with_the_fix(
    tmp_path: Path, make: object, problem: str
) -> None:
    shared = tmp_path / "socks"
    make(shared)  # type: ignore[operator]
    with pytest.raises(RouterError, match=problem) as caught:
        detached.private_dir(shared, what="socket directory", error=RouterError)
    assert f"socket directory {shared} is not a private directory" in caught.value.message
    assert f"Remove {shared}" in (caught.value.hint or "")


def test_a_directory_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "socks"
    mine.mkdir(mode=0o700)
    owner = mine.stat().st_uid
    # Seen from another user, this directory is someone else's.
    monkeypatch.setattr(detached.os, "getuid", lambda: owner + 1)
    with pytest.raises(GravenError, match=f"belongs to uid {owner}, not to this user"):
        detached.private_dir(mine, what="socket directory", error=GravenError)


# ------------------------------------------------------------------ the controller's socket


@pytest.fixture
def long_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state dir whose socket path does not fit, with /tmp redirected to a test dir."""
    import tempfile

    shared = tmp_path / "tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    state = tmp_path / ("s" * 100)
    state.mkdir()
    return state


def test_a_short_state_dir_keeps_the_socket_inside(tmp_path: Path) -> None:
    assert controller_socket(tmp_path) == tmp_path.resolve() / "controller.sock"


def test_the_controller_socket_of_a_long_state_dir_is_in_a_private_dir(
    long_state_dir: Path,
) -> None:
    sock = controller_socket(long_state_dir, create=True)
    assert sock.name == "controller.sock"
    assert sock.parent.parent == long_state_dir.parent / "tmp"
    assert sock.parent.stat().st_mode & 0o777 == 0o700
    assert controller_socket(long_state_dir) == sock  # the client finds the same path


def test_the_controller_socket_dir_is_refused_when_others_may_enter_it(
    long_state_dir: Path,
) -> None:
    # Whatever directory holds the socket: one that others can write to is refused.
    parent = controller_socket(long_state_dir).parent
    parent.mkdir(exist_ok=True)
    parent.chmod(0o777)
    with pytest.raises(ControllerError, match="not a private directory") as caught:
        controller_socket(long_state_dir)
    assert "Remove" in (caught.value.hint or "")
