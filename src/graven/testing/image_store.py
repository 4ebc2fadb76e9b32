"""A fake ImageStore: blobs, names and the step cache in memory, for fast unit tests.

Digests are those of the file store (same canonical documents), so a digest a test
computes or reads from a fixture means the same thing here. Only checkouts touch the
disk (they are real directories by definition), and ``tmp_dir`` is a directory under
``root`` made on first use. ``blobs`` is open on purpose: a test damages a blob by
writing to it, and the store must then refuse to serve it.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from graven.errors import NotFoundError, StoreError, UsageError
from graven.model import Digest, Image, ImageConfig, canonical_json, is_valid_name
from graven.store.cas.refs import parse_image
from graven.store.ingest import TreeIngest
from graven.store.tree_model import DIR_MODE, Tree, parse_tree

_HEX = frozenset("0123456789abcdef")


class FakeImageStore(TreeIngest):
    """An in-memory ImageStore; ``root`` holds only scratch space (``tmp/``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs: dict[Digest, bytes] = {}
        self.refs: dict[str, list[Digest]] = {}
        self.cache: dict[str, str] = {}
        self._checkouts: dict[Path, tuple[Digest, bool]] = {}

    @property
    def tmp_dir(self) -> Path:
        path = self.root / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- blobs ------------------------------------------------------------------------

    def has(self, digest: Digest) -> bool:
        return Digest(digest) in self.blobs

    def has_verified(self, digest: Digest, size: int) -> bool:
        data = self.blobs.get(digest)
        return data is not None and len(data) == size and Digest.of_bytes(data) == digest

    def put_bytes(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        if not self.has_verified(digest, len(data)):
            self.blobs[digest] = bytes(data)
        return digest

    def put_file(self, path: Path) -> Digest:
        return self._put_regular(Path(path))[0]

    def _put_regular(self, path: Path) -> tuple[Digest, int]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{path} is not a regular file")
            data = f.read()
        return self.put_bytes(data), len(data)

    def open_blob(self, digest: Digest) -> BinaryIO:
        return io.BytesIO(self._present(digest))

    def read_blob(self, digest: Digest) -> bytes:
        data = self._present(digest)
        if Digest.of_bytes(data) != digest:
            raise StoreError(f"blob {digest} is corrupt: its content does not match its digest")
        return data

    def verify_blob(self, digest: Digest) -> bool:
        data = self.blobs.get(digest)
        return data is not None and Digest.of_bytes(data) == digest

    def _present(self, digest: Digest) -> bytes:
        data = self.blobs.get(Digest(digest))
        if data is None:
            raise StoreError(f"blob {digest} is missing from the store")
        return data

    # --- trees ------------------------------------------------------------------------

    def put_tree(self, tree: Tree) -> Digest:
        return self.put_bytes(canonical_json(tree.document()))

    def read_tree(self, digest: Digest) -> Tree:
        try:
            return parse_tree(self.read_blob(digest))
        except ValueError as e:
            raise StoreError(f"blob {digest} is not a valid tree: {e}") from None

    # --- images and names -------------------------------------------------------------

    def put_image(
        self, rootfs: Digest, config: ImageConfig, layers: tuple[Digest, ...] | None = None
    ) -> Image:
        layers = (rootfs,) if layers is None else layers
        if layers and layers[-1] != rootfs:
            raise StoreError("an image's last layer snapshot must be its rootfs")
        for tree in {rootfs, *layers}:
            self.read_tree(tree)
        draft = Image(digest=rootfs, rootfs=rootfs, config=config, layers=layers)
        return replace(draft, digest=self.put_bytes(canonical_json(draft.document())))

    def get_image(self, digest: Digest) -> Image:
        try:
            return parse_image(digest, self.read_blob(digest))
        except ValueError as e:
            raise StoreError(f"blob {digest} is not a valid image: {e}") from None

    def tag(self, name: str, digest: Digest) -> None:
        self._check_name(name)
        self.get_image(digest)
        history = self.refs.setdefault(name, [])
        if not history or history[-1] != digest:
            history.append(digest)

    def history(self, name: str) -> list[Digest]:
        self._check_name(name)
        return list(self.refs.get(name, ()))

    def list_images(self) -> list[tuple[str, Image]]:
        out = []
        for name in sorted(self.refs):
            try:
                out.append((name, replace(self.get_image(self.refs[name][-1]), name=name)))
            except StoreError:
                continue
        return out

    def resolve(self, ref: str) -> Image:
        name, _, pinned = ref.partition("@")
        if pinned:
            digest = _digest_or_none(pinned)
            if digest is None:
                raise UsageError(f"invalid image reference {ref!r}: expected NAME@sha256:<64 hex>")
            if digest not in self.refs.get(name, ()):
                raise self._not_found(f"image {name!r} never had version {digest.short}")
            return replace(self._image(digest), name=name)
        if (digest := _digest_or_none(ref)) is not None:
            return self._image(digest)
        if ref in self.refs:
            return replace(self.get_image(self.refs[ref][-1]), name=ref)
        prefix = ref.removeprefix("sha256:")
        if len(prefix) >= 6 and set(prefix) <= _HEX:
            matches = []
            for digest in sorted(d for d in self.blobs if d.hex.startswith(prefix)):
                try:
                    matches.append(self.get_image(digest))
                except StoreError:
                    continue
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise UsageError(f"short digest {ref!r} is ambiguous", hint="Give more digits.")
        raise self._not_found(f"no image {ref!r}")

    def _image(self, digest: Digest) -> Image:
        if digest not in self.blobs:
            raise self._not_found(f"no image {digest}")
        try:
            return self.get_image(digest)
        except StoreError:
            raise self._not_found(f"{digest} is in the store but is not an image") from None

    def _not_found(self, message: str) -> NotFoundError:
        known = ", ".join(sorted(self.refs)) or "none"
        return NotFoundError(f"{message} (known images: {known})")

    @staticmethod
    def _check_name(name: str) -> None:
        if not is_valid_name(name):
            raise UsageError(f"invalid image name {name!r}")

    # --- step cache -------------------------------------------------------------------

    def cache_get(self, key: str) -> str | None:
        return self.cache.get(key)

    def cache_put(self, key: str, value: str) -> None:
        self.cache[key] = value

    # --- checkouts --------------------------------------------------------------------

    def checkout(self, tree: Digest, dest: Path, *, read_only: bool = True) -> Path:
        dest = Path(dest).absolute()
        if os.path.lexists(dest):
            if read_only and self._checkouts.get(dest) == (tree, True):
                return dest
            raise StoreError(f"cannot check out {tree.short} at {dest}: it already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._materialize(tree, dest, read_only)
        except BaseException:
            self.remove_checkout(dest)
            raise
        self._checkouts[dest] = (tree, read_only)
        return dest

    def _materialize(self, digest: Digest, directory: Path, read_only: bool) -> None:
        directory.mkdir(0o700)
        for entry in self.read_tree(digest).entries:
            path = directory / entry.name
            if entry.type == "symlink" and entry.target is not None:
                path.symlink_to(entry.target)
            elif entry.type == "dir" and entry.digest is not None:
                self._materialize(entry.digest, path, read_only)
            elif entry.digest is not None:
                path.write_bytes(self.read_blob(entry.digest))
                path.chmod(entry.mode & 0o555 if read_only else entry.mode)
        directory.chmod(0o555 if read_only else DIR_MODE)

    def remove_checkout(self, dest: Path) -> None:
        dest = Path(dest).absolute()
        self._checkouts.pop(dest, None)
        if not os.path.lexists(dest):
            return
        if dest.is_symlink() or not dest.is_dir():
            dest.unlink()
            return
        for dirpath, dirnames, _ in os.walk(dest):
            Path(dirpath).chmod(0o700)
            for d in dirnames:
                if not Path(dirpath, d).is_symlink():
                    Path(dirpath, d).chmod(0o700)
        shutil.rmtree(dest)


def _digest_or_none(text: str) -> Digest | None:
    try:
        return Digest(text)
    except ValueError:
        return None
