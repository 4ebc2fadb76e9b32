"""What the controller's health loop does for the state dir about once a second, besides
probing instances: bound the logs that instances and routers write there, and watch
its free space.

Instances and routers outlive the controller and hold their logs open, so the
controller rotates those logs for them (copy-truncate, :mod:`graven.logfiles`): one
``stat`` per log per pass, a copy only when a log is over its limit. While no
controller runs, nothing rotates; the next one catches up on its first pass.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

from graven.disk import StateDirWatch
from graven.logfiles import LogLimits, log_limits
from graven.logtimes import MarkBook

log = logging.getLogger("graven.controller")


@runtime_checkable
class WritesLogs(Protocol):
    """A runtime or router whose processes log to a file in the state dir: by instance
    id for a runtime, by service for a router."""

    def log_path(self, name: str, /) -> Path: ...


class Upkeep:
    def __init__(self, state_dir: Path, *, limits: LogLimits | None = None) -> None:
        self.disk = StateDirWatch(state_dir)
        self.limits = log_limits() if limits is None else limits
        self.marks = MarkBook(self.limits)

    def pass_once(self, logs: list[Path]) -> None:
        """Rotate the ``logs`` that are over the limit and mark the time on those that
        grew (:mod:`graven.logtimes`), then measure free space. A log that cannot be
        rotated or marked now is tried again on the next pass."""
        for path in logs:
            try:
                if self.marks.pass_once(path):
                    log.debug("rotated %s (over %d bytes)", path, self.limits.max_bytes)
            except OSError:
                continue
        self.marks.forget(logs)
        self.disk.check()


def log_files(owner: object, names: list[str]) -> list[Path]:
    """The logs of ``names`` (instance ids or services) if ``owner`` writes logs."""
    if not isinstance(owner, WritesLogs):
        return []
    return [owner.log_path(name) for name in names]
