"""Bounded logs (graven.logfiles): copy-truncate rotation under writers that hold the
log open with O_APPEND, size and count limits, and the controller's own handler."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.errors import UsageError
from graven.logfiles import (
    LogLimits,
    RotatingStreamHandler,
    appends_to,
    log_limits,
    rotate,
    rotate_all,
    rotated,
)


def lines(n: int, tag: str = "line", width: int = 100) -> bytes:
    return b"".join(f"{tag} {i:06d} ".encode().ljust(width - 1, b"x") + b"\n" for i in range(n))


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "instances" / "web-r1-abcd" / "log"


@pytest.fixture
def appender(log: Path) -> Iterator[int]:
    """A descriptor like the one an instance writes its stdout to."""
    log.parent.mkdir(parents=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    yield fd
    os.close(fd)


def test_a_log_under_the_limit_is_left_alone(log: Path, appender: int) -> None:
    os.write(appender, lines(10))
    assert not rotate(log, LogLimits(max_bytes=4096, keep=2))
    assert log.read_bytes() == lines(10)
    assert not rotated(log, 1).exists()


def test_rotation_bounds_the_size_of_the_log_and_of_its_copy(log: Path, appender: int) -> None:
    os.write(appender, lines(1000))  # 100 000 bytes, limit 4096
    assert rotate(log, LogLimits(max_bytes=4096, keep=2))
    assert log.stat().st_size == 0
    copy = rotated(log, 1).read_bytes()
    assert 0 < len(copy) <= 4096
    # The copy is the newest part of the log, starting at a line.
    assert lines(1000).endswith(copy)
    assert copy.startswith(b"line ")


def test_rotation_keeps_at_most_keep_copies(log: Path, appender: int) -> None:
    limits = LogLimits(max_bytes=4096, keep=2)
    for round_ in range(5):
        os.write(appender, lines(100, tag=f"round{round_}"))
        assert rotate(log, limits)
    assert sorted(p.name for p in log.parent.iterdir()) == ["log", "log.1", "log.2"]
    assert rotated(log, 1).read_bytes().startswith(b"round4 ")
    assert rotated(log, 2).read_bytes().startswith(b"round3 ")


def test_a_smaller_keep_drops_the_copies_beyond_it(log: Path, appender: int) -> None:
    for _ in range(4):
        os.write(appender, lines(100))
        rotate(log, LogLimits(max_bytes=4096, keep=4))
    assert rotated(log, 4).exists()
    os.write(appender, lines(100))
    rotate(log, LogLimits(max_bytes=4096, keep=1))
    assert sorted(p.name for p in log.parent.iterdir()) == ["log", "log.1"]


def test_keep_zero_truncates_without_copies(log: Path, appender: int) -> None:
    os.write(appender, lines(100))
    assert rotate(log, LogLimits(max_bytes=4096, keep=0))
    assert log.stat().st_size == 0
    assert [p.name for p in log.parent.iterdir()] == ["log"]


def test_a_writer_holding_an_append_fd_keeps_writing_to_the_log(log: Path, appender: int) -> None:
    os.write(appender, lines(1000, tag="before"))
    assert rotate(log, LogLimits(max_bytes=4096, keep=1))
    os.write(appender, lines(3, tag="after"))
    # The writer's next line lands at the start of the truncated log: no hole of NULs
    # where the old content was, nothing written to the copy.
    assert log.read_bytes() == lines(3, tag="after")
    assert b"after" not in rotated(log, 1).read_bytes()


def test_a_writer_in_another_process_keeps_writing_after_rotation(log: Path) -> None:
    log.parent.mkdir(parents=True)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    with log.open("ab") as out:
        pid = os.fork()
        if pid == 0:  # the "instance": a burst, then waits for the rotation, then a line
            os.write(out.fileno(), lines(500, tag="early"))
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            os.write(out.fileno(), b"late\n")
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"r"
        assert rotate(log, LogLimits(max_bytes=4096, keep=1))
        os.write(go_w, b"g")
    finally:
        _, status = os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert log.read_bytes() == b"late\n"
    assert rotated(log, 1).read_bytes().startswith(b"early ")


def test_the_log_is_truncated_even_when_the_copy_cannot_be_written(
    log: Path, appender: int
) -> None:
    os.write(appender, lines(100))
    # Where the copy would be written is taken (as on a full disk, the copy fails).
    (log.parent / ".log.1.tmp").mkdir()
    assert rotate(log, LogLimits(max_bytes=4096, keep=1))
    assert log.stat().st_size == 0
    assert not rotated(log, 1).exists()


def test_rotate_all_skips_missing_logs(tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    big.write_bytes(lines(100))
    done = rotate_all([tmp_path / "gone.log", big], LogLimits(max_bytes=4096, keep=1))
    assert done == [big]


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAVEN_LOG_MAX_BYTES", raising=False)
    monkeypatch.delenv("GRAVEN_LOG_KEEP", raising=False)
    assert log_limits() == LogLimits(10 * 1024 * 1024, 3)
    monkeypatch.setenv("GRAVEN_LOG_MAX_BYTES", "256K")
    monkeypatch.setenv("GRAVEN_LOG_KEEP", "5")
    assert log_limits() == LogLimits(256 * 1024, 5)
    monkeypatch.setenv("GRAVEN_LOG_MAX_BYTES", "2MiB")
    assert log_limits().max_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("GRAVEN_LOG_MAX_BYTES", "lots", "GRAVEN_LOG_MAX_BYTES must be a size"),
        ("GRAVEN_LOG_MAX_BYTES", "10X", "GRAVEN_LOG_MAX_BYTES must be a size"),
        ("GRAVEN_LOG_MAX_BYTES", "100", "GRAVEN_LOG_MAX_BYTES must be at least 4K"),
        ("GRAVEN_LOG_KEEP", "-1", "GRAVEN_LOG_KEEP must be a number 0-100"),
        ("GRAVEN_LOG_KEEP", "1000", "GRAVEN_LOG_KEEP must be a number 0-100"),
    ],
)
def test_bad_limits_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError) as info:
        log_limits()
    assert says in info.value.message
    assert info.value.hint and "Unset it" in info.value.hint


def test_appends_to_tells_an_append_stream_on_that_file(tmp_path: Path) -> None:
    path = tmp_path / "controller.log"
    with path.open("a") as stream:
        assert appends_to(stream, path)
        assert not appends_to(stream, tmp_path / "other.log")
    with path.open("w") as stream:
        assert not appends_to(stream, path)  # truncating under it would leave a hole


def test_the_controller_handler_bounds_its_log_and_keeps_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "controller.log"
    logger = logging.getLogger("graven.test.rotating")
    logger.propagate = False
    with path.open("a") as stream:
        handler = RotatingStreamHandler(stream, path, LogLimits(max_bytes=4096, keep=2))
        logger.addHandler(handler)
        try:
            for i in range(500):
                logger.warning("record %04d %s", i, "y" * 80)
            # What else writes to the stream (a crash's traceback) lands in the log.
            stream.write("Traceback (most recent call last): boom\n")
            stream.flush()
        finally:
            logger.removeHandler(handler)
    record = len(f"record 0000 {'y' * 80}\n")
    assert path.stat().st_size <= 4096 + record + 64
    assert path.read_text().endswith("Traceback (most recent call last): boom\n")
    assert "\0" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "controller.log",
        "controller.log.1",
        "controller.log.2",
    ]
