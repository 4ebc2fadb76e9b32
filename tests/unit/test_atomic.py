"""Crash-safe writes: the target holds the old content or the new, never a mix, and no
temp file outlives a write that failed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from graven.atomic import PendingFile, write_atomic


def test_write_atomic_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_write_atomic_can_stage_in_another_directory(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    target = tmp_path / "out" / "blob"
    write_atomic(target, b"x", tmp_dir=tmp_path / "tmp", durable=False)
    assert target.read_bytes() == b"x"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_pending_file_commits_to_a_target_chosen_at_the_end(tmp_path: Path) -> None:
    with PendingFile(tmp_path, prefix=".w-") as pending:
        pending.file.write(b"streamed ")
        pending.file.write(b"content")
        pending.commit(tmp_path / "named-by-content", mode=0o444)
    assert (tmp_path / "named-by-content").read_bytes() == b"streamed content"
    assert stat.S_IMODE((tmp_path / "named-by-content").stat().st_mode) == 0o444
    assert [p.name for p in tmp_path.iterdir()] == ["named-by-content"]


def test_a_pending_file_without_commit_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"old")
    with pytest.raises(RuntimeError), PendingFile(tmp_path) as pending:
        pending.file.write(b"half")
        raise RuntimeError("the writer failed")
    with PendingFile(tmp_path) as pending:
        pending.file.write(b"abandoned")
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
    assert (tmp_path / "target").read_bytes() == b"old"


def test_a_failed_write_names_the_target(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    with pytest.raises(OSError) as caught:
        write_atomic(tmp_path / "blocker" / "state", b"x")
    assert "blocker" in str(caught.value)
