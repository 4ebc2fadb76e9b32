"""Rendering: commands return plain data; this module is the only place that writes.

``-o json`` prints the same data the human view is drawn from, so scripts and
people see one truth.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class Output:
    """Where a command's result goes: JSON on stdout, or a rich view."""

    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"
        self._out: Console | None = None
        self._err: Console | None = None

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = _console()
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = _console(stderr=True)
        return self._err

    def emit(self, data: Any, render: Callable[[Console, Any], None] | None = None) -> None:
        if self.json:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()
        elif render is not None:
            render(self.out, data)

    def progress(self, text: str) -> None:
        """A line of progress for humans, on stderr; silent in JSON mode."""
        if not self.json:
            self.err.print(text)


def short(digest: str | None) -> str:
    if not digest:
        return "-"
    return digest.removeprefix("sha256:")[:12]


def ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
