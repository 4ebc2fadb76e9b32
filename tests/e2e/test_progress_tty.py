"""Progress bars from the real CLI: ``graven push``, ``pull``, ``image export`` and
``image import`` with stderr on a pseudo-terminal draw bars (and still print a line per
blob or layer); with stderr on a pipe they print only the plain lines, as before.

Against a real registry (docker-registry on loopback), so the byte counting rides on
real uploads and downloads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from graven.testing.registry import Registry

pytestmark = pytest.mark.e2e

SPEC = """\
version: 1
images:
  web:
    steps:
      - copy: app
        to: /app
      - copy: data
        to: /data
      - entrypoint: python3 /app/main.py
"""
BAR = "━"
ESC = "\x1b"
BYTES = re.compile(r"(\d+\.\d)/(\d+\.\d) MB")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "app").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "graven.yaml").write_text(SPEC)
    (root / "app" / "main.py").write_text("print('hello')\n")
    # Random, so gzip keeps it at 3 MB: enough bytes for the bar to move.
    (root / "data" / "blob.bin").write_bytes(os.urandom(3_000_000))
    return root


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    out.update(TERM="xterm-256color", COLUMNS="120", PYTHONUNBUFFERED="1")
    return out


def graven_on_tty(cwd: Path, *args: str) -> tuple[str, str]:
    """Run graven with stderr on a pseudo-terminal; (stdout, what the terminal got)."""
    leader, follower = pty.openpty()
    received: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError as exc:  # EIO: every writer has closed the terminal
                if exc.errno == errno.EIO:
                    return
                raise
            if not chunk:
                return
            received.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "graven", *args],
            cwd=cwd,
            env=env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=120,
            check=False,
        )
    finally:
        os.close(follower)
        reader.join(timeout=10)
        with contextlib.suppress(OSError):
            os.close(leader)
    terminal = b"".join(received).decode(errors="replace")
    assert proc.returncode == 0, f"graven {args} exited {proc.returncode}:\n{terminal}"
    return proc.stdout.decode(), terminal


def graven_piped(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graven", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_push_and_pull_draw_byte_bars_on_a_terminal(
    project: Path, registry: Registry, tmp_path: Path
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    graven_piped(project, *state, "build", "-o", "json")
    ref = f"{registry.host}/team/web:v1"

    stdout, terminal = graven_on_tty(project, *state, "push", "web", ref)
    assert BAR in terminal
    assert "push web" in terminal
    # The overall bar ends full, in bytes, and never overshoots its total.
    frames = [(float(a), float(b)) for a, b in BYTES.findall(terminal) if float(b) >= 3.0]
    assert frames, terminal
    assert frames[-1][0] == frames[-1][1]
    assert all(done <= total for done, total in frames)
    assert terminal.count("uploaded") == 3  # a line per blob still (2 layers + config)
    assert "pushed" in stdout

    stdout, terminal = graven_on_tty(tmp_path, "--state-dir", str(tmp_path / "other"), "pull", ref)
    assert BAR in terminal
    assert "pull team/web" in terminal
    assert terminal.count("downloaded") == 3
    assert "pulled" in stdout


def test_export_and_import_draw_layer_bars_on_a_terminal(project: Path, tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    graven_piped(project, *state, "build", "-o", "json")
    layout = tmp_path / "layout"

    _, terminal = graven_on_tty(project, *state, "image", "export", "web", "--layout", str(layout))
    assert BAR in terminal
    assert re.search(r"export web .*2/2", terminal), terminal
    assert "layer 2/2" in terminal

    other = ["--state-dir", str(tmp_path / "other")]
    _, terminal = graven_on_tty(tmp_path, *other, "image", "import", str(layout), "--name", "web")
    assert BAR in terminal
    assert re.search(r"import layout .*2/2", terminal), terminal


def test_a_pipe_gets_plain_lines_and_json_gets_none(
    project: Path, registry: Registry, tmp_path: Path
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    graven_piped(project, *state, "build", "-o", "json")
    ref = f"{registry.host}/web:v1"

    text = graven_piped(project, *state, "push", "web", ref)
    assert ESC not in text.stderr and BAR not in text.stderr
    assert [line.split()[0] for line in text.stderr.splitlines()[1:]] == ["uploaded"] * 3

    quiet = graven_piped(project, *state, "push", "web", ref, "-o", "json")
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout)["skipped"] == 3

    exported = graven_piped(
        project, *state, "image", "export", "web", "--layout", str(tmp_path / "out"), "-o", "json"
    )
    assert exported.stderr == ""


def test_build_draws_a_step_bar_on_a_terminal(project: Path, tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    stdout, terminal = graven_on_tty(project, *state, "build", "--no-cache")
    assert BAR in terminal
    assert "build web" in terminal
    assert "step 1" in terminal  # the per-step lines stay above the bar
    assert "built web" in stdout
    piped = graven_piped(project, *state, "build", "--no-cache")
    assert BAR not in piped.stderr and "\x1b[" not in piped.stderr
