"""The state dir's disk (graven.disk): refused writes become DiskErrors with a hint, and
the watch reports a full state dir and logs each change of condition once."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from graven.atomic import write_atomic
from graven.disk import StateDirWatch, disk_error, size_setting
from graven.errors import DiskError, UsageError


def no_space(filename: str | None = "/state/store/blob") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", filename)


def test_no_space_is_a_disk_error_naming_the_file() -> None:
    found = disk_error(no_space())
    assert isinstance(found, DiskError)
    assert found.exit_code == 1
    assert found.message == "cannot write /state/store/blob: no space left on device"
    assert found.hint and "Free space" in found.hint


def test_without_a_file_name_the_state_dir_is_named() -> None:
    found = disk_error(no_space(None), Path("/srv/state"))
    assert found is not None
    assert found.message == "cannot write to the state dir /srv/state: no space left on device"


@pytest.mark.parametrize(
    ("code", "says", "hint"),
    [
        (errno.EDQUOT, "disk quota exceeded", "Free space"),
        (errno.EROFS, "read-only file system", "Remount"),
    ],
)
def test_quota_and_read_only_are_disk_errors(code: int, says: str, hint: str) -> None:
    found = disk_error(OSError(code, "x", "/state/state.db"))
    assert found is not None
    assert found.errno == code
    assert found.message == f"cannot write /state/state.db: {says}"
    assert found.hint and hint in found.hint


def test_a_refusal_behind_another_error_is_found() -> None:
    try:
        try:
            raise no_space()
        except OSError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert disk_error(outer) is not None


def test_sqlite_full_is_a_disk_error(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "tiny.db")) as db:
        db.execute("PRAGMA max_page_count = 2")
        db.execute("CREATE TABLE t (b BLOB)")
        with pytest.raises(sqlite3.OperationalError) as info:
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    found = disk_error(info.value, tmp_path)
    assert found is not None
    assert "no space left on device" in found.message


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOENT, "No such file or directory", "/x"),
        PermissionError(errno.EACCES, "Permission denied", "/x"),
        sqlite3.OperationalError("no such table: t"),
        ValueError("nothing to do with disks"),
    ],
)
def test_other_errors_are_not_disk_errors(exc: Exception) -> None:
    assert disk_error(exc) is None


def test_size_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAVEN_X", "")
    assert size_setting("GRAVEN_X", 7) == 7
    for text, value in [("1048576", 1 << 20), ("64M", 64 << 20), ("2g", 2 << 30), ("8KiB", 8192)]:
        monkeypatch.setenv("GRAVEN_X", text)
        assert size_setting("GRAVEN_X", 7) == value
    monkeypatch.setenv("GRAVEN_X", "1.5M")
    with pytest.raises(UsageError, match="GRAVEN_X must be a size"):
        size_setting("GRAVEN_X", 7)


class Disk:
    """Free bytes and whether a write works, as the test says."""

    def __init__(self, free: int, writable: bool = True) -> None:
        self.free = free
        self.writable = writable

    def measure(self, path: Path) -> int:
        return self.free

    def probe(self, path: Path) -> bool:
        return self.writable


def watch(disk: Disk, min_free: int = 1000) -> StateDirWatch:
    return StateDirWatch(
        Path("/srv/state"), min_free=min_free, measure=disk.measure, probe=disk.probe
    )


def test_a_state_dir_with_room_has_no_problem() -> None:
    report = watch(Disk(free=5000)).report()
    assert report == {
        "path": "/srv/state",
        "free_bytes": 5000,
        "min_free_bytes": 1000,
        "problem": None,
        "hint": None,
    }


def test_no_free_bytes_is_full() -> None:
    report = watch(Disk(free=0)).report()
    assert report["problem"] == "state dir /srv/state is full (0 bytes free)"
    assert "Free space" in report["hint"]


def test_below_the_minimum_is_almost_full() -> None:
    report = watch(Disk(free=500)).report()
    assert report["problem"] == (
        "state dir /srv/state is almost full (500 bytes free, below GRAVEN_STATE_MIN_FREE=1000 bytes)"
    )


def test_the_minimum_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAVEN_STATE_MIN_FREE", "1M")
    w = StateDirWatch(Path("/srv/state"), measure=Disk(free=512 * 1024).measure)
    assert "below GRAVEN_STATE_MIN_FREE=1M" in (w.report()["problem"] or "")


def test_a_refused_write_stays_reported_until_a_write_works() -> None:
    disk = Disk(free=10_000, writable=False)
    w = watch(disk)
    assert w.refused(OSError(errno.EDQUOT, "Disk quota exceeded", "/srv/state/state.db"))
    assert w.report()["problem"] == (
        "state dir /srv/state refuses writes (cannot write /srv/state/state.db: "
        "disk quota exceeded)"
    )
    assert w.report()["problem"] is not None  # measuring again changes nothing
    disk.writable = True
    assert w.report()["problem"] is None


def test_no_space_with_bytes_still_free_is_full() -> None:
    # e.g. no inodes left, or a reserve the controller may not use
    w = watch(Disk(free=10_000, writable=False))
    w.refused(no_space())
    assert w.report()["problem"] == "state dir /srv/state is full (10000 bytes free)"


def test_other_errors_are_not_noted() -> None:
    w = watch(Disk(free=10_000))
    assert not w.refused(ValueError("bug"))
    assert w.report()["problem"] is None


def test_each_change_of_condition_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    disk = Disk(free=10_000)
    w = watch(disk)
    caplog.set_level(logging.INFO, logger="graven.disk")
    for free in [10_000, 0, 0, 0, 5, 0, 500, 500, 10_000, 10_000]:
        disk.free = free
        for _ in range(50):  # the health loop checks every pass
            w.check()
    assert [(r.levelname, r.getMessage().split(";")[0]) for r in caplog.records] == [
        ("ERROR", "state dir /srv/state is full (0 bytes free)"),
        (
            "WARNING",
            "state dir /srv/state is almost full (5 bytes free, below GRAVEN_STATE_MIN_FREE=1000 bytes)",
        ),
        ("ERROR", "state dir /srv/state is full (0 bytes free)"),
        (
            "WARNING",
            "state dir /srv/state is almost full (500 bytes free, below GRAVEN_STATE_MIN_FREE=1000 bytes)",
        ),
        ("INFO", "state dir /srv/state has room again (9.8K free)"),
    ]


def test_a_refused_atomic_write_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "ledger.head"
    with pytest.raises(OSError) as info:
        write_atomic(target, b"{}")
    assert info.value.filename == str(target)
    found = disk_error(info.value)
    assert found is not None
    assert found.message == f"cannot write {target}: no space left on device"
    assert list(tmp_path.iterdir()) == []  # no temp file left behind
