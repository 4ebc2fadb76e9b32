"""The ``graven`` entry point. A no-op ``graven build`` answers from here, before the
CLI framework or the spec validator is imported: "never run anything twice" includes
not parsing an unchanged spec. Anything this module does not recognise goes to the
full CLI, which gives the same answer the slow way.
"""

from __future__ import annotations

import sys


def _fast_build(argv: list[str]) -> int | None:
    """Handle ``[-f FILE] [--state-dir DIR] build [IMAGE...] [-o json|text]`` when
    nothing changed; None means "not handled here"."""
    spec_file = state_opt = None
    output = "text"
    names: list[str] = []
    args = iter(argv)
    seen_build = False
    for arg in args:
        if not seen_build:
            if arg == "build":
                seen_build = True
            elif arg in ("-f", "--file"):
                spec_file = next(args, None)
            elif arg == "--state-dir":
                state_opt = next(args, None)
            else:
                return None
        elif arg in ("-o", "--output"):
            output = next(args, "")
        elif arg.startswith("-"):
            return None
        else:
            names.append(arg)
    if not seen_build or output not in ("json", "text"):
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


def main() -> None:
    argv = sys.argv[1:]
    handled = _fast_build(argv)
    if handled is not None:
        sys.exit(handled)
    from graven.cli.main import main as full

    full(argv)
