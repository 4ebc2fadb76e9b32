"""Trees as values: the Merkle directory documents of the image store, and the tree
algebra (lookup, merge, place) any store of them offers.

A *tree* is a canonical-JSON document listing one directory's entries, sorted by
name; a directory entry holds the digest of its subtree, so one digest names a whole
file tree and identical files (or subtrees) are stored once. Only what defines
content enters a tree: names, types, normalized modes (0o644/0o755 by the owner exec
bit for files, 0o755 for directories), sizes and symlink targets. Owners, mtimes and
the umask never do, which is what makes builds reproducible.

Nothing here touches the filesystem: ``TreeAlgebra`` works through ``read_tree`` and
``put_tree``, which each store implements.
"""

from __future__ import annotations

import abc
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from graven.errors import StoreError
from graven.model import Digest, canonical_json

TREE_SCHEMA = "graven.tree/v1"

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
MAX_DOCUMENT = 64 << 20


class InvalidDocument(ValueError):
    """An untrusted tree or image document is malformed (the message says how)."""


class TreePathError(StoreError):
    """A path inside a tree cannot be used as asked (a parent is a file, say).

    ``path`` is the offending path inside the tree, e.g. ``/app/config``.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


def name_problem(name: object) -> str | None:
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
        if problem := name_problem(name):
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


def load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        # Hostile nesting must surface as invalid input, not as an internal error.
        raise InvalidDocument("document is nested too deeply") from None


def parse_tree(data: bytes) -> Tree:
    """Validate an untrusted tree document (exactly its canonical form); ValueError if not."""
    if len(data) > MAX_DOCUMENT:
        raise InvalidDocument("tree document is too large")
    doc = load_json(data)
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


def tree_parts(path: str) -> list[str]:
    """``/a/b/`` -> ``["a", "b"]``; rejects ``..`` and invalid names."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if problem := name_problem(part):
            raise TreePathError(path, f"{path}: {problem}")
    return parts


class TreeAlgebra(abc.ABC):
    """Operations on stored trees that need no materialization; work is proportional
    to the depth of the paths touched, never to the size of the trees."""

    @abc.abstractmethod
    def read_tree(self, digest: Digest) -> Tree:
        """The tree named ``digest``; StoreError when missing, corrupt or not a tree."""

    @abc.abstractmethod
    def put_tree(self, tree: Tree) -> Digest:
        """Store one tree level (its subtrees and files must be stored already)."""

    def _dir_entry(self, name: str, tree: Tree) -> TreeEntry:
        return TreeEntry(name, "dir", DIR_MODE, tree.size, digest=self.put_tree(tree))

    def lookup(self, root: Digest, path: str) -> TreeEntry | None:
        """The entry at ``path`` (``/a/b``) in tree ``root``; symlinks are not followed.

        ``/`` gives the root itself as a directory entry named ``""``.
        """
        tree = self.read_tree(root)
        parts = tree_parts(path)
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
        parts = tree_parts(path)
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
