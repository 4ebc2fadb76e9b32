"""Where a state dir keeps the controller's files."""

from __future__ import annotations

import os
from pathlib import Path

from graven import detached


def state_dir_for(option: Path | None, spec_path: Path | None) -> Path | None:
    """--state-dir, else $GRAVEN_STATE_DIR, else .graven beside the spec (None: no spec)."""
    if option is not None:
        return option.resolve()
    env = os.environ.get("GRAVEN_STATE_DIR")
    if env:
        return Path(env).resolve()
    return spec_path.resolve().parent / ".graven" if spec_path is not None else None


def controller_socket(state_dir: Path, *, create: bool = False) -> Path:
    """The API socket: in the state dir, or in a private directory under /tmp when that
    path is too long for a socket address.

    That directory is checked (this user's own, mode 700, not a symlink) whenever it
    exists, and made when ``create`` (by the controller, before it binds): /tmp is
    shared, and a socket in someone else's directory could be theirs."""
    path = state_dir.resolve() / "controller.sock"
    if detached.fits_socket_address(path):
        return path
    from graven.errors import ControllerError

    tag = detached.short_name(state_dir.resolve())
    short = detached.temp_dir() / f"graven-{tag}-controller"
    detached.private_dir(
        short, what="controller socket directory", error=ControllerError, create=create
    )
    return short / "controller.sock"


def controller_log(state_dir: Path) -> Path:
    return state_dir / "controller.log"


def controller_lock(state_dir: Path) -> Path:
    return state_dir / "controller.lock"


def state_db(state_dir: Path) -> Path:
    return state_dir / "state.db"


def store_root(state_dir: Path) -> Path:
    return state_dir / "store"


def secrets_dir(state_dir: Path) -> Path:
    return state_dir / "secrets"


# What holds secrets, the record of every change or program output (logs and their
# rotated copies): private to the state dir's owner.
_PRIVATE = (
    "state.db*",
    "ledger.head",
    "controller.log*",
    "instances/*/log*",
    "routers/*.log*",
    "haproxy/*/*.log*",
    "secrets",
    "secrets/*",
)


def make_private(state_dir: Path) -> list[str]:
    """Create ``state_dir`` as 0700, and tighten an existing one (and its database,
    ledger head and logs) that is more open than that: they hold secret references,
    the ledger and instance output. Returns what was changed, for the log."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_access(state_dir)
    changed = []
    candidates = [state_dir, *(p for pattern in _PRIVATE for p in state_dir.glob(pattern))]
    for path in candidates:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if path.is_symlink() or not mode & 0o077:
            continue
        private = 0o700 if path.is_dir() else 0o600
        try:
            path.chmod(private)
        except PermissionError:
            continue  # another user's file: theirs to tighten
        changed.append(f"{path} {mode & 0o777:o} -> {private:o}")
    return changed


def require_access(state_dir: Path, what: Path | None = None) -> None:
    """Raise a clear ``StateAccessError`` when this user may not read ``what`` (default:
    the state dir itself), rather than a traceback from deep inside sqlite or a walk."""
    target = what or state_dir
    try:
        info = state_dir.stat()
    except FileNotFoundError:
        return  # nothing there yet: the caller says what that means
    except PermissionError:
        info = None
    readable = os.access(state_dir, os.R_OK | os.X_OK) and (
        target == state_dir or not target.exists() or os.access(target, os.R_OK)
    )
    if info is not None and readable:
        return
    from graven.errors import StateAccessError

    owner = f"uid {info.st_uid}" if info is not None else "its owner"
    raise StateAccessError(
        f"cannot read {target}: permission denied",
        hint=f"Run graven as the user that owns the state dir ({owner}); it is private "
        "to that user because it holds the ledger and secret references.",
    )
