"""Secrets end to end: set through env_file, ${VAR} and secret_file, they reach the
instance and nothing else: not the state database (nor its WAL), the ledger, the
logs, nor any output of plan, deploy, status, releases or audit, text or JSON. And
the state dir is its owner's alone."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Project, Result, _project

pytestmark = pytest.mark.e2e

NOBODY = 65534


@pytest.fixture
def open_project(host_python_store: Path) -> Iterator[Project]:
    """A project under a directory other users may enter (pytest's tmp dirs are
    private), so that only the state dir's own modes keep them out."""
    base = Path(tempfile.mkdtemp(prefix="graven-secrets-"))
    base.chmod(0o755)
    try:
        yield from _project(base / "proj", "embedded", seed=host_python_store)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _values() -> dict[str, str]:
    tag = secrets.token_hex(8)
    return {
        "DB_PASSWORD": f"pw-envfile-{tag}",
        "API_TOKEN": f"tok-envfile-{tag}",
        "FROM_FILE": f"file-secret-{tag}",
        "FROM_VAR": f"var-secret-{tag}",
    }


def _write_secret_spec(project: Project, values: dict[str, str]) -> None:
    project.write_spec(replicas=1)
    (project.root / "secrets.env").write_text(
        "# credentials for the database\n"
        f"DB_PASSWORD={values['DB_PASSWORD']}\n"
        "\n"
        f"export API_TOKEN='{values['API_TOKEN']}'\n"
    )
    (project.root / "token.txt").write_text(values["FROM_FILE"] + "\n")
    spec = project.root / "graven.yaml"
    spec.write_text(
        spec.read_text().replace(
            "    env:\n",
            "    env_file: secrets.env\n"
            "    env:\n"
            "      FROM_FILE: {secret_file: token.txt}\n"
            '      FROM_VAR: "${GRAVEN_TEST_SECRET}"\n',
        )
    )


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def _instance_env(project: Project) -> dict[str, str]:
    status = project.status()
    assert status["instances"], status
    return _environ_of(status["instances"][0]["pid"])


def _state_files(state_dir: Path) -> list[Path]:
    """Every file under the state dir except the secrets store, where the values must be."""
    out = []
    for path in state_dir.rglob("*"):
        rel = path.relative_to(state_dir).parts
        if rel[0] == "secrets" or not path.is_file() or path.is_socket():
            continue
        out.append(path)
    return out


def _assert_nowhere(values: list[str], outputs: list[Result], state_dir: Path) -> None:
    files = _state_files(state_dir)
    names = {p.name for p in files}
    assert {"state.db", "state.db-wal", "ledger.head", "controller.log"} <= names, names
    assert any(p.name == "log" and p.parent.parent.name == "instances" for p in files)
    for value in values:
        for result in outputs:
            assert value not in result.stdout and value not in result.stderr
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value} leaked into {path}"


def _outputs(project: Project) -> list[Result]:
    g = project.graven
    return [
        g("status"),
        g("status", "-o", "json"),
        g("status", "hello", "-o", "json"),
        g("releases", "hello"),
        g("releases", "hello", "-o", "json"),
        g("audit"),
        g("audit", "-o", "json"),
        g("audit", "--verify", "-o", "json"),
        g("plan"),
        g("plan", "-o", "json"),
    ]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_reach_the_instance_and_no_record_or_output(
    open_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = open_project
    values = _values()
    monkeypatch.setenv("GRAVEN_TEST_SECRET", values["FROM_VAR"])
    _write_secret_spec(project, values)

    outputs = [project.graven("plan"), project.graven("plan", "-o", "json")]
    first_plan = outputs[-1].json()["plans"][0]
    assert first_plan["changed"]
    outputs.append(project.graven("deploy", "-m", "with secrets", "-o", "json"))
    assert outputs[-1].json()["results"][0]["rollout_result"]["state"] == "succeeded"

    env = _instance_env(project)
    for key, value in values.items():
        assert env[key] == value, key
    assert env["VERSION"] == "v1"

    outputs += _outputs(project)
    _assert_nowhere(list(values.values()), outputs, project.state_dir)

    # The database holds references, and the plan shows them.
    rows = project.graven("releases", "hello", "-o", "json").json()["releases"]
    assert len(rows) == 1
    unchanged = project.graven("plan", "-o", "json").json()["plans"][0]
    assert not unchanged["changed"]

    # A changed secret is a change plan shows (as a changed reference) and deploy makes.
    rotated = values["FROM_VAR"].replace("var-secret", "var-rotated")
    monkeypatch.setenv("GRAVEN_TEST_SECRET", rotated)
    plan_text = project.graven("plan")
    plan_json = project.graven("plan", "-o", "json")
    change = plan_json.json()["plans"][0]
    assert change["changed"] and change["to"] == "hello@r2"
    (env_change,) = change["changes"]
    old_ref, new_ref = re.findall(r"<secret sha256:[0-9a-f]{64}>", env_change)
    assert env_change == f"env FROM_VAR: '{old_ref}' -> '{new_ref}'"
    assert old_ref != new_ref
    assert env_change in " ".join(plan_text.stdout.split())
    outputs += [plan_text, plan_json]
    outputs.append(project.graven("deploy", "-m", "rotate the token", "-o", "json"))
    assert _instance_env(project)["FROM_VAR"] == rotated
    outputs += _outputs(project)
    _assert_nowhere([*values.values(), rotated], outputs, project.state_dir)

    # The values live in the secrets store only: private files in a private dir.
    store = project.state_dir / "secrets"
    kept = {p.read_text() for p in store.iterdir() if p.name != "key"}
    assert {*values.values(), rotated} <= kept
    assert _mode(store) == 0o700
    assert {_mode(p) for p in store.iterdir()} == {0o600}
    assert _mode(project.state_dir) == 0o700
    for name in ("state.db", "state.db-wal", "ledger.head", "controller.log"):
        assert _mode(project.state_dir / name) == 0o600, name


def _as_nobody(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            *args,
        ],
        cwd=project.root,  # the project is readable: only its state dir is private
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.needs_root("reading as another user needs root")
def test_another_user_cannot_read_the_state_dir(open_project: Project) -> None:
    project = open_project
    # A state dir left open (as older versions made it) is tightened on first use.
    project.state_dir.mkdir(mode=0o755, exist_ok=True)
    project.state_dir.chmod(0o755)
    project.graven("deploy", "-m", "first")

    db = project.state_dir / "state.db"
    read = _as_nobody(project, sys.executable, "-c", f"open({str(db)!r}, 'rb').read()")
    assert read.returncode != 0
    assert "PermissionError" in read.stderr

    state = str(project.state_dir)
    for args in (
        ["audit"],
        ["audit", "--verify"],
        ["--state-dir", state, "audit"],
        ["releases", "hello"],
        ["status"],
        ["rollback", "hello"],
    ):
        run = _as_nobody(project, sys.executable, "-m", "graven", *args)
        assert run.returncode == 1, (args, run.stdout, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr
        assert f"cannot read {state}" in run.stderr, run.stderr
        assert "permission denied" in run.stderr
        assert "uid 0" in run.stderr
    as_json = _as_nobody(project, sys.executable, "-m", "graven", "audit", "-o", "json")
    assert as_json.returncode == 1
    assert '"StateAccessError"' in as_json.stdout + as_json.stderr
    assert _mode(project.state_dir) == 0o700
    assert _mode(project.state_dir / "state.db") == 0o600
