"""Times of log lines from the controller's marks, across rotations; merging, --since
and --tail over fixture files; the logs view."""

from __future__ import annotations

from pathlib import Path

import pytest

from graven.cli.lines import plain
from graven.cli.render_logs import log_lines
from graven.errors import UsageError
from graven.logfiles import LogLimits
from graven.logtimes import (
    LogLine,
    Mark,
    MarkBook,
    compact,
    marks_path,
    merge,
    parse_marks,
    parse_since,
    read_log,
    select,
    stamp,
)

LIMITS = LogLimits(max_bytes=4096, keep=2)


class Clock:
    def __init__(self) -> None:
        self.at = 1_000.0

    def __call__(self) -> float:
        return self.at


def write(log: Path, text: str) -> None:
    with log.open("a") as f:
        f.write(text)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "web-r1-0001" / "log"
    path.parent.mkdir()
    path.touch()
    return path


def test_each_line_gets_the_time_of_the_first_mark_that_saw_it(log: Path) -> None:
    clock = Clock()
    book = MarkBook(LIMITS, clock)
    write(log, "one\ntwo\n")
    clock.at = 1_001.0
    book.pass_once(log)
    write(log, "three\n")
    clock.at = 1_002.0
    book.pass_once(log)
    book.pass_once(log)  # nothing new: no mark
    assert len(parse_marks(marks_path(log).read_text())) == 2
    lines, upto = read_log(log, "web-r1-0001")
    assert [(ln.text, ln.at) for ln in lines] == [
        ("one", 1001.0),
        ("two", 1001.0),
        ("three", 1002.0),
    ]
    assert upto == len("one\ntwo\nthree\n")


def test_lines_after_the_last_mark_take_the_files_mtime(log: Path) -> None:
    write(log, "unmarked\n")
    (line,), _ = read_log(log, "web-r1-0001")
    assert line.at == log.stat().st_mtime


def test_times_survive_rotation_and_the_copies_are_read_in_order(log: Path) -> None:
    clock = Clock()
    book = MarkBook(LIMITS, clock)
    expected: dict[str, float] = {}  # line -> the time of the pass after it was written
    pending: list[str] = []
    for n in range(300):
        text = f"line {n:03d} " + "x" * 40
        write(log, text + "\n")
        pending.append(text)
        if n % 25 == 24:
            clock.at += 1
            book.pass_once(log)
            expected.update(dict.fromkeys(pending, clock.at))
            pending = []
    assert log.with_name("log.1").exists() and log.with_name("log.2").exists()
    lines, _ = read_log(log, "web-r1-0001")
    texts = [ln.text for ln in lines]
    assert texts == sorted(set(texts))  # oldest copy first, each in order, no line twice
    assert texts[-1].startswith("line 299")
    assert len(texts) > 150  # the two copies and the log (each copy holds a bounded tail)
    assert [ln.at for ln in lines] == [expected[t] for t in texts]


def test_the_marks_file_stays_bounded(log: Path) -> None:
    clock = Clock()
    book = MarkBook(LogLimits(max_bytes=4096, keep=1), clock)
    for _ in range(400):
        write(log, "y" * 200 + "\n")
        clock.at += 1
        book.pass_once(log)
    marks = parse_marks(marks_path(log).read_text())
    rotations = [m for m in marks if m.rotated]
    assert 1 <= len(rotations) <= 2  # only what the one kept copy needs
    assert len(marks) < 60


def test_compact_thins_old_marks_past_the_cap() -> None:
    marks = [Mark(float(i), 0, i) for i in range(1, 101)]
    kept = compact(marks, keep=3, most=60)
    assert len(kept) <= 60
    assert kept[-30:] == marks[-30:]  # recent marks keep their precision


def test_a_torn_marks_line_is_skipped() -> None:
    assert parse_marks("10.0 0 5\n11.0 0 9 rotated\n12.0 0\nbad line here x\n") == [
        Mark(10.0, 0, 5),
        Mark(11.0, 0, 9, rotated=True),
    ]


def test_reading_on_from_an_offset_gives_only_new_whole_lines(log: Path) -> None:
    write(log, "first\nhalf")
    lines, upto = read_log(log, "web-r1-0001", partial=False)
    assert [ln.text for ln in lines] == ["first"]
    write(log, " done\nnext\n")
    lines, upto = read_log(log, "web-r1-0001", upto, partial=False)
    assert [ln.text for ln in lines] == ["half done", "next"]
    assert read_log(log, "web-r1-0001", upto, partial=False)[0] == []


def test_following_reads_across_a_rotation_without_losing_or_repeating(log: Path) -> None:
    clock = Clock()
    book = MarkBook(LIMITS, clock)
    write(log, "before\n")
    book.pass_once(log)
    seen, upto = read_log(log, "web-r1-0001", partial=False)
    assert [ln.text for ln in seen] == ["before"]
    write(log, "z" * 5000 + "\nlast of the old segment\n")
    clock.at += 1
    assert book.pass_once(log)  # rotated
    write(log, "first of the new one\n")
    more, upto = read_log(log, "web-r1-0001", upto, partial=False)
    assert [ln.text for ln in more][-2:] == ["last of the old segment", "first of the new one"]
    assert "before" not in [ln.text for ln in more]


def lines_of(instance: str, *times: float) -> list[LogLine]:
    return [LogLine(t, instance, n, f"{instance} {n}") for n, t in enumerate(times)]


def test_merge_interleaves_by_time_and_keeps_each_instances_order() -> None:
    a = lines_of("web-r1-aaaa", 1.0, 3.0, 3.0)
    b = lines_of("web-r2-bbbb", 2.0, 3.0)
    merged = merge([a, b])
    assert [ln.text for ln in merged] == [
        "web-r1-aaaa 0",
        "web-r2-bbbb 0",
        "web-r1-aaaa 1",
        "web-r1-aaaa 2",
        "web-r2-bbbb 1",
    ]


def test_since_and_tail() -> None:
    merged = merge([lines_of("web-r1-aaaa", 1.0, 2.0, 3.0, 4.0)])
    assert [ln.at for ln in select(merged, since=2.5)] == [3.0, 4.0]
    assert [ln.at for ln in select(merged, tail=1)] == [4.0]
    assert [ln.at for ln in select(merged, since=1.5, tail=2)] == [3.0, 4.0]
    assert select(merged, tail=0) == []


def test_since_reads_durations_and_times() -> None:
    now = 100_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("1h30m", now) == now - 5400
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("1970-01-01T00:01:40Z", now) == 100.0
    assert parse_since("1970-01-01T00:01:40", now) == 100.0  # UTC without a zone
    assert parse_since("1970-01-01T01:01:40+01:00", now) == 100.0
    with pytest.raises(UsageError, match="--since must be a duration or a time"):
        parse_since("yesterday", now)


def test_the_view_names_instances_only_when_several_may_show() -> None:
    lines = [LogLine(0.0, "web-r1-aaaa", 1, "hello [bold]x[/bold]")]
    assert plain(log_lines(lines, several=False)[0]) == "1970-01-01T00:00:00Z hello [bold]x[/bold]"
    assert plain(log_lines(lines, several=True)[0]) == (
        "1970-01-01T00:00:00Z web-r1-aaaa  hello [bold]x[/bold]"
    )


def test_a_marked_line_keeps_its_time_while_the_file_grows() -> None:
    # The line ending at byte 10 is covered by the mark at t=5. The file's mtime was 3
    # when first read and 9 later (the instance wrote more): the line's time is the
    # mark's both times, not the smaller mtime of the first read.
    marks = [Mark(5.0, 0, 20)]
    totals = [m.total for m in marks]
    assert stamp(10, totals, marks, mtime=3.0) == stamp(10, totals, marks, mtime=9.0) == 5.0
    # A line past the last mark takes the file's last write.
    assert stamp(30, totals, marks, mtime=9.0) == 9.0
