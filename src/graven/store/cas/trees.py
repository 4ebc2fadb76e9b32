"""Trees in the content store: each directory level a canonical-JSON blob (see
``graven.store.tree_model``), stored and read back, with parsed trees remembered by
digest (they are immutable). Ingesting from the filesystem is ``graven.store.ingest``."""

from __future__ import annotations

from pathlib import Path

from graven.errors import StoreError
from graven.model import Digest, canonical_json
from graven.store.cas.blobs import BlobStore
from graven.store.ingest import TreeIngest
from graven.store.tree_model import Tree, parse_tree

_TREE_MEMO_SIZE = 4096


class TreeStore(BlobStore, TreeIngest):
    """Blobs plus trees: store and read tree levels, ingest directories, and the tree
    algebra (lookup, merge, place) over them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        # Trees are immutable by digest, so parsed ones can be remembered freely.
        self._trees: dict[Digest, Tree] = {}

    def forget_verified(self, digest: Digest) -> None:
        """Also forget the parsed tree: the blob is going (gc) or gone (quarantine)."""
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
