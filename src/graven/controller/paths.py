"""Where a state dir keeps the controller's files."""

from __future__ import annotations

import os
from pathlib import Path

# sun_path holds 108 bytes; stay well below it.
_MAX_SOCKET_PATH = 100


def state_dir_for(option: Path | None, spec_path: Path | None) -> Path | None:
    """--state-dir, else $GRAVEN_STATE_DIR, else .graven beside the spec (None: no spec)."""
    if option is not None:
        return option.resolve()
    env = os.environ.get("GRAVEN_STATE_DIR")
    if env:
        return Path(env).resolve()
    return spec_path.resolve().parent / ".graven" if spec_path is not None else None


def controller_socket(state_dir: Path) -> Path:
    """The API socket: in the state dir, or under /tmp when that path is too long."""
    path = state_dir.resolve() / "controller.sock"
    if len(str(path).encode()) <= _MAX_SOCKET_PATH:
        return path
    import hashlib  # rarely needed: keep every CLI verb's start lean
    import tempfile

    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"graven-{tag}.sock"


def controller_log(state_dir: Path) -> Path:
    return state_dir / "controller.log"


def controller_lock(state_dir: Path) -> Path:
    return state_dir / "controller.lock"


def state_db(state_dir: Path) -> Path:
    return state_dir / "state.db"


def store_root(state_dir: Path) -> Path:
    return state_dir / "store"
