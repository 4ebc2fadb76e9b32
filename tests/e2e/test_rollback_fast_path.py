"""``graven rollback`` answers from the lean path in ``graven.cli.entry``; these tests
hold it to the full CLI's output and exit codes, text and JSON, on real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.e2e.conftest import Project, Result

pytestmark = pytest.mark.e2e

# The full CLI, whatever entry.py would do with the same arguments.
FULL = [sys.executable, "-c", "import sys; from graven.cli.main import main; main(sys.argv[1:])"]


def run(project: Project, *args: str, lean: bool) -> Result:
    """``graven ARGS`` by the entry point (``lean``) or by the full CLI. The entry point
    runs with ``-X importtime``: its report proves which path answered, and is taken
    out of stderr before outputs are compared."""
    cmd = [sys.executable, "-X", "importtime", "-m", "graven"] if lean else FULL
    env = {**os.environ, "GRAVEN_ACTOR": "tester@ci", "GRAVEN_ROUTER": project.router}
    proc = subprocess.run(
        [*cmd, *args],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    stderr = proc.stderr
    if lean:
        imported = [line for line in stderr.splitlines() if line.startswith("import time:")]
        assert not [m for m in imported if re.search(r"\| +(click|rich|pydantic)\b", m)], (
            f"graven {' '.join(args)} took the full CLI's path"
        )
        stderr = "".join(
            line for line in stderr.splitlines(keepends=True) if not line.startswith("import time:")
        )
    return Result(proc.returncode, proc.stdout, stderr)


def same(lean: Result, full: Result) -> None:
    assert (lean.code, lean.stdout, lean.stderr) == (full.code, full.stdout, full.stderr)


def settle(project: Project) -> None:
    """Wait until the service's last rollout has ended."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rollout = project.status()["rollout"]
        if rollout is None or rollout["state"] != "running":
            return
        time.sleep(0.2)
    raise AssertionError("the rollout did not end")


def releases_masked(text: str) -> str:
    return re.sub(r"hello@r\d+", "hello@rN", text)


VOLATILE = {
    "ledger",
    "rollout",
    "id",
    "started_at",
    "finished_at",
    "switched_at",
    "progress",
    "progressed_at",
}


def shape(value: Any) -> Any:
    """JSON output with what differs between two rollbacks (ids, times, which release,
    which instance) masked, so two rollbacks' answers can be compared."""
    if isinstance(value, dict):
        return {k: "…" if k in VOLATILE else shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    if isinstance(value, str):
        return releases_masked(value)
    return value


@pytest.fixture
def switched(project: Project) -> Project:
    """v1 then v2 deployed blue-green: inside the rollback window."""
    for version in ("v1", "v2"):
        project.write_spec(
            version,
            replicas=2,
            start_timeout=None,
            strategy={"type": "blue-green", "rollback_window": "10m"},
        )
        project.graven("deploy", "-m", version)
    return project


def test_controller_errors_read_the_same(switched: Project) -> None:
    for args in (
        ("rollback", "nope"),
        ("rollback", "nope", "-o", "json"),
        ("rollback", "hello", "--to", "99"),
        ("rollback", "hello", "--to", "99", "-o", "json", "-m", "why"),
    ):
        lean = run(switched, *args, lean=True)
        assert lean.code == 2
        same(lean, run(switched, *args, lean=False))


def test_nothing_to_do_reads_the_same(switched: Project) -> None:
    text = run(switched, "rollback", "hello", "--to", "2", lean=True)
    assert (text.code, text.stdout.splitlines()[0]) == (
        0,
        "hello: already at hello@r2; nothing to do",
    )
    same(text, run(switched, "rollback", "hello", "--to", "2", lean=False))
    as_json = run(switched, "rollback", "hello", "--to", "2", "-o", "json", lean=True)
    assert as_json.json()["results"][0]["changed"] is False
    same(as_json, run(switched, "rollback", "hello", "--to", "2", "-o", "json", lean=False))


def test_rollbacks_read_the_same(switched: Project) -> None:
    """Back and forth between r1 and r2, each way taken once by each path: the answers
    match once the release and the ids are masked."""
    answers: dict[tuple[str, ...], list[Result]] = {}
    for args in (
        ("rollback", "hello", "-m", "back", "--no-wait"),
        ("rollback", "hello", "-m", "back", "--no-wait", "-o", "json"),
        ("rollback", "hello", "-m", "back"),
        ("rollback", "hello", "-m", "back", "-o", "json"),
    ):
        for lean in (True, False):
            result = run(switched, *args, lean=lean)
            assert result.code == 0, result
            answers.setdefault(args, []).append(result)
            settle(switched)
    no_wait, no_wait_json, waited, waited_json = answers.values()
    lean, full = no_wait
    same(
        Result(lean.code, releases_masked(lean.stdout), releases_masked(lean.stderr)),
        Result(full.code, releases_masked(full.stdout), releases_masked(full.stderr)),
    )
    assert "recorded; rolling out (not waiting)" in lean.stdout
    # Waiting prints progress as it sees it (timing): compare the result, not the way.
    lean, full = waited
    assert releases_masked(lean.stdout) == releases_masked(full.stdout)
    assert "serving" in lean.stdout
    for lean, full in (no_wait_json, waited_json):
        assert shape(lean.json()) == shape(full.json())
        assert (lean.stderr, full.stderr) == ("", "")
    assert waited_json[0].json()["results"][0]["rollout_result"]["state"] == "succeeded"
