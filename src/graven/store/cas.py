"""The content store: files by content, directories as Merkle trees, images and names.

Layout under ``root``::

    blobs/sha256/ab/cdef...   immutable content named by its sha256 (files, trees, images)
    refs/<name>               the image digest a name points at
    refs/<name>.history       every digest the name pointed at, one a line, newest last
    cache/sha256/ab/cdef...   build step cache: sha256(key) -> small JSON value
    verified/ab/cdef...       stat of a large blob when it last hashed right (see below)
    quarantine/<run>/         what ``check(repair=True)`` moved out of the way
    tmp/                      temp files, renamed into place once complete and fsynced
    locks/                    flock files serializing read-modify-write updates

Every write goes to a temp file in ``tmp/`` (same filesystem), is fsynced and renamed
into place, so a reader sees an object whole or not at all. Two writers of the same
content race harmlessly: both renames leave identical bytes behind.

A write of a blob that is already present is skipped only once the present one is
proven right: a small blob is compared with the bytes being written, a large one is
hashed. So a damaged blob (bit rot, a stray write) is replaced by the next build or
pull that writes it, by temp file, fsync and rename. Hashing a large blob on every
skip would double the cost of re-ingesting a build context, so a blob that hashed
right is remembered by its stat signature (inode, size, mtime_ns, ctime_ns), in
memory and, for large blobs, in ``verified/``: an untouched blob is not hashed again,
while any write to it (even one that restores its mtime) changes its ctime and gets
it hashed. The ctime ticks coarsely, so a signature is remembered only once the
blob is ``SETTLED_NS`` old: a write in the same tick cannot hide behind it. Damage
that bypasses the kernel (a failing disk) keeps the signature; ``fsck`` hashes
everything, always, and ``check(repair=True)`` quarantines what is damaged so the
next build or pull writes it afresh.

A *tree* is a canonical-JSON blob listing one directory's entries, sorted by name; a
directory entry holds the digest of its subtree, so one digest names a whole file
tree and identical files (or subtrees) are stored once. Only what defines content
enters a tree: names, types, normalized modes (0o644/0o755 by the owner exec bit for
files, 0o755 for directories), sizes and symlink targets. Owners, mtimes and the umask
never do, which is what makes builds reproducible.

The blob layout is an OCI layout's ``blobs/sha256`` plus a two-hex fan-out, so the
image engine can export and import blobs without re-hashing; trees are the file-level
view it will turn into reproducible tar layers.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from graven.errors import NotFoundError, StoreError, UsageError
from graven.model import Digest, Image, ImageConfig, canonical_json, is_valid_name

CHUNK_SIZE = 1 << 20
TREE_SCHEMA = "graven.tree/v1"
IMAGE_SCHEMA = "graven.image/v1"

EntryType = Literal["file", "dir", "symlink"]

FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755
SYMLINK_MODE = 0o777
_MODES: dict[str, frozenset[int]] = {
    "file": frozenset({FILE_MODE, EXEC_MODE}),
    "dir": frozenset({DIR_MODE}),
    "symlink": frozenset({SYMLINK_MODE}),
}
_ENTRY_KEYS: dict[str, frozenset[str]] = {
    "file": frozenset({"name", "type", "mode", "size", "digest"}),
    "dir": frozenset({"name", "type", "mode", "size", "digest"}),
    "symlink": frozenset({"name", "type", "mode", "size", "target"}),
}
# Documents (trees, images) are parsed only below this size: a guard against reading
# a large file blob when looking for images, and against hostile input.
_MAX_DOCUMENT = 64 << 20
_HEX = frozenset("0123456789abcdef")
_TREE_MEMO_SIZE = 4096
_READ_ONLY_FILE = {FILE_MODE: 0o444, EXEC_MODE: 0o555}
_READ_ONLY_DIR = 0o555
# ingest(ignore=...): (absolute path, is a real directory) -> leave it out?
_Ignore = Callable[[Path, bool], bool]
# (inode, size, mtime_ns, ctime_ns): any write to a file changes its ctime.
_Signature = tuple[int, int, int, int]
_BlobState = Literal["sound", "absent", "damaged"]
_VERIFIED_MEMO_SIZE = 1 << 16
# A blob changed less than this long ago is never trusted by its stat signature.
SETTLED_NS = 2 * 10**9
REPAIR_HINT = "Run 'graven store fsck --repair', then rebuild or pull the affected images."


class InvalidDocument(ValueError):
    """An untrusted tree or image document is malformed (the message says how)."""


class TreePathError(StoreError):
    """A path inside a tree cannot be used as asked (a parent is a file, say).

    ``path`` is the offending path inside the tree, e.g. ``/app/config``.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a tree entry name, or None when it can."""
    if not isinstance(name, str) or not name:
        return "an entry name must be a non-empty string"
    if name in (".", "..") or "/" in name or "\0" in name:
        return f"invalid entry name {name!r}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"entry name {name!r} is not valid UTF-8"
    return None


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a tree: a file, a directory (subtree) or a symlink.

    ``digest`` is the blob digest of a file or the tree digest of a directory (None
    for a symlink); ``size`` is a file's length, a directory's total size beneath it,
    or a symlink target's length in bytes.
    """

    name: str
    type: EntryType
    mode: int
    size: int
    digest: Digest | None = None
    target: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "mode": self.mode,
            "size": self.size,
        }
        if self.type == "symlink":
            out["target"] = self.target
        else:
            out["digest"] = str(self.digest)
        return out

    @classmethod
    def from_dict(cls, data: object) -> TreeEntry:
        """Validate one entry of an untrusted tree document; ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise InvalidDocument(f"an entry must be an object, got {type(data).__name__}")
        kind = data.get("type")
        if kind not in _MODES:
            raise InvalidDocument(f"entry type must be file, dir or symlink, got {kind!r}")
        if set(data) != _ENTRY_KEYS[kind]:
            raise InvalidDocument(
                f"a {kind} entry has keys {sorted(_ENTRY_KEYS[kind])}, got {sorted(data)}"
            )
        name = data["name"]
        if problem := _name_problem(name):
            raise InvalidDocument(problem)
        mode, size = data["mode"], data["size"]
        if type(mode) is not int or mode not in _MODES[kind]:
            raise InvalidDocument(f"{name!r}: mode {mode!r} is not a normalized {kind} mode")
        if type(size) is not int or size < 0:
            raise InvalidDocument(f"{name!r}: size must be a non-negative integer, got {size!r}")
        if kind == "symlink":
            target = data["target"]
            if not isinstance(target, str) or not target or "\0" in target:
                raise InvalidDocument(f"{name!r}: symlink target must be a non-empty string")
            if size != len(target.encode("utf-8")):
                raise InvalidDocument(f"{name!r}: symlink size does not match its target")
            return cls(name, "symlink", mode, size, target=target)
        digest = data["digest"]
        if not isinstance(digest, str):
            raise InvalidDocument(f"{name!r}: digest must be a string")
        return cls(name, cast(EntryType, kind), mode, size, digest=Digest(digest))


@dataclass(frozen=True)
class Tree:
    """One directory level: entries sorted by name, names unique. Build with ``of``."""

    entries: tuple[TreeEntry, ...] = ()

    @classmethod
    def of(cls, entries: Iterable[TreeEntry]) -> Tree:
        ordered = tuple(sorted(entries, key=lambda e: e.name))
        for a, b in itertools.pairwise(ordered):
            if a.name == b.name:
                raise InvalidDocument(f"duplicate entry name {a.name!r}")
        return cls(ordered)

    @property
    def size(self) -> int:
        """Total size of everything beneath this directory."""
        return sum(e.size for e in self.entries)

    def get(self, name: str) -> TreeEntry | None:
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None

    def with_entry(self, entry: TreeEntry) -> Tree:
        """This tree with ``entry`` added, or replacing the entry of the same name."""
        return Tree.of([e for e in self.entries if e.name != entry.name] + [entry])

    def document(self) -> dict[str, Any]:
        """The canonical document the tree digest is computed over."""
        return {"schema": TREE_SCHEMA, "entries": [e.to_dict() for e in self.entries]}


EMPTY_TREE = Digest.of_bytes(canonical_json(Tree().document()))


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        # Hostile nesting must surface as invalid input, not as an internal error.
        raise InvalidDocument("document is nested too deeply") from None


def parse_tree(data: bytes) -> Tree:
    """Validate an untrusted tree document (exactly its canonical form); ValueError if not."""
    if len(data) > _MAX_DOCUMENT:
        raise InvalidDocument("tree document is too large")
    doc = _load_json(data)
    if not isinstance(doc, dict) or set(doc) != {"schema", "entries"}:
        raise InvalidDocument("a tree document has exactly the keys 'schema' and 'entries'")
    if doc["schema"] != TREE_SCHEMA:
        raise InvalidDocument(f"schema must be {TREE_SCHEMA!r}, got {doc['schema']!r}")
    if not isinstance(doc["entries"], list):
        raise InvalidDocument("'entries' must be a list")
    entries = [TreeEntry.from_dict(item) for item in doc["entries"]]
    tree = Tree.of(entries)
    if canonical_json(tree.document()) != data:
        # One tree, one encoding: otherwise equal trees could have different digests.
        raise InvalidDocument("tree document is not in canonical form (sorted, compact JSON)")
    return tree


def parse_image(digest: Digest, data: bytes) -> Image:
    """Validate an untrusted image document (exactly its canonical form); ValueError if not."""
    if len(data) > _MAX_DOCUMENT:
        raise InvalidDocument("image document is too large")
    doc = _load_json(data)
    if not isinstance(doc, dict) or set(doc) != {"schema", "rootfs", "layers", "config"}:
        raise InvalidDocument(
            "an image document has exactly the keys 'schema', 'rootfs', 'layers', 'config'"
        )
    if doc["schema"] != IMAGE_SCHEMA:
        raise InvalidDocument(f"schema must be {IMAGE_SCHEMA!r}, got {doc['schema']!r}")
    config = doc["config"]
    keys = {"entrypoint", "env", "workdir", "cmd", "user", "ports", "labels"}
    if not isinstance(config, dict) or set(config) != keys:
        raise InvalidDocument(f"'config' has exactly the keys {sorted(keys)}")
    workdir = config["workdir"]
    for key in ("entrypoint", "cmd"):
        if not isinstance(config[key], list) or not all(isinstance(a, str) for a in config[key]):
            raise InvalidDocument(f"'config.{key}' must be a list of strings")
    for key in ("env", "labels"):
        pairs = config[key]
        if not isinstance(pairs, list) or not all(
            isinstance(kv, list) and len(kv) == 2 and all(isinstance(s, str) for s in kv)
            for kv in pairs
        ):
            raise InvalidDocument(f"'config.{key}' must be a list of [name, value] string pairs")
    if not isinstance(config["user"], str):
        raise InvalidDocument("'config.user' must be a string")
    ports = config["ports"]
    if not isinstance(ports, list) or not all(type(p) is int and 1 <= p <= 65535 for p in ports):
        raise InvalidDocument("'config.ports' must be a list of port numbers")
    if not isinstance(workdir, str) or not workdir.startswith("/"):
        raise InvalidDocument("'config.workdir' must be an absolute path")
    if not isinstance(doc["rootfs"], str):
        raise InvalidDocument("'rootfs' must be a digest string")
    layers = doc["layers"]
    if not isinstance(layers, list) or not all(isinstance(d, str) for d in layers):
        raise InvalidDocument("'layers' must be a list of digest strings")
    if layers and layers[-1] != doc["rootfs"]:
        raise InvalidDocument("the last of 'layers' must be 'rootfs'")
    image = Image(
        digest=digest,
        rootfs=Digest(doc["rootfs"]),
        config=ImageConfig.from_dict(config),
        layers=tuple(Digest(d) for d in layers),
    )
    if canonical_json(image.document()) != data:
        raise InvalidDocument("image document is not in canonical form (sorted, compact JSON)")
    return image


def _tree_parts(path: str) -> list[str]:
    """``/a/b/`` -> ``["a", "b"]``; rejects ``..`` and invalid names."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if problem := _name_problem(part):
            raise TreePathError(path, f"{path}: {problem}")
    return parts


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    import ctypes  # only when something is written: reads stay lean

    try:
        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6", use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    return fn


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_blob(path: Path, digest: Digest, data: bytes | None) -> _Signature | None:
    """The signature of the blob at ``path`` when its content is ``data`` (or, without
    ``data``, hashes to ``digest``); None when it is not, or cannot be read. The
    signature is taken from the file that was read, not from a path looked up again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            if data is not None:
                same = f.read(len(data) + 1) == data
            else:
                h = hashlib.sha256()
                while chunk := f.read(CHUNK_SIZE):
                    h.update(chunk)
                same = "sha256:" + h.hexdigest() == digest
        except OSError:
            return None
    return _signature(st) if same else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class ContentStore:
    """File-level content-addressed store with Merkle directories, images and names.

    Safe for concurrent use by several processes: objects are immutable and written by
    atomic rename; name updates are serialized with a file lock.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._refs = self.root / "refs"
        self._cache = self.root / "cache" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self._locks = self.root / "locks"
        self._verified_dir = self.root / "verified"
        try:
            for d in (self._blobs, self._refs, self._cache, self.tmp_dir, self._locks):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot open the content store at {self.root}: {e}") from e
        # Trees are immutable by digest, so parsed ones can be remembered freely.
        self._trees: dict[Digest, Tree] = {}
        # Blobs proven right, by stat signature: a skipped write need not read them again.
        self._verified: dict[Digest, _Signature] = {}
        # Blobs are written without an fsync each; one syncfs makes them durable before
        # anything durable (a ref, a cache entry) may point at them.
        self._unsynced = False

    # --- low-level writes -------------------------------------------------------------

    def _write_atomic(
        self,
        final: Path,
        data: bytes,
        *,
        mode: int = 0o644,
        tmp_dir: Path | None = None,
        durable: bool = True,
    ) -> None:
        try:
            if durable:
                self.sync()
            self._write_atomic_unchecked(final, data, mode, tmp_dir or self.tmp_dir, durable)
        except OSError as e:
            raise StoreError(f"cannot write {final}: {e.strerror or e}") from e

    def sync(self) -> None:
        """Make every blob written so far durable (one syncfs, not one fsync per blob)."""
        if not self._unsynced:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs = _libc_syncfs()
            if syncfs is None or syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)
        self._unsynced = False

    def _write_atomic_unchecked(
        self, final: Path, data: bytes, mode: int, tmp_dir: Path, durable: bool = True
    ) -> None:
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".w-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            Path(tmp).chmod(mode)
            final.parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).replace(final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if durable:
            _fsync_dir(final.parent)
        else:
            self._unsynced = True

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with (self._locks / f"{name}.lock").open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # --- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        """Where the blob lives (whether or not it is present)."""
        hex_ = Digest(digest).hex  # re-validated: the path must never leave blobs/
        return self._blobs / hex_[:2] / hex_[2:]

    def has(self, digest: Digest) -> bool:
        return self.blob_path(digest).is_file()

    def _blob_state(self, digest: Digest, size: int, data: bytes | None = None) -> _BlobState:
        """Whether the blob is present and right (``sound``), absent, or ``damaged``
        (wrong length, wrong content, not a regular file).

        ``data``, when given, is the blob's content: compared byte for byte instead of
        hashed. A signature remembered from an earlier check spares the read."""
        path = self.blob_path(digest)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return "absent"
        except OSError:
            return "damaged"
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return "damaged"  # a blob cut short by a power loss, say
        signature = _signature(st)
        if self._verified.get(digest) == signature:
            return "sound"
        large = data is None
        if large and self._recorded(digest) == signature:
            self._remember_sound(digest, signature)
            return "sound"
        checked = _check_blob(path, digest, data)
        if checked is None:
            return "damaged"
        self._remember_sound(digest, checked, record=large)
        return "sound"

    def _remember_sound(
        self, digest: Digest, signature: _Signature, *, record: bool = False
    ) -> None:
        if time.time_ns() - signature[3] < SETTLED_NS:
            # ctime ticks coarsely: a write just after this one could keep the same
            # signature. Trusted only once settled (like git's racy index entries).
            return
        if len(self._verified) >= _VERIFIED_MEMO_SIZE:
            self._verified.clear()
        self._verified[digest] = signature
        if record:
            # Not fsynced: a lost or torn record only costs one more hash.
            with contextlib.suppress(OSError):
                path = self._verified_path(digest)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=".w-")
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(" ".join(str(n) for n in signature) + "\n")
                    Path(tmp).replace(path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise

    def _verified_path(self, digest: Digest) -> Path:
        hex_ = Digest(digest).hex
        return self._verified_dir / hex_[:2] / hex_[2:]

    def _recorded(self, digest: Digest) -> _Signature | None:
        try:
            fields = self._verified_path(digest).read_text().split()
            ino, size, mtime, ctime = (int(n) for n in fields)
        except (OSError, ValueError):
            return None
        return (ino, size, mtime, ctime)

    def forget_verified(self, digest: Digest) -> None:
        """Drop what is remembered about ``digest`` having hashed right (when it goes)."""
        self._verified.pop(digest, None)
        self._trees.pop(digest, None)
        with contextlib.suppress(OSError):
            self._verified_path(digest).unlink()

    def has_verified(self, digest: Digest, size: int) -> bool:
        """True when the blob is present, ``size`` bytes long and hashes to ``digest``.

        Remembered by stat signature (see the module docstring), so asking again about
        an untouched blob costs a stat, not a read."""
        return self._blob_state(digest, size) == "sound"

    def put_bytes(self, data: bytes) -> Digest:
        """Store ``data``; return its digest. A no-op when the blob is present and right;
        a damaged one is replaced (durably)."""
        digest = Digest.of_bytes(data)
        state = self._blob_state(digest, len(data), data)
        if state != "sound":
            path = self.blob_path(digest)
            self._write_atomic(path, data, mode=0o444, durable=state == "damaged")
        return digest

    def put_file(self, path: Path) -> Digest:
        """Store a regular file (symlinks are not followed); return its digest.

        The file is hashed first and copied only when the store lacks the blob.
        """
        return self._put_regular(Path(path))[0]

    def _put_regular(self, path: Path) -> tuple[Digest, int]:
        try:
            # O_NONBLOCK: a fifo swapped in after the caller's lstat must not hang us.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{path} is not a regular file")
            try:
                return self._put_stream(f)
            except OSError as e:
                raise StoreError(f"cannot store {path}: {e.strerror or e}") from e

    def _put_stream(self, f: BinaryIO) -> tuple[Digest, int]:
        first = f.read(CHUNK_SIZE)
        if len(first) < CHUNK_SIZE:
            return self.put_bytes(first), len(first)
        h = hashlib.sha256(first)
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
        digest = Digest("sha256:" + h.hexdigest())
        state = self._blob_state(digest, f.tell())
        if state == "sound":
            return digest, f.tell()
        # Copy, hashing again: the file may change between the passes, and the store
        # must name what it actually holds.
        f.seek(0)
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=".w-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := f.read(CHUNK_SIZE):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                if state == "damaged":
                    # Replacing a damaged blob: durable before it takes the old one's place.
                    out.flush()
                    os.fsync(out.fileno())
            Path(tmp).chmod(0o444)
            digest = Digest("sha256:" + h.hexdigest())
            final = self.blob_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).replace(final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if state == "damaged":
            _fsync_dir(final.parent)
        # Not remembered as verified: it has just changed, so its ctime has not settled.
        self._unsynced = True
        return digest, size

    def open_blob(self, digest: Digest) -> BinaryIO:
        """Open a blob for reading; StoreError when it is missing."""
        try:
            return self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise StoreError(
                f"blob {digest} is missing from the store at {self.root}",
                hint=REPAIR_HINT,
            ) from None

    def read_blob(self, digest: Digest) -> bytes:
        """A small blob's bytes, verified against its digest; StoreError if corrupt."""
        with self.open_blob(digest) as f:
            data = f.read()
        if Digest.of_bytes(data) != digest:
            raise StoreError(
                f"blob {digest} is corrupt: its content does not match its digest",
                hint=REPAIR_HINT,
            )
        return data

    def verify_blob(self, digest: Digest) -> bool:
        """True when the blob is present and its content hashes to its digest."""
        h = hashlib.sha256()
        try:
            with self.blob_path(digest).open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return "sha256:" + h.hexdigest() == digest

    # --- trees ---------------------------------------------------------------------------

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

    def _dir_entry(self, name: str, tree: Tree) -> TreeEntry:
        return TreeEntry(name, "dir", DIR_MODE, tree.size, digest=self.put_tree(tree))

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
            if problem := _name_problem(name):
                raise StoreError(
                    f"{directory / name}: {problem}", hint="Rename it to a UTF-8 name."
                )
            path = directory / name
            if path in skip or (ignore is not None and ignore(path, is_dir)):
                continue
            entries.append(self._ingest(path, name, skip, ignore))
        tree = Tree.of(entries)
        return tree, self.put_tree(tree)

    # --- tree algebra (no materialization) ------------------------------------------------

    def lookup(self, root: Digest, path: str) -> TreeEntry | None:
        """The entry at ``path`` (``/a/b``) in tree ``root``; symlinks are not followed.

        ``/`` gives the root itself as a directory entry named ``""``.
        """
        tree = self.read_tree(root)
        parts = _tree_parts(path)
        if not parts:
            return TreeEntry("", "dir", DIR_MODE, tree.size, digest=root)
        for i, part in enumerate(parts):
            entry = tree.get(part)
            if entry is None or i == len(parts) - 1:
                return entry
            if entry.type != "dir" or entry.digest is None:
                return None
            tree = self.read_tree(entry.digest)
        return None  # unreachable: the loop returns on its last part

    def merge_trees(self, base: Digest, overlay: Digest) -> Digest:
        """``overlay`` laid over ``base``: directories merge, anything else is replaced."""
        if base == overlay:
            return base
        merged = self.read_tree(base)
        for entry in self.read_tree(overlay).entries:
            existing = merged.get(entry.name)
            if (
                entry.type == "dir"
                and existing is not None
                and existing.type == "dir"
                and existing.digest is not None
                and entry.digest is not None
            ):
                sub = self.merge_trees(existing.digest, entry.digest)
                merged = merged.with_entry(self._dir_entry(entry.name, self.read_tree(sub)))
            else:
                merged = merged.with_entry(entry)
        return self.put_tree(merged)

    def place(self, root: Digest, path: str, entry: TreeEntry) -> Digest:
        """Tree ``root`` with ``entry`` put at ``path``; return the new root digest.

        Missing parent directories are created; a directory placed on a directory is
        merged into it (like ``cp -r`` or Docker ``COPY``), anything else replaces what
        was there. Work is proportional to the depth of ``path``, not to the tree size.
        TreePathError when a parent on the way is not a directory.
        """
        parts = _tree_parts(path)
        if not parts:
            if entry.type != "dir" or entry.digest is None:
                raise TreePathError("/", "only a directory can be placed at the image root /")
            return self.merge_trees(root, entry.digest)
        return self._place(root, parts, entry, "")

    def _place(self, root: Digest, parts: list[str], entry: TreeEntry, above: str) -> Digest:
        tree = self.read_tree(root)
        name, rest = parts[0], parts[1:]
        here = f"{above}/{name}"
        existing = tree.get(name)
        if rest:
            if existing is None:
                sub = self.put_tree(Tree())
            elif existing.type == "dir" and existing.digest is not None:
                sub = existing.digest
            else:
                raise TreePathError(here, f"{here} is a {existing.type}, not a directory")
            new_sub = self._place(sub, rest, entry, here)
            placed = TreeEntry(name, "dir", DIR_MODE, self.read_tree(new_sub).size, new_sub)
        elif (
            entry.type == "dir"
            and existing is not None
            and existing.type == "dir"
            and existing.digest is not None
            and entry.digest is not None
        ):
            merged = self.merge_trees(existing.digest, entry.digest)
            placed = TreeEntry(name, "dir", DIR_MODE, self.read_tree(merged).size, merged)
        else:
            placed = replace(entry, name=name)
        return self.put_tree(tree.with_entry(placed))

    # --- checkouts -----------------------------------------------------------------------

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

    # --- images and names ----------------------------------------------------------------

    def put_image(
        self, rootfs: Digest, config: ImageConfig, layers: tuple[Digest, ...] | None = None
    ) -> Image:
        """Store an image document for tree ``rootfs``; its digest is the blob's digest.

        ``layers`` are the snapshot trees layer by layer (default: one layer, ``rootfs``)."""
        layers = (rootfs,) if layers is None else layers
        if layers and layers[-1] != rootfs:
            raise StoreError("an image's last layer snapshot must be its rootfs")
        for tree in {rootfs, *layers}:
            self.read_tree(tree)  # an image must never point at a missing or bad tree
        # Image.document() leaves the digest out, so a placeholder is fine here.
        draft = Image(digest=rootfs, rootfs=rootfs, config=config, layers=layers)
        digest = self.put_bytes(canonical_json(draft.document()))
        return Image(digest=digest, rootfs=rootfs, config=config, layers=layers)

    def get_image(self, digest: Digest) -> Image:
        """The image named ``digest``; StoreError when missing, corrupt or not an image."""
        data = self.read_blob(digest)
        try:
            return parse_image(digest, data)
        except ValueError as e:
            raise StoreError(f"blob {digest} is not a valid image: {e}") from None

    def _ref_path(self, name: str) -> Path:
        if not is_valid_name(name):
            raise UsageError(
                f"invalid image name {name!r}: use lowercase letters, digits and '-', "
                "starting with a letter"
            )
        return self._refs / name

    def tag(self, name: str, digest: Digest) -> None:
        """Point ``name`` at image ``digest`` (atomically) and record it in the history."""
        ref = self._ref_path(name)
        self.get_image(digest)
        with self._lock("refs"):
            history = self.history(name)
            if not history or history[-1] != digest:
                # History first: every digest a name ever pointed at is in its history,
                # even if we crash before the ref moves (gc keeps what history lists).
                text = "".join(f"{d}\n" for d in [*history, digest])
                self._write_atomic(ref.with_name(name + ".history"), text.encode())
            if self._read_ref(name) != digest:
                self._write_atomic(ref, f"{digest}\n".encode())

    def history(self, name: str) -> list[Digest]:
        """Every digest ``name`` pointed at, oldest first; empty for an unknown name."""
        path = self._ref_path(name).with_name(name + ".history")
        try:
            lines = path.read_text().split()
        except FileNotFoundError:
            return []
        try:
            return [Digest(line) for line in lines]
        except ValueError as e:
            raise StoreError(f"{path} is corrupt: {e}") from None

    def _read_ref(self, name: str) -> Digest | None:
        path = self._ref_path(name)
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return Digest(text)
        except ValueError:
            raise StoreError(f"ref {path} is corrupt: {text[:80]!r} is not a digest") from None

    def _names(self) -> list[str]:
        return sorted(p.name for p in self._refs.iterdir() if is_valid_name(p.name) and p.is_file())

    def list_images(self) -> list[tuple[str, Image]]:
        """Every named image, sorted by name. Broken refs are left to ``fsck``."""
        out: list[tuple[str, Image]] = []
        for name in self._names():
            digest = self._read_ref(name)
            if digest is None:
                continue
            try:
                out.append((name, replace(self.get_image(digest), name=name)))
            except StoreError:
                continue
        return out

    def resolve(self, ref: str) -> Image:
        """Find an image by ``name``, ``name@sha256:...``, full digest or short digest.

        A short digest is at least 6 hex digits (``sha256:`` optional) and must match
        exactly one image. NotFoundError (listing the known names) otherwise.
        """
        if "@" in ref:
            name, _, digest_text = ref.partition("@")
            digest = self._digest_or_none(digest_text)
            if digest is None:
                raise UsageError(f"invalid image reference {ref!r}: expected NAME@sha256:<64 hex>")
            if digest not in self.history(name):
                raise self._not_found(ref, f"image {name!r} never had version {digest.short}")
            return replace(self._image_or_not_found(ref, digest), name=name)
        if (digest := self._digest_or_none(ref)) is not None:
            return self._image_or_not_found(ref, digest)
        if is_valid_name(ref) and (digest := self._read_ref(ref)) is not None:
            return replace(self.get_image(digest), name=ref)
        prefix = ref.removeprefix("sha256:")
        if len(prefix) >= 6 and set(prefix) <= _HEX:
            matches = self._images_with_prefix(prefix)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UsageError(
                    f"short digest {ref!r} is ambiguous: it matches "
                    + ", ".join(m.digest.short for m in matches),
                    hint="Give more digits.",
                )
        raise self._not_found(ref, f"no image {ref!r}")

    @staticmethod
    def _digest_or_none(text: str) -> Digest | None:
        try:
            return Digest(text)
        except ValueError:
            return None

    def _image_or_not_found(self, ref: str, digest: Digest) -> Image:
        if not self.has(digest):
            raise self._not_found(ref, f"no image {digest}")
        try:
            return parse_image(digest, self.read_blob(digest))
        except ValueError:
            raise self._not_found(ref, f"{digest} is in the store but is not an image") from None

    def _images_with_prefix(self, prefix: str) -> list[Image]:
        fan = self._blobs / prefix[:2]
        if not fan.is_dir():
            return []
        found: list[Image] = []
        for path in sorted(fan.iterdir()):
            if not path.name.startswith(prefix[2:]) or path.stat().st_size > _MAX_DOCUMENT:
                continue
            digest = Digest("sha256:" + prefix[:2] + path.name)
            with contextlib.suppress(ValueError, StoreError):
                found.append(parse_image(digest, self.read_blob(digest)))
        return found

    def _not_found(self, ref: str, message: str) -> NotFoundError:
        names = self._names()
        known = f"known images: {', '.join(names)}" if names else "the store has no images yet"
        return NotFoundError(
            f"{message} ({known})",
            hint="Run 'graven images' to list images, or 'graven build' to bake one.",
        )

    # --- step cache ----------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path:
        # Hashing the key keeps any key (however odd) inside cache/ at a fixed depth.
        hex_ = hashlib.sha256(key.encode()).hexdigest()
        return self._cache / hex_[:2] / hex_[2:]

    def cache_get(self, key: str) -> str | None:
        """The value cached under ``key``, or None."""
        try:
            return self._cache_path(key).read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def cache_put(self, key: str, value: str) -> None:
        """Cache ``value`` (a small string, typically JSON) under ``key``, atomically."""
        self._write_atomic(self._cache_path(key), value.encode("utf-8"))

    # --- integrity -----------------------------------------------------------------------

    def fsck(self) -> list[str]:
        """Problems found in the store: corrupt blobs, dangling references. Empty if sound."""
        return list(self.check().problems)

    def check(self, *, repair: bool = False) -> FsckReport:
        """Hash every blob and follow every tree and image: what is damaged, and which
        names' images hold it. Never uses remembered verifications.

        With ``repair``, every damaged object (corrupt blobs, stray files, and the
        trees and images naming a missing or damaged object, up to the images) is
        moved to ``quarantine/<run>/``, and every name pointing at such an image is
        moved there too (its history stays). Nothing is deleted. The next build or pull
        of those images then writes them afresh: no cache or no-op check can answer
        from a tree that is gone, and a name that is gone is no longer "unchanged".
        Repair while nothing else writes the store: a blob healed meanwhile may be
        moved as well (the next build or pull writes it again)."""
        problems: list[str] = []
        present: set[Digest] = set()
        corrupt: set[Digest] = set()
        strays: list[Path] = []
        for fan in sorted(self._blobs.iterdir()):
            for path in sorted(fan.iterdir()) if fan.is_dir() else [fan]:
                digest = self._digest_or_none(f"sha256:{fan.name}{path.name}")
                if digest is None or path.parent != fan or path.is_symlink() or not path.is_file():
                    problems.append(f"stray file in the blob store: {path}")
                    strays.append(path)
                elif not self.verify_blob(digest):
                    corrupt.add(digest)
                else:
                    present.add(digest)
        links = {d: found for d in sorted(present) if (found := self._links(d)) is not None}
        heads: dict[str, Digest] = {}
        unreadable: list[str] = []
        for name in self._names():
            try:
                head = self._read_ref(name)
            except StoreError as e:
                problems.append(e.message)
                unreadable.append(name)
                continue
            if head is not None:
                heads[name] = head
        damaged = _damaged(corrupt, present, links)
        holders = _holders(damaged | corrupt, links, heads)

        def held(digest: Digest) -> str:
            names = holders.get(digest, ())
            return f"; in images: {', '.join(names)}" if names else ""

        for digest in sorted(corrupt):
            problems.append(
                f"blob {digest}: content does not match its digest (corrupt){held(digest)}"
            )
        for digest, (kind, named) in links.items():
            for what, child in named:
                if child not in present:
                    state = "corrupt" if child in corrupt else "missing"
                    problems.append(f"{kind} {digest}: {what} {child} is {state}{held(digest)}")
        broken = list(unreadable)
        for name, head in heads.items():
            if head not in present:
                problems.append(f"ref {name!r} points at missing or corrupt image {head}")
            if head not in present or head in damaged:
                broken.append(name)
        report = FsckReport(
            problems=tuple(problems),
            damaged=tuple(
                Damage(d, "corrupt" if d in corrupt else "incomplete", holders.get(d, ()))
                for d in sorted(damaged | corrupt)
            ),
            strays=tuple(strays),
            names=tuple(sorted(broken)),
        )
        if repair and (report.damaged or strays or broken):
            return self._quarantine(report)
        return report

    def _links(self, digest: Digest) -> tuple[str, list[tuple[str, Digest]]] | None:
        """What a tree or image blob names: ("tree" or "image", [(what, digest)]), e.g.
        ``file 'app.py'`` or ``rootfs tree``; None for any other blob."""
        path = self.blob_path(digest)
        if path.stat().st_size > _MAX_DOCUMENT:
            return None
        with path.open("rb") as f:
            data = f.read()
        if not data.startswith(b'{"'):
            return None
        with contextlib.suppress(ValueError):
            tree = parse_tree(data)
            return "tree", [
                (f"{e.type} {e.name!r}", e.digest) for e in tree.entries if e.digest is not None
            ]
        with contextlib.suppress(ValueError):
            image = parse_image(digest, data)
            named = [("rootfs tree", image.rootfs)]
            named += [("layer tree", d) for d in dict.fromkeys(image.layers) if d != image.rootfs]
            return "image", named
        return None

    def _quarantine(self, report: FsckReport) -> FsckReport:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=self._mkdir(self.root / "quarantine")))
        try:
            for damage in report.damaged:
                blobs = self._mkdir(run / "blobs" / "sha256")
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(damage.digest).replace(blobs / damage.digest.hex)
                self.forget_verified(damage.digest)
            for path in report.strays:
                stray = self._mkdir(run / "stray")
                with contextlib.suppress(FileNotFoundError):
                    path.replace(stray / f"{path.parent.name}-{path.name}")
            with self._lock("refs"):
                for name in report.names:
                    refs = self._mkdir(run / "refs")
                    with contextlib.suppress(FileNotFoundError):
                        self._ref_path(name).replace(refs / name)
            _fsync_dir(run)
        except OSError as e:
            raise StoreError(
                f"cannot move damaged objects to {run}: {e.strerror or e}",
                hint="Check the permissions and free space of the state dir.",
            ) from e
        return replace(report, quarantine=run)

    @staticmethod
    def _mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Damage:
    """One damaged object: ``corrupt`` (its bytes do not hash to its digest) or
    ``incomplete`` (a tree or image naming an object that is missing or damaged).
    ``images`` are the names whose current image holds it."""

    digest: Digest
    kind: Literal["corrupt", "incomplete"]
    images: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"digest": str(self.digest), "kind": self.kind, "images": list(self.images)}


@dataclass(frozen=True)
class FsckReport:
    """What ``ContentStore.check`` found (and, with ``quarantine``, moved away).

    ``names`` are the names whose image is missing or damaged (moved away on repair,
    so a rebuild or pull restores them); ``strays`` files in the blob store that are
    not blobs."""

    problems: tuple[str, ...]
    damaged: tuple[Damage, ...] = ()
    strays: tuple[Path, ...] = ()
    names: tuple[str, ...] = ()
    quarantine: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def images(self) -> tuple[str, ...]:
        """Every name whose image must be rebuilt or pulled again, sorted."""
        return tuple(sorted({*self.names, *(n for d in self.damaged for n in d.images)}))


def _damaged(
    corrupt: set[Digest],
    present: set[Digest],
    links: dict[Digest, tuple[str, list[tuple[str, Digest]]]],
) -> set[Digest]:
    """The present documents that name, directly or through others, an object that is
    corrupt or missing: they can no longer be checked out, exported or pushed."""
    parents: dict[Digest, list[Digest]] = {}
    for digest, (_, named) in links.items():
        for _, child in named:
            parents.setdefault(child, []).append(digest)
    queue = [c for c in parents if c not in present or c in corrupt]
    damaged: set[Digest] = set()
    while queue:
        for parent in parents.get(queue.pop(), ()):
            if parent not in damaged:
                damaged.add(parent)
                queue.append(parent)
    return damaged


def _holders(
    damaged: set[Digest],
    links: dict[Digest, tuple[str, list[tuple[str, Digest]]]],
    heads: dict[str, Digest],
) -> dict[Digest, tuple[str, ...]]:
    """Damaged object -> the names whose current image holds it. Only damaged objects
    are walked: every object above a damaged one is damaged too."""
    found: dict[Digest, set[str]] = {}
    for name, head in heads.items():
        if head not in damaged:
            continue
        stack, seen = [head], {head}
        while stack:
            digest = stack.pop()
            found.setdefault(digest, set()).add(name)
            for _, child in links.get(digest, ("", []))[1]:
                if child in damaged and child not in seen:
                    seen.add(child)
                    stack.append(child)
    return {d: tuple(sorted(names)) for d, names in found.items()}


def _read_marker(marker: Path) -> bytes | None:
    try:
        return marker.read_bytes()
    except FileNotFoundError:
        return None
