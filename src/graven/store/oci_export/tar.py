"""Normalized tar: a layer's change set, written byte-for-byte reproducibly.

An image's layers are its snapshot trees (``Image.layers``); layer *i* is the change
set from snapshot *i-1* (the empty tree for the first) to snapshot *i*, written as a
**normalized tar**:

- entries in tree order: by path component, a directory before what it holds, and in
  each directory its whiteouts before its other entries (the image-spec asks for
  whiteouts before sibling entries: appliers that honour them in archive order must
  not remove what this very layer adds);
- every directory on the way to a changed path is emitted (mode 0o755), as other OCI
  tools do, so an applier never has to invent a parent;
- uid/gid 0, empty user and group names, mtime ``SOURCE_DATE_EPOCH`` (an integer, else
  0), no access or change times; USTAR headers, PAX only for a name or link target
  that USTAR cannot hold (too long, or not ASCII);
- file contents streamed from the content store and verified against their digest;
- a deleted path becomes an empty ``.wh.<name>`` file in its directory. A path whose
  type changed (file to directory, directory to file or symlink) gets no whiteout:
  the image-spec's "changeset over existing files" rule has the applier remove the old
  path, directory and all, before it writes the new entry; a whiteout beside it would
  be redundant and, for a directory that became a file, would sit under a path that
  is no longer a directory;
- the archive ends with two zero blocks and no record padding, like Go's archive/tar,
  so an empty layer is the well-known 1024-byte empty tar.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from typing import Literal

from graven.errors import StoreError, UsageError
from graven.model import Digest
from graven.store.base import ImageStore
from graven.store.cas.blobs import CHUNK_SIZE, REPAIR_HINT
from graven.store.layers import changes
from graven.store.oci_export.compress import ByteSink
from graven.store.oci_types import WHITEOUT_PREFIX
from graven.store.tree_model import DIR_MODE, FILE_MODE, Tree, TreeEntry

_BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
TAR_FILE_MODE = 0o644
TAR_DIR_MODE = 0o755


def source_date_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` as seconds (0 when unset or empty); UsageError when invalid."""
    text = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()):
        raise UsageError(
            f"SOURCE_DATE_EPOCH must be a non-negative integer (seconds), got {text!r}",
            hint="Unset it, or set it to e.g. $(git log -1 --format=%ct).",
        )
    value = int(text)
    if value >= 8**11:  # USTAR's 11 octal digits: beyond is the year 10000+
        raise UsageError(f"SOURCE_DATE_EPOCH is out of range: {text}")
    return value


class TarWriter:
    """Writes a normalized tar stream: fixed owners and mtime, USTAR unless impossible."""

    def __init__(self, out: ByteSink, mtime: int) -> None:
        self._out = out
        self._mtime = mtime

    def _header(self, name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.size = size
        info.mtime = self._mtime
        info.linkname = link
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if name.isascii() and link.isascii():
            try:
                self._out.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            except ValueError:
                pass  # too long for USTAR's name/prefix or link fields
            else:
                return
        # PAX records only for what USTAR cannot hold; never times (mtime is an int
        # that fits, and atime/ctime are not set).
        self._out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))

    def directory(self, name: str, mode: int = TAR_DIR_MODE) -> None:
        self._header(name, tarfile.DIRTYPE, mode)

    def symlink(self, name: str, target: str) -> None:
        self._header(name, tarfile.SYMTYPE, 0o777, link=target)

    def file_bytes(self, name: str, data: bytes, mode: int = TAR_FILE_MODE) -> None:
        self._header(name, tarfile.REGTYPE, mode, len(data))
        self._out.write(data)
        self._pad(len(data))

    def file_blob(
        self, name: str, store: ImageStore, digest: Digest, size: int, mode: int = TAR_FILE_MODE
    ) -> None:
        """A regular file whose content is streamed from the store and verified."""
        self._header(name, tarfile.REGTYPE, mode, size)
        copy_verified(store, digest, size, self._out)
        self._pad(size)

    def _pad(self, size: int) -> None:
        if rest := -size % _BLOCK:
            self._out.write(b"\0" * rest)

    def close(self) -> None:
        self._out.write(_END_OF_ARCHIVE)


def copy_verified(store: ImageStore, digest: Digest, size: int, out: ByteSink) -> None:
    """Stream blob ``digest`` (``size`` bytes) to ``out``; StoreError when it does not match."""
    h = hashlib.sha256()
    copied = 0
    with store.open_blob(digest) as f:
        while copied < size and (chunk := f.read(min(CHUNK_SIZE, size - copied))):
            h.update(chunk)
            out.write(chunk)
            copied += len(chunk)
        longer = bool(f.read(1))
    if copied != size or longer or "sha256:" + h.hexdigest() != digest:
        raise StoreError(
            f"blob {digest} is corrupt: its content does not match its digest and size",
            hint=REPAIR_HINT,
        )


@dataclass(frozen=True)
class LayerEntry:
    """One entry of a layer's change set, as the normalized tar writes it."""

    path: str  # relative, no leading '/'
    kind: Literal["file", "dir", "symlink", "whiteout"]
    mode: int = TAR_DIR_MODE
    size: int = 0
    digest: Digest | None = None
    target: str = ""

    @classmethod
    def of(cls, path: str, entry: TreeEntry) -> LayerEntry:
        return cls(path, entry.type, entry.mode, entry.size, entry.digest, entry.target or "")

    def order(self) -> tuple[tuple[int, str], ...]:
        """Sort key: by component; in a directory, whiteouts before the other entries."""
        *parents, name = self.path.split("/")
        return (*((1, p) for p in parents), (0 if self.kind == "whiteout" else 1, name))


def layer_entries(store: ImageStore, old: Digest | None, new: Digest) -> list[LayerEntry]:
    """The tar entries of the layer from snapshot ``old`` (None: empty) to ``new``, in order."""
    base = old if old is not None else store.put_tree(Tree())
    entries: dict[str, LayerEntry] = {}
    deleted: list[str] = []
    for change in changes(store, base, new):
        path = change.path.strip("/")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in entries:
                # Every tree directory is 0o755 (cas normalizes it).
                entries[parent] = LayerEntry(parent, "dir", DIR_MODE)
        if change.entry is None:
            deleted.append(path)
        else:
            entries[path] = LayerEntry.of(path, change.entry)
    for path in deleted:
        if path in entries:
            continue  # replaced by another type in this layer: the new entry replaces it
        parent, _, name = path.rpartition("/")
        whiteout = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
        entries[whiteout] = LayerEntry(whiteout, "whiteout", FILE_MODE)
    return sorted(entries.values(), key=LayerEntry.order)


def write_layer_tar(
    store: ImageStore,
    old: Digest | None,
    new: Digest,
    out: ByteSink,
    *,
    mtime: int | None = None,
) -> None:
    """Write the normalized tar of the changes from snapshot ``old`` (None: the empty
    tree) to ``new`` to ``out``; ``mtime`` defaults to ``SOURCE_DATE_EPOCH`` or 0.

    File contents are streamed from the store, never held whole. StoreError when a
    tree or blob is missing or corrupt (``out`` then holds a partial tar)."""
    write_entries(store, layer_entries(store, old, new), out, mtime)


def write_entries(
    store: ImageStore, entries: list[LayerEntry], out: ByteSink, mtime: int | None
) -> None:
    """Write ``entries`` as a normalized tar (``mtime`` None: ``SOURCE_DATE_EPOCH``)."""
    tar = TarWriter(out, source_date_epoch() if mtime is None else mtime)
    for e in entries:
        if e.kind == "dir":
            tar.directory(e.path, e.mode)
        elif e.kind == "symlink":
            tar.symlink(e.path, e.target)
        elif e.kind == "whiteout":
            tar.file_bytes(e.path, b"", e.mode)
        elif e.digest is not None:
            tar.file_blob(e.path, store, e.digest, e.size, e.mode)
    tar.close()
