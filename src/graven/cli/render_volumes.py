"""The views of ``graven volume ls`` and ``graven volume rm``, and the volumes line of
``graven status``: values in, styled lines out (pure, like :mod:`graven.cli.render`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from graven.cli.lines import Line, green, table, yellow
from graven.cli.output import human_size

if TYPE_CHECKING:
    from graven.controller.results import VolumeRemoval, VolumeView
    from graven.volumes import VolumeRecord


def volumes(records: Sequence[VolumeRecord], users: Mapping[str, Sequence[str]]) -> list[Line]:
    """``graven volume ls``: each named volume, its size, who made it, who uses it."""
    if not records:
        return [("no volumes yet: a service's 'volumes: [{name: NAME, path: /PATH}]' makes one",)]
    return table(
        ("VOLUME", "SIZE", "CREATED BY", "USED BY", "PATH"),
        [
            (
                r.name,
                human_size(r.size),
                r.release or "-",
                ", ".join(users.get(r.name, ())) or "-",
                str(r.path),
            )
            for r in records
        ],
    )


def volume_removed(result: VolumeRemoval) -> list[Line]:
    """``graven volume rm``: what was deleted, and under whom when forced."""
    lines: list[Line] = [
        (green("removed"), f" volume {result.name} ({human_size(result.size)})"),
    ]
    if result.used_by:
        lines.append(
            (yellow("forced"), ": still used by " + ", ".join(result.used_by)),
        )
    return lines


def mounts(views: Sequence[VolumeView]) -> list[Line]:
    """A service's volumes in ``graven status``: one line, empty when it has none."""
    if not views:
        return []
    shown = (
        f"{v.name or v.host} -> {v.path}" + (" (read-only)" if v.read_only else "") for v in views
    )
    return [("  volumes: " + " · ".join(shown),)]
