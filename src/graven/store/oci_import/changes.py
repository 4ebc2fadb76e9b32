"""One layer's changes: each tar member validated and recorded, then laid over the
previous snapshot as overlayfs would (whiteouts, opaque directories, hardlinks).
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from graven.errors import StoreError
from graven.model import Digest
from graven.store.base import ImageStore
from graven.store.cas.blobs import CHUNK_SIZE
from graven.store.oci_import.names import (
    AUFS_META_PREFIX,
    DATA_ON_NON_FILE,
    DEVICES,
    KINDS,
    path_parts,
    symlink_target,
)
from graven.store.oci_import.policy import ImportPolicy, ImportRejected
from graven.store.oci_import.streams import DECODE_ERRORS, check_header
from graven.store.oci_types import OPAQUE_WHITEOUT, WHITEOUT_PREFIX
from graven.store.tree_model import DIR_MODE, EXEC_MODE, FILE_MODE, SYMLINK_MODE, Tree, TreeEntry

# File capabilities as GNU tar / Go (SCHILY) and libarchive write them.
_CAPABILITY_RECORDS = frozenset(
    {"SCHILY.xattr.security.capability", "LIBARCHIVE.xattr.security.capability"}
)
_LOWER_MEMO = 4096


@dataclass
class _UpperDir:
    """A directory as this layer has it. ``exists`` is False for a directory the layer
    only names to white out something below it: such a node creates nothing."""

    children: dict[str, _UpperDir | TreeEntry] = field(default_factory=dict)
    whiteouts: set[str] = field(default_factory=set)
    opaque: bool = False
    exists: bool = False


_Node = _UpperDir | TreeEntry


class LayerChanges:
    """The changes of one layer (the "upper"), checked member by member against the
    image as later members see it (upper over lower), then laid over ``lower``."""

    def __init__(
        self,
        store: ImageStore,
        lower: Digest,
        layer: Digest,
        policy: ImportPolicy,
        lower_memo: dict[Digest, dict[str, TreeEntry]],
    ) -> None:
        self._store = store
        self._lower = lower
        self._layer = layer
        self._policy = policy
        self._memo = lower_memo
        self._upper = _UpperDir(exists=True)
        self._seen: set[tuple[str, ...]] = set()
        self.entries = 0
        self.devices_skipped = 0

    def reject(self, member: str, reason: str, hint: str | None = None) -> ImportRejected:
        return ImportRejected(reason, layer=self._layer, member=member, hint=hint)

    # --- the view: upper over lower -----------------------------------------------------

    def _lower_entries(self, tree: Digest) -> dict[str, TreeEntry]:
        found = self._memo.get(tree)
        if found is None:
            if len(self._memo) >= _LOWER_MEMO:
                self._memo.clear()
            found = {e.name: e for e in self._store.read_tree(tree).entries}
            self._memo[tree] = found
        return found

    def _view(
        self, parts: list[str], member: str, what: str, *, lower_only: bool = False
    ) -> _Node | None:
        """What is at ``parts`` now (None: nothing), or in the layers below with
        ``lower_only``. Every parent must be a directory (or not exist yet): a symlink
        or file on the way is rejected."""
        upper: _UpperDir | None = None if lower_only else self._upper
        lower: Digest | None = self._lower
        for depth, name in enumerate(parts):
            mine = upper.children.get(name) if upper is not None else None
            below: TreeEntry | None = None
            hidden = upper is not None and (upper.opaque or name in upper.whiteouts)
            if lower is not None and not hidden:
                below = self._lower_entries(lower).get(name)
            below_dir = below.digest if below is not None and below.type == "dir" else None
            node: _Node | None
            if isinstance(mine, TreeEntry):  # a file or symlink of this layer
                node, upper, lower = mine, None, None
            elif mine is not None and mine.exists:  # a directory of this layer
                node, upper, lower = mine, mine, below_dir
            else:  # what lies below (with whiteouts of this layer inside it, if any)
                node, upper, lower = below, mine, below_dir
            if depth == len(parts) - 1:
                return node
            if isinstance(node, TreeEntry) and node.type != "dir":
                on_way = "/".join(parts[: depth + 1])
                if node.type == "symlink":
                    raise self.reject(
                        member,
                        f"the {what} goes through {on_way!r}, a symlink (to {node.target!r}): "
                        "writing through a symlink could escape the image root",
                    )
                raise self.reject(
                    member, f"the {what} goes through {on_way!r}, which is a file, not a directory"
                )
        return None

    def _upper_node(self, parts: list[str]) -> _Node | None:
        """What this layer alone has at ``parts``."""
        node: _Node | None = self._upper
        for name in parts:
            if not isinstance(node, _UpperDir):
                return None
            node = node.children.get(name)
        return node

    def _upper_dir(self, parts: list[str]) -> _UpperDir:
        """This layer's directory at ``parts``, created (with its parents) if need be."""
        node = self._upper
        for name in parts:
            child = node.children.get(name)
            if not isinstance(child, _UpperDir):
                # Callers have rejected a file or symlink of this layer on the way.
                child = _UpperDir()
                node.children[name] = child
            child.exists = True
            node = child
        return node

    def _claim(self, parts: list[str], member: str) -> None:
        key = tuple(parts)
        if key in self._seen:
            raise self.reject(member, "a second entry for the same path in this layer")
        self._seen.add(key)

    def _put(self, parts: list[str], node: _Node, member: str) -> None:
        self._view(parts, member, "path")
        self._claim(parts, member)
        parent = self._upper_dir(parts[:-1])
        name = parts[-1]
        existing = parent.children.get(name)
        if isinstance(node, _UpperDir):
            if isinstance(existing, _UpperDir):
                existing.exists = True
                return
        elif isinstance(existing, _UpperDir) and existing.exists:
            raise self.reject(
                member, "it replaces a directory that earlier members of this layer write into"
            )
        parent.children[name] = node

    # --- members ------------------------------------------------------------------------

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        """Validate member ``m`` and record it (its data is read here, or skipped)."""
        name = m.name

        def reject(reason: str) -> ImportRejected:
            return self.reject(name, reason)

        parts = path_parts(name, reject)
        if m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None:
            raise reject("sparse files are not supported")
        kind = KINDS.get(m.type)
        if kind is None:
            raise reject(f"unsupported tar member type {m.type!r}")
        if m.size < 0:
            raise reject("negative size")
        if kind != "file" and m.size:
            raise reject(DATA_ON_NON_FILE.format(kind=kind, size=m.size))
        check_header(tar, m, reject)
        if not parts:
            if kind != "dir":
                raise reject(f"the image root must be a directory, not a {kind}")
            return None
        for part in parts[:-1]:
            if part.startswith(AUFS_META_PREFIX):
                return self._skip(tar, m, kind)
            if part.startswith(WHITEOUT_PREFIX):
                raise reject(f"the whiteout name {part!r} is used as a directory")
        last = parts[-1]
        if last == OPAQUE_WHITEOUT:
            return self._opaque(tar, m, parts, kind)
        if last.startswith(AUFS_META_PREFIX):
            return self._skip(tar, m, kind)
        if last.startswith(WHITEOUT_PREFIX):
            return self._whiteout(tar, m, parts, kind)
        if kind in DEVICES:
            if not self._policy.allow_devices:
                raise self.reject(
                    name,
                    f"a {kind}: images may not carry device nodes or fifos",
                    hint="Pass --allow-devices (ImportPolicy.allow_devices) to import the "
                    "image without them; a runtime provides /dev.",
                )
            self.devices_skipped += 1
            return None
        if kind == "file":
            if m.mode & (stat.S_ISUID | stat.S_ISGID) and not self._policy.allow_setuid:
                bit = "setuid" if m.mode & stat.S_ISUID else "setgid"
                raise self.reject(
                    name,
                    f"a {bit} file (mode {m.mode:o})",
                    hint="Pass --allow-setuid (ImportPolicy.allow_setuid) to import it without "
                    "the bit: graven never records setuid or setgid.",
                )
            if _CAPABILITY_RECORDS.intersection(m.pax_headers) and not self._policy.allow_setuid:
                raise self.reject(
                    name,
                    "a file with capabilities (the security.capability extended attribute): "
                    "they grant privilege as setuid does",
                    hint="Pass --allow-setuid (ImportPolicy.allow_setuid) to import it without "
                    "them: graven records no extended attributes.",
                )
            self._view(parts, name, "path")  # fail before storing the content
            digest = self._store_content(tar, m)
            mode = EXEC_MODE if m.mode & stat.S_IXUSR else FILE_MODE
            self._put(parts, TreeEntry(last, "file", mode, m.size, digest=digest), name)
        elif kind == "dir":
            self._put(parts, _UpperDir(exists=True), name)
        elif kind == "symlink":
            target = symlink_target(m.linkname, reject)
            size = len(target.encode("utf-8"))
            self._put(parts, TreeEntry(last, "symlink", SYMLINK_MODE, size, target=target), name)
        else:
            self._put(parts, replace(self._link_target(m), name=last), name)
        return None

    def _link_target(self, m: tarfile.TarInfo) -> TreeEntry:
        def reject(reason: str) -> ImportRejected:
            return self.reject(m.name, reason)

        parts = path_parts(m.linkname, reject, "hardlink target")
        if not parts:
            raise reject("a hardlink to the image root")
        if any(p.startswith(WHITEOUT_PREFIX) for p in parts):
            raise reject(f"a hardlink to a whiteout ({m.linkname!r})")
        target = self._view(parts, m.name, "hardlink target")
        if target is None:
            raise reject(
                f"a hardlink to {m.linkname!r}, which is not in the image yet (a hardlink "
                "must follow its target)"
            )
        if isinstance(target, _UpperDir) or target.type == "dir":
            raise reject(f"a hardlink to {m.linkname!r}, a directory")
        return target

    def _whiteout(
        self, tar: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str], kind: str
    ) -> None:
        target = parts[-1][len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise self.reject(m.name, f"a whiteout of {target or 'its own directory'!r}")
        if kind != "file":
            raise self.reject(m.name, f"a whiteout must be a regular file, not a {kind}")
        # A whiteout names a path of the layers below: that is where its directory must
        # be one (tools write "d -> /etc" then "d/.wh.child" when a directory became a
        # symlink; the whiteout is about the old directory).
        self._view([*parts[:-1], target], m.name, "whiteout", lower_only=True)
        self._claim(parts, m.name)
        skip_data(tar, m)
        node = self._upper
        for name in parts[:-1]:
            child = node.children.get(name)
            if isinstance(child, TreeEntry):
                return  # this layer replaces the directory whole: nothing below survives
            if child is None:
                child = _UpperDir()
                node.children[name] = child
            node = child
        node.whiteouts.add(target)

    def _opaque(
        self, tar: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str], kind: str
    ) -> None:
        if len(parts) == 1:
            raise self.reject(
                m.name, "an opaque whiteout of the image root (it would hide every lower layer)"
            )
        if kind != "file":
            raise self.reject(m.name, f"a whiteout must be a regular file, not a {kind}")
        here = self._view(parts[:-1], m.name, "whiteout")  # checks its parents
        mine = self._upper_node(parts[:-1])
        if isinstance(mine, TreeEntry):
            raise self.reject(m.name, f"an opaque whiteout inside a {mine.type} of this same layer")
        if isinstance(here, TreeEntry) and here.type != "dir":
            # The layer has not (yet) replaced it with a directory: marking it opaque would
            # mean one through a symlink, or a directory made up out of a file.
            where = "/".join(parts[:-1])
            raise self.reject(
                m.name,
                f"an opaque whiteout in {where!r}, which is a {here.type} in the layers below "
                "(a directory entry of this layer must come first)",
            )
        self._claim(parts, m.name)
        self._upper_dir(parts[:-1]).opaque = True
        skip_data(tar, m)

    def _skip(self, tar: tarfile.TarFile, m: tarfile.TarInfo, kind: str) -> None:
        if kind == "file":
            skip_data(tar, m)

    def _store_content(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> Digest:
        if m.size <= CHUNK_SIZE:
            return self._store.put_bytes(b"".join(member_data(tar, m)))
        tmp: Path | None = None
        try:
            fd, name = tempfile.mkstemp(dir=self._store.tmp_dir, prefix=".import-")
            tmp = Path(name)
            with os.fdopen(fd, "wb") as out:
                for chunk in member_data(tar, m):
                    out.write(chunk)
            return self._store.put_file(tmp)
        except OSError as e:  # writing (reading problems are MemberDataError)
            raise StoreError(f"cannot write to {self._store.tmp_dir}: {e.strerror or e}") from e
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    # --- the snapshot -------------------------------------------------------------------

    def snapshot(self) -> Digest:
        """The tree after this layer: ``lower`` less what was whited out, with the upper
        laid over it (directories merge, anything else replaces)."""
        return self._apply(self._lower, self._upper)

    def _apply(self, lower: Digest | None, upper: _UpperDir) -> Digest:
        entries: dict[str, TreeEntry] = {}
        if lower is not None and not upper.opaque:
            entries = dict(self._lower_entries(lower))
        for name in upper.whiteouts:
            entries.pop(name, None)
        for name, child in upper.children.items():
            if isinstance(child, TreeEntry):
                entries[name] = child
                continue
            below = entries.get(name)
            below_dir = below.digest if below is not None and below.type == "dir" else None
            if not child.exists and below_dir is None:
                continue  # whiteouts below something that is not a directory: no-ops
            sub = self._apply(below_dir, child)
            entries[name] = TreeEntry(name, "dir", DIR_MODE, self._store.read_tree(sub).size, sub)
        return self._store.put_tree(Tree.of(entries.values()))


class MemberDataError(Exception):
    """A member's data ends before its declared size, or cannot be decoded."""


def member_data(tar: tarfile.TarFile, m: tarfile.TarInfo) -> Iterator[bytes]:
    """The data of regular-file member ``m``, in chunks, exactly ``m.size`` bytes."""
    f = tar.extractfile(m)
    if f is None:  # not a regular file: no data
        return
    left = m.size
    while left:
        try:
            chunk = f.read(min(CHUNK_SIZE, left))
        except DECODE_ERRORS as e:
            raise MemberDataError(str(e)) from e
        if not chunk:
            raise MemberDataError(f"the data ends before its {m.size} bytes")
        left -= len(chunk)
        yield chunk


def skip_data(tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    """Read past a member's data (tarfile would too, but then outside the header budget
    and without noticing a truncation)."""
    for _ in member_data(tar, m):
        pass
