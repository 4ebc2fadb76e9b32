"""The views of 'graven volume ls', 'graven volume rm' and the volumes line of
'graven status', rendered into a StringIO."""

from __future__ import annotations

from pathlib import Path

from graven.cli import render, render_volumes
from graven.controller.results import StatusView, VolumeRemoval, VolumeView
from graven.volumes import VolumeRecord
from tests.unit.test_cli_render_views import NOW, service, written


def record(name: str, size: int, release: str = "web@r1") -> VolumeRecord:
    return VolumeRecord(
        name=name,
        path=Path(f"/state/volumes/{name}/data"),
        created_at=NOW,
        service="web",
        release=release,
        uid=1000,
        gid=1000,
        size=size,
    )


def test_ls_shows_size_maker_users_and_path() -> None:
    lines = render_volumes.volumes(
        [record("data", 2048), record("[red]x", 0, release="")], {"data": ["web@r1", "web@r2"]}
    )
    assert [line.rstrip() for line in written(lines).splitlines()] == [
        " VOLUME  SIZE     CREATED BY  USED BY         PATH",
        " data    2.0 KiB  web@r1      web@r1, web@r2  /state/volumes/data/data",
        " [red]x  0 B      -           -               /state/volumes/[red]x/data",
    ]


def test_ls_of_nothing_says_how_a_volume_is_made() -> None:
    assert "volumes: [{name: NAME" in written(render_volumes.volumes([], {}))


def test_rm_says_what_went_and_from_under_whom() -> None:
    quiet = VolumeRemoval("data", "/v/data", 10, False, (), 4)
    assert written(render_volumes.volume_removed(quiet)) == "removed volume data (10 B)\n"
    forced = VolumeRemoval("data", "/v/data", 10, True, ("web@r2",), 5)
    assert written(render_volumes.volume_removed(forced)).splitlines()[1] == (
        "forced: still used by web@r2"
    )


def test_status_lists_a_services_volumes_only_when_it_has_some() -> None:
    views = (
        VolumeView("/data", "guestbook", "", False),
        VolumeView("/etc/app", "", "/srv/conf", True),
    )
    text = written(render.status(StatusView((service(volumes=views),)), NOW))
    assert "  volumes: guestbook -> /data · /srv/conf -> /etc/app (read-only)\n" in text
    assert "volumes" not in written(render.status(StatusView((service(),)), NOW))
