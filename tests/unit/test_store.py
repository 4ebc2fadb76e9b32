"""The content store: blobs, Merkle trees, checkouts, images, names, cache, fsck."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from graven.errors import NotFoundError, StoreError, UsageError
from graven.model import Digest, ImageConfig
from graven.store.cas import ContentStore
from graven.store.tree_model import EMPTY_TREE, Tree, TreeEntry, TreePathError, parse_tree


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def make_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "run").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "run").chmod(0o700)
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("port = 8080\n")
    (root / "empty").mkdir()
    (root / "link").symlink_to("etc/app.conf")
    return root


def blob_files(store: ContentStore) -> list[Path]:
    return [p for p in (store.root / "blobs").rglob("*") if p.is_file()]


# --- blobs ----------------------------------------------------------------------------------


def test_put_bytes_is_content_addressed_and_idempotent(store: ContentStore) -> None:
    d = store.put_bytes(b"hello")
    assert d == Digest.of_bytes(b"hello")
    assert store.blob_path(d) == store.root / "blobs/sha256" / d.hex[:2] / d.hex[2:]
    assert store.put_bytes(b"hello") == d
    assert store.has(d)
    with store.open_blob(d) as f:
        assert f.read() == b"hello"
    assert store.verify_blob(d)
    assert len(blob_files(store)) == 1
    assert not list((store.root / "tmp").iterdir())


def test_put_file_streams_large_files(store: ContentStore, tmp_path: Path) -> None:
    big = tmp_path / "big"
    data = os.urandom(3 * (1 << 20) + 17)
    big.write_bytes(data)
    d = store.put_file(big)
    assert d == Digest.of_bytes(data)
    assert store.blob_path(d).read_bytes() == data
    assert store.put_file(big) == d


def test_put_file_refuses_symlinks_and_fifos(store: ContentStore, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to("f")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(StoreError, match="cannot read"):
        store.put_file(tmp_path / "l")
    with pytest.raises(StoreError, match="not a regular file"):
        store.put_file(tmp_path / "fifo")


def test_missing_blob_is_a_store_error(store: ContentStore) -> None:
    d = Digest.of_bytes(b"never stored")
    assert not store.has(d)
    assert not store.verify_blob(d)
    with pytest.raises(StoreError, match="missing"):
        store.open_blob(d)


# --- trees ----------------------------------------------------------------------------------


def test_ingest_tree_records_normalized_entries(store: ContentStore, tmp_path: Path) -> None:
    digest = store.ingest_tree(make_tree(tmp_path / "src"))
    tree = store.read_tree(digest)
    assert [e.name for e in tree.entries] == ["bin", "empty", "etc", "link"]
    run = store.lookup(digest, "/bin/run")
    assert run is not None
    assert (run.type, run.mode, run.size) == ("file", 0o755, 18)
    conf = store.lookup(digest, "/etc/app.conf")
    assert conf is not None and conf.mode == 0o644
    assert store.lookup(digest, "/empty") == TreeEntry(
        "empty", "dir", 0o755, 0, digest=store.put_tree(Tree())
    )
    assert store.lookup(digest, "/link") == TreeEntry(
        "link", "symlink", 0o777, len("etc/app.conf"), target="etc/app.conf"
    )
    assert store.lookup(digest, "/link/x") is None
    assert store.lookup(digest, "/nope") is None
    assert tree.size == 18 + 12 + len("etc/app.conf")


def test_tree_blob_is_canonical_json(store: ContentStore, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("A")
    digest = store.ingest_tree(tmp_path / "d")
    blob = store.blob_path(digest).read_bytes()
    assert blob == (
        b'{"entries":[{"digest":"' + Digest.of_bytes(b"A").encode() + b'","mode":420,'
        b'"name":"a","size":1,"type":"file"}],"schema":"graven.tree/v1"}'
    )


def test_digest_ignores_mtime_owner_and_umask(store: ContentStore, tmp_path: Path) -> None:
    a = store.ingest_tree(make_tree(tmp_path / "a"))
    old = os.umask(0o077)
    try:
        b_root = make_tree(tmp_path / "b")
    finally:
        os.umask(old)
    (b_root / "etc" / "app.conf").chmod(0o600)
    (b_root / "bin" / "run").chmod(0o711)
    for p in [b_root, *b_root.rglob("*")]:
        os.utime(p, (1, 1), follow_symlinks=False)
    assert store.ingest_tree(b_root) == a


def test_identical_files_across_trees_are_one_blob(store: ContentStore, tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "same.txt").write_text("shared content")
        (tmp_path / name / f"{name}.txt").write_text(name)
    store.ingest_tree(tmp_path / "one")
    store.ingest_tree(tmp_path / "two")
    contents = [p.read_bytes() for p in blob_files(store)]
    assert contents.count(b"shared content") == 1
    # and the identical 'sub' subtree is stored once as well
    assert sum(1 for c in contents if b'"name":"same.txt"' in c) == 1


def test_ingest_rejects_fifos_naming_the_path(store: ContentStore, tmp_path: Path) -> None:
    (tmp_path / "d" / "deep").mkdir(parents=True)
    os.mkfifo(tmp_path / "d" / "deep" / "pipe")
    with pytest.raises(StoreError, match=r"d/deep/pipe is a fifo"):
        store.ingest_tree(tmp_path / "d")


def test_ingest_rejects_sockets(store: ContentStore, tmp_path: Path) -> None:
    import socket

    (tmp_path / "d").mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "d" / "sock"))
        with pytest.raises(StoreError, match="is a socket"):
            store.ingest_tree(tmp_path / "d")


def test_ingest_excludes_paths(store: ContentStore, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "src")
    digest = store.ingest(root, exclude=[root / "etc"]).digest
    assert digest is not None
    assert store.lookup(digest, "/etc") is None
    assert store.lookup(digest, "/bin/run") is not None


def test_read_tree_rejects_non_canonical_and_malformed(store: ContentStore) -> None:
    not_canonical = store.put_bytes(b'{"schema": "graven.tree/v1", "entries": []}')
    with pytest.raises(StoreError, match="canonical"):
        store.read_tree(not_canonical)
    bad_name = store.put_bytes(
        b'{"entries":[{"mode":511,"name":"..","size":1,"target":"x","type":"symlink"}],'
        b'"schema":"graven.tree/v1"}'
    )
    with pytest.raises(StoreError, match="invalid entry name"):
        store.read_tree(bad_name)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_tree(b"[" * 100_000)


def test_place_and_merge_work_on_trees(store: ContentStore, tmp_path: Path) -> None:
    root = store.ingest_tree(make_tree(tmp_path / "src"))
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "new.conf").write_text("new")
    (tmp_path / "extra" / "app.conf").write_text("replaced")
    extra = store.ingest(tmp_path / "extra")

    merged = store.place(root, "/etc", extra)
    etc = store.lookup(merged, "/etc")
    assert etc is not None and etc.digest is not None
    assert [e.name for e in store.read_tree(etc.digest).entries] == ["app.conf", "new.conf"]
    conf = store.lookup(merged, "/etc/app.conf")
    assert conf is not None and conf.digest == Digest.of_bytes(b"replaced")
    assert store.lookup(merged, "/bin/run") == store.lookup(root, "/bin/run")

    deep = store.place(root, "/opt/a/b/new.conf", store.ingest(tmp_path / "extra" / "new.conf"))
    assert store.lookup(deep, "/opt/a/b/new.conf") is not None
    with pytest.raises(TreePathError, match=r"/etc/app.conf is a file"):
        store.place(root, "/etc/app.conf/x", extra)
    # sizes of directories are kept up to date on the way up
    assert store.read_tree(merged).size == store.read_tree(root).size + len("new") - 12 + 8


# --- checkouts ------------------------------------------------------------------------------


def test_checkout_read_only_copies_and_marks(store: ContentStore, tmp_path: Path) -> None:
    digest = store.ingest_tree(make_tree(tmp_path / "src"))
    dest = tmp_path / "out" / "root.v1"
    assert store.checkout(digest, dest) == dest
    assert store.checkout_marker(dest) == tmp_path / "out" / "root.v1.tree"
    assert (dest / "bin" / "run").read_text() == "#!/bin/sh\necho hi\n"
    assert os.readlink(dest / "link") == "etc/app.conf"
    assert stat.S_IMODE((dest / "bin" / "run").stat().st_mode) == 0o555
    assert stat.S_IMODE((dest / "etc" / "app.conf").stat().st_mode) == 0o444
    assert stat.S_IMODE((dest / "etc").stat().st_mode) == 0o555
    assert stat.S_IMODE(dest.stat().st_mode) == 0o555
    # copies, not hard links: no inode is shared with the store
    store_inodes = {p.stat().st_ino for p in blob_files(store)}
    checkout_inodes = {p.stat().st_ino for p in dest.rglob("*") if not p.is_symlink()}
    assert not store_inodes & checkout_inodes
    # no temp directory is left beside it
    assert sorted(p.name for p in dest.parent.iterdir()) == ["root.v1", "root.v1.tree"]
    assert store.ingest_tree(dest) == digest


def test_checkout_reuses_a_complete_read_only_checkout(store: ContentStore, tmp_path: Path) -> None:
    digest = store.ingest_tree(make_tree(tmp_path / "src"))
    dest = tmp_path / "co"
    store.checkout(digest, dest)
    inode = (dest / "etc" / "app.conf").stat().st_ino
    store.checkout(digest, dest)
    assert (dest / "etc" / "app.conf").stat().st_ino == inode
    other = store.put_tree(Tree())
    with pytest.raises(StoreError, match="already exists"):
        store.checkout(other, dest)
    store.remove_checkout(dest)
    assert not dest.exists() and not store.checkout_marker(dest).exists()


def test_checkout_refuses_an_unmarked_existing_dest(store: ContentStore, tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    with pytest.raises(StoreError, match="not a graven checkout"):
        store.checkout(store.put_tree(Tree()), tmp_path / "dest")


def test_writing_a_writable_checkout_never_touches_the_store(
    store: ContentStore, tmp_path: Path
) -> None:
    digest = store.ingest_tree(make_tree(tmp_path / "src"))
    dest = store.checkout(digest, tmp_path / "rw", read_only=False)
    assert stat.S_IMODE((dest / "etc" / "app.conf").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "bin" / "run").stat().st_mode) == 0o755
    (dest / "etc" / "app.conf").write_text("tampered")
    assert store.fsck() == []
    conf = store.lookup(digest, "/etc/app.conf")
    assert conf is not None and conf.digest is not None
    assert store.blob_path(conf.digest).read_text() == "port = 8080\n"


def test_checkout_detects_a_corrupt_blob(store: ContentStore, tmp_path: Path) -> None:
    digest = store.ingest_tree(make_tree(tmp_path / "src"))
    conf = store.lookup(digest, "/etc/app.conf")
    assert conf is not None and conf.digest is not None
    blob = store.blob_path(conf.digest)
    blob.chmod(0o644)
    blob.write_text("evil")
    with pytest.raises(StoreError, match="corrupt"):
        store.checkout(digest, tmp_path / "co")
    assert not (tmp_path / "co").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


# --- images and names -----------------------------------------------------------------------


def image_of(store: ContentStore, text: str) -> Digest:
    rootfs = store.place(
        store.put_tree(Tree()),
        "/f",
        TreeEntry("f", "file", 0o644, len(text), store.put_bytes(text.encode())),
    )
    return store.put_image(rootfs, ImageConfig(entrypoint=("true",))).digest


def test_put_and_get_image(store: ContentStore) -> None:
    config = ImageConfig(entrypoint=("python", "app.py"), env=(("A", "1"),), workdir="/app")
    rootfs = store.put_tree(Tree())
    image = store.put_image(rootfs, config)
    assert image.digest == Digest.of_bytes(store.blob_path(image.digest).read_bytes())
    assert store.get_image(image.digest) == image
    with pytest.raises(StoreError, match="not a valid image"):
        store.get_image(rootfs)
    with pytest.raises(StoreError, match="missing"):
        store.put_image(Digest.of_bytes(b"no such tree"), config)


def test_tag_is_atomic_and_keeps_history(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = image_of(store, "1"), image_of(store, "2")
    store.tag("web", first)
    store.tag("web", first)
    store.tag("web", second)
    assert (store.root / "refs" / "web").read_text() == f"{second}\n"
    assert store.history("web") == [first, second]

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(StoreError, match=r"cannot write .*disk on fire"):
        store.tag("web", first)
    monkeypatch.undo()
    # the crash left the old ref whole and no temp file behind
    assert (store.root / "refs" / "web").read_text() == f"{second}\n"
    assert not list((store.root / "tmp").iterdir())
    assert store.resolve("web").digest == second


def test_tag_refuses_bad_names_and_unknown_images(store: ContentStore) -> None:
    with pytest.raises(UsageError, match="invalid image name"):
        store.tag("../escape", image_of(store, "x"))
    with pytest.raises(StoreError, match="missing"):
        store.tag("web", Digest.of_bytes(b"nothing"))


def test_resolve_by_name_digest_and_short_digest(store: ContentStore) -> None:
    one, two = image_of(store, "1"), image_of(store, "2")
    store.tag("web", one)
    store.tag("web", two)
    store.tag("api", one)
    assert store.resolve("web").digest == two
    assert store.resolve("web").name == "web"
    assert store.resolve(f"web@{one}").digest == one
    assert store.resolve(str(one)).digest == one
    assert store.resolve(one.hex[:6]).digest == one
    assert store.resolve("sha256:" + two.hex[:10]).digest == two
    assert [(n, i.digest) for n, i in store.list_images()] == [("api", one), ("web", two)]


def test_resolve_unknown_lists_what_exists(store: ContentStore) -> None:
    with pytest.raises(NotFoundError, match="no images yet"):
        store.resolve("web")
    store.tag("web", image_of(store, "1"))
    with pytest.raises(NotFoundError, match=r"no image 'nope' \(known images: web\)") as e:
        store.resolve("nope")
    assert e.value.hint is not None and "graven images" in e.value.hint
    with pytest.raises(NotFoundError):
        store.resolve("abc")  # too short to be a digest prefix
    with pytest.raises(NotFoundError, match="not an image"):
        store.resolve(str(EMPTY_TREE if store.has(EMPTY_TREE) else store.put_tree(Tree())))
    with pytest.raises(NotFoundError, match="never had version"):
        store.resolve(f"web@{Digest.of_bytes(b'other')}")


def test_resolve_ambiguous_short_digest(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two real digests sharing 6 hex digits would take ~16M images to find by chance:
    # stand in for the prefix scan and check what resolve makes of two matches.
    one, two = image_of(store, "1"), image_of(store, "2")
    images = [store.get_image(one), store.get_image(two)]
    monkeypatch.setattr(store, "_images_with_prefix", lambda prefix: images)
    with pytest.raises(UsageError, match=f"ambiguous.*{one.short}.*{two.short}"):
        store.resolve("abcdef")


# --- cache ----------------------------------------------------------------------------------


def test_cache_round_trip(store: ContentStore) -> None:
    assert store.cache_get("sha256:" + "0" * 64) is None
    store.cache_put("k/../../escape", '{"v":1}')
    assert store.cache_get("k/../../escape") == '{"v":1}'
    store.cache_put("k/../../escape", '{"v":2}')
    assert store.cache_get("k/../../escape") == '{"v":2}'
    assert not (store.root.parent / "escape").exists()


# --- fsck -----------------------------------------------------------------------------------


def test_fsck_clean_store(store: ContentStore, tmp_path: Path) -> None:
    digest = store.ingest_tree(make_tree(tmp_path / "src"))
    store.tag("web", store.put_image(digest, ImageConfig(entrypoint=("x",))).digest)
    assert store.fsck() == []


def test_fsck_finds_corrupt_and_missing_blobs(store: ContentStore, tmp_path: Path) -> None:
    digest = store.ingest_tree(make_tree(tmp_path / "src"))
    store.tag("web", store.put_image(digest, ImageConfig(entrypoint=("x",))).digest)
    conf = store.lookup(digest, "/etc/app.conf")
    run = store.lookup(digest, "/bin/run")
    assert conf is not None and conf.digest is not None
    assert run is not None and run.digest is not None
    corrupt = store.blob_path(conf.digest)
    corrupt.chmod(0o644)
    corrupt.write_text("bit rot")
    store.blob_path(run.digest).unlink()
    problems = store.fsck()
    assert any(str(conf.digest) in p and "corrupt" in p for p in problems)
    assert any(f"file 'run' {run.digest} is missing" in p for p in problems)
    assert not store.verify_blob(conf.digest)
