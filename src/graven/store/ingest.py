"""Ingesting: a file, symlink or directory on disk stored as tree entries, the same for
every ImageStore adapter (each says how a regular file's content is stored).

Only what defines content is read: names, the owner exec bit, sizes, content and
symlink targets (as text, never followed). Fifos, sockets and device nodes are
refused: an image holds only files, directories and symlinks.
"""

from __future__ import annotations

import abc
import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path

from graven.errors import StoreError
from graven.model import Digest
from graven.store.tree_model import (
    DIR_MODE,
    EXEC_MODE,
    FILE_MODE,
    SYMLINK_MODE,
    Tree,
    TreeAlgebra,
    TreeEntry,
    name_problem,
)

# ingest(ignore=...): (absolute path, is a real directory) -> leave it out?
_Ignore = Callable[[Path, bool], bool]


class TreeIngest(TreeAlgebra):
    """``ingest`` and ``ingest_tree`` over ``put_tree`` and ``_put_regular``."""

    @abc.abstractmethod
    def _put_regular(self, path: Path) -> tuple[Digest, int]:
        """Store the regular file at ``path`` (not following a symlink swapped in);
        its digest and size. StoreError when it cannot be read or is not regular."""

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
