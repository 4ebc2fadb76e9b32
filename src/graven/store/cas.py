"""The content store: files by content, directories as Merkle trees, images and names.

Layout under ``root``::

    blobs/sha256/ab/cdef...   immutable content named by its sha256 (files, trees, images)
    refs/<name>               the image digest a name points at
    refs/<name>.history       every digest the name pointed at, one a line, newest last
    cache/sha256/ab/cdef...   build step cache: sha256(key) -> small JSON value
    tmp/                      temp files, renamed into place once complete and fsynced
    locks/                    flock files serializing read-modify-write updates

Every write goes to a temp file in ``tmp/`` (same filesystem), is fsynced and renamed
into place, so a reader sees an object whole or not at all. Two writers of the same
content race harmlessly: both renames leave identical bytes behind.

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
        try:
            for d in (self._blobs, self._refs, self._cache, self.tmp_dir, self._locks):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot open the content store at {self.root}: {e}") from e
        # Trees are immutable by digest, so parsed ones can be remembered freely.
        self._trees: dict[Digest, Tree] = {}
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

    def _has_sized(self, digest: Digest, size: int) -> bool:
        """Present with the right length: a blob cut short by a power loss is rewritten."""
        try:
            return self.blob_path(digest).stat().st_size == size
        except OSError:
            return False

    def put_bytes(self, data: bytes) -> Digest:
        """Store ``data``; return its digest. A no-op when the blob is present."""
        digest = Digest.of_bytes(data)
        if not self._has_sized(digest, len(data)):
            self._write_atomic(self.blob_path(digest), data, mode=0o444, durable=False)
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
        if self._has_sized(digest, f.tell()):
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
            Path(tmp).chmod(0o444)
            digest = Digest("sha256:" + h.hexdigest())
            final = self.blob_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).replace(final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._unsynced = True
        return digest, size

    def open_blob(self, digest: Digest) -> BinaryIO:
        """Open a blob for reading; StoreError when it is missing."""
        try:
            return self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise StoreError(
                f"blob {digest} is missing from the store at {self.root}",
                hint="Run 'graven store fsck' to check the store; rebuild what needs it.",
            ) from None

    def read_blob(self, digest: Digest) -> bytes:
        """A small blob's bytes, verified against its digest; StoreError if corrupt."""
        with self.open_blob(digest) as f:
            data = f.read()
        if Digest.of_bytes(data) != digest:
            raise StoreError(
                f"blob {digest} is corrupt: its content does not match its digest",
                hint="Run 'graven store fsck'; rebuild or pull the affected images.",
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
                    self._materialize(tree, tmp, read_only)
                    tmp.rename(dest)
                except BaseException:
                    _force_remove(tmp)
                    raise
            except OSError as e:
                raise StoreError(f"cannot check out {tree.short} at {dest}: {e}") from e
            self._write_atomic(marker, wanted, tmp_dir=dest.parent)
        return dest

    def _materialize(self, digest: Digest, directory: Path, read_only: bool) -> None:
        for entry in self.read_tree(digest).entries:
            path = directory / entry.name
            if entry.type == "symlink" and entry.target is not None:
                path.symlink_to(entry.target)
            elif entry.type == "dir" and entry.digest is not None:
                path.mkdir(0o700)
                self._materialize(entry.digest, path, read_only)
            elif entry.type == "file" and entry.digest is not None:
                self._copy_blob(entry.digest, path)
                path.chmod(_READ_ONLY_FILE[entry.mode] if read_only else entry.mode)
        # Last, so the directory stays writable while it is being filled.
        directory.chmod(_READ_ONLY_DIR if read_only else DIR_MODE)

    def _copy_blob(self, digest: Digest, path: Path) -> None:
        h = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self.open_blob(digest) as src, os.fdopen(os.open(path, flags, 0o600), "wb") as out:
            while chunk := src.read(CHUNK_SIZE):
                h.update(chunk)
                out.write(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise StoreError(
                f"blob {digest} is corrupt: its content does not match its digest",
                hint="Run 'graven store fsck'; rebuild or pull the affected images.",
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
        problems: list[str] = []
        present: set[Digest] = set()
        for fan in sorted(self._blobs.iterdir()):
            for path in sorted(fan.iterdir()) if fan.is_dir() else [fan]:
                digest = self._digest_or_none(f"sha256:{fan.name}{path.name}")
                if digest is None or path.parent != fan:
                    problems.append(f"stray file in the blob store: {path}")
                elif not self.verify_blob(digest):
                    problems.append(f"blob {digest}: content does not match its digest (corrupt)")
                else:
                    present.add(digest)
        for digest in sorted(present):
            problems.extend(self._check_document(digest, present))
        for name in self._names():
            try:
                head = self._read_ref(name)
            except StoreError as e:
                problems.append(e.message)
                continue
            if head is not None and head not in present:
                problems.append(f"ref {name!r} points at missing or corrupt image {head}")
        return problems

    def _check_document(self, digest: Digest, present: set[Digest]) -> list[str]:
        """Dangling references of one blob, if it is a tree or an image."""
        path = self.blob_path(digest)
        if path.stat().st_size > _MAX_DOCUMENT:
            return []
        with path.open("rb") as f:
            data = f.read()
        if not data.startswith(b'{"'):
            return []
        with contextlib.suppress(ValueError):
            tree = parse_tree(data)
            return [
                f"tree {digest}: entry {e.name!r} references missing {e.type} {e.digest}"
                for e in tree.entries
                if e.digest is not None and e.digest not in present
            ]
        with contextlib.suppress(ValueError):
            image = parse_image(digest, data)
            if image.rootfs not in present:
                return [f"image {digest}: rootfs tree {image.rootfs} is missing"]
        return []


def _read_marker(marker: Path) -> bytes | None:
    try:
        return marker.read_bytes()
    except FileNotFoundError:
        return None
