"""The ``graven`` entry point. Two verbs are recognised here, before the CLI framework,
rich or the spec validator is imported:

- ``graven build``: "never run anything twice" includes not parsing an unchanged
  spec, and the no-op answer should not wait for an interpreter full of modules;
- ``graven rollback``: inside a blue-green rollback window a rollback is a traffic
  switch, and without this path the interpreter's start-up would be most of its wait.

This module only recognises their arguments: what runs then is the function the
click verb calls (:func:`graven.cli.build_flow.build_verb`,
:func:`graven.cli.rollouts.rollback`), and errors map to exit codes through
:mod:`graven.cli.exits`, as in the full CLI. Anything not recognised here (another
verb, ``--help``, ``--debug``, a value click would check) goes to the full CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graven.cli.context import AppContext
    from graven.cli.output import Output


def _split_globals(argv: list[str], verb: str) -> tuple[str | None, str | None, list[str]] | None:
    """``[-f FILE] [--state-dir DIR] VERB ARGS...`` as (FILE, DIR, ARGS); None for
    anything else, and for values click would refuse (a directory as FILE, a file as
    DIR), so that the full CLI reports them."""
    spec_file = state_dir = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == verb:
            return spec_file, state_dir, argv[i + 1 :]
        if arg not in ("-f", "--file", "--state-dir") or i + 1 >= len(argv):
            return None
        value = argv[i + 1]
        if not value or value.startswith("-"):
            return None
        if arg == "--state-dir":
            if state_dir is not None or Path(value).is_file():
                return None
            state_dir = value
        else:
            if spec_file is not None or Path(value).is_dir():
                return None
            spec_file = value
        i += 2
    return None


# Each recognised verb's options, by the parameter they set: flags, then options that
# take a value. tests/unit/test_cli_lean.py holds them to the click verbs' options.
BUILD_FLAGS = {"--no-cache": "no_cache"}
BUILD_VALUES = {"-o": "output", "--output": "output"}
ROLLBACK_FLAGS = {"--detach": "no_wait", "--no-wait": "no_wait"}
ROLLBACK_VALUES = {"--to": "to", "-m": "message", "--message": "message", **BUILD_VALUES}


def _options(
    rest: list[str], flags: dict[str, str], values: dict[str, str]
) -> tuple[list[str], dict[str, str]] | None:
    """``rest`` as (arguments, {parameter: value}), options in any order, each once
    (a flag's value is ""); None for an unknown option, a repeated one, or a value
    click might read otherwise (missing, or starting with '-')."""
    arguments: list[str] = []
    seen: dict[str, str] = {}
    args = iter(rest)
    for arg in args:
        if arg in flags:
            name, value = flags[arg], ""
        elif arg in values:
            name, value = values[arg], next(args, "-")
            if value.startswith("-"):
                return None
        elif arg.startswith("-"):
            return None
        else:
            arguments.append(arg)
            continue
        if name in seen:
            return None
        seen[name] = value
    if seen.get("output", "text") not in ("json", "text"):
        return None
    return arguments, seen


def _build_args(rest: list[str]) -> tuple[list[str], bool, str] | None:
    """``[IMAGE...] [--no-cache] [-o json|text]`` as (images, no_cache, output)."""
    parsed = _options(rest, BUILD_FLAGS, BUILD_VALUES)
    if parsed is None:
        return None
    names, seen = parsed
    return names, "no_cache" in seen, seen.get("output", "text")


def _rollback_args(rest: list[str]) -> tuple[str, int | None, str, bool, str] | None:
    """``SERVICE [--to N] [-m MSG] [--detach|--no-wait] [-o json|text]`` as (service,
    to, message, no_wait, output)."""
    parsed = _options(rest, ROLLBACK_FLAGS, ROLLBACK_VALUES)
    if parsed is None:
        return None
    arguments, seen = parsed
    to = seen.get("to")
    if len(arguments) != 1 or (to is not None and not (to.isascii() and to.isdigit())):
        return None
    message = seen.get("message", "rollback")
    output = seen.get("output", "text")
    return arguments[0], int(to) if to is not None else None, message, "no_wait" in seen, output


def recognised(argv: list[str]) -> Callable[[], int] | None:
    """The verb call ``argv`` asks for, if this module recognises it: the same call the
    click verb makes, returning the exit code. None: leave ``argv`` to the full CLI."""
    for verb in ("build", "rollback"):
        split = _split_globals(argv, verb)
        if split is not None:
            break
    else:
        return None
    spec_file, state_opt, rest = split
    if verb == "build":
        build = _build_args(rest)
        if build is None:
            return None
        names, no_cache, output = build
        from graven.cli.build_flow import build_verb

        app, out = _context(spec_file, state_opt, output)
        return lambda: build_verb(app, names, out, no_cache=no_cache)
    rollback = _rollback_args(rest)
    if rollback is None:
        return None
    service, to, message, no_wait, output = rollback
    from graven.cli.rollouts import rollback as run

    app, out = _context(spec_file, state_opt, output)
    return lambda: run(app, service, to, message, no_wait=no_wait, out=out)


def _context(
    spec_file: str | None, state_dir: str | None, output: str
) -> tuple[AppContext, Output]:
    """What the root command and the ``-o`` option give a click verb."""
    from graven.cli.context import AppContext
    from graven.cli.output import Output

    app = AppContext(
        spec_file=Path(spec_file) if spec_file else None,
        state_dir_option=Path(state_dir) if state_dir else None,
    )
    return app, Output(output)


def main() -> None:
    argv = sys.argv[1:]
    run = recognised(argv)
    if run is None:
        from graven.cli.main import main as full

        full(argv)
        return
    from graven.cli.exits import exit_code, wants_json

    sys.exit(exit_code(run, debug=False, as_json=wants_json(argv)))
