"""The README's first command, on a fresh clone: the whole demo, zero failed requests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_fresh_clone_runs_the_demo_with_zero_failures(tmp_path: Path) -> None:
    clone = tmp_path / "graven"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    demo_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "GRAVEN_STATE_DIR")}
    try:
        proc = subprocess.run(
            ["./scripts/demo", "--dir", str(demo_dir), "-o", "json"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        assert report["failed_requests"] == 0
        assert report["deploy_traffic"]["sent"] >= 500
        assert report["deploy_traffic"]["failed"] == 0
        assert report["rollback_traffic"]["sent"] >= 500
        assert report["rollback_traffic"]["failed"] == 0
        assert report["rollback"]["state"] == "succeeded"
        assert [e["action"] for e in report["audit"]] == ["deploy", "deploy", "rollback"]
        service = report["status"]["services"][0]
        assert service["desired_release"] == "hello@r1"
        assert len(service["instances"]) == 3
        # The commands it prints work in a fresh shell: no virtualenv on PATH, elsewhere.
        fresh = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        for command in report["commands"].values():
            assert command.startswith(str(clone / ".venv" / "bin" / "graven") + " ")
        shown = subprocess.run(
            ["bash", "-c", report["commands"]["what runs"] + " -o json"],
            cwd=tmp_path,
            env=fresh,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["services"][0]["desired_release"] == "hello@r1"
        stopped = subprocess.run(
            ["bash", "-c", report["commands"]["stop everything"]],
            cwd=tmp_path,
            env=fresh,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert stopped.returncode == 0, stopped.stderr
    finally:
        graven = clone / ".venv" / "bin" / "graven"
        if graven.exists() and (demo_dir / "graven.yaml").exists():
            subprocess.run(
                [str(graven), "-f", str(demo_dir / "graven.yaml"), "down"],
                capture_output=True,
                timeout=120,
                check=False,
            )
