"""Named volumes and host directories: the writable paths of an instance whose data
outlives it.

A named volume is a directory under the state dir::

    <state>/volumes/<name>/volume.json   who made it and when (written atomically)
    <state>/volumes/<name>/data/         what instances see at their path

``<name>/`` belongs to graven; only ``data/`` belongs to the instance's user, so an
instance can change what is in its volume but never what the volume is (it cannot put
a symlink where ``data`` was and redirect the next bind). A volume is made whole or not
at all (built under a temp name, then renamed into place) and outlives every instance,
rollback and ``graven down``; only :func:`remove_volume` ('graven volume rm') deletes
it, renaming it away first so a start racing the removal finds it whole or absent.

:func:`prepare` is what a runtime calls before it starts an instance: it makes the
named volumes that are missing, checks host directories, and returns the
:class:`Mount` list the runtime binds (bwrap ``--bind``, an OCI ``bind`` mount).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graven.atomic import fsync_dir, write_atomic
from graven.errors import NotFoundError, RuntimeFailure
from graven.model import Volume, is_valid_name, release_id
from graven.runtime.base import LaunchSpec

if TYPE_CHECKING:
    from graven.ledger.state import StateStore

VOLUMES_DIR = "volumes"
METADATA_FILE = "volume.json"
DATA_DIR = "data"
_NEW_PREFIX = ".new-"  # a volume being made
_REMOVED_PREFIX = ".rm-"  # a volume being deleted


@dataclass(frozen=True)
class Mount:
    """A directory of the host a runtime binds into an instance at ``target``."""

    source: Path
    target: str
    read_only: bool


@dataclass(frozen=True)
class VolumeRecord:
    """A named volume as it is on disk. ``created_at`` is None when its record is
    missing or unreadable (a directory made by hand)."""

    name: str
    path: Path  # the data directory
    created_at: float | None
    service: str  # the service and release whose instance made it
    release: str
    uid: int  # owner of the data directory
    gid: int
    size: int  # bytes of the files in it

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "created_at": self.created_at,
            "service": self.service,
            "release": self.release,
            "uid": self.uid,
            "gid": self.gid,
            "size": self.size,
        }


def volumes_dir(state_dir: Path) -> Path:
    return state_dir / VOLUMES_DIR


def volume_data(state_dir: Path, name: str) -> Path:
    """Where a named volume's data is (whether or not it exists yet)."""
    return volumes_dir(state_dir) / name / DATA_DIR


# --- preparing an instance's mounts -----------------------------------------------------


def prepare(
    state_dir: Path,
    spec: LaunchSpec,
    uid: int,
    gid: int,
    *,
    clock: Callable[[], float] = time.time,
) -> tuple[Mount, ...]:
    """The mounts of ``spec.volumes`` for an instance that runs as ``uid``:``gid``.

    Makes each missing named volume (its data directory owned by ``uid``:``gid``),
    checks each host directory exists, and refuses any volume whose path goes through a
    symlink. Raises RuntimeFailure naming the volume and what to do."""
    mounts = []
    for volume in spec.volumes:
        if volume.name:
            source = _named_volume(state_dir, volume, spec, uid, gid, clock)
        else:
            source = _host_directory(volume, spec.instance_id)
        mounts.append(Mount(source=source, target=volume.path, read_only=volume.read_only))
    return tuple(mounts)


def _named_volume(
    state_dir: Path,
    volume: Volume,
    spec: LaunchSpec,
    uid: int,
    gid: int,
    clock: Callable[[], float],
) -> Path:
    root = volumes_dir(state_dir)
    what = f"{spec.instance_id}: volume {volume.name!r}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _require_real_dir(root, what)
    home = root / volume.name
    if not os.path.lexists(home):
        _create(root, volume.name, spec, uid, gid, clock(), what)
    _require_real_dir(home, what)
    data = home / DATA_DIR
    info = _require_real_dir(data, what)
    if not volume.read_only and (info.st_uid, info.st_gid) != (uid, gid):
        raise RuntimeFailure(
            f"{what}: its data belongs to uid {info.st_uid}, gid {info.st_gid}, but the "
            f"instance runs as uid {uid}, gid {gid} and could not write it",
            hint=f"Give it to the service's user ('chown -R {uid}:{gid} {data}'), or remove "
            f"it with 'graven volume rm {volume.name}' if its data is not needed.",
        )
    return data


def _create(
    root: Path, name: str, spec: LaunchSpec, uid: int, gid: int, at: float, what: str
) -> None:
    """Make the volume under a temp name, then rename it into place: a crash leaves no
    half-made volume, and of two instances starting at once one makes it and the other
    uses it."""
    staging = root / f"{_NEW_PREFIX}{name}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        data = staging / DATA_DIR
        data.mkdir(mode=0o750)
        data.chmod(0o750)  # whatever the umask
        try:
            os.chown(data, uid, gid)
        except PermissionError as exc:
            raise RuntimeFailure(
                f"{what}: cannot give a new volume to uid {uid}, gid {gid}: {exc.strerror}",
                hint="Run graven as root, or as the user the instances run as.",
            ) from exc
        record = {
            "name": name,
            "created_at": at,
            "service": spec.service,
            "release": release_id(spec.service, spec.release),
            "instance": spec.instance_id,
        }
        write_atomic(staging / METADATA_FILE, json.dumps(record, sort_keys=True).encode())
        try:
            staging.rename(root / name)
        except OSError:
            if not os.path.lexists(root / name):
                raise
            # Made by another instance meanwhile: that one is the volume.
            return
        staging = root / name
        fsync_dir(root)
    finally:
        if staging.name.startswith(_NEW_PREFIX):
            shutil.rmtree(staging, ignore_errors=True)


def _require_real_dir(path: Path, what: str) -> os.stat_result:
    """``path``'s own status, when it is a directory and not a symlink."""
    try:
        info = path.lstat()
    except FileNotFoundError as exc:
        raise RuntimeFailure(
            f"{what}: {path} is missing",
            hint="Remove the volume ('graven volume rm NAME') and deploy again to start it "
            "empty, or restore it from a backup.",
        ) from exc
    if stat.S_ISLNK(info.st_mode):
        raise RuntimeFailure(
            f"{what}: {path} is a symlink; graven binds only real directories, so that no "
            "link can redirect a volume",
            hint=f"Replace the symlink with the directory it points to ({path.readlink()}).",
        )
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeFailure(
            f"{what}: {path} is not a directory",
            hint="Move it away; graven makes the volume again on the next start.",
        )
    return info


def _host_directory(volume: Volume, instance_id: str) -> Path:
    host = volume.host_path
    what = f"{instance_id}: volume {volume.path} (host {host})"
    if not os.path.lexists(host):
        raise RuntimeFailure(
            f"{what}: {host} does not exist",
            hint=f"Create it ('mkdir -p {host}', owned by the service's user) or fix "
            "'volumes' in graven.yaml.",
        )
    real = os.path.realpath(host)
    if real != host:
        raise RuntimeFailure(
            f"{what}: {host} goes through a symlink (to {real}); graven binds only real "
            "directories, so that no link can redirect a volume",
            hint=f"Name the real directory in graven.yaml: host: {real}",
        )
    _require_real_dir(Path(host), what)
    return Path(host)


def check_mount_points(
    root: Path, spec: LaunchSpec, *, runtime_dirs: frozenset[str] = frozenset()
) -> None:
    """Refuse a volume or tmpfs path that cannot be mounted over the image at ``root``
    (a read-only tree): one under a directory the image has must exist in it as a
    directory, and none may go through a symlink of the image (it would lead out of
    the image). Paths under ``runtime_dirs`` (top-level names the runtime mounts
    writable itself, such as ``tmp``) and under names the image lacks are made
    by the runtime."""
    for target in [v.path for v in spec.volumes] + [t.path for t in spec.tmpfs]:
        parts = target.strip("/").split("/")
        if parts[0] in runtime_dirs:
            continue
        here = root
        for depth, part in enumerate(parts):
            here = here / part
            try:
                info = here.lstat()
            except FileNotFoundError:
                if depth == 0:
                    break  # a new top-level directory: the runtime makes it
                raise RuntimeFailure(
                    f"{spec.instance_id}: cannot mount {target}: the image has "
                    f"/{'/'.join(parts[:depth])} but no {'/'.join(parts[: depth + 1])!r} in it,"
                    " and the image is read-only",
                    hint=f"Add a step 'run: mkdir -p {target}' to the recipe, or mount at a "
                    "top-level path such as /data.",
                ) from None
            if stat.S_ISLNK(info.st_mode):
                raise RuntimeFailure(
                    f"{spec.instance_id}: cannot mount {target}: /{'/'.join(parts[: depth + 1])}"
                    " is a symlink in the image",
                    hint="Mount at the path the link points to, in graven.yaml.",
                )
            if not stat.S_ISDIR(info.st_mode):
                raise RuntimeFailure(
                    f"{spec.instance_id}: cannot mount {target}: "
                    f"/{'/'.join(parts[: depth + 1])} is a file in the image",
                    hint="Choose another path in graven.yaml.",
                )


# --- listing and removing -----------------------------------------------------------------


def list_volumes(state_dir: Path) -> list[VolumeRecord]:
    """Every named volume, by name."""
    root = volumes_dir(state_dir)
    try:
        names = sorted(p.name for p in root.iterdir())
    except FileNotFoundError:
        return []
    return [
        record
        for name in names
        if is_valid_name(name) and (record := _record(root / name)) is not None
    ]


def find_volume(state_dir: Path, name: str) -> VolumeRecord:
    """The named volume; NotFoundError when there is none."""
    record = _record(volumes_dir(state_dir) / name) if is_valid_name(name) else None
    if record is None:
        raise NotFoundError(
            f"no volume named {name!r}", hint="Run 'graven volume ls' to see the volumes."
        )
    return record


def _record(home: Path) -> VolumeRecord | None:
    try:
        info = (home / DATA_DIR).lstat()
    except OSError:
        return None
    if home.is_symlink() or not stat.S_ISDIR(info.st_mode):
        return None
    try:
        meta = json.loads((home / METADATA_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    created = meta.get("created_at")
    return VolumeRecord(
        name=home.name,
        path=home / DATA_DIR,
        created_at=float(created) if isinstance(created, (int, float)) else None,
        service=str(meta.get("service", "")),
        release=str(meta.get("release", "")),
        uid=info.st_uid,
        gid=info.st_gid,
        size=_size(home / DATA_DIR),
    )


def _size(directory: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(directory):  # does not follow symlinks
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size  # noqa: PTH118
            except OSError:
                continue
    return total


def remove_volume(state_dir: Path, name: str) -> VolumeRecord:
    """Delete the named volume and its data; returns what it was."""
    record, doomed = retire_volume(state_dir, name)
    delete_retired(name, doomed)
    return record


def retire_volume(state_dir: Path, name: str) -> tuple[VolumeRecord, Path]:
    """Take the named volume out of sight (a start from now on makes a new, empty
    one) and return what it was and where it now is, for :func:`delete_retired`
    (or :func:`restore_retired`, when the removal cannot be recorded)."""
    record = find_volume(state_dir, name)
    root = volumes_dir(state_dir)
    doomed = root / f"{_REMOVED_PREFIX}{name}-{secrets.token_hex(4)}"
    (root / name).rename(doomed)
    fsync_dir(root)
    return record, doomed


def restore_retired(state_dir: Path, name: str, doomed: Path) -> None:
    """Put a retired volume back (unless a new one took its name meanwhile)."""
    root = volumes_dir(state_dir)
    if not os.path.lexists(root / name):
        doomed.rename(root / name)
        fsync_dir(root)


def delete_retired(name: str, doomed: Path) -> None:
    try:
        shutil.rmtree(doomed)  # never follows a symlink the instance left inside
    except OSError as exc:
        raise RuntimeFailure(
            f"volume {name} is removed, but {doomed} could not be deleted: {exc}",
            hint=f"Delete {doomed} by hand.",
        ) from exc


def volumes_in_use(state: StateStore) -> dict[str, list[str]]:
    """Named volume -> the releases that need it now: those of live instances, and
    those services are meant to run (a service in a crash loop starts again)."""
    wanted = {(i.service, i.release) for i in state.live_instances()}
    wanted |= {(s, n) for s, n in state.services().items() if n is not None}
    return volume_users(
        (release_id(s, n), state.release(s, n).config.volumes) for s, n in sorted(wanted)
    )


def volume_users(releases: Iterable[tuple[str, Iterable[Volume]]]) -> dict[str, list[str]]:
    """Which of ``releases`` (id, volumes) use each named volume: name -> release ids."""
    users: dict[str, list[str]] = {}
    for rid, volumes in releases:
        for volume in volumes:
            if volume.name and rid not in users.setdefault(volume.name, []):
                users[volume.name].append(rid)
    return users
