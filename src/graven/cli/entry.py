"""The ``graven`` entry point. Two verbs can answer from here, before the CLI
framework, rich or the spec validator is imported:

- a no-op ``graven build``: "never run anything twice" includes not parsing an
  unchanged spec;
- ``graven rollback``: inside a blue-green rollback window a rollback is a traffic
  switch, and without this path the interpreter's start-up would be most of its wait.

Anything this module does not recognise goes to the full CLI, which gives the same
answer the slow way. What the rollback path prints comes from the modules the full
CLI prints with (``graven.cli.plain``, ``graven.cli.rollouts``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graven.controller.client import ControllerClient


def _split_globals(argv: list[str], verb: str) -> tuple[str | None, str | None, list[str]] | None:
    """``[-f FILE] [--state-dir DIR] VERB ARGS...`` as (FILE, DIR, ARGS); None for
    anything else, and for values click would refuse (a directory as FILE, a file as
    DIR), so that the full CLI reports them."""
    from pathlib import Path

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


def _fast_build(argv: list[str]) -> int | None:
    """Handle ``[-f FILE] [--state-dir DIR] build [IMAGE...] [-o json|text]`` when
    nothing changed; None means "not handled here"."""
    split = _split_globals(argv, "build")
    if split is None:
        return None
    spec_file, state_opt, rest = split
    output = "text"
    names: list[str] = []
    args = iter(rest)
    for arg in args:
        if arg in ("-o", "--output"):
            output = next(args, "")
        elif arg.startswith("-"):
            return None
        else:
            names.append(arg)
    if output not in ("json", "text"):
        return None

    from pathlib import Path

    from graven.build import fingerprint
    from graven.controller.paths import state_dir_for
    from graven.errors import GravenError
    from graven.spec.locate import find_spec

    try:
        spec_path = find_spec(Path.cwd(), Path(spec_file) if spec_file else None)
        state_dir = state_dir_for(Path(state_opt) if state_opt else None, spec_path)
        unchanged = fingerprint.unchanged_images(state_dir, spec_path, names) if state_dir else None
    except (GravenError, OSError):
        return None
    if unchanged is None:
        return None
    images = [
        {
            "name": i["name"],
            "digest": i["digest"],
            "steps_run": 0,
            "steps_cached": i["steps"],
            "steps": [],
        }
        for i in unchanged
    ]
    if output == "json":
        import json

        sys.stdout.write(json.dumps({"images": images}, indent=2, sort_keys=True) + "\n")
    else:
        for i in images:
            sys.stderr.write(f"build {i['name']}: nothing changed since the last build\n")
            sys.stdout.write(
                f"built {i['name']} {i['digest']}  (0 step(s) ran, {i['steps_cached']} cached)\n"
            )
    return 0


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


def _fast_rollback(argv: list[str]) -> int | None:
    """``graven rollback`` against a running controller, as the full CLI's ``rollback``
    does it; None ("not handled here") while nothing has been sent, e.g. when there is
    no spec or no controller to send it to (the full CLI then says why, or starts one).

    The request goes out before anything only the output needs is imported: the
    traffic switch waits for nothing but the interpreter and the client."""
    split = _split_globals(argv, "rollback")
    parsed = _rollback_args(split[2]) if split is not None else None
    if split is None or parsed is None:
        return None
    spec_file, state_opt, _ = split
    service, to, message, no_wait, output = parsed

    from pathlib import Path

    from graven.cli.context import AppContext, actor
    from graven.cli.rollouts import StoppedWatching
    from graven.controller.client import ControllerClient
    from graven.errors import ControllerNotRunning, GravenError

    app = AppContext(
        spec_file=Path(spec_file) if spec_file else None,
        state_dir_option=Path(state_opt) if state_opt else None,
    )
    try:
        client = ControllerClient(app.state_dir)
    except GravenError:
        return None
    as_json = output == "json"
    try:
        try:
            # Raw JSON on purpose: the typed replies (graven.controller.results) would
            # add their import to this path's start-up; the full CLI's verb uses them.
            r = client.request(
                "POST",
                "/v1/rollback",
                {"service": service, "to": to, "actor": actor(), "message": message},
            )
        except ControllerNotRunning:
            return None
        return _report_rollback(client, service, r, no_wait=no_wait, as_json=as_json)
    except GravenError as exc:
        from graven.cli.plain import report_error

        report_error(exc, as_json=as_json)
        return exc.exit_code
    except StoppedWatching as exc:
        sys.stderr.write(exc.message + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _report_rollback(
    client: ControllerClient, service: str, r: dict[str, Any], *, no_wait: bool, as_json: bool
) -> int:
    """After the rollback request: wait (unless ``no_wait``), print, and the exit code,
    as the full CLI's ``rollback`` does."""
    from graven.cli.plain import PlainConsole, write_json
    from graven.cli.rollouts import any_failed, await_results, render_results

    err = PlainConsole(stderr=True)

    def progress(text: str) -> None:
        if not as_json:
            err.print(text)

    def connect() -> ControllerClient:
        client.ensure_running()
        return client

    progress(f"[bold]rollback[/] {service} -> {r['release']}")
    results = [{"service": service, **r}]
    await_results(connect, results, no_wait=no_wait, progress=progress)
    status = client.request("GET", "/v1/status", service=service)["services"]
    data = {"results": results, "url": status[0]["url"] if status else None}
    if as_json:
        write_json(data)
    else:
        render_results(PlainConsole(), data, "rollback")
    return 1 if any_failed(results) else 0


def _refused_write(exc: Exception, argv: list[str]) -> int | None:
    """A write the filesystem refused (full, over quota, read-only) on a lean path: the
    full CLI's message and exit code, no traceback (unless ``--debug``, which the lean
    paths never see: it is not among their arguments)."""
    import itertools

    from graven.cli.plain import report_error
    from graven.disk import disk_error

    refused = disk_error(exc)
    if refused is None:
        return None
    as_json = any(a in ("-o", "--output") and b == "json" for a, b in itertools.pairwise(argv))
    report_error(refused, as_json=as_json)
    return refused.exit_code


def main() -> None:
    argv = sys.argv[1:]
    try:
        handled = _fast_build(argv)
        if handled is None:
            handled = _fast_rollback(argv)
    except Exception as exc:
        handled = _refused_write(exc, argv)
        if handled is None:
            raise
    if handled is not None:
        sys.exit(handled)
    from graven.cli.main import main as full

    full(argv)
