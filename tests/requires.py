"""What a test needs from the machine. Off CI a missing part skips the test; under CI
(``CI`` set) it fails, because CI installs every part and runs as root, and a skip there
would hide a guarantee nobody checked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(message: str) -> None:
    """Skip off CI, fail under CI. Never returns."""
    if under_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def need_tool(tool: str) -> str:
    """The path of ``tool`` (also looked for in /usr/sbin), or the test stops."""
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        missing(f"{tool} is not installed (scripts/setup installs it)")
        raise AssertionError("unreachable")
    return path


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        if under_ci():
            missing(f"{why}, and CI must run as root: run .ci/run as root")
        pytest.skip(f"{why} (not root)")
