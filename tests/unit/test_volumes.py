"""Named volumes and host directories on a temp state dir: made once, owned by the
instance's user, never reached through a symlink, removed only when asked (and only
when no release needs them), every removal in the ledger."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from graven.controller.volume_commands import remove_volume as remove_command
from graven.errors import NotFoundError, RuntimeFailure, UsageError
from graven.ledger.chain import verify_chain
from graven.model import Digest, HealthCheck, Image, ImageConfig, ServiceConfig, Tmpfs, Volume
from graven.runtime.base import LaunchSpec
from graven.volumes import (
    Mount,
    find_volume,
    list_volumes,
    prepare,
    remove_volume,
    retire_volume,
    volume_data,
    volume_users,
)
from tests.unit.test_engine import World

UID, GID = os.getuid(), os.getgid()


def launch(*volumes: Volume, instance: str = "web-r1-aaaa", release: int = 1) -> LaunchSpec:
    image = Image(
        digest=Digest("sha256:" + "0" * 64),
        rootfs=Digest("sha256:" + "1" * 64),
        config=ImageConfig(entrypoint=("app",)),
    )
    return LaunchSpec(
        instance_id=instance,
        service="web",
        release=release,
        image=image,
        env=(),
        port=9000,
        volumes=volumes,
        tmpfs=(Tmpfs("/scratch"),),
    )


DATA = Volume(path="/data", name="data")


def test_a_named_volume_is_made_once_and_kept(tmp_path: Path) -> None:
    mounts = prepare(tmp_path, launch(DATA), UID, GID, clock=lambda: 1000.0)
    assert mounts == (Mount(volume_data(tmp_path, "data"), "/data", False),)
    source = mounts[0].source
    assert source.is_dir() and not source.is_symlink()
    assert (source.stat().st_uid, source.stat().st_gid) == (UID, GID)
    (source / "guestbook.db").write_text("rows")
    # The next instance, of a later release, gets the same directory and its data.
    again = prepare(tmp_path, launch(DATA, instance="web-r2-bbbb", release=2), UID, GID)
    assert again[0].source == source
    assert (source / "guestbook.db").read_text() == "rows"
    record = find_volume(tmp_path, "data")
    assert (record.created_at, record.release, record.size) == (1000.0, "web@r1", 4)
    meta = json.loads((source.parent / "volume.json").read_text())
    assert meta["instance"] == "web-r1-aaaa"
    assert [r.name for r in list_volumes(tmp_path)] == ["data"]


def test_no_half_made_volume_is_left_or_listed(tmp_path: Path) -> None:
    prepare(tmp_path, launch(DATA), UID, GID)
    root = tmp_path / "volumes"
    assert sorted(p.name for p in root.iterdir()) == ["data"]
    # What a crash mid-creation leaves (a staging dir) is not a volume.
    (root / ".new-other-1234" / "data").mkdir(parents=True)
    assert [r.name for r in list_volumes(tmp_path)] == ["data"]


@pytest.mark.parametrize("where", ["volumes", "volumes/data", "volumes/data/data"])
def test_a_symlinked_volume_root_is_refused(tmp_path: Path, where: str) -> None:
    prepare(tmp_path, launch(DATA), UID, GID)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / where
    link.rename(tmp_path / "moved")
    link.symlink_to(elsewhere)
    with pytest.raises(RuntimeFailure, match="is a symlink") as err:
        prepare(tmp_path, launch(DATA), UID, GID)
    assert "volume 'data'" in err.value.message
    assert err.value.hint and str(elsewhere) in err.value.hint


def test_a_volume_of_another_user_is_refused_rw_but_not_ro(tmp_path: Path) -> None:
    prepare(tmp_path, launch(DATA), UID, GID)
    with pytest.raises(RuntimeFailure, match=f"runs as uid {UID + 1}") as err:
        prepare(tmp_path, launch(DATA), UID + 1, GID)
    assert err.value.hint and "chown -R" in err.value.hint
    ro = Volume(path="/data", name="data", read_only=True)
    assert prepare(tmp_path, launch(ro), UID + 1, GID)[0].read_only is True


def test_a_new_volume_for_another_user_needs_root(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        made = prepare(tmp_path, launch(DATA), 4321, 4321)[0].source
        assert (made.stat().st_uid, made.stat().st_gid) == (4321, 4321)
        assert (made.stat().st_mode & 0o777) == 0o750
        return
    with pytest.raises(RuntimeFailure, match="cannot give a new volume to uid"):
        prepare(tmp_path, launch(DATA), UID + 1, GID)
    assert list_volumes(tmp_path) == []  # nothing half made


def test_a_host_directory_must_exist_be_a_directory_and_not_a_link(tmp_path: Path) -> None:
    host = tmp_path / "srv"
    vol = Volume(path="/srv", host_path=str(host), read_only=True)
    with pytest.raises(RuntimeFailure, match="does not exist") as err:
        prepare(tmp_path, launch(vol), UID, GID)
    assert "volume /srv" in err.value.message and err.value.hint and "mkdir -p" in err.value.hint
    host.write_text("a file")
    with pytest.raises(RuntimeFailure, match="is not a directory"):
        prepare(tmp_path, launch(vol), UID, GID)
    host.unlink()
    real = tmp_path / "real"
    real.mkdir()
    host.symlink_to(real)
    with pytest.raises(RuntimeFailure, match="goes through a symlink") as err:
        prepare(tmp_path, launch(vol), UID, GID)
    assert err.value.hint == f"Name the real directory in graven.yaml: host: {real}"
    # A link higher up the path counts too.
    via = Volume(path="/srv", host_path=str(host / "sub"))
    (real / "sub").mkdir()
    with pytest.raises(RuntimeFailure, match="goes through a symlink"):
        prepare(tmp_path, launch(via), UID, GID)
    ok = Volume(path="/srv", host_path=str(real), read_only=True)
    assert prepare(tmp_path, launch(ok), UID, GID) == (Mount(real, "/srv", True),)


def test_remove_deletes_only_that_volume_and_a_later_start_is_empty(tmp_path: Path) -> None:
    other = Volume(path="/other", name="other")
    source = prepare(tmp_path, launch(DATA, other), UID, GID)[0].source
    (source / "rows").write_text("x")
    (source / "link").symlink_to(tmp_path / "outside")  # a link the instance left
    (tmp_path / "outside").write_text("not the volume's")
    record = remove_volume(tmp_path, "data")
    assert record.name == "data"
    assert (tmp_path / "outside").read_text() == "not the volume's"
    assert [r.name for r in list_volumes(tmp_path)] == ["other"]
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == ["other"]
    fresh = prepare(tmp_path, launch(DATA), UID, GID)[0].source
    assert list(fresh.iterdir()) == []
    with pytest.raises(NotFoundError, match="no volume named 'nope'"):
        remove_volume(tmp_path, "nope")
    with pytest.raises(NotFoundError):
        find_volume(tmp_path, "../volumes")


def test_a_start_racing_a_removal_finds_the_volume_whole_or_absent(tmp_path: Path) -> None:
    source = prepare(tmp_path, launch(DATA), UID, GID)[0].source
    (source / "rows").write_text("x")
    _record, doomed = retire_volume(tmp_path, "data")
    # Retired but not yet deleted: a start makes a new one, never reuses the old.
    fresh = prepare(tmp_path, launch(DATA), UID, GID)[0].source
    assert list(fresh.iterdir()) == []
    assert (doomed / "data" / "rows").exists()


def test_volume_users_names_each_release_once() -> None:
    users = volume_users(
        [
            ("web@r1", (DATA,)),
            ("web@r2", (DATA, Volume(path="/x", host_path="/srv/x"))),
            ("web@r2", (DATA,)),
        ]
    )
    assert users == {"data": ["web@r1", "web@r2"]}


# --- 'graven volume rm' through the controller's engine --------------------------------


def with_volume(world: World, tmp: Path) -> Path:
    cfg = ServiceConfig(
        replicas=1, port=18080, health=HealthCheck(start_timeout=5), volumes=(DATA,)
    )
    world.engine.commands.deploy("web", world.v1, "web", cfg, "ana@host", "first", {})
    world.converge()
    return prepare(tmp, launch(DATA), UID, GID)[0].source


def test_rm_refuses_a_volume_a_live_release_uses(tmp_path: Path) -> None:
    world = World(tmp_path)
    source = with_volume(world, tmp_path)
    with pytest.raises(UsageError, match="volume data is in use by web@r1") as err:
        asyncio.run(remove_command(world.engine, "data", force=False, actor="a", message="m"))
    assert err.value.hint and "graven down" in err.value.hint and "--force" in err.value.hint
    assert source.is_dir()
    assert [e.action for e in world.state.ledger()] == ["deploy"]


def test_rm_after_down_is_ledgered(tmp_path: Path) -> None:
    world = World(tmp_path)
    source = with_volume(world, tmp_path)
    world.engine.commands.down("web", "ana@host", "done")
    world.converge()
    assert world.state.live_instances() == []
    assert source.is_dir()  # down keeps it
    out = asyncio.run(
        remove_command(world.engine, "data", force=False, actor="bo@host", message="wipe it")
    )
    assert (out.name, out.forced, out.used_by) == ("data", False, ())
    assert not source.exists()
    entry = world.state.ledger()[-1]
    assert (entry.action, entry.actor, entry.message, entry.seq) == (
        "volume-rm",
        "bo@host",
        "wipe it",
        out.ledger,
    )
    assert entry.details["volume"] == "data" and entry.details["created_by"] == "web@r1"
    verify_chain(world.state.ledger())


def test_rm_forced_under_a_live_release_says_so(tmp_path: Path) -> None:
    world = World(tmp_path)
    source = with_volume(world, tmp_path)
    out = asyncio.run(remove_command(world.engine, "data", force=True, actor="a", message="m"))
    assert (out.forced, out.used_by) == (True, ("web@r1",))
    assert not source.exists()
    assert world.state.ledger()[-1].details["used_by"] == ["web@r1"]


def test_rm_refuses_a_volume_a_desired_release_needs_before_it_runs(tmp_path: Path) -> None:
    # Desired but not started yet (or crash-looping): its next instance needs the volume.
    world = World(tmp_path)
    cfg = ServiceConfig(
        replicas=1, port=18080, health=HealthCheck(start_timeout=5), volumes=(DATA,)
    )
    world.engine.commands.deploy("web", world.v1, "web", cfg, "ana@host", "first", {})
    prepare(tmp_path, launch(DATA), UID, GID)
    assert world.state.live_instances() == []
    with pytest.raises(UsageError, match="in use by web@r1"):
        asyncio.run(remove_command(world.engine, "data", force=False, actor="a", message="m"))
    with pytest.raises(NotFoundError, match="no volume named 'other'"):
        asyncio.run(remove_command(world.engine, "other", force=True, actor="a", message="m"))


def test_a_removal_that_cannot_be_ledgered_does_not_happen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path)
    source = prepare(tmp_path, launch(DATA), UID, GID)[0].source
    (source / "rows").write_text("kept")

    def broken(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(world.engine.commands, "record", broken)
    with pytest.raises(OSError, match="No space left"):
        asyncio.run(remove_command(world.engine, "data", force=False, actor="a", message="m"))
    assert (source / "rows").read_text() == "kept"
    assert [r.name for r in list_volumes(tmp_path)] == ["data"]
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == ["data"]
