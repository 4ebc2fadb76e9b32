"""Styled lines: what the verbs both entry paths answer (build, deploy, rollback and
the rollout waits) write, as text and styles instead of markup.

A :data:`Line` is a tuple of plain strings and :class:`Span` s (text with a rich style
name). Nothing in a line is ever parsed, so a service name or a reason with brackets
or colons in it prints as it is. :class:`LineWriter` is the one place lines become
output: on a stream rich would not style (a pipe, a file, a log) the texts are written
as they are, without importing rich; on a terminal rich draws the same spans. Both
entry paths write through it, so what is printed never depends on which path ran.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import IO, TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


class Span(NamedTuple):
    """Text shown in a rich style ("bold", "green", "dim", ...)."""

    text: str
    style: str


Line = tuple[str | Span, ...]


def bold(text: str) -> Span:
    return Span(text, "bold")


def green(text: str) -> Span:
    return Span(text, "green")


def yellow(text: str) -> Span:
    return Span(text, "yellow")


def red(text: str) -> Span:
    return Span(text, "red")


def dim(text: str) -> Span:
    return Span(text, "dim")


def cyan(text: str) -> Span:
    return Span(text, "cyan")


def plain(line: Line) -> str:
    """The line's text without its styles."""
    return "".join(part if isinstance(part, str) else part.text for part in line)


def rich_text(line: Line) -> Text:
    """The line as a rich Text with its spans (rich is imported here)."""
    from rich.text import Text

    return Text.assemble(
        *(part if isinstance(part, str) else (part.text, part.style) for part in line)
    )


def isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def unstyled(stream: IO[str]) -> bool:
    """Whether rich writes to ``stream`` without any styling: it is not a terminal and
    no environment variable makes rich treat it as one (rich's own rules)."""
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "0"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force == ""
    return not isatty(stream)


class LineWriter:
    """Writes lines to stdout or stderr (the stream current when writing, as a test's
    capture or a redirect replaces it), or to ``file``.

    ``console`` gives the rich console to draw styled lines with; it is only called on
    a stream rich would style. A writer over a rich console handed in (``through``)
    always draws with it: that console decides about styles.
    """

    def __init__(
        self,
        *,
        stderr: bool = False,
        file: IO[str] | None = None,
        console: Callable[[], Console] | None = None,
        through: Console | None = None,
    ) -> None:
        self._stderr = stderr
        self._file = file
        self._console = console
        self._through = through

    @property
    def file(self) -> IO[str]:
        if self._through is not None:
            return self._through.file
        if self._file is not None:
            return self._file
        return sys.stderr if self._stderr else sys.stdout

    def write(self, line: Line) -> None:
        if self._through is not None:
            self._through.print(rich_text(line))
            return
        file = self.file
        if unstyled(file):
            file.write(plain(line) + "\n")
            file.flush()
            return
        self._rich().print(rich_text(line))

    def write_all(self, lines: Iterable[Line]) -> None:
        for line in lines:
            self.write(line)

    def _rich(self) -> Console:
        if self._console is not None:
            return self._console()
        from rich.console import Console

        return Console(file=self.file, highlight=False, soft_wrap=True)


Cell = str | Span


def width(text: str) -> int:
    """Columns ``text`` takes on a terminal (wide East Asian characters take two)."""
    import unicodedata

    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> list[Line]:
    """Columns as a borderless rich table lays them out when they fit (a space at each
    edge, two between columns, every cell padded to its column), header in bold. A
    cell is never cut or wrapped: a row wider than the terminal runs on."""
    widths = [width(h) for h in header]
    for row in rows:
        for n, cell in enumerate(row):
            widths[n] = max(widths[n], width(_text(cell)))
    lines: list[Line] = [(bold(plain(_row(header, widths))),)]
    lines.extend(_row(row, widths) for row in rows)
    return lines


def _text(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell.text


def _row(cells: Sequence[Cell], widths: Sequence[int]) -> Line:
    parts: list[str | Span] = [" "]
    for n, (cell, w) in enumerate(zip(cells, widths, strict=True)):
        if n:
            parts.append("  ")
        parts.extend((cell, " " * (w - width(_text(cell)))))
    parts.append(" ")
    return tuple(p for p in parts if p)
