"""Bounded log files: each log at most ``max_bytes``, and at most ``keep`` older copies.

Instances, routers and the controller write their logs through file descriptors
opened with ``O_APPEND``, and instances and routers outlive the controller that
opened them: nobody can ask them to reopen a renamed file. So rotation is
copy-truncate: the older copies shift (``LOG.1`` to ``LOG.2`` ..., the one past
``keep`` is dropped), the tail of ``LOG`` is copied to ``LOG.1``, then ``LOG`` is
truncated to zero. An ``O_APPEND`` writer's next write lands at the new end: no
reopening, no sparse file. Lines written between the copy and the truncation are
lost; that is the price of rotating a file whose writers cannot be told.

A copy holds at most the last ``max_bytes`` of the log (from a line start), so a
burst between two rotations does not make the copies unbounded either. When the copy
cannot be written (the disk is full), the log is truncated anyway: the bound matters
more than the old lines.

Settings come from the environment, as sizes such as ``10M`` or plain byte counts:
``GRAVEN_LOG_MAX_BYTES`` (default 10M) and ``GRAVEN_LOG_KEEP`` (default 3).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import NamedTuple, TextIO

from graven.disk import size_setting
from graven.errors import UsageError

MAX_BYTES_DEFAULT = 10 * 1024 * 1024
KEEP_DEFAULT = 3
_MIN_BYTES = 4096
_MAX_KEEP = 100
_CHUNK = 1024 * 1024


class LogLimits(NamedTuple):
    max_bytes: int = MAX_BYTES_DEFAULT
    keep: int = KEEP_DEFAULT


def log_limits() -> LogLimits:
    """The limits set by GRAVEN_LOG_MAX_BYTES and GRAVEN_LOG_KEEP, else the defaults."""
    max_bytes = size_setting("GRAVEN_LOG_MAX_BYTES", MAX_BYTES_DEFAULT, minimum=_MIN_BYTES)
    text = os.environ.get("GRAVEN_LOG_KEEP", "").strip()
    if not text:
        return LogLimits(max_bytes, KEEP_DEFAULT)
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_KEEP:
        raise UsageError(
            f"GRAVEN_LOG_KEEP must be a number 0-{_MAX_KEEP} (got {text!r})",
            hint=f"Unset it for the default, {KEEP_DEFAULT} rotated copies per log.",
        )
    return LogLimits(max_bytes, int(text))


def rotated(path: Path, n: int) -> Path:
    """The ``n``-th older copy of the log at ``path`` (1 is the newest)."""
    return path.with_name(f"{path.name}.{n}")


def rotate(path: Path, limits: LogLimits) -> bool:
    """Rotate the log at ``path`` if it is larger than ``limits.max_bytes``; True if it
    was rotated. A log that does not exist is left alone."""
    return rotate_at(path, limits) is not None


def rotate_at(path: Path, limits: LogLimits) -> int | None:
    """``rotate``, telling the size the log had when it was rotated (its copy ends
    there), or None when it was not rotated."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size <= limits.max_bytes:
        return None
    _drop_beyond(path, limits.keep)
    for n in range(limits.keep - 1, 0, -1):
        older = rotated(path, n)
        if older.exists():
            older.replace(rotated(path, n + 1))
    if limits.keep:
        _copy_tail(path, rotated(path, 1), size, limits.max_bytes)
    os.truncate(path, 0)
    return size


def _drop_beyond(path: Path, keep: int) -> None:
    """Remove copies past ``keep``, including those a larger ``keep`` left behind."""
    for old in path.parent.glob(f"{path.name}.*"):
        suffix = old.name[len(path.name) + 1 :]
        if suffix.isdigit() and int(suffix) > keep:
            old.unlink(missing_ok=True)


def _copy_tail(path: Path, dest: Path, size: int, max_bytes: int) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with path.open("rb") as src, tmp.open("wb") as out:
            start = max(0, size - max_bytes)
            src.seek(start)
            left = size - start
            first = True
            while left > 0:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                if first and start > 0:
                    # Start the copy at a line, not in the middle of one.
                    chunk = chunk[chunk.find(b"\n") + 1 :]
                first = False
                out.write(chunk)
        tmp.replace(dest)
    except OSError:
        # No room for the copy: the log is truncated anyway (see the module docstring).
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def rotate_all(paths: list[Path], limits: LogLimits) -> list[Path]:
    """Rotate each log that is over its limit; the ones rotated. A log that cannot be
    rotated now (gone, unreadable) is skipped: the next pass tries again."""
    done = []
    for path in paths:
        try:
            if rotate(path, limits):
                done.append(path)
        except OSError:
            continue
    return done


def appends_to(stream: TextIO, path: Path) -> bool:
    """Whether ``stream`` writes to the file at ``path`` through an ``O_APPEND``
    descriptor, so that ``path`` may be copy-truncated under it."""
    try:
        fd = stream.fileno()
        return os.path.samestat(os.fstat(fd), path.stat()) and bool(
            fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        )
    except (OSError, ValueError, AttributeError):
        return False


class RotatingStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler writing to a stream that appends to the log file at ``path``
    (the controller's stderr), which it rotates after a record takes it over the limit.

    The stream itself is never replaced: whatever else writes to it, such as the
    traceback of a crash, still lands in the current log."""

    def __init__(self, stream: TextIO, path: Path, limits: LogLimits) -> None:
        super().__init__(stream)
        self.path = path
        self.limits = limits

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        try:
            if os.fstat(self.stream.fileno()).st_size > self.limits.max_bytes:
                rotate(self.path, self.limits)
        except (OSError, ValueError):
            pass  # a log that cannot be rotated now is rotated after a later record
