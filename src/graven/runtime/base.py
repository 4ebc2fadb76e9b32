"""The Runtime port: starts, observes and stops instances of images.

An instance is never modified: the runtime only ever starts a fresh one from an
image, and stops it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from graven.model import Image, Isolation, Resources, Tmpfs, Volume


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one instance."""

    instance_id: str
    service: str
    release: int
    image: Image
    env: tuple[tuple[str, str], ...]
    port: int
    host: str = "127.0.0.1"
    # What the release's ServiceConfig says about sealing; the runtime enforces what it
    # can and reports the rest (named volumes live under the runtime's state dir).
    resources: Resources = field(default_factory=Resources)
    volumes: tuple[Volume, ...] = ()
    tmpfs: tuple[Tmpfs, ...] = ()
    isolation: Isolation = "auto"


@dataclass(frozen=True)
class Handle:
    """How to find a started instance again, even from another controller process."""

    pid: int
    pid_start: int  # kernel start time of the pid: tells a live instance from pid reuse


class Runtime(Protocol):
    def start(self, spec: LaunchSpec) -> Handle:
        """Start an instance; returns once the process exists (not once it is healthy)."""
        ...

    def alive(self, handle: Handle) -> bool: ...

    def stop(self, handle: Handle, grace: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Idempotent."""
        ...

    def orphans(self, recorded: Collection[str]) -> list[tuple[str, Handle]]:
        """Instances running without a record among ``recorded`` instance ids (their
        controller died between starting and recording them), to be stopped."""
        ...

    def exit_reason(self, handle: Handle) -> str:
        """How a dead instance ended (``exited with code 1``, ``killed by SIGKILL``),
        or "" when the runtime cannot tell."""
        ...

    def forget(self, handle: Handle) -> None:
        """Drop what the runtime keeps about a dead instance (after ``exit_reason``)."""
        ...

    def log_tail(self, instance_id: str, lines: int = 20) -> str: ...
