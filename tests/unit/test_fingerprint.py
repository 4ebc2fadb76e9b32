"""The no-op build fast path: it answers only when nothing an image reads changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from graven.build import fingerprint


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    # ctime cannot be set back, so files made here are always fresh: tests that need a
    # settled project shrink the racy window instead.
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)
    root = tmp_path / "p"
    (root / "app" / "sub").mkdir(parents=True)
    (root / "app" / "main.py").write_text("x = 1\n")
    (root / "app" / "sub" / "lib.py").write_text("y = 2\n")
    spec = root / "graven.yaml"
    spec.write_text("version: 1\n")
    state = root / ".graven"
    (state / "store" / "refs").mkdir(parents=True)
    (state / "store" / "refs" / "web").write_text("sha256:" + "a" * 64 + "\n")
    old = time.time() - 60
    for p in [*root.rglob("*")]:
        os.utime(p, (old, old))
    return root, spec, state


def remember(root: Path, spec: Path, state: Path) -> None:
    sig, newest = fingerprint.signature(root, ["app"], state)
    fingerprint.remember(
        state, spec, spec.read_bytes(), {"web": ("sha256:" + "a" * 64, 3, ["app"], sig, newest)}
    )


def test_unchanged_project_is_answered_from_the_record(project: tuple[Path, Path, Path]) -> None:
    root, spec, state = project
    assert fingerprint.unchanged_images(state, spec, []) is None  # nothing recorded yet
    remember(root, spec, state)
    hit = fingerprint.unchanged_images(state, spec, ["web"])
    assert hit == [{"name": "web", "digest": "sha256:" + "a" * 64, "steps": 3}]
    assert fingerprint.unchanged_images(state, spec, ["other"]) is None


@pytest.mark.parametrize(
    "change",
    [
        lambda root, spec, state: (root / "app" / "sub" / "lib.py").write_text("y = 3\n"),
        lambda root, spec, state: (root / "app" / "new.py").write_text(""),
        lambda root, spec, state: (root / "app" / "main.py").unlink(),
        lambda root, spec, state: (root / "app" / "main.py").chmod(0o755),
        lambda root, spec, state: spec.write_text("version: 1\n# edited\n"),
        lambda root, spec, state: (state / "store" / "refs" / "web").write_text(
            "sha256:" + "b" * 64
        ),
        lambda root, spec, state: (root / ".gravenignore").write_text("*.py\n"),
    ],
    ids=["edit", "add", "delete", "chmod", "spec", "retagged", "ignore-file"],
)
def test_any_change_falls_back_to_a_real_build(
    project: tuple[Path, Path, Path], change: object
) -> None:
    root, spec, state = project
    remember(root, spec, state)
    change(root, spec, state)  # type: ignore[operator]
    assert fingerprint.unchanged_images(state, spec, ["web"]) is None


def test_recently_modified_files_are_not_vouched_for(
    project: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 2.0)
    root, spec, state = project
    (root / "app" / "main.py").write_text("x = 2\n")  # just now: a same-tick edit could follow
    remember(root, spec, state)
    assert fingerprint.unchanged_images(state, spec, ["web"]) is None


def test_the_state_dir_inside_a_copied_directory_is_ignored(
    project: tuple[Path, Path, Path],
) -> None:
    root, spec, state = project
    sig, newest = fingerprint.signature(root, ["."], state)
    fingerprint.remember(
        state, spec, spec.read_bytes(), {"web": ("sha256:" + "a" * 64, 1, ["."], sig, newest)}
    )
    (state / "store" / "scratch").write_text("written by a build")
    assert fingerprint.unchanged_images(state, spec, ["web"]) is not None
