"""Layers as snapshots: an image's layers are a chain of root trees, each the one
before plus one layer's changes. The changes of a layer are the difference between
two consecutive snapshots, computed on Merkle trees (identical subtrees are skipped
by digest), so a layer costs only the tree nodes it changes.

Large steps are split by content: the changed paths, in order, are cut where the
hash of a path says so (after a minimum size), so editing one file among thousands
changes one small layer, and only that layer travels on the next push.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from graven.model import Digest
from graven.store.base import ImageStore
from graven.store.tree_model import DIR_MODE, Tree, TreeEntry

# A step smaller than this stays one layer.
SPLIT_ABOVE = 8 * 1024 * 1024
# Content-defined cut points: at least MIN_CHUNK per layer, then a cut after any path
# whose hash is 0 modulo CUT_EVERY (about one path in CUT_EVERY), at most MAX_CHUNK.
MIN_CHUNK = 4 * 1024 * 1024
MAX_CHUNK = 64 * 1024 * 1024
CUT_EVERY = 32


@dataclass(frozen=True)
class Change:
    """One leaf change between two trees: ``entry`` at ``path``, or None for a deletion.

    Directories appear only when they are new and empty, or when a non-directory
    replaces them (then the deletion comes first)."""

    path: str
    entry: TreeEntry | None

    @property
    def size(self) -> int:
        return self.entry.size if self.entry is not None and self.entry.type != "dir" else 0


def changes(store: ImageStore, old: Digest, new: Digest) -> list[Change]:
    """Leaf-level changes that turn tree ``old`` into tree ``new``, sorted by path."""
    return list(_changes(store, old, new, ""))


def _changes(store: ImageStore, old: Digest | None, new: Digest, prefix: str) -> Iterator[Change]:
    if old == new:
        return
    before = {e.name: e for e in store.read_tree(old).entries} if old is not None else {}
    after = store.read_tree(new)
    names = sorted(set(before) | {e.name for e in after.entries})
    for name in names:
        path = f"{prefix}/{name}"
        a, b = before.get(name), after.get(name)
        if b is None:
            yield Change(path, None)
            continue
        if a == b:
            continue
        if b.type == "dir" and b.digest is not None:
            if a is not None and a.type != "dir":
                yield Change(path, None)
                a = None
            sub = a.digest if a is not None else None
            if not store.read_tree(b.digest).entries and sub is None:
                yield Change(path, b)  # a new empty directory is a change of its own
            else:
                yield from _changes(store, sub, b.digest, path)
        else:
            yield Change(path, b)


_DELETE = object()
_RESET = "\0reset"  # not a valid entry name: marks a directory deleted, then recreated


def apply_changes(store: ImageStore, root: Digest, batch: list[Change]) -> Digest:
    """``root`` with ``batch`` applied in order, writing each changed directory once."""
    edits: dict[str, Any] = {}
    for change in batch:
        *parents, name = [p for p in change.path.split("/") if p]
        node = edits
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                # Entries below a path deleted or replaced earlier in the batch: start afresh.
                child = {_RESET: True} if child is not None else {}
                node[part] = child
            node = child
        node[name] = _DELETE if change.entry is None else change.entry
    return _apply_edits(store, root, edits)


def _apply_edits(store: ImageStore, root: Digest | None, edits: dict[str, Any]) -> Digest:
    tree = store.read_tree(root) if root is not None and not edits.get(_RESET) else Tree()
    entries = {e.name: e for e in tree.entries}
    for name, edit in edits.items():
        if name == _RESET:
            continue
        existing = entries.get(name)
        if edit is _DELETE:
            entries.pop(name, None)
        elif isinstance(edit, dict):
            below = existing.digest if existing is not None and existing.type == "dir" else None
            sub = _apply_edits(store, below, edit)
            entries[name] = TreeEntry(name, "dir", DIR_MODE, store.read_tree(sub).size, sub)
        elif (
            edit.type == "dir"
            and existing is not None
            and existing.type == "dir"
            and existing.digest is not None
            and edit.digest is not None
        ):
            merged = store.merge_trees(existing.digest, edit.digest)
            entries[name] = TreeEntry(name, "dir", DIR_MODE, store.read_tree(merged).size, merged)
        else:
            entries[name] = replace(edit, name=name)
    return store.put_tree(Tree.of(entries.values()))


def remove(store: ImageStore, root: Digest, path: str) -> Digest:
    """``root`` without the entry at ``path`` (no error if it is absent)."""
    parts = [p for p in path.split("/") if p]
    return _remove(store, root, parts)


def _remove(store: ImageStore, root: Digest, parts: list[str]) -> Digest:
    tree = store.read_tree(root)
    entry = tree.get(parts[0])
    if entry is None:
        return root
    if len(parts) == 1:
        return store.put_tree(Tree.of(e for e in tree.entries if e.name != parts[0]))
    if entry.type != "dir" or entry.digest is None:
        return root
    sub = _remove(store, entry.digest, parts[1:])
    size = store.read_tree(sub).size
    return store.put_tree(tree.with_entry(TreeEntry(entry.name, "dir", entry.mode, size, sub)))


def _cut_here(path: str) -> bool:
    h = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big")
    return h % CUT_EVERY == 0


def split(store: ImageStore, old: Digest, new: Digest) -> list[Digest]:
    """Snapshots from ``old`` to ``new``: one for a small change, several for a large one.

    The last snapshot is always ``new`` itself."""
    if old == new:
        return []
    all_changes = changes(store, old, new)
    if sum(c.size for c in all_changes) <= SPLIT_ABOVE:
        return [new]
    batches: list[list[Change]] = [[]]
    size = 0
    for change in all_changes:
        batches[-1].append(change)
        size += change.size
        if size >= MAX_CHUNK or (size >= MIN_CHUNK and _cut_here(change.path)):
            batches.append([])
            size = 0
    batches = [b for b in batches if b]
    snapshots: list[Digest] = []
    root = old
    for batch in batches[:-1]:
        root = apply_changes(store, root, batch)
        snapshots.append(root)
    snapshots.append(new)  # exact by construction; no drift from re-derivation
    return snapshots
