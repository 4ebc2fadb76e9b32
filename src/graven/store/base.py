"""The ImageStore port: content-addressed blobs, Merkle trees, images and their names.

What builds, base makers, layer and OCI code, runtimes and the controller ask of the
local image store. Everything is named by content: the same bytes (or tree, or image
document) always get the same digest, whichever adapter stores them, so digests move
between adapters and into OCI layouts and registries unchanged.

Adapters: ``graven.store.cas.ContentStore`` (files in the state dir, the embedded
default) and ``graven.testing.image_store.FakeImageStore`` (in memory, for unit tests).
``graven.testing.contracts.image_store`` is the contract both pass; a new adapter
(a shared store on a server, say) goes beside them and subclasses that suite.

Errors: a missing or corrupt object is a ``StoreError`` (never wrong bytes served);
an unknown image reference a ``NotFoundError``; an invalid name a ``UsageError``;
a path inside a tree that cannot be used a ``TreePathError``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO, Protocol

from graven.model import Digest, Image, ImageConfig
from graven.store.tree_model import Tree, TreeEntry


class ImageStore(Protocol):
    """Blobs, trees, images, names, the step cache and checkouts, by content."""

    #: Where the store keeps what it keeps on disk: never ingested into an image.
    root: Path
    #: Scratch space on the store's filesystem, for work that becomes store content
    #: (a run step's checkout, a layer being compressed); gc removes what a crash left.
    tmp_dir: Path

    # --- blobs ------------------------------------------------------------------------

    def has(self, digest: Digest) -> bool:
        """Whether the blob is present (not whether it is sound: see ``verify_blob``)."""
        ...

    def has_verified(self, digest: Digest, size: int) -> bool:
        """Whether the blob is present, ``size`` bytes long and hashes to ``digest``."""
        ...

    def put_bytes(self, data: bytes) -> Digest:
        """Store ``data``; its digest. Storing the same bytes again stores nothing new."""
        ...

    def put_file(self, path: Path) -> Digest:
        """Store a regular file's content (symlinks are not followed); its digest."""
        ...

    def open_blob(self, digest: Digest) -> BinaryIO:
        """The blob for streaming; StoreError when missing. A streaming reader must
        hash what it reads: damage shows only at the end of the stream."""
        ...

    def read_blob(self, digest: Digest) -> bytes:
        """A small blob's bytes, verified; StoreError when missing or corrupt."""
        ...

    def verify_blob(self, digest: Digest) -> bool:
        """Whether the blob is present and hashes to its digest (always hashes)."""
        ...

    # --- trees ------------------------------------------------------------------------

    def put_tree(self, tree: Tree) -> Digest:
        """Store one tree level (its files and subtrees must be stored already)."""
        ...

    def read_tree(self, digest: Digest) -> Tree:
        """The tree named ``digest``; StoreError when missing, corrupt or not a tree."""
        ...

    def ingest(
        self,
        path: Path,
        *,
        exclude: Collection[Path] = (),
        ignore: Callable[[Path, bool], bool] | None = None,
    ) -> TreeEntry:
        """Store a file, symlink or directory from disk; its entry, named ``path.name``.
        Symlinks are kept, never followed; fifos, sockets and devices are refused."""
        ...

    def ingest_tree(self, directory: Path) -> Digest:
        """Store a real directory recursively; its tree digest."""
        ...

    def lookup(self, root: Digest, path: str) -> TreeEntry | None:
        """The entry at ``path`` (``/a/b``) in tree ``root``; symlinks are not followed."""
        ...

    def merge_trees(self, base: Digest, overlay: Digest) -> Digest:
        """``overlay`` laid over ``base``: directories merge, anything else replaces."""
        ...

    def place(self, root: Digest, path: str, entry: TreeEntry) -> Digest:
        """Tree ``root`` with ``entry`` put at ``path`` (parents made, dirs merged)."""
        ...

    # --- images and names -------------------------------------------------------------

    def put_image(
        self, rootfs: Digest, config: ImageConfig, layers: tuple[Digest, ...] | None = None
    ) -> Image:
        """Store the image of tree ``rootfs`` (layer snapshots ``layers``, default one)."""
        ...

    def get_image(self, digest: Digest) -> Image:
        """The image named ``digest``; StoreError when missing, corrupt or not an image."""
        ...

    def tag(self, name: str, digest: Digest) -> None:
        """Point ``name`` at image ``digest`` and add it to the name's history."""
        ...

    def history(self, name: str) -> list[Digest]:
        """Every digest ``name`` pointed at, oldest first; empty for an unknown name."""
        ...

    def list_images(self) -> list[tuple[str, Image]]:
        """Every named image, sorted by name."""
        ...

    def resolve(self, ref: str) -> Image:
        """The image ``ref`` names: ``name``, ``name@sha256:...``, a digest or a short
        digest (6+ hex digits, unambiguous); NotFoundError naming the known images."""
        ...

    # --- step cache -------------------------------------------------------------------

    def cache_get(self, key: str) -> str | None:
        """The value cached under ``key``, or None."""
        ...

    def cache_put(self, key: str, value: str) -> None:
        """Cache a small value under ``key``, durably after the objects it names."""
        ...

    # --- checkouts --------------------------------------------------------------------

    def checkout(self, tree: Digest, dest: Path, *, read_only: bool = True) -> Path:
        """Materialize ``tree`` at ``dest``, atomically, every file verified as copied;
        a complete read-only checkout of the same tree there is reused."""
        ...

    def remove_checkout(self, dest: Path) -> None:
        """Delete a checkout (read-only or not); nothing when absent."""
        ...
