"""When each line of an instance log was written, to within the controller's upkeep
period (about a second), without touching the instance's output path.

Instances (of any runtime) write raw bytes to ``<instance>/log`` through an
``O_APPEND`` descriptor that outlives the controller, so nothing can stamp a line as it
is written. Instead, on every upkeep pass the controller appends a *mark* to
``log.marks`` when the log has grown: the wall time and the log's size. A line that
ends at byte ``e`` was written no later than the first mark whose size reaches ``e``;
that mark's time (or the file's mtime, for lines newer than every mark) is the line's
time. So a time is an upper bound, late by at most one upkeep period: ``--since T``
never drops a line written at or after ``T``, and may show one written up to about a
second before it. Lines written while no controller ran get the time of the next mark
(or the file's mtime).

Marks count bytes across rotations: each mark is ``TIME BASE SIZE``, where ``BASE`` is
how many bytes the log held before its current segment, and rotation (copy-truncate by
:mod:`graven.logfiles`) is marked ``TIME BASE SIZE rotated``: the segment starting at
``BASE`` was copied to ``log.1`` and ended at ``BASE + SIZE``. The copy holds the
segment's tail, so ``log.k`` (the k-th last rotation) covers ``END - len(log.k)`` to
``END``. Marks older than the oldest kept copy are dropped at rotation, and a marks
file past ``MAX_MARKS`` lines loses every other old mark (coarser times for old lines).
"""

from __future__ import annotations

import bisect
import contextlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from graven.atomic import write_atomic
from graven.errors import UsageError
from graven.logfiles import LogLimits, rotate_at, rotated

MARKS_SUFFIX: Final = ".marks"
MAX_MARKS: Final = 20_000
_READ_CAP = 64 * 1024 * 1024  # bytes of one segment read at most (logs are bounded anyway)


@dataclass(frozen=True)
class Mark:
    at: float
    base: int
    size: int
    rotated: bool = False

    @property
    def total(self) -> int:
        return self.base + self.size

    def line(self) -> str:
        return f"{self.at:.3f} {self.base} {self.size}{' rotated' if self.rotated else ''}\n"


def marks_path(log: Path) -> Path:
    return log.with_name(log.name + MARKS_SUFFIX)


def parse_marks(text: str) -> list[Mark]:
    """Marks from a marks file; a torn or foreign line is skipped."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "rotated"):
            continue
        try:
            out.append(Mark(float(parts[0]), int(parts[1]), int(parts[2]), len(parts) == 4))
        except ValueError:
            continue
    return out


def compact(marks: list[Mark], keep: int, most: int = MAX_MARKS) -> list[Mark]:
    """The marks still needed once only ``keep`` rotated copies remain: those of the
    kept segments; past ``most``, every other old plain mark goes."""
    rotations = [m for m in marks if m.rotated]
    if keep == 0:
        start = current_base(marks)
        kept = [m for m in marks if m.base >= start]
    elif len(rotations) >= keep:
        start = rotations[-keep].base
        kept = [m for m in marks if m.base >= start]
    else:
        kept = list(marks)
    while len(kept) > most:
        half = len(kept) // 2
        old = [m for i, m in enumerate(kept[:half]) if m.rotated or i % 2 == 0]
        kept = old + kept[half:]
    return kept


def current_base(marks: list[Mark]) -> int:
    """Bytes before the current segment of the log."""
    if not marks:
        return 0
    last = marks[-1]
    return last.total if last.rotated else last.base


class MarkBook:
    """The controller's side: rotates a log when it is over its limit and marks it
    when it grew (one ``stat`` per log per pass, one short append when it grew)."""

    def __init__(self, limits: LogLimits, now: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.now = now
        self._known: dict[Path, tuple[int, int]] = {}  # log -> (base, size last marked)

    def pass_once(self, path: Path) -> bool:
        """Rotate and mark the log at ``path``; True if it was rotated."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            self._known.pop(path, None)
            return False
        base, marked = self._known.get(path) or self._load(path)
        if size > self.limits.max_bytes:
            end = rotate_at(path, self.limits)
            if end is None:
                return False
            marks = parse_marks(_read_text(marks_path(path)))
            marks.append(Mark(self.now(), base, end, rotated=True))
            text = "".join(m.line() for m in compact(marks, self.limits.keep))
            write_atomic(marks_path(path), text.encode(), durable=False)
            self._known[path] = (base + end, 0)
            return True
        if size < marked:  # truncated by someone else: a new segment, no copy
            base, marked = base + marked, 0
        if size != marked:
            with marks_path(path).open("a") as f:
                f.write(Mark(self.now(), base, size).line())
            self._known[path] = (base, size)
        return False

    def _load(self, path: Path) -> tuple[int, int]:
        marks = parse_marks(_read_text(marks_path(path)))
        if not marks:
            return 0, 0
        last = marks[-1]
        return (last.total, 0) if last.rotated else (last.base, last.size)

    def forget(self, keep: Iterable[Path]) -> None:
        """Drop what is cached about logs not in ``keep`` (instances gone)."""
        wanted = set(keep)
        for path in [p for p in self._known if p not in wanted]:
            del self._known[path]


# --- reading ------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One file of a log, placed in the log's byte count: ``start`` is the count of the
    log's bytes before the file's first byte (``None`` when no mark places it)."""

    path: Path
    length: int
    mtime: float
    start: int | None


@dataclass(frozen=True, order=True)
class LogLine:
    at: float  # written no later than this (see the module docstring)
    instance: str
    end: int  # the log's byte count at the line's end: orders lines of one instance
    text: str = field(compare=False)

    def to_dict(self) -> dict[str, object]:
        return {"time": iso_time(self.at), "instance": self.instance, "line": self.text}


def place_segments(files: list[tuple[Path, int, float]], marks: list[Mark]) -> list[Segment]:
    """``files`` (path, length, mtime), newest first (``log``, ``log.1``...), placed in
    the log's byte count by the marks; oldest first in the result."""
    rotations = [m for m in marks if m.rotated]
    placed: list[Segment] = []
    next_start: int | None = current_base(marks) if marks else None
    for k, (path, length, mtime) in enumerate(files):
        if k == 0:
            start = next_start
        elif len(rotations) >= k:
            start = rotations[-k].total - length
        else:
            start = None if next_start is None else next_start - length
        placed.append(Segment(path, length, mtime, start))
        next_start = start
    placed.reverse()
    if any(s.start is None for s in placed):
        # No marks at all (no controller ever ran): the files end to end, from 0.
        at = 0
        placed = [
            Segment(s.path, s.length, s.mtime, (at := at + s.length) - s.length) for s in placed
        ]
    return placed


def stamp(end: int, marks_totals: list[int], marks: list[Mark], mtime: float) -> float:
    """When the line ending at byte count ``end`` was written, at the latest: the first
    mark that covers it, else (a line no mark covers yet) the file's last write. Never
    the smaller of the two: the file's mtime moves on as the instance writes, so a line
    would change its time between two reads."""
    i = bisect.bisect_left(marks_totals, end)
    return marks[i].at if i < len(marks) else mtime


def split_lines(
    data: bytes, start: int, instance: str, marks: list[Mark], mtime: float, *, partial: bool
) -> tuple[list[LogLine], int]:
    """The lines of ``data`` (which begins at byte count ``start``), stamped, and the
    byte count after the last one taken (a last line without its newline is taken only
    when ``partial``)."""
    totals = [m.total for m in marks]
    lines: list[LogLine] = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0 and not partial:
            break
        stop = len(data) if nl < 0 else nl + 1
        end = start + stop
        text = data[pos:stop].rstrip(b"\n").decode(errors="replace")
        lines.append(LogLine(stamp(end, totals, marks, mtime), instance, end, text))
        pos = stop
    return lines, start + pos


def log_files(log: Path) -> list[tuple[Path, int, float]]:
    """``log`` and its rotated copies that exist, newest first, with length and mtime."""
    found = []
    k = 0
    while True:
        path = log if k == 0 else rotated(log, k)
        try:
            st = path.stat()
        except FileNotFoundError:
            if k > 0:
                break
        else:
            found.append((path, st.st_size, st.st_mtime))
        k += 1
    return found


def read_log(
    log: Path, instance: str, after: int = 0, *, partial: bool = True
) -> tuple[list[LogLine], int]:
    """The lines of the instance log at ``log`` (all its segments) past byte count
    ``after``, and the byte count read up to (to pass as ``after`` next time)."""
    marks = parse_marks(_read_text(marks_path(log)))
    lines: list[LogLine] = []
    upto = after
    segments = place_segments(log_files(log), marks)
    for n, seg in enumerate(segments):
        assert seg.start is not None
        if seg.start + seg.length <= upto:
            continue
        skip = max(0, upto - seg.start)
        try:
            with seg.path.open("rb") as f:
                f.seek(skip)
                data = f.read(min(seg.length - skip, _READ_CAP))
        except OSError:
            continue
        # Only the newest file may end in a line still being written.
        whole = partial or n < len(segments) - 1
        got, upto = split_lines(data, seg.start + skip, instance, marks, seg.mtime, partial=whole)
        lines += got
    return lines, upto


def merge(per_instance: Iterable[list[LogLine]]) -> list[LogLine]:
    """Lines of several instances in one list by time (each instance's own order kept,
    since its times never go down)."""
    return sorted(line for lines in per_instance for line in lines)


def select(
    lines: list[LogLine], *, since: float | None = None, tail: int | None = None
) -> list[LogLine]:
    """The lines at or after ``since`` (a unix time), then the last ``tail`` of them."""
    if since is not None:
        lines = [ln for ln in lines if ln.at >= since]
    if tail is not None:
        lines = lines[-tail:] if tail else []
    return lines


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float) -> float:
    """A unix time from ``10m``, ``1h30m``, ``2d`` (ago) or an ISO 8601 time
    (``2026-12-03T18:00:00Z``; without a zone it is UTC)."""
    value = text.strip()
    if value and _DURATION.sub("", value) == "":
        return now - sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(value))
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since must be a duration or a time (got {text!r})",
            hint="Examples: --since 10m, --since 1h30m, --since 2026-12-03T18:00:00Z.",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iso_time(at: float) -> str:
    """``2026-12-03T18:00:01.250Z``."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _read_text(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""
