"""OCI export: graven images out as reproducible OCI image layouts and archives.

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

Compressed blobs are byte-identical for identical input: gzip with a fixed header
(mtime 0, no file name, OS "unknown") at a fixed level, or zstd at a fixed level with
a checksum; they depend only on the zlib/zstd library versions. A compressed layer is
written into the content store and its descriptor cached, keyed by the two snapshots,
the compression, the mtime and the tar format version, so a second export or push
recompresses nothing.

Config and manifest are canonical JSON. The only host-dependent field is the config's
``architecture`` (the host's, as GOARCH); everything else depends on the image and
``SOURCE_DATE_EPOCH`` alone, never on the time, umask or working directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from graven.atomic import PendingFile, write_atomic
from graven.errors import StoreError, UsageError
from graven.model import Digest, Image, canonical_json
from graven.store.base import ImageStore
from graven.store.cas.blobs import CHUNK_SIZE, REPAIR_HINT
from graven.store.layers import changes
from graven.store.oci_types import (
    GRAVEN_IMAGE,
    MAX_REF_NAME,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    InvalidOCI,
    is_valid_ref_name,
)
from graven.store.tree_model import DIR_MODE, FILE_MODE, Tree, TreeEntry

Compression = Literal["gzip", "zstd", "none"]
COMPRESSIONS: tuple[Compression, ...] = ("gzip", "zstd", "none")
MEDIA_TYPES: dict[Compression, str] = {
    "gzip": OCI_LAYER_GZIP,
    "zstd": OCI_LAYER_ZSTD,
    "none": OCI_LAYER_TAR,
}
# Bump when the tar or compressed bytes for the same snapshots would change: it is part
# of the layer cache key, so old cache entries are then simply not found.
LAYER_FORMAT = "graven.oci-layer/v2"
GZIP_LEVEL = 6  # zlib's default: level 9 costs far more time for a few percent
ZSTD_LEVEL = 3  # zstd's default
WHITEOUT_PREFIX = ".wh."
LAYOUT_VERSION = "1.0.0"
OCI_LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"

_BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
# RFC 1952 header: magic, CM=deflate, FLG=0 (no name, no comment), MTIME=0,
# XFL=0 (level 6 is neither "best" nor "fastest"), OS=255 (unknown).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_FILE_MODE = 0o644
_DIR_MODE = 0o755
# platform.machine() -> (GOARCH, variant)
_GOARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


class ByteSink(Protocol):
    """Anything bytes can be written to (a binary file, a hashing or compressing stage)."""

    def write(self, data: bytes, /) -> object: ...


# --- value types -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    """One exported layer: ``diff_id`` names the uncompressed tar, ``digest`` and ``size``
    the blob as stored and shipped (equal to the tar for ``none``)."""

    diff_id: Digest
    digest: Digest
    size: int
    media_type: str

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "diff_id": str(self.diff_id),
            "digest": str(self.digest),
            "size": self.size,
            "media_type": self.media_type,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LayerBlob:
        """Parse a cached entry; ValueError/KeyError/TypeError when it is malformed."""
        size = data["size"]
        media_type = data["media_type"]
        if type(size) is not int or size < 0 or media_type not in MEDIA_TYPES.values():
            raise ValueError("malformed layer entry")
        return cls(Digest(data["diff_id"]), Digest(data["digest"]), size, media_type)


@dataclass(frozen=True)
class OciImage:
    """An image's OCI documents: manifest and config (exact bytes) and its layers."""

    manifest: bytes
    manifest_digest: Digest
    config: bytes
    config_digest: Digest
    layers: tuple[LayerBlob, ...]

    def manifest_descriptor(self, ref_name: str | None = None) -> Descriptor:
        annotations = ((REF_NAME, ref_name),) if ref_name else ()
        return Descriptor(OCI_MANIFEST, self.manifest_digest, len(self.manifest), annotations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": {"digest": str(self.manifest_digest), "size": len(self.manifest)},
            "config": {"digest": str(self.config_digest), "size": len(self.config)},
            "layers": [layer.to_dict() for layer in self.layers],
        }


@dataclass(frozen=True)
class LayerProgress:
    """Reported once per layer: ``index`` of ``count`` (0-based), and whether the blob
    came from the cache (``cached``) or was written now."""

    index: int
    count: int
    blob: LayerBlob
    cached: bool


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the layout directory or archive file, the ref it carries,
    the documents, and how many blobs were written or already present."""

    path: Path
    ref_name: str
    image: Digest
    compression: Compression
    oci: OciImage
    blobs_written: int
    blobs_reused: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ref": self.ref_name,
            "image": str(self.image),
            "compression": self.compression,
            **self.oci.to_dict(),
            "blobs_written": self.blobs_written,
            "blobs_reused": self.blobs_reused,
        }


Progress = Callable[[LayerProgress], None]


# --- settings from the environment ------------------------------------------------------


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


def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_platform() -> tuple[str, str | None]:
    """The host's (GOARCH, variant), e.g. ``("amd64", None)``."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, (machine or "unknown", None))


def check_compression(value: str) -> Compression:
    """``value`` as a Compression; UsageError naming the choices otherwise."""
    for c in COMPRESSIONS:
        if value == c:
            return c
    raise UsageError(f"unknown compression {value!r}: expected one of {', '.join(COMPRESSIONS)}")


def check_ref_name(ref_name: str) -> str:
    """``ref_name`` if it fits the image-spec's ``org.opencontainers.image.ref.name``."""
    if not is_valid_ref_name(ref_name):
        raise UsageError(
            f"invalid OCI ref name {ref_name!r:.80}: use letters and digits, separated by "
            f"one of - . _ : @ + (or --), with / between components, at most "
            f"{MAX_REF_NAME} characters",
            hint="For example 'latest', 'web', 'web:v2'.",
        )
    return ref_name


# --- byte pipelines ----------------------------------------------------------------------


class _Digesting:
    """Passes bytes through to ``out`` and hashes them on the way."""

    def __init__(self, out: ByteSink | None = None) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)
        return len(data)

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._hash.hexdigest())


class _Compressor(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def finish(self) -> None: ...


class _Plain:
    def __init__(self, out: ByteSink) -> None:
        self._out = out

    def write(self, data: bytes, /) -> int:
        self._out.write(data)
        return len(data)

    def finish(self) -> None:
        return None


class _Gzip:
    """Gzip with a fixed header: the same input gives the same bytes (RFC 1952)."""

    def __init__(self, out: ByteSink) -> None:
        self._out = out
        self._deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0
        out.write(_GZIP_HEADER)

    def write(self, data: bytes, /) -> int:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        if chunk := self._deflate.compress(data):
            self._out.write(chunk)
        return len(data)

    def finish(self) -> None:
        self._out.write(self._deflate.flush())
        self._out.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))


class _Zstd:
    """One zstd frame, with checksum, without content size (the input is streamed)."""

    def __init__(self, out: ByteSink) -> None:
        import zstandard  # lazily: only zstd exports pay for the import

        self._out = out
        self._z = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()

    def write(self, data: bytes, /) -> int:
        if chunk := self._z.compress(data):
            self._out.write(chunk)
        return len(data)

    def finish(self) -> None:
        self._out.write(self._z.flush())


def _compressor(compression: Compression, out: ByteSink) -> _Compressor:
    if compression == "gzip":
        return _Gzip(out)
    if compression == "zstd":
        return _Zstd(out)
    return _Plain(out)


# --- normalized tar ----------------------------------------------------------------------


class _TarWriter:
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

    def directory(self, name: str, mode: int = _DIR_MODE) -> None:
        self._header(name, tarfile.DIRTYPE, mode)

    def symlink(self, name: str, target: str) -> None:
        self._header(name, tarfile.SYMTYPE, 0o777, link=target)

    def file_bytes(self, name: str, data: bytes, mode: int = _FILE_MODE) -> None:
        self._header(name, tarfile.REGTYPE, mode, len(data))
        self._out.write(data)
        self._pad(len(data))

    def file_blob(
        self, name: str, store: ImageStore, digest: Digest, size: int, mode: int = _FILE_MODE
    ) -> None:
        """A regular file whose content is streamed from the store and verified."""
        self._header(name, tarfile.REGTYPE, mode, size)
        _copy_verified(store, digest, size, self._out)
        self._pad(size)

    def _pad(self, size: int) -> None:
        if rest := -size % _BLOCK:
            self._out.write(b"\0" * rest)

    def close(self) -> None:
        self._out.write(_END_OF_ARCHIVE)


def _copy_verified(store: ImageStore, digest: Digest, size: int, out: ByteSink) -> None:
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
class _LayerEntry:
    path: str  # relative, no leading '/'
    kind: Literal["file", "dir", "symlink", "whiteout"]
    mode: int = _DIR_MODE
    size: int = 0
    digest: Digest | None = None
    target: str = ""

    @classmethod
    def of(cls, path: str, entry: TreeEntry) -> _LayerEntry:
        return cls(path, entry.type, entry.mode, entry.size, entry.digest, entry.target or "")

    def order(self) -> tuple[tuple[int, str], ...]:
        """Sort key: by component; in a directory, whiteouts before the other entries."""
        *parents, name = self.path.split("/")
        return (*((1, p) for p in parents), (0 if self.kind == "whiteout" else 1, name))


def _layer_entries(store: ImageStore, old: Digest | None, new: Digest) -> list[_LayerEntry]:
    """The tar entries of the layer from snapshot ``old`` (None: empty) to ``new``, in order."""
    base = old if old is not None else store.put_tree(Tree())
    entries: dict[str, _LayerEntry] = {}
    deleted: list[str] = []
    for change in changes(store, base, new):
        path = change.path.strip("/")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in entries:
                # Every tree directory is 0o755 (cas normalizes it).
                entries[parent] = _LayerEntry(parent, "dir", DIR_MODE)
        if change.entry is None:
            deleted.append(path)
        else:
            entries[path] = _LayerEntry.of(path, change.entry)
    for path in deleted:
        if path in entries:
            continue  # replaced by another type in this layer: the new entry replaces it
        parent, _, name = path.rpartition("/")
        whiteout = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
        entries[whiteout] = _LayerEntry(whiteout, "whiteout", FILE_MODE)
    return sorted(entries.values(), key=_LayerEntry.order)


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
    _write_entries(store, _layer_entries(store, old, new), out, mtime)


def _write_entries(
    store: ImageStore, entries: list[_LayerEntry], out: ByteSink, mtime: int | None
) -> None:
    tar = _TarWriter(out, source_date_epoch() if mtime is None else mtime)
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


# --- layer blobs (cached) ------------------------------------------------------------------


def _layer_key(entries: list[_LayerEntry], compression: Compression, mtime: int) -> str:
    """Keyed by what the layer holds, not by the snapshots around it: after an edit in
    one content-defined layer, the later layers' snapshots change but their contents do
    not, and they must not be compressed again."""
    content = [
        [e.path, e.kind, e.mode, str(e.digest) if e.digest else None, e.size, e.target]
        for e in entries
    ]
    doc = {"schema": LAYER_FORMAT, "entries": content, "compression": compression, "mtime": mtime}
    return str(Digest.of_bytes(canonical_json(doc)))


def _cached_layer(store: ImageStore, key: str) -> LayerBlob | None:
    text = store.cache_get(key)
    if text is None:
        return None
    try:
        blob = LayerBlob.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError):
        return None  # a damaged entry only costs a recompression
    # gc may have taken the blob, or it may be damaged: then it is compressed again,
    # and the store replaces the damaged copy. Verified once per stat signature.
    return blob if store.has_verified(blob.digest, blob.size) else None


def layer_blob(
    store: ImageStore, old: Digest | None, new: Digest, compression: Compression = "gzip"
) -> LayerBlob:
    """The layer from snapshot ``old`` to ``new`` as a (compressed) blob in the store.

    Cached: the same snapshots, compression and mtime are compressed once."""
    return _layer_blob(store, old, new, check_compression(compression), source_date_epoch())[0]


def _layer_blob(
    store: ImageStore, old: Digest | None, new: Digest, compression: Compression, mtime: int
) -> tuple[LayerBlob, bool]:
    entries = _layer_entries(store, old, new)
    key = _layer_key(entries, compression, mtime)
    if (cached := _cached_layer(store, key)) is not None:
        return cached, True
    fd, tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix=".oci-layer-")
    try:
        with os.fdopen(fd, "wb") as f:
            compressed = _Digesting(f)
            compressor = _compressor(compression, compressed)
            tar = _Digesting(compressor)
            _write_entries(store, entries, tar, mtime)
            compressor.finish()
        digest = store.put_file(Path(tmp))
    finally:
        Path(tmp).unlink(missing_ok=True)
    if digest != compressed.digest:
        raise StoreError(f"layer blob changed while it was stored ({compressed.digest})")
    blob = LayerBlob(tar.digest, digest, compressed.size, MEDIA_TYPES[compression])
    store.cache_put(key, canonical_json(blob.to_dict()).decode())
    return blob, False


# --- documents ------------------------------------------------------------------------------


def _snapshot_pairs(image: Image) -> list[tuple[Digest | None, Digest]]:
    if not image.layers:
        # No layer recorded (scratch, no files): one layer holding the rootfs, usually
        # the empty tar; some tools refuse a manifest without layers.
        return [(None, image.rootfs)]
    return list(zip((None, *image.layers[:-1]), image.layers, strict=True))


def _config_document(image: Image, layers: list[LayerBlob], created: str) -> dict[str, Any]:
    cfg = image.config
    run: dict[str, Any] = {"WorkingDir": cfg.workdir}
    if cfg.entrypoint:
        run["Entrypoint"] = list(cfg.entrypoint)
    if cfg.cmd:
        run["Cmd"] = list(cfg.cmd)
    if cfg.env:
        run["Env"] = [f"{k}={v}" for k, v in cfg.env]
    if cfg.user:
        run["User"] = cfg.user
    if cfg.ports:
        run["ExposedPorts"] = {f"{p}/tcp": {} for p in sorted(set(cfg.ports))}
    if cfg.labels:
        run["Labels"] = dict(cfg.labels)
    arch, variant = host_platform()
    doc: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [str(b.diff_id) for b in layers]},
        "history": [{"created": created, "created_by": "graven"} for _ in layers],
    }
    if variant:
        doc["variant"] = variant
    return doc


def oci_documents(
    store: ImageStore,
    image: Image,
    compression: Compression = "gzip",
    *,
    progress: Progress | None = None,
) -> OciImage:
    """The OCI manifest, config and layer blobs of ``image`` (layers written to the store,
    cached). ``progress`` is called once per layer."""
    compression = check_compression(compression)
    mtime = source_date_epoch()
    pairs = _snapshot_pairs(image)
    layers: list[LayerBlob] = []
    for index, (old, new) in enumerate(pairs):
        blob, cached = _layer_blob(store, old, new, compression, mtime)
        layers.append(blob)
        if progress is not None:
            progress(LayerProgress(index, len(pairs), blob, cached))
    config = canonical_json(_config_document(image, layers, _rfc3339(mtime)))
    config_digest = Digest.of_bytes(config)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor(OCI_CONFIG, config_digest, len(config)).to_dict(),
            "layers": [b.descriptor().to_dict() for b in layers],
            "annotations": {GRAVEN_IMAGE: str(image.digest)},
        }
    )
    return OciImage(manifest, Digest.of_bytes(manifest), config, config_digest, tuple(layers))


# --- OCI image layout -------------------------------------------------------------------------


def _layout_marker() -> bytes:
    return canonical_json({"imageLayoutVersion": LAYOUT_VERSION})


def _mkdir(path: Path) -> None:
    """Create a directory with mode 0o755 whatever the umask; leave an existing one be."""
    try:
        path.mkdir()
    except FileExistsError:
        return
    path.chmod(_DIR_MODE)


def _prepare_layout(dest: Path) -> None:
    """Make ``dest`` an OCI layout, or check that it is one; UsageError when it is not."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory", hint="Choose a directory.")
    marker = dest / OCI_LAYOUT_FILE
    if dest.is_dir() and not marker.exists():
        if any(dest.iterdir()):
            raise UsageError(
                f"{dest} is not empty and is not an OCI image layout (no {OCI_LAYOUT_FILE})",
                hint="Export into a new or empty directory, or into an existing layout.",
            )
    elif marker.exists():
        try:
            version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if version != LAYOUT_VERSION:
            raise UsageError(
                f"{marker}: unsupported or unreadable OCI layout (expected imageLayoutVersion "
                f"{LAYOUT_VERSION!r})",
                hint="Export into a new directory.",
            )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _mkdir(dest)
        _mkdir(dest / "blobs")
        _mkdir(dest / "blobs" / "sha256")
    except OSError as e:
        raise StoreError(f"cannot create the OCI layout at {dest}: {e.strerror or e}") from e


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize writers of one layout (its index.json is read-modify-write)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _file_matches(path: Path, digest: Digest, size: int) -> bool:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size != size:
            return False
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)
    except OSError:
        return False
    return "sha256:" + h.hexdigest() == digest


def _write_blob_from_store(store: ImageStore, digest: Digest, size: int, final: Path) -> None:
    with PendingFile(final.parent) as pending:
        _copy_verified(store, digest, size, pending.file)
        pending.commit(final, mode=_FILE_MODE)


def _read_index(dest: Path) -> dict[str, Any]:
    path = dest / INDEX_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    except ValueError as e:
        raise UsageError(
            f"{path} is not valid JSON: {e}", hint="Export into a new directory."
        ) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise UsageError(f"{path}: an OCI index needs a 'manifests' list")
    for i, m in enumerate(doc["manifests"]):
        try:
            Descriptor.from_dict(m, f"{path}: manifests[{i}]")
        except InvalidOCI as e:
            raise UsageError(str(e), hint="Fix or remove that entry, or use a new layout.") from e
    return doc


def _ref_of(entry: dict[str, Any]) -> str:
    annotations = entry.get("annotations") or {}
    return str(annotations.get(REF_NAME, ""))


def _index_with(existing: dict[str, Any], descriptor: Descriptor, ref_name: str) -> bytes:
    """``existing`` with ``ref_name`` pointing at ``descriptor``; other entries are kept."""
    manifests = [m for m in existing["manifests"] if _ref_of(m) != ref_name]
    manifests.append(descriptor.to_dict())
    manifests.sort(key=lambda m: (_ref_of(m), str(m["digest"])))
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    if isinstance(existing.get("annotations"), dict):
        doc["annotations"] = existing["annotations"]
    return canonical_json(doc)


def export_layout(
    store: ImageStore,
    image: Image,
    dest: Path,
    ref_name: str,
    compression: Compression = "gzip",
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``image`` into the OCI image layout ``dest`` under ``ref_name``.

    ``dest`` is created, or must already be a layout; another image under the same ref
    is replaced, other refs are kept. Each file is written atomically (temp, fsync,
    rename); index.json last, so the ref appears only once its blobs are complete.
    Blobs already in the layout are verified and reused."""
    check_ref_name(ref_name)
    oci = oci_documents(store, image, compression, progress=progress)
    dest = Path(dest)
    _prepare_layout(dest)
    blobs = dest / "blobs" / "sha256"
    written = reused = 0
    try:
        with _locked(dest):
            for layer in _unique(oci.layers):
                final = blobs / layer.digest.hex
                if _file_matches(final, layer.digest, layer.size):
                    reused += 1
                    continue
                _write_blob_from_store(store, layer.digest, layer.size, final)
                written += 1
            for data, digest in (
                (oci.config, oci.config_digest),
                (oci.manifest, oci.manifest_digest),
            ):
                final = blobs / digest.hex
                if _file_matches(final, digest, len(data)):
                    reused += 1
                    continue
                write_atomic(final, data, mode=_FILE_MODE)
                written += 1
            marker = dest / OCI_LAYOUT_FILE
            if not marker.exists():
                write_atomic(marker, _layout_marker(), mode=_FILE_MODE)
            index = _index_with(_read_index(dest), oci.manifest_descriptor(ref_name), ref_name)
            write_atomic(dest / INDEX_FILE, index, mode=_FILE_MODE)
    except OSError as e:
        raise StoreError(f"cannot write the OCI layout at {dest}: {e.strerror or e}") from e
    return ExportResult(dest, ref_name, image.digest, compression, oci, written, reused)


def _unique(layers: tuple[LayerBlob, ...]) -> list[LayerBlob]:
    """Layers without repeats (two empty layers are one blob)."""
    return list({layer.digest: layer for layer in layers}.values())


def export_archive(
    store: ImageStore,
    image: Image,
    dest: Path,
    ref_name: str,
    compression: Compression = "gzip",
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``image`` as an OCI archive (``oci-archive:``): a normalized tar of a layout
    holding just this image under ``ref_name``. Replaces ``dest`` atomically."""
    check_ref_name(ref_name)
    oci = oci_documents(store, image, compression, progress=progress)
    dest = Path(dest)
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory", hint="Name the archive file, e.g. image.tar.")
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [oci.manifest_descriptor(ref_name).to_dict()],
        }
    )
    documents = {oci.config_digest: oci.config, oci.manifest_digest: oci.manifest}
    stored = {layer.digest: layer for layer in oci.layers if layer.digest not in documents}
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with PendingFile(dest.parent, prefix=f".{dest.name}.", suffix=".tmp") as pending:
            tar = _TarWriter(pending.file, source_date_epoch())
            tar.directory("blobs")
            tar.directory("blobs/sha256")
            for digest in sorted({*documents, *stored}):
                name = f"blobs/sha256/{digest.hex}"
                if digest in documents:
                    tar.file_bytes(name, documents[digest])
                else:
                    tar.file_blob(name, store, digest, stored[digest].size)
            tar.file_bytes(INDEX_FILE, index)
            tar.file_bytes(OCI_LAYOUT_FILE, _layout_marker())
            tar.close()
            pending.commit(dest, mode=_FILE_MODE)
    except OSError as e:
        raise StoreError(f"cannot write the OCI archive {dest}: {e.strerror or e}") from e
    blob_count = len(documents) + len(stored)
    return ExportResult(dest, ref_name, image.digest, compression, oci, blob_count, 0)
