"""The state dir's disk: refused writes as graven errors, and free space watched.

A full disk must not be a silent outage. Instances and routers keep serving when the
state dir's filesystem fills up (they write nothing there but their logs), but
nothing can be deployed, rolled back or recorded. So:

- :func:`disk_error` turns a write the filesystem refused (no space, over quota,
  read-only; from the OS or from SQLite) into a :class:`~graven.errors.DiskError`
  with what to do, which every verb shows instead of a traceback;
- :class:`StateDirWatch` measures free space (``statvfs``) and remembers refused
  writes, for ``graven status`` and the controller's log, which hears of each change
  once, not on every pass.

Settings come from the environment, as sizes such as ``64M`` or ``1048576``:
``GRAVEN_STATE_MIN_FREE`` (default 64M) is the free space below which the state dir
counts as almost full.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graven.errors import DiskError, UsageError

log = logging.getLogger("graven.disk")

MIN_FREE_DEFAULT = 64 * 1024 * 1024

# errno values meaning "the filesystem refused to store this", and how to say so.
_REFUSALS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
_SQLITE_FULL = 13  # sqlite3's SQLITE_FULL: "database or disk is full"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def size_setting(name: str, default: int, *, minimum: int = 0) -> int:
    """The size in environment variable ``name`` (``10M``, ``512K``, ``1048576``; units
    are binary), else ``default``; a UsageError naming the variable if it is no size."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    number, unit = text.rstrip("kKmMgGiIbB"), text[len(text.rstrip("kKmMgGiIbB")) :]
    unit = unit.upper().removesuffix("B").removesuffix("I")
    if not (number.isascii() and number.isdigit()) or unit not in _UNITS:
        raise UsageError(
            f"{name} must be a size such as 10M, 512K or 1048576 (got {text!r})",
            hint=f"Unset it for the default, {human_size(default)}.",
        )
    value = int(number) * _UNITS[unit]
    if value < minimum:
        raise UsageError(
            f"{name} must be at least {human_size(minimum)} (got {text!r})",
            hint=f"Unset it for the default, {human_size(default)}.",
        )
    return value


def human_size(n: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n} bytes" if n != 1 else "1 byte"


def _refusal(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, filename) of the refused write behind ``exc`` or its causes; None if
    ``exc`` is about something else."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno in _REFUSALS:
            name = current.filename
            return current.errno, str(name) if name is not None else None
        # sqlite3 errors, recognised without importing sqlite3 (lean CLI start-up).
        if getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:
            return errno.ENOSPC, None
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def disk_error(exc: BaseException, state_dir: Path | None = None) -> DiskError | None:
    """``exc`` as a DiskError if a filesystem refused a write (no space, over quota,
    read-only), else None."""
    found = _refusal(exc)
    if found is None:
        return None
    code, filename = found
    if filename:
        what = f"cannot write {filename}"
    elif state_dir is not None:
        what = f"cannot write to the state dir {state_dir}"
    else:
        what = "a write was refused"
    if code == errno.EROFS:
        hint = "Remount that filesystem read-write (or point --state-dir elsewhere), then retry."
    else:
        hint = (
            "Free space on that filesystem (remove files, or 'graven gc' for old images "
            "and releases), then retry. Running instances keep serving meanwhile."
        )
    return DiskError(f"{what}: {_REFUSALS[code]}", hint=hint, errno=code)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def condition(
    state_dir: Path, free: int, refused: DiskError | None, min_free: int
) -> tuple[str, str | None, str | None]:
    """The state dir's condition (ok, low, full, refusing) with its problem and hint,
    from its free bytes and the write it refused last (None: none since it took one)."""
    if refused is not None and refused.errno != errno.ENOSPC:
        return "refusing", f"state dir {state_dir} refuses writes ({refused.message})", refused.hint
    if free == 0 or refused is not None:
        return (
            "full",
            f"state dir {state_dir} is full ({free} bytes free)",
            "Free space on its filesystem (remove files, or 'graven gc' for old images and "
            "releases). Instances keep serving, but deploys, rollbacks and logs cannot be "
            "written until then.",
        )
    if free < min_free:
        return (
            "low",
            f"state dir {state_dir} is almost full ({human_size(free)} free, below "
            f"GRAVEN_STATE_MIN_FREE={human_size(min_free)})",
            "Free space on its filesystem (or 'graven gc') before deploys start failing.",
        )
    return "ok", None, None


def write_refusal(path: Path) -> OSError | None:
    """Why the directory ``path`` does not take a small write now, or None if it does:
    free space alone cannot tell a quota or a read-only mount."""
    probe = path / ".write-probe"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return None


def takes_writes(path: Path) -> bool:
    """Whether the directory ``path`` takes a small write now."""
    return write_refusal(path) is None


class StateDirWatch:
    """Free space in the state dir, and the last write it refused.

    ``check`` (the controller's health loop calls it about once a second) measures again and
    logs a change of condition once: full, almost full, refusing writes, fine again."""

    def __init__(
        self,
        state_dir: Path,
        *,
        min_free: int | None = None,
        measure: Callable[[Path], int] = free_bytes,
        probe: Callable[[Path], bool] = takes_writes,
    ) -> None:
        self.state_dir = state_dir
        self.measure = measure
        self.probe = probe
        self.min_free = (
            size_setting("GRAVEN_STATE_MIN_FREE", MIN_FREE_DEFAULT)
            if min_free is None
            else min_free
        )
        self.free: int | None = None
        self.problem: str | None = None
        self.hint: str | None = None
        self._refused: DiskError | None = None
        self._condition = "ok"

    def refused(self, exc: BaseException) -> bool:
        """Note ``exc`` if it is a refused write (True), so that ``status`` shows it until
        the state dir takes writes again; False for any other error."""
        found = disk_error(exc, self.state_dir)
        if found is None:
            return False
        self._refused = found
        self.check()
        return True

    def check(self) -> None:
        try:
            self.free = self.measure(self.state_dir)
        except OSError as exc:
            self.free = None
            self._set("unreadable", f"cannot measure free space in {self.state_dir}: {exc}", None)
            return
        # After a refusal, only a write that works again says the state dir is fine.
        if self._refused is not None and self.probe(self.state_dir):
            self._refused = None
        self._set(*condition(self.state_dir, self.free, self._refused, self.min_free))

    def _set(self, condition: str, problem: str | None, hint: str | None) -> None:
        self.problem, self.hint = problem, hint
        if condition == self._condition:
            return
        self._condition = condition
        if problem is None:
            free = human_size(self.free) if self.free is not None else "unknown"
            log.info("state dir %s has room again (%s free)", self.state_dir, free)
        else:
            level = logging.WARNING if condition == "low" else logging.ERROR
            log.log(level, "%s; %s", problem, hint or "")

    def report(self) -> dict[str, Any]:
        """For ``graven status``: measured now, not at the last pass."""
        self.check()
        return {
            "path": str(self.state_dir),
            "free_bytes": self.free,
            "min_free_bytes": self.min_free,
            "problem": self.problem,
            "hint": self.hint,
        }
