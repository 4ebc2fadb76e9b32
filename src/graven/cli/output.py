"""Rendering: commands return plain data; this module (and the line writer it holds,
:class:`graven.cli.lines.LineWriter`) is the only place that writes.

``-o json`` prints the same data the human view is drawn from, so scripts and
people see one truth.

Long work reports progress through :meth:`Output.bar`. On a terminal that is a live
rich progress bar on stderr (erased when done, the lines printed under it stay); in
a log or CI it is just the plain progress lines, with no bar frames or cursor codes;
with ``-o json`` it is silent. rich is imported only when something is written
that rich must draw: :mod:`graven.cli.lines` writes styled lines to a pipe or a log
without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from graven.cli.exits import write_json
from graven.cli.lines import Line, LineWriter, rich_text

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, TaskID

Unit = Literal["steps", "bytes"]


def rich_console(stderr: bool = False) -> Console:
    """The rich console every command writes through (stdout, or stderr)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class Output:
    """Where a command's result goes: JSON on stdout, or a rich view.

    ``out`` and ``err`` replace the consoles for stdout and stderr (tests render into
    a StringIO). A console handed in is trusted to say whether it is a terminal; the
    default stderr must really be one for bars to show, whatever FORCE_COLOR says:
    it colours CI logs, it must not fill them with bar frames.
    """

    def __init__(self, fmt: str, *, out: Console | None = None, err: Console | None = None) -> None:
        self.json = fmt == "json"
        self._out = out
        self._err = err
        self._err_given = err is not None
        self._live: Progress | None = None
        self.lines = LineWriter(console=lambda: self.out, through=out)
        self.err_lines = LineWriter(stderr=True, console=lambda: self.err, through=err)

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = rich_console()
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = rich_console(stderr=True)
        return self._err

    def emit(self, data: Any) -> None:
        """``data`` as JSON; nothing for people (a verb with a human view uses
        :meth:`show`)."""
        if self.json:
            write_json(data)

    def show(self, data: Any, lines: Iterable[Line]) -> None:
        """``data`` as JSON, or ``lines`` (a renderer's view of it) for people."""
        if self.json:
            write_json(data)
        else:
            self.lines.write_all(lines)

    def progress(self, text: str | Line) -> None:
        """A line of progress for humans, on stderr; silent in JSON mode. While a bar
        is live the line is printed above it. ``text`` is rich markup, or a styled
        line (never parsed)."""
        if self.json:
            return
        if isinstance(text, str):
            self.err.print(text)
        elif self._live is not None:
            self.err.print(rich_text(text))
        else:
            self.err_lines.write(text)

    @property
    def bars_shown(self) -> bool:
        """Whether :meth:`bar` draws bars: text mode, on a real (not dumb) terminal."""
        if self.json:
            return False
        con = self.err
        if not con.is_terminal or con.is_dumb_terminal:
            return False
        if self._err_given:
            return True
        isatty = getattr(con.file, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # closed
            return False

    @contextlib.contextmanager
    def bar(
        self, description: str, *, total: float | None = None, unit: Unit = "steps"
    ) -> Iterator[ProgressBar]:
        """A progress bar for the work inside the ``with`` block.

        ``total`` is the number of steps, or of bytes with ``unit="bytes"``; None until
        known (set it later with :meth:`ProgressBar.update`). Where bars are not shown
        the bar does nothing but print its :meth:`ProgressBar.line` calls. A bar opened
        while another is live becomes one more row of it (in the outer bar's unit).
        """
        if self._live is not None:
            task = self._live.add_task(description, total=total)
            try:
                yield ProgressBar(self, self._live, task)
            finally:
                self._live.remove_task(task)
            return
        if not self.bars_shown:
            yield ProgressBar(self)
            return
        from rich.progress import Progress

        progress = Progress(*_columns(unit), console=self.err, transient=True)
        self._live = progress
        try:
            with progress:
                yield ProgressBar(self, progress, progress.add_task(description, total=total))
        finally:
            self._live = None


class ProgressBar:
    """One bar (a row of a live display), or a stand-in that only prints lines.

    Made by :meth:`Output.bar`; every method is safe to call whether or not a bar is
    shown, so commands drive it the same way on a terminal, in a log and in JSON mode.
    """

    def __init__(
        self, output: Output, progress: Progress | None = None, task: TaskID | None = None
    ) -> None:
        self._output = output
        self._progress = progress
        self._task = task

    @property
    def shown(self) -> bool:
        """True when this is a bar on a terminal (worth feeding byte counts)."""
        return self._progress is not None

    def line(self, text: str | Line) -> None:
        """A progress line (rich markup, or a styled line): above the bar, or alone where
        none is shown."""
        self._output.progress(text)

    def advance(self, amount: float = 1) -> None:
        """Move the bar ``amount`` steps or bytes forward."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)

    def update(
        self,
        *,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
    ) -> None:
        """Set how far the bar is, its total, or its description (None: unchanged)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, completed=completed, total=total, description=description
            )

    def child(self, description: str, total: float | None = None) -> ProgressBar:
        """Another row under this bar (e.g. one blob of a push); :meth:`remove` it when
        done. Where no bar is shown it is a stand-in too."""
        if self._progress is None:
            return ProgressBar(self._output)
        return ProgressBar(
            self._output, self._progress, self._progress.add_task(description, total=total)
        )

    def remove(self) -> None:
        """Take this row off the display (a child that is done)."""
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None


def _columns(unit: Unit) -> list[ProgressColumn]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    text = TextColumn("{task.description}")
    if unit == "bytes":
        return [text, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    return [text, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]


def short(digest: str | None) -> str:
    if not digest:
        return "-"
    return digest.removeprefix("sha256:")[:12]


def human_size(n: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 23.4 MiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
