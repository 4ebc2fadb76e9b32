"""Layer blobs: compressed normalized tars in the content store, cached.

Compressed blobs are byte-identical for identical input: gzip with a fixed header
(mtime 0, no file name, OS "unknown") at a fixed level, or zstd at a fixed level with
a checksum; they depend only on the zlib/zstd library versions. A compressed layer is
written into the content store and its descriptor cached, keyed by the layer's change
set (not the snapshots around it), the compression, the mtime and the tar format
version, so a second export or push recompresses nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graven.errors import StoreError
from graven.model import Digest, canonical_json
from graven.store.base import ImageStore
from graven.store.oci_export.compress import (
    MEDIA_TYPES,
    Compression,
    Digesting,
    check_compression,
    open_compressor,
)
from graven.store.oci_export.tar import LayerEntry, layer_entries, source_date_epoch, write_entries
from graven.store.oci_types import Descriptor

# Bump when the tar or compressed bytes for the same snapshots would change: it is part
# of the layer cache key, so old cache entries are then simply not found.
LAYER_FORMAT = "graven.oci-layer/v2"


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


def _layer_key(entries: list[LayerEntry], compression: Compression, mtime: int) -> str:
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
    return find_or_write_layer(
        store, old, new, check_compression(compression), source_date_epoch()
    )[0]


def find_or_write_layer(
    store: ImageStore, old: Digest | None, new: Digest, compression: Compression, mtime: int
) -> tuple[LayerBlob, bool]:
    """The layer blob from ``old`` to ``new``, and whether it came from the cache."""
    entries = layer_entries(store, old, new)
    key = _layer_key(entries, compression, mtime)
    if (cached := _cached_layer(store, key)) is not None:
        return cached, True
    fd, tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix=".oci-layer-")
    try:
        with os.fdopen(fd, "wb") as f:
            compressed = Digesting(f)
            compressor = open_compressor(compression, compressed)
            tar = Digesting(compressor)
            write_entries(store, entries, tar, mtime)
            compressor.finish()
        digest = store.put_file(Path(tmp))
    finally:
        Path(tmp).unlink(missing_ok=True)
    if digest != compressed.digest:
        raise StoreError(f"layer blob changed while it was stored ({compressed.digest})")
    blob = LayerBlob(tar.digest, digest, compressed.size, MEDIA_TYPES[compression])
    store.cache_put(key, canonical_json(blob.to_dict()).decode())
    return blob, False
