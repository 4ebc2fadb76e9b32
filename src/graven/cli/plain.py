"""Writing without rich or click, for the lean paths in ``graven.cli.entry``.

What is written here is byte for byte what the full CLI writes: JSON the way
:class:`~graven.cli.output.Output` emits it, errors the way ``click.secho`` shows
them, and rich markup lines as rich prints them where it adds no styling. Anything
this module cannot vouch for (a terminal, a line rich might style or change) goes
to rich itself, so the output never depends on which path ran.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import TYPE_CHECKING, Any, TextIO

from graven.errors import GravenError

if TYPE_CHECKING:
    from rich.console import Console

# The styles graven's markup uses, and rich's own pattern for emoji codes.
_TAG = re.compile(r"\[(/|bold|green|red|yellow)\]")
_EMOJI_CODE = re.compile(r"(:(\S*?)(?:(?:\-)(emoji|text))?:)")
# Every character of every name in rich's emoji table (matched case-insensitively).
_EMOJI_NAME = re.compile(r"[!#&()*+\-.0-9_a-zA-Z]*")
# click's pattern for the escape sequences it strips from output that is not a tty.
_ANSI = re.compile(r"\033\[[0-?]*[ -/]*[@-~]")


def write_json(data: Any, *, sort_keys: bool = True) -> None:
    """A command's result (or error) as JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n")
    sys.stdout.flush()


def report_error(exc: GravenError, *, as_json: bool) -> None:
    """Show a GravenError: JSON on stdout, or red 'error:' and 'hint:' lines on stderr."""
    if as_json:
        write_json(exc.to_dict(), sort_keys=False)
        return
    _echo_err(f"\033[31merror: {exc.message}\033[0m")
    if exc.hint:
        _echo_err(f"hint: {exc.hint}")


def _echo_err(text: str) -> None:
    """``click.echo(text, err=True)``: escape sequences only for a terminal."""
    stream = sys.stderr
    if stream is None:  # no stderr at all: nowhere to write
        return
    out = text + "\n"
    if not _isatty(stream):
        out = _ANSI.sub("", out)
    stream.write(out)
    stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def unstyled(stream: TextIO) -> bool:
    """Whether rich writes to ``stream`` without any styling: it is not a terminal and
    no environment variable makes rich treat it as one (rich's own rules)."""
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "0"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force == ""
    return not _isatty(stream)


def plain_text(markup: str) -> str | None:
    """The text rich prints for ``markup`` on an unstyled stream, or None where that
    is not certain: anything but printable ASCII, an escape, a bracket or an emoji
    code that is not one of graven's balanced style tags."""
    if "\\" in markup or not all(" " <= c <= "~" or c == "\n" for c in markup):
        return None
    parts = _TAG.split(markup)
    texts, tags = parts[0::2], parts[1::2]
    if len(tags) % 2 or any((tag == "/") != (i % 2 == 1) for i, tag in enumerate(tags)):
        return None  # not simple open/close pairs: let rich judge them
    for text in texts:
        if "[" in text:
            return None
        if any(_EMOJI_NAME.fullmatch(m.group(2)) for m in _EMOJI_CODE.finditer(text)):
            return None
    return "".join(texts)


class PlainConsole:
    """``Console.print`` of one markup string, without importing rich when the line
    comes out plain anyway; rich (configured as ``Output`` configures it) otherwise."""

    def __init__(self, *, stderr: bool = False) -> None:
        self.stderr = stderr
        self._rich: Console | None = None

    @property
    def file(self) -> TextIO:
        return sys.stderr if self.stderr else sys.stdout

    def print(self, markup: str) -> None:
        file = self.file
        text = plain_text(markup) if unstyled(file) else None
        if text is None:
            if self._rich is None:
                from graven.cli.output import rich_console

                self._rich = rich_console(stderr=self.stderr)
            self._rich.print(markup)
            return
        file.write(text + "\n")
        file.flush()
