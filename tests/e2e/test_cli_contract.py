"""The CLI's promises to scripts: JSON on every verb, exit codes, errors without tracebacks."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from pathlib import Path

import pytest

from tests.e2e.conftest import Project, free_port

pytestmark = pytest.mark.e2e


def test_every_verb_speaks_json(project: Project, tmp_path: Path) -> None:
    verbs: list[tuple[str, ...]] = [
        ("init", str(tmp_path / "fresh")),
        ("check",),
        ("schema",),
        ("build",),
        ("images",),
        ("plan",),
        ("deploy", "-m", "json everywhere"),
        ("status",),
        ("releases", "hello"),
        ("logs", "hello"),
        ("runtime",),
        ("audit",),
        ("audit", "--verify"),
        ("rollback", "hello", "--to", "1"),
        ("volume", "ls"),
        ("down", "hello"),
        ("down",),
    ]
    for verb in verbs:
        result = project.graven(*verb, "-o", "json")
        try:
            json.loads(result.stdout)
        except ValueError as exc:  # pragma: no cover - the assertion message is the point
            raise AssertionError(
                f"graven {' '.join(verb)} -o json printed: {result.stdout!r}"
            ) from exc
    # Errors are JSON too, with the usage exit code.
    bad = project.graven("releases", "nope", "-o", "json", check=False)
    assert bad.code == 2
    assert json.loads(bad.stdout)["error"]
    gone = project.graven("volume", "rm", "nope", "-o", "json", check=False)
    assert gone.code == 2
    assert json.loads(gone.stdout)["error"] == "NotFoundError"


def test_every_verb_has_help(project: Project) -> None:
    top = project.graven("--help").stdout
    for verb in [
        "init",
        "check",
        "schema",
        "build",
        "images",
        "plan",
        "deploy",
        "rollback",
        "status",
        "releases",
        "logs",
        "runtime",
        "down",
        "audit",
        "serve",
        "demo",
    ]:
        assert verb in top
        assert "-o, --output" in project.graven(verb, "--help").stdout
    assert "volume" in top
    for sub in ("ls", "rm"):
        assert "-o, --output" in project.graven("volume", sub, "--help").stdout


def test_deploy_requires_a_reason(project: Project) -> None:
    result = project.graven("deploy", check=False)
    assert result.code == 2
    assert "-m" in result.stderr
    assert "Traceback" not in result.stderr


MALFORMED = {
    "syntax": ("services:\n  hello:\n    image: [unclosed\n", 3, ""),
    "unknown key": (
        "services:\n  hello:\n    image: hello\n    port: 1\n    replica: 2\n",
        5,
        "services.hello.replica",
    ),
    "bad replicas": (
        "services:\n  hello:\n    image: hello\n    port: 1\n    replicas: three\n",
        5,
        "services.hello.replicas",
    ),
    "bad duration": (
        "services:\n  hello:\n    image: hello\n    port: 1\n    health:\n      interval: soon\n",
        6,
        "services.hello.health.interval",
    ),
    "port range": (
        "services:\n  hello:\n    image: hello\n    port: 70000\n",
        4,
        "services.hello.port",
    ),
    "boolean port": (
        "services:\n  hello:\n    image: hello\n    port: yes\n",
        4,
        "services.hello.port",
    ),
    "nul in env": (
        'services:\n  hello:\n    image: hello\n    port: 1\n    env:\n      A: "x\\0"\n',
        6,
        "services.hello.env.A",
    ),
    "unknown image": (
        "services:\n  hello:\n    image: nope\n    port: 1\n",
        3,
        "services.hello.image",
    ),
    "missing port": ("services:\n  hello:\n    image: hello\n", 2, "services.hello"),
    "bad step": ("images:\n  hello:\n    steps:\n      - cpy: app\n", 4, "images.hello.steps[0]"),
    "copy escapes": (
        "images:\n  hello:\n    steps:\n      - copy: ../etc\n      - entrypoint: x\n",
        4,
        "images.hello.steps[0]",
    ),
    "relative workdir": (
        "images:\n  hello:\n    steps:\n      - workdir: app\n      - entrypoint: x\n",
        4,
        "images.hello.steps[0]",
    ),
    "duplicate key": (
        "services:\n  hello:\n    image: hello\n    image: other\n    port: 1\n",
        4,
        "services.hello.image",
    ),
    "not a mapping": ("- just\n- a list\n", 1, ""),
    "bad strategy": (
        "services:\n  hello:\n    image: hello\n    port: 1\n    strategy:\n      max_surge: 0\n      max_unavailable: 0\n",
        5,
        "services.hello.strategy",
    ),
}

IMAGE = "images:\n  hello:\n    steps:\n      - copy: app\n        to: /app\n      - entrypoint: python3 app.py\n"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_spec_names_file_line_and_key(project: Project, case: str) -> None:
    text, line, key = MALFORMED[case]
    body = text if text.startswith(("images:", "- ")) or "[unclosed" in text else IMAGE + text
    offset = 0 if body is text else IMAGE.count("\n")
    spec = project.root / "graven.yaml"
    spec.write_text(body)
    for fmt in ("text", "json"):
        result = project.graven("check", "-o", fmt, check=False)
        assert result.code == 2, (case, result)
        assert "Traceback" not in result.stdout + result.stderr
    text_out = project.graven("check", check=False).stderr
    assert f"graven.yaml:{line + offset}" in text_out, (case, text_out)
    if key:
        assert key in text_out, (case, text_out)
    problems = project.graven("check", "-o", "json", check=False).json()["problems"]
    assert any(p["line"] == line + offset for p in problems), (case, problems)


def test_editing_a_ledger_row_fails_verify_naming_it(project: Project) -> None:
    project.graven("deploy", "-m", "first")
    project.write_spec("v2")
    project.graven("deploy", "-m", "second")
    project.graven("rollback", "hello", "-m", "third")
    assert project.graven("audit", "--verify").code == 0
    db = sqlite3.connect(project.state_dir / "state.db")
    with db:
        db.execute("UPDATE ledger SET message='nothing happened' WHERE seq=2")
    db.close()
    text = project.graven("audit", "--verify", check=False)
    assert text.code == 1
    assert "#2" in text.stderr
    as_json = project.graven("audit", "--verify", "-o", "json", check=False)
    assert as_json.code == 1
    assert as_json.json()["first_bad_entry"] == 2


def test_serve_runs_in_the_foreground_and_speaks_json(project: Project) -> None:
    import os
    import subprocess
    import sys
    import time

    from graven.controller.client import ControllerClient

    proc = subprocess.Popen(
        [sys.executable, "-m", "graven", "serve", "-o", "json"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRAVEN_ACTOR": "tester@ci"},
    )
    try:
        client = ControllerClient(project.state_dir)
        deadline = time.monotonic() + 20
        while not client.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.alive()
        # A second controller for the same state dir is refused, clearly.
        second = project.graven("serve", check=False)
        assert second.code == 1 and "already running" in second.stderr
        client.request("POST", "/v1/shutdown", {})
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert json.loads(out)["stopped"] is True


@pytest.mark.parametrize("verb", ["check", "build", "plan"])
def test_a_fifo_as_the_spec_is_refused_at_once(project: Project, verb: str) -> None:
    fifo = project.root / "spec.fifo"
    os.mkfifo(fifo)
    # Nothing ever writes to it: reading it would wait forever (the timeout is a net).
    for fmt in ("text", "json"):
        result = project.graven("-f", str(fifo), verb, "-o", fmt, timeout=60, check=False)
        assert result.code == 2, result
        assert "Traceback" not in result.stdout + result.stderr
    assert "is a named pipe (FIFO), not a spec file" in result.json()["problems"][0]["message"]


def test_check_warns_about_a_port_another_process_holds(project: Project) -> None:
    preview = free_port()
    project.write_spec(strategy={"type": "blue-green", "preview_port": preview})
    with socket.socket() as held, socket.socket() as held_preview:
        held.bind(("127.0.0.1", project.port))
        held.listen()
        held_preview.bind(("127.0.0.1", preview))
        held_preview.listen()
        text = project.graven("check")
        data = project.graven("check", "-o", "json").json()
    me = f"by pid {os.getpid()} ("
    assert f"warning: {project.root / 'graven.yaml'}:" in text.stderr
    assert f"port {project.port} on 127.0.0.1 is in use {me}" in text.stderr
    assert text.stdout.startswith("ok ")
    assert data["valid"] is True
    assert [(w["key_path"], w["line"]) for w in data["warnings"]] == [
        ("services.hello.port", 14),
        ("services.hello.strategy.preview_port", 23),
    ]
    assert f"port {preview} on 127.0.0.1 is in use {me}" in data["warnings"][1]["message"]
    # Freed: no warning.
    assert project.graven("check", "-o", "json").json()["warnings"] == []


def test_check_does_not_warn_about_the_services_own_router(project: Project) -> None:
    project.write_spec(replicas=1)
    project.graven("deploy", "-m", "router up")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", project.port)) == 0  # the router listens

    result = project.graven("check", "-o", "json")
    assert result.json()["warnings"] == []
    assert "warning" not in project.graven("check").stderr
