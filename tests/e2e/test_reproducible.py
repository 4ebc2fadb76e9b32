"""Same inputs, same digest: two builds of one recipe in different directories, at
different times, with different umasks and file mtimes, give byte-identical OCI
manifests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SPEC = """\
version: 1
images:
  web:
    steps:
      - copy: vendor
        to: /app/vendor
      - copy: app
        to: /app
      - run: mkdir -p generated && cp /app/app.py generated/copy.py && chmod 755 generated/copy.py
      - env: {MODE: prod}
      - workdir: /app
      - expose: 8080
      - label: {team: core}
      - entrypoint: python3 app.py
"""


def _project(root: Path) -> None:
    (root / "app").mkdir(parents=True)
    (root / "app" / "app.py").write_text("print('hello')\n")
    (root / "app" / "run.sh").write_text("#!/bin/sh\nexec python3 app.py\n")
    (root / "app" / "run.sh").chmod(0o755)
    for n in range(40):
        pkg = root / "vendor" / f"pkg{n % 4}"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / f"mod{n}.py").write_text(f"VALUE = {n}\n" * 50)
    (root / "graven.yaml").write_text(SPEC)


def _build_and_export(project: Path, umask: int, layout: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}

    def graven(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "graven", *args, "-o", "json"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            preexec_fn=lambda: os.umask(umask),
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    built = json.loads(graven("build"))["images"][0]
    exported = json.loads(graven("image", "export", "web", "--layout", str(layout), "--ref", "web"))
    return {"image": built["digest"], "manifest": exported["manifest"]["digest"]}


def test_two_builds_anywhere_anytime_give_identical_manifests(tmp_path: Path) -> None:
    first = tmp_path / "a" / "project"
    _project(first)
    second = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(first, second, copy_function=shutil.copy)
    for p in [second, *second.rglob("*")]:
        os.utime(p, (1_500_000_000, 1_500_000_000), follow_symlinks=False)

    one = _build_and_export(first, 0o022, tmp_path / "layout-a")
    time.sleep(1.1)  # a different wall clock for the second build
    two = _build_and_export(second, 0o077, tmp_path / "layout-b")

    assert one == two
    index_a = (tmp_path / "layout-a" / "index.json").read_bytes()
    index_b = (tmp_path / "layout-b" / "index.json").read_bytes()
    assert index_a == index_b
    blobs_a = sorted(p.name for p in (tmp_path / "layout-a" / "blobs" / "sha256").iterdir())
    blobs_b = sorted(p.name for p in (tmp_path / "layout-b" / "blobs" / "sha256").iterdir())
    assert blobs_a == blobs_b
