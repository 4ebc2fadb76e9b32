"""The view of ``graven logs``: log lines in, styled lines out (pure, like
:mod:`graven.cli.render`). A line's text is the instance's own output, shown as it is."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from graven.cli.lines import Line, cyan, dim
from graven.logtimes import LogLine


def clock_time(at: float) -> str:
    """``2026-12-03T18:50:01Z``: to the second, as precise as the times are."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_line(line: LogLine, instance_width: int = 0) -> Line:
    """One line: its time, its instance (when several are shown), its text."""
    if not instance_width:
        return (dim(clock_time(line.at)), " ", line.text)
    return (
        dim(clock_time(line.at)),
        " ",
        cyan(line.instance.ljust(instance_width)),
        "  ",
        line.text,
    )


def log_lines(lines: Sequence[LogLine], *, several: bool) -> list[Line]:
    """The lines of ``graven logs``; ``several``: lines of more than one instance may
    be shown, so each names its instance."""
    width = max((len(ln.instance) for ln in lines), default=0) if several else 0
    return [log_line(ln, width) for ln in lines]
