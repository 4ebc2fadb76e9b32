"""A damaged blob heals: a write that finds the blob present proves it right first,
and ``check(repair=True)`` quarantines what is damaged so the next write restores it.

Damage is done the way a stray write does it: same size, one byte flipped, the mtime
put back, so neither the size nor the mtime gives it away (only the ctime changes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graven.build.builder import BuildResult, build_image
from graven.errors import StoreError
from graven.model import Digest, ImageConfig
from graven.spec.recipe import Recipe
from graven.store.cas import ContentStore, blobs
from graven.store.oci_export.layers import layer_blob
from graven.store.tree_model import Tree

LARGE = 3 * blobs.CHUNK_SIZE + 5  # streamed by put_file, hashed rather than compared


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def flip_a_byte(path: Path, at: int = 0) -> None:
    """Corrupt ``path`` in place: same size, same mtime."""
    before = path.stat()
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    path.chmod(0o444)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def project(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "app.conf").write_text("port = 8080\n")
    (root / "etc" / "shared.txt").write_text("in both images\n")
    (root / "big.bin").write_bytes(os.urandom(LARGE))
    return root


def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every blob the store reads back to verify it, in order."""
    seen: list[Path] = []
    real = blobs._check_blob

    def spy(path: Path, digest: Digest, data: bytes | None) -> blobs._Signature | None:
        seen.append(path)
        return real(path, digest, data)

    monkeypatch.setattr(blobs, "_check_blob", spy)
    return seen


# --- writes verify what they skip --------------------------------------------------------


def test_put_bytes_replaces_a_same_size_corrupt_blob(store: ContentStore) -> None:
    digest = store.put_bytes(b"port = 8080\n")
    flip_a_byte(store.blob_path(digest))
    assert not store.verify_blob(digest)

    assert store.put_bytes(b"port = 8080\n") == digest

    assert store.verify_blob(digest)
    assert store.blob_path(digest).stat().st_mode & 0o777 == 0o444
    assert not list(store.tmp_dir.iterdir())


def test_put_file_replaces_a_same_size_corrupt_large_blob(
    store: ContentStore, tmp_path: Path
) -> None:
    big = project(tmp_path / "src") / "big.bin"
    digest = store.put_file(big)
    flip_a_byte(store.blob_path(digest), at=LARGE - 1)
    # Another process: nothing is remembered in memory.
    again = ContentStore(store.root)

    assert again.put_file(big) == digest

    assert store.verify_blob(digest)


def test_a_verified_large_blob_is_not_hashed_again_until_it_is_written(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "SETTLED_NS", 0)  # no waiting for the ctime to settle
    big = project(tmp_path / "src") / "big.bin"
    digest = store.put_file(big)
    path = store.blob_path(digest)
    seen = hashes(monkeypatch)
    ContentStore(store.root).put_file(big)
    ContentStore(store.root).put_file(big)
    store.put_file(big)
    # Hashed once, then remembered across processes by its stat signature.
    assert seen == [path]
    assert (store.root / "verified" / digest.hex[:2] / digest.hex[2:]).is_file()

    flip_a_byte(path)  # a write: the ctime moves, the mtime does not
    ContentStore(store.root).put_file(big)
    assert seen == [path, path]
    assert store.verify_blob(digest)


def test_a_fresh_blob_is_not_trusted_by_its_signature(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write in the same ctime tick would keep the signature: wait until it settles.
    monkeypatch.setattr(blobs, "SETTLED_NS", 3600 * 10**9)
    big = project(tmp_path / "src") / "big.bin"
    digest = store.put_file(big)
    seen = hashes(monkeypatch)

    store.put_file(big)
    ContentStore(store.root).put_file(big)

    assert seen == [store.blob_path(digest)] * 2
    assert not (store.root / "verified").exists()


def test_trees_and_images_heal_too(store: ContentStore, tmp_path: Path) -> None:
    root = store.ingest_tree(project(tmp_path / "src"))
    image = store.put_image(root, ImageConfig(entrypoint=("x",)))
    for digest in (root, image.digest):
        flip_a_byte(store.blob_path(digest), at=3)
    fresh = ContentStore(store.root)

    assert fresh.ingest_tree(tmp_path / "src") == root
    assert fresh.put_image(root, ImageConfig(entrypoint=("x",))).digest == image.digest

    assert fresh.fsck() == []


def test_a_cached_compressed_layer_that_is_corrupt_is_compressed_again(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    root = store.ingest_tree(project(tmp_path / "src"))
    layer = layer_blob(store, None, root)
    flip_a_byte(store.blob_path(layer.digest), at=layer.size // 2)

    again = layer_blob(ContentStore(store.root), None, root)

    assert again == layer
    assert store.verify_blob(layer.digest)


# --- checkouts refuse ---------------------------------------------------------------------


def test_a_checkout_from_a_corrupt_blob_refuses_naming_the_file(
    store: ContentStore, tmp_path: Path
) -> None:
    root = store.ingest_tree(project(tmp_path / "src"))
    conf = store.lookup(root, "/etc/app.conf")
    assert conf is not None and conf.digest is not None
    flip_a_byte(store.blob_path(conf.digest))

    with pytest.raises(StoreError) as caught:
        store.checkout(root, tmp_path / "co")

    assert f"{conf.digest} (the file /etc/app.conf) is corrupt" in caught.value.message
    assert "graven store fsck --repair" in (caught.value.hint or "")
    assert not (tmp_path / "co").exists()  # no checkout at all, so no wrong file
    assert not store.checkout_marker(tmp_path / "co").exists()


# --- fsck: names the images, repair quarantines --------------------------------------------


def two_images(store: ContentStore, tmp_path: Path) -> tuple[Digest, Digest, Digest]:
    """web and api share /etc/shared.txt; returns (web, api, the shared blob)."""
    src = project(tmp_path / "src")
    web = store.put_image(store.ingest_tree(src), ImageConfig(entrypoint=("web",)))
    (src / "etc" / "app.conf").write_text("port = 9090\n")
    api = store.put_image(store.ingest_tree(src), ImageConfig(entrypoint=("api",)))
    store.tag("web", web.digest)
    store.tag("api", api.digest)
    shared = store.lookup(web.rootfs, "/etc/shared.txt")
    assert shared is not None and shared.digest is not None
    return web.digest, api.digest, shared.digest


def test_fsck_names_the_images_holding_a_corrupt_blob(store: ContentStore, tmp_path: Path) -> None:
    web, api, shared = two_images(store, tmp_path)
    flip_a_byte(store.blob_path(shared))

    report = store.check()

    assert not report.ok
    assert f"blob {shared}: content does not match its digest (corrupt); in images: api, web" in (
        report.problems
    )
    kinds = {d.digest: (d.kind, d.images) for d in report.damaged}
    assert kinds[shared] == ("corrupt", ("api", "web"))
    # Everything above it is damaged too: the /etc trees, the roots, both images.
    assert kinds[web] == ("incomplete", ("web",))
    assert kinds[api] == ("incomplete", ("api",))
    assert len(kinds) == 7
    assert report.images == ("api", "web")
    assert report.quarantine is None
    assert store.verify_blob(web)  # a check alone moves nothing


def test_repair_quarantines_the_damage_and_a_rebuild_restores_it(
    store: ContentStore, tmp_path: Path
) -> None:
    web, api, shared = two_images(store, tmp_path)
    untouched = store.put_image(store.put_tree(Tree()), ImageConfig(entrypoint=("z",)))
    store.tag("other", untouched.digest)
    flip_a_byte(store.blob_path(shared))

    report = store.check(repair=True)

    assert report.quarantine is not None
    assert report.quarantine.parent == store.root / "quarantine"
    assert report.names == ("api", "web")
    moved = {p.name for p in (report.quarantine / "blobs" / "sha256").iterdir()}
    assert moved == {d.digest.hex for d in report.damaged}
    assert {p.name for p in (report.quarantine / "refs").iterdir()} == {"api", "web"}
    # The damaged bytes are kept as found, for a look.
    kept = (report.quarantine / "blobs" / "sha256" / shared.hex).read_bytes()
    assert len(kept) == len("in both images\n") and Digest.of_bytes(kept) != shared
    assert not store.has(web) and not store.has(api)
    assert store.history("web") == [web]  # history stays: nothing is forgotten
    assert [n for n, _ in store.list_images()] == ["other"]
    assert store.fsck() == []

    # A rebuild (the same inputs) writes everything afresh, with the same digests.
    src = tmp_path / "src"
    (src / "etc" / "app.conf").write_text("port = 8080\n")
    fresh = ContentStore(store.root)
    assert fresh.put_image(fresh.ingest_tree(src), ImageConfig(entrypoint=("web",))).digest == web
    fresh.tag("web", web)
    (src / "etc" / "app.conf").write_text("port = 9090\n")
    assert fresh.put_image(fresh.ingest_tree(src), ImageConfig(entrypoint=("api",))).digest == api
    fresh.tag("api", api)
    assert fresh.check().ok
    assert fresh.history("web") == [web]


def test_repair_on_a_sound_store_moves_nothing(store: ContentStore, tmp_path: Path) -> None:
    two_images(store, tmp_path)
    report = store.check(repair=True)
    assert report.ok and report.quarantine is None
    assert not (store.root / "quarantine").exists()


def test_repair_quarantines_stray_files_and_dangling_names(
    store: ContentStore, tmp_path: Path
) -> None:
    web, _, _ = two_images(store, tmp_path)
    stray = store.root / "blobs" / "sha256" / "zz"
    stray.write_text("not a blob")
    store.blob_path(web).unlink()  # gone, not corrupt: the name dangles

    report = store.check(repair=True)

    assert f"ref 'web' points at missing or corrupt image {web}" in report.problems
    assert report.names == ("web",)
    assert report.quarantine is not None
    assert (report.quarantine / "stray" / "sha256-zz").read_text() == "not a blob"
    assert store.fsck() == []


# --- through the builder: what a cached run step made heals too -----------------------------


def run_recipe() -> Recipe:
    return Recipe.model_validate(
        {
            "steps": [
                {"copy": "app", "to": "/app"},
                {"workdir": "/app"},
                {"run": "echo made by a run step > made.txt"},
                {"entrypoint": ["python3", "main.py"]},
            ]
        }
    )


def made_blob(store: ContentStore, result: BuildResult) -> Path:
    entry = store.lookup(result.image.rootfs, "/app/made.txt")
    assert entry is not None and entry.digest is not None
    return store.blob_path(entry.digest)


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "ctx" / "app").mkdir(parents=True)
    (tmp_path / "ctx" / "app" / "main.py").write_text("print('hi')\n")
    return tmp_path / "ctx"


def test_repair_then_a_plain_build_restores_what_a_run_step_made(
    store: ContentStore, context: Path
) -> None:
    first = build_image("web", run_recipe(), context, store)
    blob = made_blob(store, first)
    flip_a_byte(blob)

    report = store.check(repair=True)

    assert report.names == ("web",)
    assert [d.images for d in report.damaged if d.kind == "corrupt"] == [("web",)]
    again = build_image("web", run_recipe(), context, store)  # the cache is on
    assert again.image.digest == first.image.digest
    # Only the step that made the damaged file runs again.
    assert [s.cached for s in again.steps] == [True, True, False, True]
    assert blob.read_bytes() == b"made by a run step\n"
    assert store.check().ok


def test_no_cache_rebuild_replaces_what_a_run_step_made(store: ContentStore, context: Path) -> None:
    first = build_image("web", run_recipe(), context, store)
    blob = made_blob(store, first)
    flip_a_byte(blob)

    again = build_image("web", run_recipe(), context, ContentStore(store.root), no_cache=True)

    assert again.image.digest == first.image.digest
    assert blob.read_bytes() == b"made by a run step\n"
    assert store.check().ok
