"""Run the ``graven`` CLI as a user would, in a child process, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def clean_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without registry credentials (tests bring their own),
    unbuffered, with ``home`` as HOME when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAVEN_REGISTRY_")}
    env["PYTHONUNBUFFERED"] = "1"
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra)
    return env


def run_graven(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    stdin: str | None = None,
    timeout: float = 120,
    check: bool = True,
) -> Result:
    """``graven [--state-dir S] ARGS`` in ``cwd``; with ``check``, a non-zero exit raises
    an AssertionError carrying both streams."""
    argv = [sys.executable, "-m", "graven"]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    argv += list(args)
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"graven {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return result
