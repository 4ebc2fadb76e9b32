"""OCI import: untrusted image layouts, archives and manifests in, as graven images.

Everything read here is hostile until proven otherwise (DESIGN invariant 8). One layer
flows through a chain of streams; nothing is held whole and nothing is extracted::

    open_blob(descriptor)   the source: a layout file, an archive's spool, a registry
      -> _VerifiedBlob      exactly ``size`` bytes whose sha256 is ``digest``
      -> gzip | zstd | -    decompression
      -> _TarStream         the uncompressed bytes: sha256 == the config's diff_id, a
                            size cap (bombs), a cap on one member's header records,
                            nothing but zeros after the end-of-archive marker
      -> tarfile "r|"       members one at a time (extract/extractall are never called)
      -> _LayerChanges      each member validated and recorded as a change (file
                            contents go to the store as blobs), then laid over the
                            previous snapshot as overlayfs would: whiteouts and opaque
                            directories hide lower content, directories merge

The store receives only blobs and tree documents, and temporary files go to its
``tmp/``: nothing is written outside the store, by construction (the malicious-archive
tests check it anyway). Blobs stored before a later check fails are unreferenced and
left to gc; no image or name is recorded unless every check passed.

Decisions:

- Member names: a leading ``./`` and ``.`` components are accepted (``tar -C dir .``
  writes them). A leading ``/`` is **rejected**, not stripped: no layer tool writes
  one, so it marks a crafted or broken archive. ``..`` is rejected anywhere, even where
  it would stay inside. Names must be UTF-8 without NUL, at most 255 bytes a component,
  4096 bytes and ``MAX_DEPTH`` components a path.
- Nothing is altered silently. Setuid/setgid files and device nodes or fifos are
  rejected unless the policy allows them; then the bit is dropped (the store keeps
  only normalized modes: 0o644/0o755 files, 0o755 directories) and device nodes are
  left out (a runtime provides ``/dev``). Setgid and sticky bits on *directories*
  (``/var/mail``, ``/tmp`` in every Debian image) are accepted: they grant nothing.
  Owners, times and extended attributes are ignored, but values no file system
  could hold (ids beyond 32 bits, modes beyond ``MAX_MODE``) are refused, and file
  capabilities (``security.capability``) are treated as setuid.
- Header records are refused where tarfile reads them otherwise than other tools do
  (a member hidden in plain sight is as bad as one written outside): a non-file that
  declares data, a pax number that is not a number, ``GNU.sparse.*`` records, a
  global pax header that renames or resizes the members after it, a GNU long name
  with a NUL inside.
- A member below a path that is a symlink (in this layer or below) is rejected, as is
  one below a file: tools that diff real file systems never write through symlinks,
  and following one is how archives escape their root.
- Whiteouts hide lower-layer content only (image-spec), wherever they stand in the
  tar, so their paths are checked against the layers below: one under a path this
  layer turns into a file or symlink is the old directory's (umoci writes that), one
  under a path that is a symlink below is rejected, as is an opaque whiteout in a
  path that is a symlink or file below (unless this layer made it a directory
  first). An opaque whiteout of the image root, ``.wh.`` with an empty, ``.`` or
  ``..`` target, a whiteout name used as a directory and a whiteout that is not a
  regular file are rejected; AUFS metadata (``.wh..wh.*`` other than the opaque
  marker) is skipped, as other importers do.
- A hardlink becomes a copy of the entry it names (a file or symlink), which must
  already be in the image (earlier in this layer, or below: the image-spec leaves
  cross-layer hardlinks open, Docker and containerd apply them) and must not be
  reached through a symlink.
- Annotations never name anything: only the ref name is read, to match ``--ref`` and
  in messages, and it must fit the image-spec's grammar.
- Documents (index, manifest, config) must be UTF-8 JSON without duplicate keys and
  within size caps; every blob is checked against its descriptor's size and digest,
  and every layer against the config's diff_id. A tar must end with its end-of-archive
  marker, so a truncated layer is caught whatever its compression.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from graven.errors import StoreError, UsageError
from graven.model import Digest, Image, ImageConfig, is_valid_name
from graven.store.base import ImageStore
from graven.store.cas.blobs import CHUNK_SIZE
from graven.store.oci_types import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_REF_NAME,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    InvalidOCI,
    is_valid_ref_name,
)
from graven.store.tree_model import DIR_MODE, EXEC_MODE, FILE_MODE, SYMLINK_MODE, Tree, TreeEntry

BlobOpener = Callable[[Descriptor], AbstractContextManager[BinaryIO]]

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 256
MAX_LAYOUT_MARKER = 4096
MAX_ID = 2**32 - 2  # (uid_t)-1 is no owner at all: chown(2) reads it as "leave unchanged"
MAX_MODE = 0o177777  # permission bits, and the file-type bits some writers copy from st_mode

_BLOCK = 512
_TAR_BUFSIZE = 64 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# pax numbers as POSIX writes them: decimal; times may be negative and have a fraction.
_PAX_COUNT = re.compile(r"[0-9]{1,20}")
_PAX_TIME = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]+)?")
_PAX_NUMBERS = {"size": _PAX_COUNT, "uid": _PAX_COUNT, "gid": _PAX_COUNT}
_PAX_NUMBERS |= dict.fromkeys(("mtime", "atime", "ctime"), _PAX_TIME)
# What a global pax header may not set: tarfile applies it to every later member, and
# other readers do not.
_PAX_MEMBER_ONLY = frozenset({"path", "linkpath", "size"})
# File capabilities as GNU tar / Go (SCHILY) and libarchive write them.
_CAPABILITY_RECORDS = frozenset(
    {"SCHILY.xattr.security.capability", "LIBARCHIVE.xattr.security.capability"}
)
_PLATFORM_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOWER_MEMO = 4096
_DEFAULT_HINT = (
    "Nothing was imported. Rebuild or re-export the image with a standard tool "
    "(graven image export, skopeo, buildah, docker) and import that."
)
_CORRUPT_HINT = (
    "The source is corrupt or was tampered with: nothing was imported. Fetch or export "
    "the image again."
)


class ImportRejected(UsageError):
    """An image to import was refused. ``reason`` says why; ``layer`` (a blob digest)
    and ``member`` (a tar member name) say where, when the problem is inside a layer."""

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        layer: Digest | None = None,
        member: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.source = source
        self.layer = layer
        self.member = member
        where = [source] if source is not None else []
        if layer is not None:
            where.append(f"layer {layer}")
        if member is not None:
            where.append(f"member {member!r}")  # repr: a hostile name cannot drive a terminal
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"import rejected: {prefix}{reason}", hint=hint or _DEFAULT_HINT)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.source is not None:
            out["source"] = self.source
        if self.layer is not None:
            out["layer"] = str(self.layer)
        if self.member is not None:
            out["member"] = self.member
        return out


@dataclass(frozen=True)
class ImportPolicy:
    """What an import accepts. The caps bound the time, memory and space a hostile image
    can cost; the defaults fit any reasonable image."""

    allow_devices: bool = False  # then device nodes and fifos are left out, not rejected
    allow_setuid: bool = False  # then setuid/setgid files are imported without the bit
    max_layers: int = 256
    max_entries: int = 1_000_000  # tar members over all layers
    max_layer_bytes: int = 16 << 30  # one layer: its blob, and its uncompressed tar
    max_image_bytes: int = 64 << 30  # all layers' uncompressed tars together
    max_header_bytes: int = 1 << 20  # one member's header records (pax, GNU long names)
    max_archive_bytes: int = 64 << 30  # an oci-archive, spooled into the store's tmp/


@dataclass(frozen=True)
class LayerImported:
    """Progress: layer ``index`` (0-based) of ``count`` is in, as tree ``snapshot``."""

    index: int
    count: int
    digest: Digest
    snapshot: Digest
    entries: int
    size: int  # bytes of the uncompressed tar
    devices_skipped: int


Progress = Callable[[LayerImported], None]


# --- byte streams ----------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _CorruptStream(ValueError):
    """A decompressor found the compressed bytes malformed."""


class _VerifiedBlob:
    """A blob read as its descriptor says: exactly ``size`` bytes hashing to ``digest``.

    More bytes, fewer bytes or another digest raise ImportRejected as soon as known; the
    first such problem is kept in ``failure`` (decoders above may swallow or wrap it)."""

    def __init__(
        self, raw: BinaryIO, desc: Descriptor, what: str, layer: Digest | None = None
    ) -> None:
        self._raw = raw
        self._desc = desc
        self._what = what
        self._layer = layer
        self._hash = hashlib.sha256()
        self._left = desc.size
        self._done = False
        self.failure: ImportRejected | None = None

    def _fail(self, reason: str) -> ImportRejected:
        # A layer's digest is in the message's "where" already.
        subject = "the blob" if self._layer is not None else f"the {self._what} {self._desc.digest}"
        self.failure = ImportRejected(f"{subject} {reason}", layer=self._layer, hint=_CORRUPT_HINT)
        return self.failure

    def read(self, n: int = -1, /) -> bytes:
        if self.failure is not None:
            raise self.failure
        if self._done or n == 0:
            return b""
        want = min(CHUNK_SIZE if n < 0 else n, self._left + 1)  # +1 notices an overlong blob
        try:
            data = self._raw.read(want)
        except OSError as e:
            raise self._fail(f"cannot be read: {e.strerror or e}") from e
        if not data:
            if self._left:
                got = self._desc.size - self._left
                raise self._fail(f"ends after {got} of {self._desc.size} bytes (truncated)")
            self._finish()
            return b""
        if len(data) > self._left:
            raise self._fail(f"is longer than the {self._desc.size} bytes declared")
        self._hash.update(data)
        self._left -= len(data)
        if not self._left:
            if self._raw.read(1):
                raise self._fail(f"is longer than the {self._desc.size} bytes declared")
            self._finish()
        return data

    def _finish(self) -> None:
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._desc.digest:
            raise self._fail(f"hashes to {actual}, not to its declared digest")
        self._done = True

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass

    def integrity_problem(self) -> ImportRejected | None:
        """Read to the end; the size or digest problem found, if any (else None)."""
        if self.failure is None:
            with contextlib.suppress(ImportRejected):
                self.drain()
        return self.failure


class _ZstdStream:
    """zstandard's stream reader, its errors turned into ``_CorruptStream``."""

    def __init__(self, source: _VerifiedBlob) -> None:
        import zstandard  # lazily: only zstd layers pay for the import

        self._error = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, source), read_across_frames=True
        )

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._reader.read(CHUNK_SIZE if n < 0 else n)
        except self._error as e:
            raise _CorruptStream(f"corrupt zstd data: {e}") from e


def _zstd_available() -> bool:
    return importlib.util.find_spec("zstandard") is not None


def _decompressed(media_type: str, blob: _VerifiedBlob) -> _Readable:
    if media_type in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP):
        return gzip.GzipFile(fileobj=cast(BinaryIO, blob), mode="rb")
    if media_type == OCI_LAYER_ZSTD:
        return _ZstdStream(blob)
    return blob


class _TarStream:
    """The uncompressed tar as tarfile reads it: hashed, capped, watched.

    ``data_end`` is the offset just past the last non-zero byte, so whatever follows
    the archive's end can be proven to be zero padding. While ``header_budget`` is in
    force, reads are capped: tarfile holds a member's pax or long-name records in
    memory, and a hostile archive could declare them gigabytes long."""

    def __init__(
        self, source: _Readable, cap: int, too_big: Callable[[int], ImportRejected]
    ) -> None:
        self._source = source
        self._cap = cap
        self._too_big = too_big
        self._hash = hashlib.sha256()
        self._budget: int | None = None
        self._budget_error: Callable[[], ImportRejected] | None = None
        self.size = 0
        self.data_end = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(CHUNK_SIZE if n < 0 else n)
        if not data:
            return b""
        start = self.size
        self.size += len(data)
        if self.size > self._cap:
            raise self._too_big(self._cap)
        if self._budget is not None:
            self._budget -= len(data)
            if self._budget < 0 and self._budget_error is not None:
                raise self._budget_error()
        self._hash.update(data)
        if kept := len(data.rstrip(b"\0")):
            self.data_end = start + kept
        return data

    @contextlib.contextmanager
    def header_budget(self, limit: int, error: Callable[[], ImportRejected]) -> Iterator[None]:
        self._budget, self._budget_error = limit, error
        try:
            yield
        finally:
            self._budget, self._budget_error = None, None

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._hash.hexdigest())


# Errors tarfile and the decompressors raise on malformed input (tarfile passes some
# parsing errors through as ValueError; gzip raises EOFError when truncated, and
# BadGzipFile, an OSError, on a bad header).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    ValueError,
)


class _TarEndProblem(Exception):
    """The tar stream does not end as a tar must (found after its last member)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _HeaderProblem(Exception):
    """A member's header records say something tarfile would quietly reinterpret."""

    def __init__(self, reason: str, member: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.member = member


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a GNU long name or long link target with a NUL inside.

    tarfile (as GNU tar and Go) cuts such a record at its first NUL: whatever follows is
    hidden from every reader, which is only ever useful to hide something."""

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile's own method, with the check: the record cannot be read twice.
        fileobj = cast(BinaryIO, tar.fileobj)
        record = fileobj.read(-(-self.size // _BLOCK) * _BLOCK)[: self.size].rstrip(b"\0")
        try:
            following = self.fromtarfile(tar)
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(str(e)) from None  # what tarfile makes of it
        following.offset = self.offset
        cut = record.split(b"\0", 1)[0].decode(tar.encoding or "utf-8", tar.errors)
        what = "long name"
        if self.type == tarfile.GNUTYPE_LONGNAME:
            following.name = cut
        else:
            following.linkname, what = cut, "long link target"
        if following.isdir():
            following.name = following.name.removesuffix("/")
        if b"\0" in record:
            raise _HeaderProblem(
                f"its GNU {what} goes on after a NUL byte (readers cut it there)",
                following.name,
            )
        return following


def _check_header(
    tar: tarfile.TarFile, m: tarfile.TarInfo, reject: Callable[[str], ImportRejected]
) -> None:
    """Refuse header values no tool writes, or that readers would take differently.

    tarfile reads a malformed pax number as 0, lets a global pax header rename or resize
    every later member, and takes ``GNU.sparse.name`` as the name even of a file that is
    not sparse; owners, modes and times beyond any file system's range mark a crafted
    archive (graven records none of them, so valid values are simply dropped)."""
    overriding = sorted(_PAX_MEMBER_ONLY.intersection(tar.pax_headers))
    if overriding:
        raise reject(f"a global pax header sets {overriding[0]!r} for every member that follows")
    for key, value in m.pax_headers.items():
        if key.startswith("GNU.sparse."):
            raise reject(f"a GNU sparse record ({key!r}): sparse files are not supported")
        pattern = _PAX_NUMBERS.get(key)
        if pattern is not None and not pattern.fullmatch(value):
            raise reject(f"the pax record {key}={value!r:.40} is not a valid number")
    for field_name, owner in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= owner <= MAX_ID:
            raise reject(f"{field_name} {owner} is out of range (0 to {MAX_ID})")
    if not 0 <= m.mode <= MAX_MODE:
        raise reject(f"mode {m.mode:#o} is out of range (at most {MAX_MODE:#o})")


def _open_tar(stream: _TarStream, header_limit: int, error: Callable[[], ImportRejected]) -> Any:
    with stream.header_budget(header_limit, error):
        try:
            return tarfile.open(
                fileobj=cast(BinaryIO, stream),
                mode="r|",
                bufsize=_TAR_BUFSIZE,
                tarinfo=_StrictTarInfo,
                encoding="utf-8",
                errors="surrogateescape",  # undecodable names stay visible, and are refused
            )
        except tarfile.ReadError:
            if stream.size == 0:
                raise _TarEndProblem(
                    "the tar stream is empty (an empty or truncated blob)"
                ) from None
            raise


def _members(
    stream: _TarStream, header_limit: int, error: Callable[[str | None], ImportRejected]
) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The members of the tar in ``stream``, one at a time, then the end check.

    The caller reads (or skips) each member's data before asking for the next."""
    # tarfile reads ahead a buffer or two past the header records it parses.
    limit = header_limit + 4 * _TAR_BUFSIZE
    last: str | None = None
    tar: tarfile.TarFile = _open_tar(stream, limit, lambda: error(None))
    while True:
        with stream.header_budget(limit, functools.partial(error, last)):
            member = tar.next()
        if member is None:
            break
        cast(Any, tar).members.clear()  # stream mode: keep memory flat however many members
        yield tar, member
        last = member.name
    stream.drain()
    end = tar.offset
    if stream.size < end + _BLOCK:
        raise _TarEndProblem(
            "the tar ends inside a header or without its end-of-archive marker (truncated)"
        )
    if stream.data_end > end:
        after = f"member {last!r}" if last is not None else "the start"
        raise _TarEndProblem(
            f"bytes after {after} are not a valid tar header (a corrupt or crafted archive)"
        )


# --- names -----------------------------------------------------------------------------------


def _path_parts(
    name: str, reject: Callable[[str], ImportRejected], what: str = "name"
) -> list[str]:
    """``name`` as path components below the image root; raise ``reject(reason)`` if unsafe."""
    if "\0" in name:
        raise reject(f"the {what} contains a NUL byte")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise reject(f"the {what} is not valid UTF-8") from None
    if name.startswith("/"):
        raise reject(f"the {what} is an absolute path (members must be relative to the root)")
    if len(encoded) > MAX_PATH_BYTES:
        raise reject(f"the {what} is longer than {MAX_PATH_BYTES} bytes")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise reject(f"the {what} has a '..' component (path traversal)")
    if len(parts) > MAX_DEPTH:
        raise reject(f"the {what} is nested deeper than {MAX_DEPTH} directories")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise reject(f"a component of the {what} is longer than {MAX_NAME_BYTES} bytes")
    return parts


def _symlink_target(target: str, reject: Callable[[str], ImportRejected]) -> str:
    if not target:
        raise reject("the symlink has an empty target")
    if "\0" in target:
        raise reject("the symlink target contains a NUL byte")
    try:
        size = len(target.encode("utf-8"))
    except UnicodeEncodeError:
        raise reject("the symlink target is not valid UTF-8") from None
    if size >= MAX_PATH_BYTES:
        raise reject(f"the symlink target is longer than {MAX_PATH_BYTES - 1} bytes")
    return target


_KINDS: dict[bytes, str] = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}
_DEVICES = frozenset({"character device", "block device", "fifo"})
# tarfile reads the next header right after such a member, other readers after its data.
_DATA_ON_NON_FILE = (
    "a {kind} that declares {size} bytes of data: only files carry data, and readers "
    "disagree on where the next member starts"
)


# --- one layer's changes ---------------------------------------------------------------------


@dataclass
class _UpperDir:
    """A directory as this layer has it. ``exists`` is False for a directory the layer
    only names to white out something below it: such a node creates nothing."""

    children: dict[str, _UpperDir | TreeEntry] = field(default_factory=dict)
    whiteouts: set[str] = field(default_factory=set)
    opaque: bool = False
    exists: bool = False


_Node = _UpperDir | TreeEntry


class _LayerChanges:
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

        parts = _path_parts(name, reject)
        if m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None:
            raise reject("sparse files are not supported")
        kind = _KINDS.get(m.type)
        if kind is None:
            raise reject(f"unsupported tar member type {m.type!r}")
        if m.size < 0:
            raise reject("negative size")
        if kind != "file" and m.size:
            raise reject(_DATA_ON_NON_FILE.format(kind=kind, size=m.size))
        _check_header(tar, m, reject)
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
        if kind in _DEVICES:
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
            target = _symlink_target(m.linkname, reject)
            size = len(target.encode("utf-8"))
            self._put(parts, TreeEntry(last, "symlink", SYMLINK_MODE, size, target=target), name)
        else:
            self._put(parts, replace(self._link_target(m), name=last), name)
        return None

    def _link_target(self, m: tarfile.TarInfo) -> TreeEntry:
        def reject(reason: str) -> ImportRejected:
            return self.reject(m.name, reason)

        parts = _path_parts(m.linkname, reject, "hardlink target")
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
        _skip_data(tar, m)
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
        _skip_data(tar, m)

    def _skip(self, tar: tarfile.TarFile, m: tarfile.TarInfo, kind: str) -> None:
        if kind == "file":
            _skip_data(tar, m)

    def _store_content(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> Digest:
        if m.size <= CHUNK_SIZE:
            return self._store.put_bytes(b"".join(_member_data(tar, m)))
        tmp: Path | None = None
        try:
            fd, name = tempfile.mkstemp(dir=self._store.tmp_dir, prefix=".import-")
            tmp = Path(name)
            with os.fdopen(fd, "wb") as out:
                for chunk in _member_data(tar, m):
                    out.write(chunk)
            return self._store.put_file(tmp)
        except OSError as e:  # writing (reading problems are _MemberDataError)
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


class _MemberDataError(Exception):
    """A member's data ends before its declared size, or cannot be decoded."""


def _member_data(tar: tarfile.TarFile, m: tarfile.TarInfo) -> Iterator[bytes]:
    """The data of regular-file member ``m``, in chunks, exactly ``m.size`` bytes."""
    f = tar.extractfile(m)
    if f is None:  # not a regular file: no data
        return
    left = m.size
    while left:
        try:
            chunk = f.read(min(CHUNK_SIZE, left))
        except _DECODE_ERRORS as e:
            raise _MemberDataError(str(e)) from e
        if not chunk:
            raise _MemberDataError(f"the data ends before its {m.size} bytes")
        left -= len(chunk)
        yield chunk


def _skip_data(tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    """Read past a member's data (tarfile would too, but then outside the header budget
    and without noticing a truncation)."""
    for _ in _member_data(tar, m):
        pass


# --- documents -------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _document(data: bytes, what: str, cap: int) -> Any:
    """Parse an untrusted JSON document: UTF-8, no duplicate keys, at most ``cap`` bytes."""
    if len(data) > cap:
        raise ImportRejected(f"the {what} is larger than {cap} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImportRejected(f"the {what} is not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ImportRejected(f"the {what} is nested too deeply") from None
    except ValueError as e:
        raise ImportRejected(f"the {what} is not valid JSON: {e}") from None


def _descriptor(data: object, where: str) -> Descriptor:
    try:
        return Descriptor.from_dict(data, where)
    except InvalidOCI as e:
        raise ImportRejected(str(e)) from None


@dataclass(frozen=True)
class _Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def _parse_manifest(data: bytes, policy: ImportPolicy) -> _Manifest:
    doc = _document(data, "manifest", MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict):
        raise ImportRejected("the manifest must be a JSON object")
    version = doc.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise ImportRejected(
            f"manifest schemaVersion must be 2, got {version!r}",
            hint="Docker schema 1 manifests are obsolete: re-push the image with a current tool.",
        )
    media_type = doc.get("mediaType")
    if media_type in INDEX_TYPES or (media_type is None and "manifests" in doc):
        raise ImportRejected("expected an image manifest, got an index (a multi-image list)")
    if media_type is not None and media_type not in MANIFEST_TYPES:
        raise ImportRejected(
            f"unsupported manifest mediaType {media_type!r} "
            f"(expected {OCI_MANIFEST} or the Docker v2 manifest)"
        )
    config = _descriptor(doc.get("config"), "manifest.config")
    if config.media_type not in (OCI_CONFIG, DOCKER_CONFIG):
        raise ImportRejected(
            f"manifest.config.mediaType {config.media_type!r} is not an image config: "
            "this is not a container image"
        )
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImportRejected("manifest.layers must be a list")
    if len(raw_layers) > policy.max_layers:
        raise ImportRejected(
            f"the image has {len(raw_layers)} layers; the limit is {policy.max_layers}"
        )
    layers = []
    for i, item in enumerate(raw_layers):
        desc = _descriptor(item, f"manifest.layers[{i}]")
        if desc.media_type not in LAYER_TYPES:
            raise ImportRejected(
                f"manifest.layers[{i}].mediaType {desc.media_type!r} is not supported "
                f"(supported: {', '.join(sorted(LAYER_TYPES))})"
            )
        if desc.size > policy.max_layer_bytes:
            raise ImportRejected(
                f"manifest.layers[{i}] ({desc.digest}) is {desc.size} bytes; the limit is "
                f"{policy.max_layer_bytes}"
            )
        layers.append(desc)
    if any(d.media_type == OCI_LAYER_ZSTD for d in layers) and not _zstd_available():
        raise ImportRejected(
            "the image has zstd-compressed layers and the 'zstandard' package is not installed",
            hint="Install graven with its dependencies (pip install zstandard), or export the "
            "image with gzip layers.",
        )
    return _Manifest(config, tuple(layers))


def _strings(run: dict[str, Any], key: str) -> tuple[str, ...]:
    value = run.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ImportRejected(f"config.config.{key} must be a list of strings, got {value!r:.80}")
    for s in value:
        if "\0" in s:
            raise ImportRejected(f"config.config.{key} holds a string with a NUL byte")
    return tuple(value)


def _string(run: dict[str, Any], key: str) -> str:
    value = run.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or "\0" in value:
        raise ImportRejected(f"config.config.{key} must be a string, got {value!r:.80}")
    return value


def _ports(run: dict[str, Any]) -> tuple[int, ...]:
    value = run.get("ExposedPorts")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ImportRejected("config.config.ExposedPorts must be an object")
    ports = set()
    for key in value:
        number, _, proto = key.partition("/")
        if not number.isascii() or not number.isdigit() or proto not in ("", "tcp", "udp", "sctp"):
            raise ImportRejected(
                f"config.config.ExposedPorts: {key!r} is not PORT/tcp, PORT/udp or PORT/sctp"
            )
        port = int(number)
        if not 1 <= port <= 65535:
            raise ImportRejected(f"config.config.ExposedPorts: port {port} is out of range")
        ports.add(port)
    return tuple(sorted(ports))


def _string_map(run: dict[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    value = run.get(key)
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(v, str) and "\0" not in v and "\0" not in k for k, v in value.items()
    ):
        raise ImportRejected(f"config.config.{key} must be a map of strings")
    return tuple(sorted(value.items()))


def _parse_config(data: bytes, layers: int) -> tuple[ImageConfig, tuple[Digest, ...]]:
    """The image config (untrusted) as graven's ImageConfig, and its diff_ids."""
    doc = _document(data, "image config", MAX_CONFIG_BYTES)
    if not isinstance(doc, dict):
        raise ImportRejected("the image config must be a JSON object")
    system = doc.get("os")
    if system is not None and system != "linux":
        raise ImportRejected(f"the image is for {system!r}; graven runs linux images")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImportRejected("config.rootfs must be an object with type 'layers'")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise ImportRejected("config.rootfs.diff_ids must be a list of digests")
    try:
        diff_ids = tuple(Digest(d) if isinstance(d, str) else Digest("") for d in raw_ids)
    except ValueError as e:
        raise ImportRejected(f"config.rootfs.diff_ids: {e}") from None
    if len(diff_ids) != layers:
        raise ImportRejected(
            f"the config lists {len(diff_ids)} diff_ids for the manifest's {layers} layers"
        )
    run = doc.get("config")
    if run is None:
        run = {}
    if not isinstance(run, dict):
        raise ImportRejected("config.config must be an object")
    env = []
    for item in _strings(run, "Env"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ImportRejected(f"config.config.Env: {item!r:.80} is not NAME=VALUE")
        env.append((key, value))
    workdir = _string(run, "WorkingDir") or "/"
    if not workdir.startswith("/"):
        workdir = "/" + workdir  # relative to the root, where a runtime would start it
    config = ImageConfig(
        entrypoint=_strings(run, "Entrypoint"),
        env=tuple(env),
        workdir=workdir,
        cmd=_strings(run, "Cmd"),
        user=_string(run, "User"),
        ports=_ports(run),
        labels=_string_map(run, "Labels"),
    )
    return config, diff_ids


def _read_small_blob(open_blob: BlobOpener, desc: Descriptor, what: str, cap: int) -> bytes:
    """A document blob, whole, checked against its descriptor."""
    if desc.size > cap:
        raise ImportRejected(f"the {what} {desc.digest} is {desc.size} bytes; the limit is {cap}")
    chunks = []
    with open_blob(desc) as raw:
        blob = _VerifiedBlob(raw, desc, what)
        while chunk := blob.read(CHUNK_SIZE):
            chunks.append(chunk)
    return b"".join(chunks)


# --- images ----------------------------------------------------------------------------------


@dataclass
class _Totals:
    entries: int = 0
    size: int = 0


def import_from_manifest(
    store: ImageStore,
    manifest: bytes,
    expected_digest: Digest | None,
    open_blob: BlobOpener,
    *,
    policy: ImportPolicy = ImportPolicy(),
    progress: Progress | None = None,
) -> Image:
    """Import the image ``manifest`` describes; return it (unnamed).

    ``manifest`` is the exact manifest bytes; when ``expected_digest`` is given (it was
    asked for by digest) they must hash to it. ``open_blob(descriptor)`` opens a blob
    for streaming; it need not check anything: every blob is read to its end and checked
    against its descriptor's size and digest here, and each layer against the config's
    diff_id. Layers are applied in order, each giving the next snapshot tree.

    ImportRejected (a UsageError) names what is wrong and where; no image is recorded
    then. ``progress`` is called once per layer."""
    if len(manifest) > MAX_MANIFEST_BYTES:
        raise ImportRejected(
            f"the manifest is {len(manifest)} bytes; the limit is {MAX_MANIFEST_BYTES}"
        )
    if expected_digest is not None and Digest.of_bytes(manifest) != expected_digest:
        raise ImportRejected(
            f"the manifest's digest is {Digest.of_bytes(manifest)}, not the expected "
            f"{expected_digest}",
            hint=_CORRUPT_HINT,
        )
    parsed = _parse_manifest(manifest, policy)
    config_bytes = _read_small_blob(open_blob, parsed.config, "image config", MAX_CONFIG_BYTES)
    config, diff_ids = _parse_config(config_bytes, len(parsed.layers))
    root = store.put_tree(Tree())
    snapshots: list[Digest] = []
    totals = _Totals()
    memo: dict[Digest, dict[str, TreeEntry]] = {}
    for index, (desc, diff_id) in enumerate(zip(parsed.layers, diff_ids, strict=True)):
        changes, size = _import_layer(
            store, root, desc, diff_id, index, open_blob, policy, totals, memo
        )
        root = changes.snapshot()
        snapshots.append(root)
        if progress is not None:
            progress(
                LayerImported(
                    index,
                    len(parsed.layers),
                    desc.digest,
                    root,
                    changes.entries,
                    size,
                    changes.devices_skipped,
                )
            )
    image = store.put_image(root, config, tuple(snapshots))
    store.get_image(image.digest)  # what was recorded must read back as a valid image
    return image


def _import_layer(
    store: ImageStore,
    lower: Digest,
    desc: Descriptor,
    diff_id: Digest,
    index: int,
    open_blob: BlobOpener,
    policy: ImportPolicy,
    totals: _Totals,
    memo: dict[Digest, dict[str, TreeEntry]],
) -> tuple[_LayerChanges, int]:
    layer = desc.digest
    changes = _LayerChanges(store, lower, layer, policy, memo)
    cap = min(policy.max_layer_bytes, policy.max_image_bytes - totals.size)

    def too_big(limit: int) -> ImportRejected:
        if limit == policy.max_layer_bytes:
            what = f"the uncompressed layer exceeds the limit of {limit} bytes"
        else:
            what = (
                f"the uncompressed layers exceed the image limit of {policy.max_image_bytes} bytes"
            )
        return ImportRejected(
            f"{what} (a compression bomb, or an image too large for this policy)", layer=layer
        )

    def header_too_big(after: str | None) -> ImportRejected:
        where = f"after member {after!r}" if after is not None else "at the start"
        return ImportRejected(
            f"a member's header records {where} exceed {policy.max_header_bytes} bytes",
            layer=layer,
        )

    with open_blob(desc) as raw:
        blob = _VerifiedBlob(raw, desc, f"layer {index + 1}", layer)
        stream = _TarStream(_decompressed(desc.media_type, blob), cap, too_big)
        try:
            for tar, member in _members(stream, policy.max_header_bytes, header_too_big):
                totals.entries += 1
                changes.entries += 1
                if totals.entries > policy.max_entries:
                    raise ImportRejected(
                        f"the image has more than {policy.max_entries} entries", layer=layer
                    )
                try:
                    changes.add(tar, member)
                except _MemberDataError as e:
                    raise _blame(blob, e) or changes.reject(
                        member.name, f"its data is truncated or corrupt ({e})"
                    ) from e
            blob.drain()
        # A corrupt blob explains a decoding error better than the error itself; what
        # the checks above refuse is refused as it is (no reading on to find out).
        except _TarEndProblem as e:
            raise _blame(blob, e) or ImportRejected(e.reason, layer=layer) from e
        except _HeaderProblem as e:
            raise changes.reject(e.member, e.reason) from e
        except _DECODE_ERRORS as e:
            raise _blame(blob, e) or ImportRejected(
                f"not a valid {_format(desc.media_type)}: {e}", layer=layer
            ) from e
    if stream.digest != diff_id:
        raise ImportRejected(
            f"the uncompressed layer's digest is {stream.digest}, but the config's "
            f"rootfs.diff_ids[{index}] is {diff_id}",
            layer=layer,
            hint=_CORRUPT_HINT,
        )
    totals.size += stream.size
    return changes, stream.size


def _blame(blob: _VerifiedBlob, error: BaseException) -> ImportRejected | None:
    """The blob's own size or digest problem, which explains any decoding error better."""
    problem = blob.integrity_problem()
    return problem if problem is not None and problem is not error else None


def _format(media_type: str) -> str:
    if media_type == OCI_LAYER_ZSTD:
        return "zstd-compressed tar"
    if media_type in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP):
        return "gzip-compressed tar"
    return "tar"


# --- layouts and archives --------------------------------------------------------------------


class _Layout:
    """An OCI image layout directory, read defensively: its files are opened without
    following symlinks and must be regular files (a fifo would hang, a symlink could
    point anywhere)."""

    def __init__(self, root: Path, label: str) -> None:
        self.root = root
        self.label = label

    def _open(self, relative: str, what: str) -> BinaryIO:
        try:
            fd = os.open(
                self.root / relative, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except FileNotFoundError:
            raise ImportRejected(
                f"{what} is missing from {self.label}",
                hint="Is this an OCI image layout (as written by 'graven image export' or "
                "'skopeo copy ... oci:DIR')? Export the image again.",
            ) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ImportRejected(f"{what} in {self.label} is a symlink") from None
            raise ImportRejected(f"cannot read {what} in {self.label}: {e.strerror}") from None
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise ImportRejected(f"{what} in {self.label} is not a regular file")
        return f

    def read_document(self, relative: str, what: str, cap: int) -> bytes:
        with self._open(relative, what) as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise ImportRejected(f"{what} in {self.label} is larger than {cap} bytes")
        return data

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        for sub in ("blobs", "blobs/sha256"):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISDIR(os.lstat(self.root / sub).st_mode):
                    raise ImportRejected(f"{sub} in {self.label} is a symlink or not a directory")
        f = self._open(f"blobs/sha256/{desc.digest.hex}", f"blob {desc.digest}")
        size = os.fstat(f.fileno()).st_size
        if size != desc.size:
            f.close()
            raise ImportRejected(
                f"blob {desc.digest} in {self.label} is {size} bytes; its descriptor "
                f"says {desc.size}",
                hint=_CORRUPT_HINT,
            )
        return f


@dataclass(frozen=True)
class _IndexEntry:
    descriptor: Descriptor
    platform: tuple[str, str, str | None] | None  # os, architecture, variant

    @property
    def ref(self) -> str | None:
        return dict(self.descriptor.annotations).get(REF_NAME)


def _index_entries(data: bytes, where: str) -> list[_IndexEntry]:
    doc = _document(data, where, MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict):
        raise ImportRejected(f"{where} must be a JSON object")
    if type(doc.get("schemaVersion")) is not int or doc.get("schemaVersion") != 2:
        raise ImportRejected(f"{where}: schemaVersion must be 2")
    media_type = doc.get("mediaType")
    if media_type is not None and media_type not in INDEX_TYPES:
        raise ImportRejected(f"{where}: mediaType {media_type!r} is not an image index")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ImportRejected(f"{where}: 'manifests' must be a list")
    entries = []
    for i, item in enumerate(manifests):
        desc = _descriptor(item, f"{where} manifests[{i}]")
        ref = dict(desc.annotations).get(REF_NAME)
        if ref is not None and not is_valid_ref_name(ref):
            # Only this annotation is ever read, and only to match --ref and to list the
            # images in messages; a value outside the image-spec's grammar (a NUL, a
            # newline, an escape sequence, '..') marks a crafted index.
            raise ImportRejected(
                f"{where} manifests[{i}].annotations: {REF_NAME} {_shown(ref)} is not a "
                f"valid ref name (the image-spec's grammar, at most {MAX_REF_NAME} characters)"
            )
        raw = item.get("platform")
        platform: tuple[str, str, str | None] | None = None
        if raw is not None:
            if not (
                isinstance(raw, dict)
                and isinstance(raw.get("os"), str)
                and isinstance(raw.get("architecture"), str)
                and isinstance(raw.get("variant"), str | None)
            ):
                raise ImportRejected(f"{where} manifests[{i}].platform is malformed")
            platform = (raw["os"], raw["architecture"], raw.get("variant"))
            for word in filter(None, platform):
                if not _PLATFORM_WORD.fullmatch(word):
                    raise ImportRejected(
                        f"{where} manifests[{i}].platform: {_shown(word)} is not an os, "
                        "architecture or variant name"
                    )
        entries.append(_IndexEntry(desc, platform))
    return entries


def _shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message: control characters escaped, cut at ``limit``."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _on_host(platform: tuple[str, str, str | None] | None) -> bool:
    from graven.store.oci import host_platform

    if platform is None:
        return False
    arch, variant = host_platform()
    return (
        platform[0] == "linux"
        and platform[1] == arch
        and (variant is None or platform[2] in (None, variant))
    )


def _describe(entries: list[_IndexEntry]) -> str:
    names = []
    for e in entries:
        label = e.ref or e.descriptor.digest.short
        if e.platform is not None:
            label += f" ({'/'.join(p for p in e.platform if p)})"
        names.append(label)
    return ", ".join(names) or "nothing"


def _choose(entries: list[_IndexEntry], ref: str | None, label: str) -> Descriptor:
    found = entries if ref is None else [e for e in entries if e.ref == ref]
    if not found:
        if ref is not None:
            raise ImportRejected(
                f"{label} has no image named {ref!r}",
                hint=f"It holds: {_describe(entries)}. Pass one of those with --ref.",
            )
        raise ImportRejected(f"{label} lists no images")
    if len(found) > 1:
        host = [e for e in found if _on_host(e.platform)]
        if len(host) != 1:
            raise ImportRejected(
                f"{label} holds {len(found)} images; choose one",
                hint=f"It holds: {_describe(found)}. Pass one with --ref.",
            )
        found = host
    return found[0].descriptor


def _import_layout_dir(
    store: ImageStore,
    layout: _Layout,
    ref: str | None,
    policy: ImportPolicy,
    progress: Progress | None,
) -> Image:
    marker = _document(
        layout.read_document("oci-layout", "the oci-layout file", MAX_LAYOUT_MARKER),
        "oci-layout file",
        MAX_LAYOUT_MARKER,
    )
    version = marker.get("imageLayoutVersion") if isinstance(marker, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImportRejected(
            f"{layout.label}: unsupported imageLayoutVersion {version!r} (expected 1.x)"
        )
    index = layout.read_document("index.json", "index.json", MAX_MANIFEST_BYTES)
    desc = _choose(_index_entries(index, "index.json"), ref, layout.label)
    if desc.media_type in INDEX_TYPES:
        nested = _read_small_blob(layout.open_blob, desc, "image index", MAX_MANIFEST_BYTES)
        entries = _index_entries(nested, f"index {desc.digest}")
        host = [e for e in entries if _on_host(e.platform)]
        if len(host) != 1 and len(entries) != 1:
            raise ImportRejected(
                "multi-platform indexes are supported only with exactly one linux image "
                f"for this machine; {desc.digest.short} holds: {_describe(entries)}",
                hint="Copy the one platform out first, e.g. 'skopeo copy --override-arch ...'.",
            )
        desc = (host or entries)[0].descriptor
        if desc.media_type in INDEX_TYPES:
            raise ImportRejected("indexes nested more than one level are not supported")
    if desc.media_type not in MANIFEST_TYPES:
        raise ImportRejected(
            f"index entry {desc.digest} has unsupported mediaType {desc.media_type!r}"
        )
    manifest = _read_small_blob(layout.open_blob, desc, "manifest", MAX_MANIFEST_BYTES)
    return import_from_manifest(
        store, manifest, desc.digest, layout.open_blob, policy=policy, progress=progress
    )


_ARCHIVE_SKIPPED = frozenset({"manifest.json", "repositories"})  # docker save's extras


def _spool_archive(source: Path, spool: Path, policy: ImportPolicy) -> None:
    """Copy the layout inside the oci-archive ``source`` into ``spool`` (in the store's
    tmp/), member by member: only ``oci-layout``, ``index.json`` and
    ``blobs/sha256/<64 hex>`` files are taken, each blob verified against its name.
    Nothing is ever extracted by a name taken from the archive."""
    label = f"archive {source}"
    blobs = spool / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def reject(member: str | None, reason: str) -> ImportRejected:
        return ImportRejected(reason, source=label, member=member)

    def too_big(limit: int) -> ImportRejected:
        return reject(None, f"the archive is larger than {limit} bytes")

    def header_too_big(after: str | None) -> ImportRejected:
        return reject(after, f"a header after this member exceeds {policy.max_header_bytes} bytes")

    try:
        with source.open("rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            plain: _Readable = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
            stream = _TarStream(plain, policy.max_archive_bytes, too_big)
            members = _members(stream, policy.max_header_bytes, header_too_big)
            for count, (tar, m) in enumerate(members, start=1):
                if count > policy.max_entries:
                    raise reject(None, f"more than {policy.max_entries} entries")
                try:
                    _spool_member(tar, m, spool, functools.partial(reject, m.name))
                except _MemberDataError as e:
                    raise reject(m.name, f"its data is truncated or corrupt ({e})") from e
    except _TarEndProblem as e:
        raise reject(None, e.reason) from e
    except _HeaderProblem as e:
        raise reject(e.member, e.reason) from e
    except _DECODE_ERRORS as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.filename:
            raise UsageError(f"cannot read {source}: {e.strerror}") from e
        raise reject(None, f"not a valid OCI archive (tar): {e}") from e


def _spool_member(
    tar: tarfile.TarFile, m: tarfile.TarInfo, spool: Path, reject: Callable[[str], ImportRejected]
) -> None:
    path = "/".join(_path_parts(m.name, reject))
    _check_header(tar, m, reject)
    if m.isdir():
        if m.size:
            raise reject(_DATA_ON_NON_FILE.format(kind="dir", size=m.size))
        if path in ("", "blobs", "blobs/sha256"):
            return
        raise reject(
            "unexpected directory: an OCI archive holds oci-layout, index.json and "
            "blobs/sha256/<digest>"
        )
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.sparse is not None:
        kind = _KINDS.get(m.type, f"type {m.type!r}")
        raise reject(f"a {kind}: an OCI archive holds only regular files and directories")
    if path in _ARCHIVE_SKIPPED:
        _skip_data(tar, m)
        return
    blob = path.removeprefix("blobs/sha256/")
    if path in ("oci-layout", "index.json"):
        cap = MAX_LAYOUT_MARKER if path == "oci-layout" else MAX_MANIFEST_BYTES
        if m.size > cap:
            raise reject(f"larger than {cap} bytes")
        target = spool / path
    elif blob != path and _HEX64.match(blob):
        target = spool / "blobs" / "sha256" / blob
    else:
        raise reject(
            "unexpected entry: an OCI archive holds oci-layout, index.json and "
            "blobs/sha256/<64 hex digits> (convert other formats with "
            "'skopeo copy docker-archive:FILE oci-archive:FILE')"
        )
    h = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise reject("a second entry for the same path") from None
    except OSError as e:
        raise StoreError(f"cannot write to {spool}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in _member_data(tar, m):
                h.update(chunk)
                out.write(chunk)
    except OSError as e:  # writing (reading problems are _MemberDataError)
        raise StoreError(f"cannot write to {spool}: {e.strerror or e}") from e
    if target.parent.name == "sha256" and h.hexdigest() != blob:
        raise ImportRejected(
            f"blob {path} in the archive holds content with digest sha256:{h.hexdigest()}",
            member=m.name,
            hint=_CORRUPT_HINT,
        )


def import_layout(
    store: ImageStore,
    source: Path,
    ref: str | None = None,
    *,
    name: str | None = None,
    policy: ImportPolicy = ImportPolicy(),
    progress: Progress | None = None,
) -> Image:
    """Import an image from an OCI image layout directory or an oci-archive file.

    ``ref`` picks the image by its ``org.opencontainers.image.ref.name``; it may be
    left out when the layout holds one image (or one for this machine's platform). An
    archive is read as a stream and its blobs spooled into the store's ``tmp/`` (a tar
    has no order to rely on), then removed. Tagged ``name`` when given.
    ImportRejected when anything is wrong; nothing is recorded then."""
    if name is not None and not is_valid_name(name):
        raise UsageError(
            f"invalid image name {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter"
        )
    source = Path(source)
    if source.is_dir():
        image = _import_layout_dir(
            store, _Layout(source, f"layout {source}"), ref, policy, progress
        )
    elif source.is_file():
        spool = Path(tempfile.mkdtemp(prefix=".import-", dir=store.tmp_dir))
        try:
            _spool_archive(source, spool, policy)
            image = _import_layout_dir(
                store, _Layout(spool, f"archive {source}"), ref, policy, progress
            )
        finally:
            shutil.rmtree(spool, ignore_errors=True)
    elif not source.exists():
        raise UsageError(
            f"{source} does not exist",
            hint="Give an OCI layout directory or an oci-archive file.",
        )
    else:
        raise UsageError(f"{source} is neither a directory nor a regular file")
    if name is not None:
        store.tag(name, image.digest)
        image = replace(image, name=name)
    return image
