"""Push and pull: images between the content store and a registry.

Push sends only what the registry lacks: every blob is probed with ``HEAD`` first;
a blob the store remembers in another repository of the same registry is mounted
from there (no bytes travel); the rest is streamed from the content store, in one
``PUT`` when small and in ``PATCH`` chunks when large, never loaded whole. The
manifest goes last, and the digest the registry names it by must be ours.

Pull fetches the manifest (an index resolves to the ``linux/<this machine>`` entry),
checks its digest against the pinned one or ``Docker-Content-Digest``, and hands it
to the OCI importer, which streams every blob through ``open_blob`` and verifies
digest and size; only then is a local name pointed at the image.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, cast

from graven.errors import UsageError
from graven.model import Digest, Image, is_valid_name
from graven.reference import RegistryRef, is_repository_name, local_name_for
from graven.store.oci_types import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    InvalidOCI,
    host_platform,
)
from graven.store.registry.client import RegistryClient
from graven.store.registry.errors import RegistryAuthError, RegistryError, RegistryNotFound
from graven.store.registry.wire import parse_json, printable

if TYPE_CHECKING:
    from graven.store.base import ImageStore

_BLOB_SOURCES_KEY = "graven.registry.blob-sources/v1"
_MAX_SOURCES = 8


BlobAction = Literal["uploaded", "skipped", "mounted", "downloaded"]


@dataclass(frozen=True)
class BlobTransfer:
    """What happened to one blob: sent, found already there, mounted, or fetched."""

    digest: Digest
    media_type: str
    size: int
    action: BlobAction
    bytes: int = 0  # bytes sent or received for it (retries included)
    source: str | None = None  # the repository a mounted blob came from

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": str(self.digest),
            "media_type": self.media_type,
            "size": self.size,
            "action": self.action,
            "bytes": self.bytes,
        }
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class PushResult:
    """A pushed image: where it went, its manifest digest, and what travelled."""

    reference: RegistryRef
    image: Digest
    manifest_digest: Digest
    media_type: str
    blobs: tuple[BlobTransfer, ...]

    @property
    def bytes_sent(self) -> int:
        return sum(b.bytes for b in self.blobs)

    def count(self, action: BlobAction) -> int:
        return sum(b.action == action for b in self.blobs)

    @property
    def pinned(self) -> RegistryRef:
        """Where the image now is, by its manifest digest (what to pull to get it)."""
        return RegistryRef(
            self.reference.registry, self.reference.repository, digest=self.manifest_digest
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": str(self.reference),
            "pinned": str(self.pinned),
            "image": str(self.image),
            "manifest_digest": str(self.manifest_digest),
            "media_type": self.media_type,
            "bytes_sent": self.bytes_sent,
            "uploaded": self.count("uploaded"),
            "skipped": self.count("skipped"),
            "mounted": self.count("mounted"),
            "blobs": [b.to_dict() for b in self.blobs],
        }


@dataclass(frozen=True)
class PullResult:
    """A pulled image: the local name now pointing at it and what was fetched."""

    reference: RegistryRef
    name: str
    image: Digest
    manifest_digest: Digest
    blobs: tuple[BlobTransfer, ...]

    @property
    def bytes_received(self) -> int:
        return sum(b.bytes for b in self.blobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": str(self.reference),
            "name": self.name,
            "image": str(self.image),
            "manifest_digest": str(self.manifest_digest),
            "bytes_received": self.bytes_received,
            "blobs": [b.to_dict() for b in self.blobs],
        }


Progress = Callable[[BlobTransfer], None]


class BlobSources:
    """Which repositories of a registry are known to hold a blob: the candidates for a
    cross-repository mount. Kept in the store's cache; only a hint (a wrong entry costs
    one failed mount, then a normal upload)."""

    def __init__(self, store: ImageStore, registry: str) -> None:
        self._store, self._registry = store, registry

    def _key(self, digest: Digest) -> str:
        return f"{_BLOB_SOURCES_KEY} {self._registry} {digest}"

    def repositories(self, digest: Digest) -> list[str]:
        text = self._store.cache_get(self._key(digest))
        try:
            repos = json.loads(text) if text else []
        except ValueError:
            return []
        if not isinstance(repos, list):
            return []
        return [r for r in repos if isinstance(r, str) and is_repository_name(r)]

    def add(self, digest: Digest, repository: str) -> None:
        repos = self.repositories(digest)
        if repos[:1] == [repository]:
            return
        repos = [repository, *(r for r in repos if r != repository)][:_MAX_SOURCES]
        self._store.cache_put(self._key(digest), json.dumps(repos))


def _blob_descriptors(manifest: bytes) -> list[Descriptor]:
    """The config and layer descriptors of an (already validated) manifest."""
    doc = json.loads(manifest)
    blobs = [Descriptor.from_dict(doc["config"], "manifest.config")]
    blobs += [Descriptor.from_dict(d, f"manifest.layers[{i}]") for i, d in enumerate(doc["layers"])]
    return blobs


def push_image(
    store: ImageStore,
    image: Image,
    ref: RegistryRef,
    client: RegistryClient,
    *,
    compression: str = "gzip",
    progress: Progress | None = None,
) -> PushResult:
    """Push ``image`` to ``ref``: the blobs the repository lacks, then the manifest.

    ``ref`` names a tag (default ``latest``) and/or a digest; a digest must be the one
    the image's manifest has. ``progress`` is told about every blob as it is done.
    """
    from graven.store.oci_export.compress import check_compression
    from graven.store.oci_export.documents import oci_documents

    oci = oci_documents(store, image, check_compression(compression))
    if ref.digest is not None and ref.digest != oci.manifest_digest:
        raise UsageError(
            f"{ref} pins digest {ref.digest}, but the manifest of image "
            f"{image.name or image.digest.short} is {oci.manifest_digest}",
            hint="Push by tag, or pin the manifest digest 'graven push -o json' reported.",
        )
    repo = ref.repository
    sources = BlobSources(store, client.registry)
    config = Descriptor(OCI_CONFIG, oci.config_digest, len(oci.config))
    transfers: list[BlobTransfer] = []
    # Layers first, the config last: the config names every layer (the usual order).
    for desc in [*(layer.descriptor() for layer in oci.layers), config]:
        if desc.digest in {t.digest for t in transfers}:
            continue  # the same layer twice in one image travels once
        if desc is config:
            opener: Callable[[], BinaryIO] = functools.partial(io.BytesIO, oci.config)
        else:
            opener = functools.partial(store.open_blob, desc.digest)
        transfer = _push_blob(client, sources, repo, desc, opener)
        sources.add(desc.digest, repo)
        transfers.append(transfer)
        if progress is not None:
            progress(transfer)
    tag = ref.tag or (None if ref.digest else "latest")
    client.put_manifest(repo, tag or str(oci.manifest_digest), OCI_MANIFEST, oci.manifest)
    final = RegistryRef(ref.registry, repo, tag, oci.manifest_digest)
    return PushResult(final, image.digest, oci.manifest_digest, OCI_MANIFEST, tuple(transfers))


def _push_blob(
    client: RegistryClient,
    sources: BlobSources,
    repo: str,
    desc: Descriptor,
    opener: Callable[[], BinaryIO],
) -> BlobTransfer:
    def done(action: BlobAction, sent: int = 0, source: str | None = None) -> BlobTransfer:
        return BlobTransfer(desc.digest, desc.media_type, desc.size, action, sent, source)

    if client.blob_size(repo, desc.digest) is not None:
        return done("skipped")
    location = None
    for source in sources.repositories(desc.digest):
        if source == repo:
            continue
        try:
            location = client.mount_blob(repo, desc.digest, source)
        except (RegistryAuthError, RegistryNotFound):
            continue  # no pull access there, or it is gone: try the next, then upload
        if location is None:
            return done("mounted", source=source)
        break  # the registry opened an upload session instead: use it
    sent = client.upload_blob(repo, desc.digest, desc.size, opener, location=location)
    return done("uploaded", sent)


def pick_platform(index: bytes, where: str) -> Descriptor:
    """The manifest of an index for this machine (``linux/<arch>``); RegistryError if
    the index has none, naming the platforms it has."""
    want_os = "linux"
    want_arch, want_variant = host_platform()
    try:
        doc = parse_json(index)
        entries = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise InvalidOCI("manifests: expected a list")
        found: list[tuple[Descriptor, str, str, str | None]] = []
        for i, entry in enumerate(entries):
            desc = Descriptor.from_dict(entry, f"manifests[{i}]")
            plat = entry.get("platform") if isinstance(entry, dict) else None
            if isinstance(plat, dict):
                variant = plat.get("variant")
                found.append(
                    (
                        desc,
                        str(plat.get("os", "")),
                        str(plat.get("architecture", "")),
                        str(variant) if variant else None,
                    )
                )
    except ValueError as exc:
        raise RegistryError(f"{where}: the index is malformed: {exc}") from None
    matches = [f for f in found if f[1] == want_os and f[2] == want_arch]
    matches.sort(key=lambda f: f[3] != want_variant)  # an exact variant first
    if not matches or matches[0][0].media_type not in MANIFEST_TYPES:
        have = ", ".join(f"{o}/{a}" + (f"/{v}" if v else "") for _, o, a, v in found) or "none"
        raise RegistryNotFound(
            f"{where} has no image for {want_os}/{want_arch} (it has: {have})",
            hint="Pull an image built for this machine's platform.",
        )
    return matches[0][0]


def pull_image(
    store: ImageStore,
    ref: RegistryRef,
    client: RegistryClient,
    *,
    name: str | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Pull ``ref`` into ``store`` and point local name ``name`` at it.

    The default name is the repository's last component. Every blob is verified
    while it streams in; on any failure nothing is tagged.
    """
    from graven.store.oci_import.images import import_from_manifest

    local = name if name is not None else local_name_for(ref.repository)
    if not is_valid_name(local):
        raise UsageError(
            f"invalid image name {local!r}: use lowercase letters, digits and '-', "
            "starting with a letter",
            hint="Pass --name NAME.",
        )
    repo = ref.repository
    manifest = client.get_manifest(repo, ref.reference)
    if manifest.media_type in INDEX_TYPES:
        entry = pick_platform(manifest.data, f"{ref} on {client.registry}")
        manifest = client.get_manifest(repo, str(entry.digest))
        if len(manifest.data) != entry.size:
            raise RegistryError(
                f"{client.registry}: manifest {entry.digest} is {len(manifest.data)} bytes, "
                f"the index says {entry.size}",
                registry=client.registry,
            )
    if manifest.media_type not in MANIFEST_TYPES:
        raise RegistryError(
            f"{ref} is a {printable(manifest.media_type[:100]) or 'document of unknown type'}, "
            "not an image manifest graven can import",
            hint="graven pulls OCI and Docker v2 image manifests (and indexes of them).",
            registry=client.registry,
        )
    transfers: list[BlobTransfer] = []

    @contextlib.contextmanager
    def open_blob(desc: Descriptor) -> Iterator[BinaryIO]:
        with client.open_blob(repo, desc.digest, desc.size) as stream:
            yield cast(BinaryIO, stream)
            # Reached only when the importer read the blob without complaint.
            transfer = BlobTransfer(
                desc.digest, desc.media_type, desc.size, "downloaded", stream.received
            )
            transfers.append(transfer)
            if progress is not None:
                progress(transfer)

    image = import_from_manifest(store, manifest.data, manifest.digest, open_blob)
    store.tag(local, image.digest)
    sources = BlobSources(store, client.registry)
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for desc in _blob_descriptors(manifest.data):
            sources.add(desc.digest, repo)
    pinned = RegistryRef(ref.registry, repo, ref.tag, manifest.digest)
    return PullResult(pinned, local, image.digest, manifest.digest, tuple(transfers))
