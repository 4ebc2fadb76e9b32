"""Errors to messages and exit codes, the same for both entry paths.

Exit codes scripts can trust: 0 success, 1 failure, 2 usage or invalid input, 130
interrupted. Neither click nor rich is imported here: the lean entry path reports
through this module too. Errors look as ``click.secho`` shows them (red on a
terminal), JSON as :class:`~graven.cli.output.Output` emits it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any

from graven.cli.lines import isatty
from graven.errors import GravenError


class StoppedWatching(Exception):
    """Ctrl-C while a verb waits for rollouts: the verb stops watching, the controller
    goes on. Both CLI paths print ``message`` and exit 130."""

    exit_code = 130

    def __init__(self, services: list[str]) -> None:
        self.services = services
        target = services[0] if len(services) == 1 else "SERVICE"
        self.message = (
            "stopped watching; the rollout goes on — 'graven status -w' to follow, "
            f"'graven abort {target}' to stop it"
        )
        if len(services) > 1:
            self.message += f" (rolling out: {', '.join(services)})"
        super().__init__(self.message)


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
    echo_err(f"\033[31merror: {exc.message}\033[0m")
    if exc.hint:
        echo_err(f"hint: {exc.hint}")


def echo_err(text: str) -> None:
    """``click.echo(text, err=True)``: escape sequences only for a terminal."""
    stream = sys.stderr
    if stream is None:  # no stderr at all: nowhere to write
        return
    out = text + "\n"
    if not isatty(stream):
        out = _ANSI.sub("", out)
    stream.write(out)
    stream.flush()


def exit_code(run: Callable[[], int], *, debug: bool, as_json: bool) -> int:
    """Run a verb and map what it raises to a message and an exit code.

    A write the filesystem refused (full, over quota, read-only) is the operator's to
    fix, not a bug: a message and exit 1, no traceback. With ``debug`` graven's own
    errors and refused writes propagate, traceback and all."""
    try:
        return run()
    except GravenError as exc:
        if debug:
            raise
        report_error(exc, as_json=as_json)
        return exc.exit_code
    except StoppedWatching as exc:
        sys.stderr.write(exc.message + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from graven.disk import disk_error

        refused = disk_error(exc)
        if refused is None or debug:
            raise
        report_error(refused, as_json=as_json)
        return refused.exit_code


def wants_json(args: list[str]) -> bool:
    """Whether the arguments ask for ``-o json`` (errors are then JSON too)."""
    for i, a in enumerate(args):
        if a in ("-o", "--output") and i + 1 < len(args) and args[i + 1] == "json":
            return True
        if a in ("-ojson", "--output=json"):
            return True
    return False
