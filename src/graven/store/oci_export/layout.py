"""OCI image layouts and archives written from the store: crash-safe, under a lock,
merging into a layout that is already there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graven.atomic import PendingFile, write_atomic
from graven.errors import StoreError, UsageError
from graven.model import Digest, Image, canonical_json
from graven.store.base import ImageStore
from graven.store.cas.blobs import CHUNK_SIZE
from graven.store.oci_export.compress import Compression
from graven.store.oci_export.documents import OciImage, Progress, oci_documents
from graven.store.oci_export.layers import LayerBlob
from graven.store.oci_export.tar import (
    TAR_DIR_MODE,
    TAR_FILE_MODE,
    TarWriter,
    copy_verified,
    source_date_epoch,
)
from graven.store.oci_types import (
    MAX_REF_NAME,
    OCI_INDEX,
    REF_NAME,
    Descriptor,
    InvalidOCI,
    is_valid_ref_name,
)

LAYOUT_VERSION = "1.0.0"
OCI_LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"


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


@dataclass(frozen=True)
class ImageExport:
    """What ``graven image export`` wrote: one image under one ref, into a layout, an
    archive, or both (their documents are the same)."""

    image: Digest
    name: str
    ref_name: str
    compression: Compression
    oci: OciImage
    layout: ExportResult | None = None
    archive: ExportResult | None = None

    @property
    def locations(self) -> list[str]:
        """Where to read it from, as skopeo and podman name it."""
        where = [f"oci:{self.layout.path}:{self.ref_name}"] if self.layout else []
        if self.archive is not None:
            where.append(f"oci-archive:{self.archive.path}:{self.ref_name}")
        return where

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "image": str(self.image),
            "name": self.name,
            "ref": self.ref_name,
            "compression": self.compression,
            **self.oci.to_dict(),
        }
        if self.layout is not None:
            data["layout"] = str(self.layout.path)
            data["blobs_written"] = self.layout.blobs_written
            data["blobs_reused"] = self.layout.blobs_reused
        if self.archive is not None:
            data["archive"] = str(self.archive.path)
        return data


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


def _layout_marker() -> bytes:
    return canonical_json({"imageLayoutVersion": LAYOUT_VERSION})


def _mkdir(path: Path) -> None:
    """Create a directory with mode 0o755 whatever the umask; leave an existing one be."""
    try:
        path.mkdir()
    except FileExistsError:
        return
    path.chmod(TAR_DIR_MODE)


def _prepare_layout(dest: Path) -> None:
    """Make ``dest`` an OCI layout, or check that it is one; UsageError when it is not."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory", hint="Choose a directory.")
    marker = dest / OCI_LAYOUT_FILE
    try:
        foreign = dest.is_dir() and not marker.exists() and any(dest.iterdir())
    except OSError as e:
        raise StoreError(f"cannot read {dest}: {e.strerror or e}") from e
    if foreign:
        raise UsageError(
            f"{dest} is not empty and is not an OCI image layout (no {OCI_LAYOUT_FILE})",
            hint="Export into a new or empty directory, or into an existing layout.",
        )
    if marker.exists():
        try:
            version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
        except (OSError, ValueError, AttributeError, RecursionError):
            version = None  # a directory, unreadable, or not the JSON it should be
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
        copy_verified(store, digest, size, pending.file)
        pending.commit(final, mode=TAR_FILE_MODE)


def _read_index(dest: Path) -> dict[str, Any]:
    path = dest / INDEX_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
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
                write_atomic(final, data, mode=TAR_FILE_MODE)
                written += 1
            marker = dest / OCI_LAYOUT_FILE
            if not marker.exists():
                write_atomic(marker, _layout_marker(), mode=TAR_FILE_MODE)
            index = _index_with(_read_index(dest), oci.manifest_descriptor(ref_name), ref_name)
            write_atomic(dest / INDEX_FILE, index, mode=TAR_FILE_MODE)
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
            tar = TarWriter(pending.file, source_date_epoch())
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
            pending.commit(dest, mode=TAR_FILE_MODE)
    except OSError as e:
        raise StoreError(f"cannot write the OCI archive {dest}: {e.strerror or e}") from e
    blob_count = len(documents) + len(stored)
    return ExportResult(dest, ref_name, image.digest, compression, oci, blob_count, 0)
