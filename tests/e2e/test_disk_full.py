"""A full disk is no silent outage: on a real small filesystem (a 400 MiB tmpfs as the
state dir, room for the host-python base and two checkouts of the example) ``graven status`` says the state dir is full, verbs that must write there
fail with a message and a hint instead of a traceback, the service keeps serving,
and once there is room again everything works. Logs stay within their bounds."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Project, _project, eventually, pid_alive

pytestmark = [pytest.mark.e2e, pytest.mark.needs_root("mounting a small filesystem needs root")]

FS_SIZE = "400m"
LOG_MAX = 64 * 1024
LOG_KEEP = 2
FILLER = "filler"

# Wraps the example service: a thread writes CHATTY_BYTES of log lines to stdout at a
# bounded pace, then one last line, while the service serves as usual.
CHATTY = """\
import os, runpy, sys, threading, time

def chatter():
    line = ("chatter " + "x" * 1000 + "\\n").encode()
    total = int(os.environ["CHATTY_BYTES"])
    for i in range(total // (16 * len(line))):
        sys.stdout.buffer.write(line * 16)
        sys.stdout.buffer.flush()
        time.sleep(0.005)
    sys.stdout.buffer.write(b"chatter done\\n")
    sys.stdout.buffer.flush()

threading.Thread(target=chatter, daemon=True).start()
runpy.run_path("app.py", run_name="__main__")
"""


def _unmount(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        if subprocess.run(args, capture_output=True, check=False).returncode == 0:
            return


@pytest.fixture
def small_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_python_store: Path
) -> Iterator[Project]:
    """A project whose state dir is a small tmpfs (unmounted after the project's own
    teardown has stopped everything in it)."""
    monkeypatch.setenv("GRAVEN_STATE_MIN_FREE", "1M")
    monkeypatch.setenv("GRAVEN_LOG_MAX_BYTES", str(LOG_MAX))
    monkeypatch.setenv("GRAVEN_LOG_KEEP", str(LOG_KEEP))
    state_dir = tmp_path / "proj" / ".graven"
    state_dir.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(state_dir)],
        check=True,
    )
    project = _project(tmp_path / "proj", "embedded", seed=host_python_store)
    try:
        yield next(project)
    finally:
        # Teardown reads the state database: give it room, even if the test failed full.
        (state_dir / FILLER).unlink(missing_ok=True)
        with contextlib.suppress(StopIteration):
            next(project)
        _unmount(state_dir)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem has no byte left."""
    filler = directory / FILLER
    with filler.open("wb", buffering=0) as f:
        for size in (1024 * 1024, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    f.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def serves(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bool(reply.status == 200)


def state_dir_report(project: Project) -> dict[str, object]:
    data = project.graven("status", "-o", "json").json()
    report: dict[str, object] = data["state_dir"]
    return report


def assert_refused(project: Project, *args: str) -> None:
    result = project.graven(*args, check=False)
    assert result.code == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert "no space left on device" in result.stderr, result.stderr
    assert "hint: Free space" in result.stderr, result.stderr


def test_status_reports_a_full_state_dir(small_project: Project) -> None:
    project = small_project
    project.write_spec("v1", replicas=1)
    project.graven("deploy", "-m", "first")
    assert state_dir_report(project)["problem"] is None

    filler = fill(project.state_dir)
    report = state_dir_report(project)
    assert report["problem"] == f"state dir {project.state_dir} is full (0 bytes free)"
    assert report["free_bytes"] == 0
    assert "Free space" in str(report["hint"])
    human = project.graven("status")
    assert f"state dir {project.state_dir} is full (0 bytes free)" in human.stdout
    assert "hint: Free space" in human.stdout
    assert "hello@r1" in human.stdout  # and the services, as usual

    filler.unlink()
    assert eventually(lambda: state_dir_report(project)["problem"] is None, timeout=10)
    assert "is full" not in project.graven("status").stdout
    # The controller's log hears of each change once, not on every pass of its loop
    # (the line saying it was full may itself have found no room).
    controller_log = project.state_dir / "controller.log"
    assert eventually(lambda: "has room again" in controller_log.read_text(), timeout=10)
    text = controller_log.read_text()
    assert text.count("has room again") == 1
    assert text.count("is full (0 bytes free)") <= 1


def test_a_controller_that_cannot_start_says_the_state_dir_is_full(
    small_project: Project,
) -> None:
    project = small_project
    project.write_spec("v1", replicas=1)
    project.graven("deploy", "-m", "first")
    url = project.status()["url"]
    pid = project.controller_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert eventually(lambda: not pid_alive(pid), timeout=30)

    fill(project.state_dir)
    # status starts no controller: it reads the records, or says why it cannot.
    result = project.graven("status", check=False)
    assert "Traceback" not in result.stderr
    # (Reading a WAL database needs its shared-memory file: a full disk breaks reads.)
    assert result.code == 1, result
    assert result.stderr.startswith("error: cannot read the state database "), result
    assert "(its filesystem is full: 0 bytes free)" in result.stderr
    assert "hint: Free space" in result.stderr
    # A verb that changes state needs the controller, which cannot start.
    result = project.graven("abort", "hello", "-m", "why", check=False)
    assert result.code == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"error: the controller cannot start: state dir {project.state_dir} is full "
        "(0 bytes free)\n"
    ), result.stderr
    assert "hint: Free space" in result.stderr
    assert serves(url)  # the router and the instance do not need the controller


def test_verbs_that_must_write_fail_clearly_and_the_service_keeps_serving(
    small_project: Project,
) -> None:
    project = small_project
    project.write_spec("v1", replicas=1)
    project.graven("deploy", "-m", "first")
    project.write_spec("v2", replicas=1)
    project.graven("deploy", "-m", "second")
    url = project.status()["url"]

    filler = fill(project.state_dir)
    project.write_spec("v2", replicas=1, env={"COLOR": "blue"})  # a config-only change
    assert_refused(project, "deploy", "-m", "third")
    assert_refused(project, "rollback", "hello")  # the lean path
    assert_refused(project, "down")
    assert_refused(project, "init", str(project.state_dir / "new"))
    assert all(serves(url) for _ in range(20))
    assert project.status()["desired_release"] == "hello@r2"

    filler.unlink()
    project.graven("deploy", "-m", "third")
    assert project.status()["desired_release"] == "hello@r3"
    assert serves(url)


def test_an_instance_that_logs_a_lot_keeps_its_log_bounded(small_project: Project) -> None:
    project = small_project
    (project.root / "app" / "chatty.py").write_text(CHATTY)
    # Half the filesystem's size in log lines: without a bound, the log holds all of it.
    project.write_spec("v1", replicas=1, env={"CHATTY_BYTES": str(8 * 1024 * 1024)})
    spec = project.root / "graven.yaml"
    spec.write_text(spec.read_text().replace("python3 app.py", "python3 chatty.py"))
    project.graven("deploy", "-m", "chatty")
    (inst,) = project.status()["instances"]
    log = project.state_dir / "instances" / inst["id"] / "log"
    logs = [log, *(log.with_name(f"log.{n}") for n in range(1, LOG_KEEP + 1))]

    def done() -> bool:
        return any(b"chatter done" in p.read_bytes() for p in logs if p.exists())

    assert eventually(done, timeout=120)
    assert eventually(lambda: log.stat().st_size <= LOG_MAX, timeout=10)
    # The log, its rotated copies and the small file of times graven keeps beside them.
    assert sorted(p.name for p in log.parent.glob("log*")) == ["log", "log.1", "log.2", "log.marks"]
    for path in logs:
        data = path.read_bytes()
        assert len(data) <= LOG_MAX
        assert b"\0" not in data  # the instance wrote on at the start of the truncated log
    # The instance went on serving, and logging, through every rotation.
    assert project.status()["instances"][0]["state"] == "healthy"
    assert serves(project.status()["url"])
    assert (project.state_dir / "controller.log").stat().st_size <= LOG_MAX + 4096
