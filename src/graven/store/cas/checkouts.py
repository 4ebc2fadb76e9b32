"""Checkouts: a tree materialized as a real directory, read-only by default, for an
instance to run from or a build step to work in.

A checkout is built in a temp directory beside its destination and renamed into
place; the marker ``<dest>.tree`` beside it (fsynced) declares it complete, and names
the tree, so the same read-only checkout is reused rather than copied again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from graven.errors import StoreError
from graven.model import Digest, canonical_json
from graven.store.cas.blobs import CHUNK_SIZE, REPAIR_HINT
from graven.store.cas.trees import TreeStore
from graven.store.tree_model import DIR_MODE, EXEC_MODE, FILE_MODE

_READ_ONLY_FILE = {FILE_MODE: 0o444, EXEC_MODE: 0o555}
_READ_ONLY_DIR = 0o555


class CheckoutStore(TreeStore):
    """Trees plus checkouts."""

    @staticmethod
    def checkout_marker(dest: Path) -> Path:
        """The marker beside a checkout (``<dest>.tree``).

        Beside, not inside: the checked-out directory holds exactly the image's files,
        so drift checks compare it with the tree as is. (``with_suffix`` is not used:
        it would clobber a name that contains a dot.)
        """
        return dest.with_name(dest.name + ".tree")

    def checkout(self, tree: Digest, dest: Path, *, read_only: bool = True) -> Path:
        """Materialize ``tree`` at ``dest`` by copying (never hard-linking) its files.

        Atomic: built in a temp directory beside ``dest`` and renamed into place. A
        read-only checkout (files 0o444/0o555, directories 0o555) of the same tree that
        is already complete at ``dest`` is reused. Any other existing ``dest`` is a
        StoreError. Files are verified against their digests while copied. Contents are
        not fsynced (a checkout is a disposable copy; drift checks catch damage), only
        the marker that declares it complete is.
        """
        dest = Path(dest)
        marker = self.checkout_marker(dest)
        wanted = canonical_json({"tree": str(tree), "read_only": read_only})
        lock = hashlib.sha256(str(dest.absolute()).encode()).hexdigest()[:32]
        with self._lock(f"checkout-{lock}"):
            if os.path.lexists(dest):
                if read_only and dest.is_dir() and _read_marker(marker) == wanted:
                    return dest
                raise StoreError(
                    f"cannot check out {tree.short} at {dest}: it already exists"
                    + ("" if marker.exists() else " and is not a graven checkout"),
                    hint="Remove it or choose another destination.",
                )
            self.read_tree(tree)  # fail before creating anything
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
                try:
                    self._materialize(tree, tmp, read_only, "")
                    tmp.rename(dest)
                except BaseException:
                    _force_remove(tmp)
                    raise
            except OSError as e:
                raise StoreError(f"cannot check out {tree.short} at {dest}: {e}") from e
            self._write_atomic(marker, wanted, tmp_dir=dest.parent)
        return dest

    def _materialize(self, digest: Digest, directory: Path, read_only: bool, where: str) -> None:
        for entry in self.read_tree(digest).entries:
            path = directory / entry.name
            inside = f"{where}/{entry.name}"
            if entry.type == "symlink" and entry.target is not None:
                path.symlink_to(entry.target)
            elif entry.type == "dir" and entry.digest is not None:
                path.mkdir(0o700)
                self._materialize(entry.digest, path, read_only, inside)
            elif entry.type == "file" and entry.digest is not None:
                self._copy_blob(entry.digest, path, inside)
                path.chmod(_READ_ONLY_FILE[entry.mode] if read_only else entry.mode)
        # Last, so the directory stays writable while it is being filled.
        directory.chmod(_READ_ONLY_DIR if read_only else DIR_MODE)

    def _copy_blob(self, digest: Digest, path: Path, inside: str) -> None:
        h = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self.open_blob(digest) as src, os.fdopen(os.open(path, flags, 0o600), "wb") as out:
            while chunk := src.read(CHUNK_SIZE):
                h.update(chunk)
                out.write(chunk)
        if "sha256:" + h.hexdigest() != digest:
            # The whole checkout is thrown away: never a file with the wrong content.
            raise StoreError(
                f"blob {digest} (the file {inside}) is corrupt: its content does not "
                "match its digest",
                hint=REPAIR_HINT,
            )

    def remove_checkout(self, dest: Path) -> None:
        """Delete a checkout (read-only or not) and its marker; no-op when absent."""
        dest = Path(dest)
        # Marker first: a half-deleted checkout must never look complete.
        self.checkout_marker(dest).unlink(missing_ok=True)
        _force_remove(dest)


def _force_remove(path: Path) -> None:
    """Remove a file or directory tree even where write bits were stripped."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    # Removing an entry needs write permission on its directory: restore it top-down
    # (os.walk lists a directory's children before descending, after we chmod it).
    path.chmod(0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            sub = Path(dirpath, d)
            if not sub.is_symlink():
                sub.chmod(0o700)
    shutil.rmtree(path)


def _read_marker(marker: Path) -> bytes | None:
    try:
        return marker.read_bytes()
    except FileNotFoundError:
        return None
