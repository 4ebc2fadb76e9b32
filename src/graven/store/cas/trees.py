"""Trees in the content store: each directory level a canonical-JSON blob (see
``graven.store.tree_model``), ingested from the filesystem and read back, with parsed
trees remembered by digest (they are immutable)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path

from graven.errors import StoreError
from graven.model import Digest, canonical_json
from graven.store.cas.blobs import BlobStore
from graven.store.tree_model import (
    DIR_MODE,
    EXEC_MODE,
    FILE_MODE,
    SYMLINK_MODE,
    Tree,
    TreeAlgebra,
    TreeEntry,
    name_problem,
    parse_tree,
)

_TREE_MEMO_SIZE = 4096
# ingest(ignore=...): (absolute path, is a real directory) -> leave it out?
_Ignore = Callable[[Path, bool], bool]


class TreeStore(BlobStore, TreeAlgebra):
    """Blobs plus trees: ingest directories, store and read tree levels, and the tree
    algebra (lookup, merge, place) over them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        # Trees are immutable by digest, so parsed ones can be remembered freely.
        self._trees: dict[Digest, Tree] = {}

    def forget_verified(self, digest: Digest) -> None:
        super().forget_verified(digest)
        self._trees.pop(digest, None)

    def put_tree(self, tree: Tree) -> Digest:
        """Store one tree level (its subtrees and files must be stored already)."""
        digest = self.put_bytes(canonical_json(tree.document()))
        self._remember(digest, tree)
        return digest

    def _remember(self, digest: Digest, tree: Tree) -> None:
        # Bounded: a long-running controller checks out many images over its life.
        if len(self._trees) >= _TREE_MEMO_SIZE:
            self._trees.clear()
        self._trees[digest] = tree

    def read_tree(self, digest: Digest) -> Tree:
        """The tree named ``digest``; StoreError when missing, corrupt or not a tree."""
        if (cached := self._trees.get(digest)) is not None:
            return cached
        data = self.read_blob(digest)
        try:
            tree = parse_tree(data)
        except ValueError as e:
            raise StoreError(f"blob {digest} is not a valid tree: {e}") from None
        self._remember(digest, tree)
        return tree

    def ingest(
        self,
        path: Path,
        *,
        exclude: Collection[Path] = (),
        ignore: Callable[[Path, bool], bool] | None = None,
    ) -> TreeEntry:
        """Store a file, symlink or whole directory; return its entry, named ``path.name``.

        Symlinks are stored as symlinks, never followed. Device nodes, sockets and fifos
        are refused with a StoreError naming them. Paths in ``exclude`` (compared as
        absolute paths, symlinks not resolved) are left out, with everything below them,
        and so is every path below ``path`` for which ``ignore(absolute_path, is_dir)``
        is true (``is_dir``: a real directory, not a symlink to one); an ignored
        directory is not looked into.
        """
        path = Path(path).absolute()
        skip = frozenset(Path(p).absolute() for p in exclude)
        return self._ingest(path, path.name, skip, ignore)

    def ingest_tree(self, directory: Path) -> Digest:
        """Store a real directory recursively; return its tree digest."""
        directory = Path(directory)
        try:
            st = os.lstat(directory)
        except OSError as e:
            raise StoreError(f"cannot read {directory}: {e.strerror}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{directory} is not a directory")
        return self._ingest_dir(directory, frozenset(), None)[1]

    def _ingest(
        self, path: Path, name: str, skip: frozenset[Path], ignore: _Ignore | None
    ) -> TreeEntry:
        try:
            st = os.lstat(path)
            # os.readlink, not Path.readlink: a Path would normalize the target's text.
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""  # noqa: PTH115
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e
        if stat.S_ISREG(st.st_mode):
            digest, size = self._put_regular(path)
            mode = EXEC_MODE if st.st_mode & stat.S_IXUSR else FILE_MODE
            return TreeEntry(name, "file", mode, size, digest=digest)
        if stat.S_ISDIR(st.st_mode):
            tree, digest = self._ingest_dir(path, skip, ignore)
            return TreeEntry(name, "dir", DIR_MODE, tree.size, digest=digest)
        if stat.S_ISLNK(st.st_mode):
            try:
                size = len(target.encode("utf-8"))
            except UnicodeEncodeError:
                raise StoreError(f"{path}: symlink target is not valid UTF-8") from None
            return TreeEntry(name, "symlink", SYMLINK_MODE, size, target=target)
        kind = (
            "a fifo"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device node"
        )
        raise StoreError(
            f"{path} is {kind}: an image holds only files, directories and symlinks",
            hint="Remove it, or move it out of the directory being copied.",
        )

    def _ingest_dir(
        self, directory: Path, skip: frozenset[Path], ignore: _Ignore | None
    ) -> tuple[Tree, Digest]:
        try:
            with os.scandir(directory) as listing:
                # d_type from the listing: asking 'is it a directory?' costs no stat.
                children = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in listing)
        except OSError as e:
            raise StoreError(f"cannot read {directory}: {e.strerror}") from e
        entries = []
        for name, is_dir in children:
            if problem := name_problem(name):
                raise StoreError(
                    f"{directory / name}: {problem}", hint="Rename it to a UTF-8 name."
                )
            path = directory / name
            if path in skip or (ignore is not None and ignore(path, is_dir)):
                continue
            entries.append(self._ingest(path, name, skip, ignore))
        tree = Tree.of(entries)
        return tree, self.put_tree(tree)
