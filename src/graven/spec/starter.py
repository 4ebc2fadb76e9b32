"""``graven init``: a starter project that builds, deploys and serves as it is.

The files come from package data under ``graven/spec/scaffold/``, so the example
service is real, linted code rather than a string inside this module.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from graven.atomic import write_atomic
from graven.disk import disk_error
from graven.errors import UsageError

# Destination in the new project -> file in the package data.
_FILES: tuple[tuple[str, str], ...] = (
    ("graven.yaml", "graven.yaml"),
    ("app/app.py", "app/app.py"),
)


def scaffold(directory: Path, *, force: bool = False) -> list[Path]:
    """Write a starter ``graven.yaml`` and example service into ``directory``.

    Returns the paths written. Refuses to overwrite an existing file unless ``force``;
    it checks every file before writing any, so a refusal leaves nothing half-made.
    """
    data = resources.files("graven.spec").joinpath("scaffold")
    planned = [(directory / dest, data.joinpath(name).read_bytes()) for dest, name in _FILES]
    if not force:
        for path, _ in planned:
            if path.exists() or path.is_symlink():
                raise UsageError(
                    f"{path} already exists; not overwriting it",
                    hint="Pass --force to overwrite, or run 'graven init' in another directory.",
                )
    written: list[Path] = []
    for path, content in planned:
        try:
            write_atomic(path, content)
        except OSError as exc:
            raise disk_error(exc) or UsageError(
                f"cannot write {path}: {exc.strerror or exc}"
            ) from exc
        written.append(path)
    return written
