"""Finding ``graven.yaml``: standard library only, so a no-op build can find the spec
without importing the validator."""

from __future__ import annotations

from pathlib import Path

from graven.errors import UsageError

SPEC_FILENAME = "graven.yaml"
INIT_HINT = "Run 'graven init' to create one."


def find_spec(start: Path | None = None, explicit: Path | None = None) -> Path:
    """The spec file to use: ``explicit`` if given, else the nearest ``graven.yaml``.

    The search starts in ``start`` (default: the current directory) and walks up
    through its parents, as git does for ``.git``.
    """
    if explicit is not None:
        return explicit / SPEC_FILENAME if explicit.is_dir() else explicit
    here = (start if start is not None else Path.cwd()).absolute()
    for directory in (here, *here.parents):
        candidate = directory / SPEC_FILENAME
        if candidate.is_file():
            return candidate
    raise UsageError(f"no {SPEC_FILENAME} in {here} or any parent directory", hint=INIT_HINT)
