"""OCI documents of an image: its layer blobs, config and manifest.

Config and manifest are canonical JSON. The only host-dependent field is the config's
``architecture`` (the host's, as GOARCH); everything else depends on the image and
``SOURCE_DATE_EPOCH`` alone, never on the time, umask or working directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from graven.model import Digest, Image, canonical_json
from graven.store.base import ImageStore
from graven.store.oci_export.compress import Compression, check_compression
from graven.store.oci_export.layers import LayerBlob, find_or_write_layer
from graven.store.oci_export.tar import source_date_epoch
from graven.store.oci_types import (
    GRAVEN_IMAGE,
    OCI_CONFIG,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    host_platform,
)


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


Progress = Callable[[LayerProgress], None]


def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        blob, cached = find_or_write_layer(store, old, new, compression, mtime)
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
