"""gc: what names, releases and instances need stays; everything else goes, carefully."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import time
from pathlib import Path

import pytest

from graven.errors import StoreError
from graven.ledger.sqlite import SqliteStateStore
from graven.model import Digest, HealthCheck, Image, ImageConfig, Instance, ServiceConfig
from graven.store.cas import ContentStore
from graven.store.gc import GRACE_PERIOD, collect, reachable, run_gc

# Later than any blob's mtime by more than the grace period: everything counts as old.
LATER = time.time() + 2 * 86400
CONFIG = ServiceConfig(replicas=1, port=8080, health=HealthCheck())
_counter = itertools.count()


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "state" / "store")


def make_image(
    store: ContentStore, tmp_path: Path, files: dict[str, bytes], tag: str | None = None
) -> Image:
    src = tmp_path / f"src-{next(_counter)}"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    image = store.put_image(store.ingest_tree(src), ImageConfig(entrypoint=("x",)))
    if tag is not None:
        store.tag(tag, image.digest)
    return image


def blob_of(store: ContentStore, image: Image, path: str) -> Digest:
    entry = store.lookup(image.rootfs, path)
    assert entry is not None and entry.digest is not None
    return entry.digest


@pytest.fixture
def two(store: ContentStore, tmp_path: Path) -> tuple[Image, Image]:
    """'web' is named; the other image is not, and shares one file with it."""
    named = make_image(store, tmp_path, {"shared": b"s", "a": b"only in a"}, tag="web")
    loose = make_image(store, tmp_path, {"shared": b"s", "b": b"only in b"})
    return named, loose


# --- what goes, what stays -------------------------------------------------------------------


def test_an_unreferenced_image_is_collected_a_named_one_kept(
    store: ContentStore, two: tuple[Image, Image]
) -> None:
    named, loose = two
    only_b = blob_of(store, loose, "/b")
    sizes = sum(store.blob_path(d).stat().st_size for d in (loose.digest, loose.rootfs, only_b))

    report = run_gc(store, now=LATER)

    assert report.ok
    for gone in (loose.digest, loose.rootfs, only_b):
        assert not store.has(gone)
    for kept in (named.digest, named.rootfs, blob_of(store, named, "/a")):
        assert store.has(kept)
    assert store.has(blob_of(store, named, "/shared"))
    assert (report.objects_deleted, report.bytes_freed) == (3, sizes)
    assert report.kept[named.digest] == ["ref web"]
    assert store.fsck() == []
    assert not (store.root / "trash").exists() or not any((store.root / "trash").iterdir())


def test_dry_run_deletes_nothing(store: ContentStore, two: tuple[Image, Image]) -> None:
    _, loose = two

    report = run_gc(store, now=LATER, dry_run=True)

    assert report.objects_deleted == 3
    assert report.dry_run
    assert store.has(loose.digest) and store.has(loose.rootfs)
    assert run_gc(store, now=LATER).objects_deleted == 3


def test_nothing_younger_than_the_grace_period_is_deleted(
    store: ContentStore, two: tuple[Image, Image]
) -> None:
    _, loose = two

    report = run_gc(store, now=time.time() + GRACE_PERIOD / 2)

    assert report.objects_deleted == 0
    assert report.objects_young >= 3
    assert store.has(loose.digest)
    assert run_gc(store, now=time.time() + GRACE_PERIOD + 60).objects_deleted == 3


def test_a_young_tree_keeps_the_old_blobs_it_names(store: ContentStore, tmp_path: Path) -> None:
    # A build running now reuses a file that was unreferenced until then.
    image = make_image(store, tmp_path, {"reused": b"old content"})
    old = blob_of(store, image, "/reused")
    os.utime(store.blob_path(old), (1_000_000, 1_000_000))

    report = run_gc(store)  # the clock of the machine: the tree and image are young

    assert report.objects_deleted == 0
    assert store.has(old)


def test_history_retention(store: ContentStore, tmp_path: Path) -> None:
    first = make_image(store, tmp_path, {"v": b"1"}, tag="web")
    second = make_image(store, tmp_path, {"v": b"2"}, tag="web")
    third = make_image(store, tmp_path, {"v": b"3"}, tag="web")

    report = run_gc(store, now=LATER, keep_history=2)

    assert report.kept[second.digest] == ["history of web"]
    assert report.kept[third.digest] == ["ref web"]
    assert not store.has(first.digest)
    run_gc(store, now=LATER, keep_history=0)
    assert not store.has(second.digest)
    assert store.has(third.digest)


# --- releases and instances --------------------------------------------------------------------


def release_images(
    store: ContentStore, tmp_path: Path, db: Path, count: int, service: str = "web"
) -> list[Image]:
    state = SqliteStateStore(db)
    images = []
    try:
        for n in range(1, count + 1):
            image = make_image(store, tmp_path, {"version": f"{service} {n}".encode()})
            with state.transaction() as tx:
                release = tx.add_release(service, image.digest, service, CONFIG, 1.0)
                tx.set_desired(service, release.number, 1.0)
            images.append(image)
    finally:
        state.close()
    return images


def test_the_last_releases_are_kept(store: ContentStore, tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    images = release_images(store, tmp_path, db, 12)
    other = release_images(store, tmp_path, db, 2, service="api")

    report = run_gc(store, now=LATER, state_db=db, keep_releases=10)

    assert [store.has(i.digest) for i in images] == [False, False] + [True] * 10
    assert report.kept[images[-1].digest] == ["release web@r12 (desired)"]
    assert report.kept[images[2].digest] == ["release web@r3 (last 10)"]
    assert all(store.has(i.digest) for i in other)
    assert store.fsck() == []


def test_the_desired_release_is_kept_however_old(store: ContentStore, tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    images = release_images(store, tmp_path, db, 4)
    state = SqliteStateStore(db)
    with state.transaction() as tx:  # rolled back to r1
        tx.set_desired("web", 1, 2.0)
    state.close()

    report = run_gc(store, now=LATER, state_db=db, keep_releases=1)

    assert [store.has(i.digest) for i in images] == [True, False, False, True]
    assert report.kept[images[0].digest] == ["release web@r1 (desired)"]


def test_images_of_live_instances_are_kept(store: ContentStore, tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    images = release_images(store, tmp_path, db, 3)
    state = SqliteStateStore(db)
    for n, (image, inst_state) in enumerate(zip(images[:2], ["draining", "stopped"], strict=True)):
        instance = Instance(
            id=f"web-r{n + 1}-0000",
            service="web",
            release=n + 1,
            image=image.digest,
            host="127.0.0.1",
            port=9000 + n,
            pid=1,
            started_at=1.0,
            state=inst_state,
        )
        with state.transaction() as tx:
            tx.add_instance(instance, pid_start=0)
    state.close()

    report = run_gc(store, now=LATER, state_db=db, keep_releases=0)

    assert [store.has(i.digest) for i in images] == [True, False, True]
    assert report.kept[images[0].digest] == ["instance web-r1-0000 (draining)"]


# --- damage ----------------------------------------------------------------------------------------


def corrupt(store: ContentStore, digest: Digest) -> None:
    path = store.blob_path(digest)
    path.chmod(0o644)
    path.write_bytes(b'{"not": "what it was"}')


def test_fsck_finds_a_corrupt_blob(store: ContentStore, two: tuple[Image, Image]) -> None:
    named, _ = two
    assert store.fsck() == []
    corrupt(store, blob_of(store, named, "/a"))

    problems = store.fsck()

    assert any("corrupt" in p for p in problems)


def test_gc_deletes_nothing_when_a_kept_tree_is_damaged(
    store: ContentStore, two: tuple[Image, Image]
) -> None:
    named, loose = two
    corrupt(store, named.rootfs)

    report = run_gc(store, now=LATER)

    assert not report.ok
    assert any(str(named.rootfs) in p for p in report.problems)
    assert report.objects_deleted == 0
    assert store.has(loose.digest) and store.has(blob_of(store, named, "/a"))


def test_a_root_that_is_already_gone_is_only_listed(store: ContentStore, tmp_path: Path) -> None:
    first = make_image(store, tmp_path, {"v": b"1"}, tag="web")
    make_image(store, tmp_path, {"v": b"2"}, tag="web")
    run_gc(store, now=LATER, keep_history=1)

    report = run_gc(store, now=LATER, keep_history=5)

    assert report.ok
    assert report.missing[first.digest] == ["history of web"]


# --- the cache, temp files, checkouts ----------------------------------------------------------------


def test_cache_entries_follow_their_trees(store: ContentStore, two: tuple[Image, Image]) -> None:
    named, loose = two

    def step_result(image: Image) -> str:
        state = {"rootfs": str(image.rootfs), "layers": [str(image.rootfs)]}
        return json.dumps({"schema": "graven.step-result/v1", "state": state})

    store.cache_put("step-named", step_result(named))
    store.cache_put("step-loose", step_result(loose))
    store.cache_put("step-gone", step_result(loose).replace(loose.rootfs.hex, "0" * 64))

    report = run_gc(store, now=LATER)

    assert store.cache_get("step-named") is not None
    assert store.cache_get("step-loose") is None
    assert store.cache_get("step-gone") is None
    assert report.cache_entries_deleted == 2


def test_derived_blobs_in_the_cache_stay_unless_pruned(store: ContentStore) -> None:
    layer = store.put_bytes(b"\x1f\x8b compressed layer")
    entry = {"digest": str(layer), "diff_id": "sha256:" + "1" * 64, "size": 20}
    store.cache_put("oci-layer", json.dumps(entry))

    report = run_gc(store, now=LATER)
    assert store.has(layer)
    assert report.kept[layer] == ["cache entry"]

    report = run_gc(store, now=LATER, prune_cache=True)
    assert not store.has(layer)
    assert store.cache_get("oci-layer") is None
    assert report.cache_entries_deleted == 1


def test_leftover_temp_files_are_removed(store: ContentStore) -> None:
    (store.tmp_dir / ".w-crashed").write_bytes(b"half")
    (store.tmp_dir / "run-crashed" / "rootfs").mkdir(parents=True)

    assert run_gc(store).tmp_removed == 0  # might be a build running now
    report = run_gc(store, now=LATER)

    assert report.tmp_removed == 2
    assert list(store.tmp_dir.iterdir()) == []


def test_checkouts_nothing_uses_are_removed(
    store: ContentStore, tmp_path: Path, two: tuple[Image, Image]
) -> None:
    named, loose = two
    db = tmp_path / "state" / "state.db"
    checkouts = tmp_path / "state" / "checkouts"
    for image in two:
        store.checkout(image.rootfs, checkouts / image.digest.hex)
    (checkouts / "not-ours").mkdir()
    state = SqliteStateStore(db)
    live = Instance("web-r1-0000", "web", 1, named.digest, "127.0.0.1", 9000, 1, 1.0, "healthy")
    with state.transaction() as tx:
        tx.add_instance(live, pid_start=0)
    state.close()

    report = run_gc(store, now=LATER, state_db=db, checkouts=checkouts)

    assert report.checkouts_removed == [loose.digest.hex]
    assert report.checkout_bytes_freed == len(b"s") + len(b"only in b")
    assert sorted(p.name for p in checkouts.iterdir()) == sorted(
        [named.digest.hex, named.digest.hex + ".tree", "not-ours"]
    )


# --- concurrency and crashes ------------------------------------------------------------------------


def test_what_becomes_needed_while_collecting_is_put_back(
    store: ContentStore, two: tuple[Image, Image]
) -> None:
    _, loose = two
    # As if a build tagged the loose image right after the first mark: the re-read
    # roots include it, and its tree and files come back level by level.
    report = collect(
        store,
        keep=reachable(store, [two[0].digest]),
        dry_run=False,
        now=LATER,
        recheck=lambda: reachable(store, [loose.digest]) | {loose.digest},
    )

    assert report.objects_deleted == 0
    assert report.objects_restored == 3
    assert store.has(loose.digest) and store.has(blob_of(store, loose, "/b"))
    assert store.fsck() == []


def test_blobs_a_crashed_gc_left_in_the_trash_are_put_back(
    store: ContentStore, two: tuple[Image, Image]
) -> None:
    named, _ = two
    needed = blob_of(store, named, "/a")
    trash = store.root / "trash" / "gc-1-1"
    trash.mkdir(parents=True)
    store.blob_path(needed).replace(trash / needed.hex)

    run_gc(store, now=LATER)

    assert store.has(needed)
    assert store.fsck() == []
    assert not trash.exists()


def test_one_gc_at_a_time(store: ContentStore) -> None:
    with (store.root / "locks" / "gc.lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="another 'graven gc' is running"):
            run_gc(store)
