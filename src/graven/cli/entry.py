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


def _build_args(rest: list[str]) -> tuple[list[str], bool, str] | None:
    """``[IMAGE...] [--no-cache] [-o json|text]`` in any order, each option once, as
    (images, no_cache, output); None for anything else."""
    names: list[str] = []
    seen: dict[str, str] = {}
    args = iter(rest)
    for arg in args:
        if arg == "--no-cache":
            name, value = "no_cache", ""
        elif arg in ("-o", "--output"):
            name, value = "output", next(args, "")
        elif arg.startswith("-"):
            return None
        else:
            names.append(arg)
            continue
        if name in seen:
            return None
        seen[name] = value
    output = seen.get("output", "text")
    if output not in ("json", "text"):
        return None
    return names, "no_cache" in seen, output


# The rollback command's options that take a value, by the name they set.
_ROLLBACK_VALUES = {
    "--to": "to",
    "-m": "message",
    "--message": "message",
    "-o": "output",
    "--output": "output",
}


def _rollback_args(rest: list[str]) -> tuple[str, int | None, str, bool, str] | None:
    """``SERVICE [--to N] [-m MSG] [--detach|--no-wait] [-o json|text]`` in any order,
    each option once, as (service, to, message, no_wait, output); None for anything
    else."""
    service: str | None = None
    seen: dict[str, str] = {}
    args = iter(rest)
    for arg in args:
        if arg in ("--detach", "--no-wait"):
            name, value = "no_wait", ""
        elif arg in _ROLLBACK_VALUES:
            name, value = _ROLLBACK_VALUES[arg], next(args, "-")
            if value.startswith("-"):
                return None  # missing, or an option click might read otherwise
        elif arg.startswith("-") or service is not None:
            return None
        else:
            service = arg
            continue
        if name in seen:
            return None
        seen[name] = value
    to = seen.get("to")
    output = seen.get("output", "text")
    if (
        service is None
        or output not in ("json", "text")
        or (to is not None and not (to.isascii() and to.isdigit()))
    ):
        return None
    message = seen.get("message", "rollback")
    return service, int(to) if to is not None else None, message, "no_wait" in seen, output


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

    from graven.cli.context import AppContext
    from graven.cli.output import Output

    app = AppContext(
        spec_file=Path(spec_file) if spec_file else None,
        state_dir_option=Path(state_opt) if state_opt else None,
    )
    if verb == "build":
        build = _build_args(rest)
        if build is None:
            return None
        names, no_cache, output = build
        from graven.cli.build_flow import build_verb

        return lambda: build_verb(app, names, Output(output), no_cache=no_cache)
    rollback = _rollback_args(rest)
    if rollback is None:
        return None
    service, to, message, no_wait, output = rollback
    from graven.cli.rollouts import rollback as run

    return lambda: run(app, service, to, message, no_wait=no_wait, out=Output(output))


def main() -> None:
    argv = sys.argv[1:]
    run = recognised(argv)
    if run is None:
        from graven.cli.main import main as full

        full(argv)
        return
    from graven.cli.exits import exit_code, wants_json

    sys.exit(exit_code(run, debug=False, as_json=wants_json(argv)))
