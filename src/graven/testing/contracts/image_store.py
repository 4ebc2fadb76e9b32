"""The ImageStore contract: what every adapter of ``graven.store.base.ImageStore`` does.

Subclass ``ImageStoreContract`` once per adapter (``TestFileImageStore``, ...) and
give it a ``store`` fixture plus the two hooks that reach behind the port:
``corrupt`` (damage a stored blob the way a disk or a stray write would) and
``stored_blobs`` (what the adapter holds). ``reopen`` defaults to the same object; an
adapter that remembers parsed objects returns a fresh one over the same data.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from graven.errors import NotFoundError, StoreError, UsageError
from graven.model import Digest, ImageConfig
from graven.store.base import ImageStore
from graven.store.tree_model import (
    DIR_MODE,
    EMPTY_TREE,
    EXEC_MODE,
    FILE_MODE,
    SYMLINK_MODE,
    Tree,
    TreeEntry,
)

LARGE = (1 << 20) * 2 + 7  # above one read chunk: streamed, not read whole


def sample_project(root: Path) -> Path:
    """A directory with what a tree must keep: modes, symlinks, empty and nested dirs."""
    root.mkdir(parents=True)
    (root / "app.py").write_text("print('hello')\n")
    (root / "run.sh").write_text("#!/bin/sh\nexec python3 app.py\n")
    (root / "run.sh").chmod(0o750)  # normalized to 0o755
    (root / "secret.txt").write_text("kept as a plain file\n")
    (root / "secret.txt").chmod(0o600)  # normalized to 0o644
    (root / "data" / "nested").mkdir(parents=True)
    (root / "data" / "nested" / "deep.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty").mkdir()
    (root / "current").symlink_to("data/nested")
    (root / "dangling").symlink_to("../nowhere/at all")
    return root


def listing(root: Path) -> dict[str, tuple[str, int, bytes | str | None]]:
    """Path -> (type, permission bits, content or link target) for everything below."""
    found: dict[str, tuple[str, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("symlink", 0, os.readlink(path))  # noqa: PTH115
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                found[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


def normalized(
    entry: tuple[str, int, bytes | str | None],
) -> tuple[str, int, bytes | str | None]:
    """What a listing entry becomes in a tree: modes by the owner exec bit, dirs 0o755."""
    kind, mode, content = entry
    if kind == "dir":
        return ("dir", DIR_MODE, None)
    if kind == "file":
        return ("file", EXEC_MODE if mode & stat.S_IXUSR else FILE_MODE, content)
    return entry


class ImageStoreContract:
    """The behaviour every ImageStore adapter shares; subclasses supply the hooks."""

    def corrupt(self, store: ImageStore, digest: Digest, data: bytes) -> None:
        """Make the adapter hold ``data`` under ``digest``, behind the store's back."""
        raise NotImplementedError

    def stored_blobs(self, store: ImageStore) -> set[Digest]:
        """Every blob digest the adapter holds."""
        raise NotImplementedError

    def reopen(self, store: ImageStore) -> ImageStore:
        """A store over the same data with nothing remembered."""
        return store

    def image(self, store: ImageStore, content: bytes = b"v1\n") -> Digest:
        entry = store.put_bytes(content)
        tree = Tree.of([TreeEntry("VERSION", "file", FILE_MODE, len(content), digest=entry)])
        return store.put_image(store.put_tree(tree), ImageConfig(entrypoint=("/VERSION",))).digest

    # --- content addressing -------------------------------------------------------------

    def test_same_bytes_same_digest_stored_once(self, store: ImageStore) -> None:
        before = self.stored_blobs(store)
        first = store.put_bytes(b"hello\n")
        second = store.put_bytes(b"hello\n")
        assert first == second == Digest.of_bytes(b"hello\n")
        assert self.stored_blobs(store) - before == {first}
        assert store.has(first)
        assert store.has_verified(first, 6)
        assert not store.has_verified(first, 7)
        assert store.read_blob(first) == b"hello\n"
        assert store.put_bytes(b"hello!\n") != first

    def test_a_file_is_stored_by_its_content(self, store: ImageStore, tmp_path: Path) -> None:
        small, large = tmp_path / "small", tmp_path / "large"
        small.write_bytes(b"small\n")
        content = os.urandom(LARGE)
        large.write_bytes(content)
        assert store.put_file(small) == store.put_bytes(b"small\n")
        digest = store.put_file(large)
        assert digest == Digest.of_bytes(content)
        assert store.put_file(large) == digest
        with store.open_blob(digest) as f:
            assert f.read() == content
        assert store.verify_blob(digest)

    def test_same_directory_content_same_tree_anywhere(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        one = store.ingest_tree(sample_project(tmp_path / "one"))
        two = store.ingest_tree(sample_project(tmp_path / "elsewhere" / "two"))
        assert one == two
        (tmp_path / "bare").mkdir()
        assert store.ingest_tree(tmp_path / "bare") == EMPTY_TREE

    def test_a_tree_digest_is_the_digest_of_its_canonical_document(self, store: ImageStore) -> None:
        blob = store.put_bytes(b"x")
        tree = Tree.of([TreeEntry("x", "file", FILE_MODE, 1, digest=blob)])
        assert store.put_tree(tree) == Digest.of_bytes(
            b'{"entries":[{"digest":"' + str(blob).encode() + b'","mode":420,"name":"x",'
            b'"size":1,"type":"file"}],"schema":"graven.tree/v1"}'
        )
        assert store.put_tree(Tree()) == EMPTY_TREE

    # --- trees ------------------------------------------------------------------------

    def test_a_tree_keeps_modes_symlinks_and_empty_directories(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        root = store.ingest_tree(sample_project(tmp_path / "src"))
        top = {e.name: e for e in store.read_tree(root).entries}
        assert sorted(top) == [
            "app.py",
            "current",
            "dangling",
            "data",
            "empty",
            "run.sh",
            "secret.txt",
        ]
        assert (top["app.py"].type, top["app.py"].mode) == ("file", FILE_MODE)
        assert (top["run.sh"].type, top["run.sh"].mode) == ("file", EXEC_MODE)
        assert top["secret.txt"].mode == FILE_MODE
        assert (top["current"].type, top["current"].target) == ("symlink", "data/nested")
        assert top["dangling"].target == "../nowhere/at all"
        assert top["dangling"].mode == SYMLINK_MODE
        assert (top["empty"].type, top["empty"].digest) == ("dir", EMPTY_TREE)
        assert top["data"].mode == DIR_MODE
        deep = store.lookup(root, "/data/nested/deep.bin")
        assert deep is not None and deep.size == 1024
        assert deep.digest is not None and store.read_blob(deep.digest) == bytes(range(256)) * 4
        assert store.lookup(root, "/current/deep.bin") is None  # symlinks are not followed
        assert store.lookup(root, "/missing") is None

    def test_ingest_refuses_what_an_image_cannot_hold_and_leaves_out_what_is_asked(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        src = sample_project(tmp_path / "src")
        os.mkfifo(src / "data" / "pipe")
        with pytest.raises(StoreError, match="pipe is a fifo"):
            store.ingest(src)
        entry = store.ingest(
            src, exclude=[src / "data"], ignore=lambda path, is_dir: path.name == "empty"
        )
        assert entry.type == "dir" and entry.digest is not None
        names = [e.name for e in store.read_tree(entry.digest).entries]
        assert names == ["app.py", "current", "dangling", "run.sh", "secret.txt"]

    def test_a_writable_checkout_round_trips_exactly(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        src = sample_project(tmp_path / "src")
        root = store.ingest_tree(src)
        out = store.checkout(root, tmp_path / "out", read_only=False)
        assert store.ingest_tree(out) == root
        assert listing(out) == {rel: normalized(e) for rel, e in listing(src).items()}
        store.remove_checkout(out)
        assert not os.path.lexists(out)

    def test_tree_algebra_places_and_merges_without_touching_the_rest(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        root = store.ingest_tree(sample_project(tmp_path / "src"))
        note = TreeEntry("note", "file", FILE_MODE, 2, digest=store.put_bytes(b"hi"))
        placed = store.place(root, "/etc/app/note", note)
        found = store.lookup(placed, "/etc/app/note")
        assert found is not None and found.digest == note.digest
        assert store.lookup(placed, "/app.py") == store.lookup(root, "/app.py")
        assert store.place(EMPTY_TREE, "/", TreeEntry("", "dir", DIR_MODE, 0, root)) == root
        assert store.merge_trees(root, root) == root
        assert store.merge_trees(EMPTY_TREE, root) == root

    # --- images and refs --------------------------------------------------------------

    def test_an_image_is_stored_by_content(self, store: ImageStore) -> None:
        digest = self.image(store)
        assert self.image(store) == digest
        image = store.get_image(digest)
        assert image.digest == digest
        assert image.config.entrypoint == ("/VERSION",)
        assert image.layers == (image.rootfs,)
        assert self.image(store, b"v2\n") != digest

    def test_refs_point_at_images_and_remember_every_version(self, store: ImageStore) -> None:
        v1, v2 = self.image(store, b"v1\n"), self.image(store, b"v2\n")
        assert store.history("web") == []
        store.tag("web", v1)
        store.tag("web", v1)
        store.tag("web", v2)
        assert store.history("web") == [v1, v2]
        assert store.resolve("web").digest == v2
        assert store.resolve("web").name == "web"
        assert store.resolve(f"web@{v1}").digest == v1
        assert store.resolve(str(v1)).digest == v1
        assert store.resolve(v1.hex[:12]).digest == v1
        assert [(n, i.digest) for n, i in store.list_images()] == [("web", v2)]
        store.tag("api", v1)
        assert [n for n, _ in store.list_images()] == ["api", "web"]

    def test_refs_refuse_what_is_not_an_image_or_not_a_name(self, store: ImageStore) -> None:
        blob = store.put_bytes(b"not an image")
        with pytest.raises(StoreError):
            store.tag("web", blob)
        with pytest.raises(UsageError):
            store.tag("Not A Name", self.image(store))
        assert store.list_images() == []

    def test_an_unknown_image_reference_is_not_found(self, store: ImageStore) -> None:
        store.tag("web", self.image(store))
        for ref in ("nope", "sha256:" + "0" * 64, "abcdef0123", f"web@sha256:{'1' * 64}"):
            with pytest.raises(NotFoundError) as caught:
                store.resolve(ref)
            assert "web" in caught.value.message  # the known images are named
        with pytest.raises(UsageError):
            store.resolve("web@sha256:short")

    def test_the_step_cache_round_trips(self, store: ImageStore) -> None:
        assert store.cache_get("step one") is None
        store.cache_put("step one", '{"tree": "x"}')
        store.cache_put("odd/../key\n", "v")
        assert store.cache_get("step one") == '{"tree": "x"}'
        assert store.cache_get("odd/../key\n") == "v"
        store.cache_put("step one", "replaced")
        assert store.cache_get("step one") == "replaced"

    # --- checkouts --------------------------------------------------------------------

    def test_a_checkout_is_read_only_and_identical_to_the_tree(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        src = sample_project(tmp_path / "src")
        root = store.ingest_tree(src)
        dest = tmp_path / "instances" / "web-1"
        assert store.checkout(root, dest) == dest
        got = listing(dest)
        for rel, (kind, _, content) in listing(src).items():
            if kind == "symlink":
                assert got[rel] == (kind, 0, content)
            else:
                assert got[rel][0] == kind and got[rel][2] == content
        assert {mode for kind, mode, _ in got.values() if kind == "dir"} == {0o555}
        assert got["app.py"][1] == 0o444
        assert got["run.sh"][1] == 0o555
        assert stat.S_IMODE(dest.stat().st_mode) == 0o555
        assert store.ingest_tree(dest) == root  # exactly the tree: nothing added inside

    def test_a_checkout_is_reused_never_overwritten(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        root = store.ingest_tree(sample_project(tmp_path / "src"))
        dest = tmp_path / "co"
        store.checkout(root, dest)
        assert store.checkout(root, dest) == dest
        with pytest.raises(StoreError):
            store.checkout(EMPTY_TREE, dest)
        (tmp_path / "occupied").mkdir()
        with pytest.raises(StoreError):
            store.checkout(root, tmp_path / "occupied")
        store.remove_checkout(dest)
        assert not os.path.lexists(dest)
        store.remove_checkout(dest)  # absent: nothing to do

    # --- damage and absence -----------------------------------------------------------

    def test_a_corrupt_blob_is_reported_never_served(self, store: ImageStore) -> None:
        digest = store.put_bytes(b"the right content\n")
        self.corrupt(store, digest, b"the wrong content\n")  # same length
        store = self.reopen(store)
        with pytest.raises(StoreError, match="corrupt"):
            store.read_blob(digest)
        assert not store.verify_blob(digest)
        assert not store.has_verified(digest, len(b"the right content\n"))

    def test_writing_a_damaged_blob_again_heals_it(self, store: ImageStore) -> None:
        digest = store.put_bytes(b"the right content\n")
        self.corrupt(store, digest, b"the wrong content\n")
        store = self.reopen(store)
        assert store.put_bytes(b"the right content\n") == digest
        assert store.read_blob(digest) == b"the right content\n"
        assert store.verify_blob(digest)

    def test_a_corrupt_tree_or_image_is_refused(self, store: ImageStore) -> None:
        image = store.get_image(self.image(store))
        tree_bytes = store.read_blob(image.rootfs)
        self.corrupt(store, image.rootfs, tree_bytes.replace(b"VERSION", b"VERSIOM"))
        self.corrupt(store, image.digest, store.read_blob(image.digest)[:-1] + b" ")
        store = self.reopen(store)
        with pytest.raises(StoreError):
            store.read_tree(image.rootfs)
        with pytest.raises(StoreError):
            store.get_image(image.digest)

    def test_a_checkout_of_a_corrupt_file_fails_and_leaves_nothing(
        self, store: ImageStore, tmp_path: Path
    ) -> None:
        root = store.ingest_tree(sample_project(tmp_path / "src"))
        entry = store.lookup(root, "/data/nested/deep.bin")
        assert entry is not None and entry.digest is not None
        self.corrupt(store, entry.digest, bytes(1024))
        store = self.reopen(store)
        dest = tmp_path / "co"
        with pytest.raises(StoreError, match="corrupt"):
            store.checkout(root, dest)
        assert not os.path.lexists(dest)

    def test_missing_objects_give_a_clear_error(self, store: ImageStore, tmp_path: Path) -> None:
        absent = Digest.of_bytes(b"never stored")
        assert not store.has(absent)
        assert not store.verify_blob(absent)
        assert not store.has_verified(absent, 12)
        for read in (store.read_blob, store.read_tree, store.get_image, store.open_blob):
            with pytest.raises(StoreError) as caught:
                read(absent)
            assert str(absent) in caught.value.message
        with pytest.raises(StoreError):
            store.put_image(absent, ImageConfig(entrypoint=("/app",)))
        with pytest.raises(StoreError):
            store.checkout(absent, tmp_path / "co")
        assert not os.path.lexists(tmp_path / "co")
        with pytest.raises(StoreError):
            store.put_file(tmp_path / "no-such-file")
