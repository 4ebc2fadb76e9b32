"""Layouts and archives: OCI image layout directories and oci-archive tars as sources
of an import, and choosing the manifest to import from an index.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from graven.errors import StoreError, UsageError
from graven.model import Image, is_valid_name
from graven.store.base import ImageStore
from graven.store.oci_import.changes import MemberDataError, member_data, skip_data
from graven.store.oci_import.documents import parse_descriptor, parse_document, read_small_blob
from graven.store.oci_import.images import import_from_manifest
from graven.store.oci_import.names import DATA_ON_NON_FILE, KINDS, path_parts
from graven.store.oci_import.policy import (
    CORRUPT_HINT,
    DEFAULT_POLICY,
    ImportPolicy,
    ImportRejected,
    Progress,
)
from graven.store.oci_import.streams import (
    DECODE_ERRORS,
    HeaderProblem,
    Readable,
    TarEndProblem,
    TarStream,
    check_header,
    tar_members,
)
from graven.store.oci_types import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    MAX_REF_NAME,
    REF_NAME,
    Descriptor,
    host_platform,
    is_valid_ref_name,
)

MAX_LAYOUT_MARKER = 4096
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PLATFORM_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class _Layout:
    """An OCI image layout directory, read defensively: its files are opened without
    following symlinks and must be regular files (a fifo would hang, a symlink could
    point anywhere)."""

    def __init__(self, root: Path, label: str) -> None:
        self.root = root
        self.label = label

    def _open(self, relative: str, what: str) -> BinaryIO:
        try:
            fd = os.open(
                self.root / relative, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except FileNotFoundError:
            raise ImportRejected(
                f"{what} is missing from {self.label}",
                hint="Is this an OCI image layout (as written by 'graven image export' or "
                "'skopeo copy ... oci:DIR')? Export the image again.",
            ) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ImportRejected(f"{what} in {self.label} is a symlink") from None
            raise ImportRejected(f"cannot read {what} in {self.label}: {e.strerror}") from None
        # Checked before fdopen: it refuses a directory with a bare IsADirectoryError.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImportRejected(f"{what} in {self.label} is not a regular file")
        return os.fdopen(fd, "rb")

    def read_document(self, relative: str, what: str, cap: int) -> bytes:
        with self._open(relative, what) as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise ImportRejected(f"{what} in {self.label} is larger than {cap} bytes")
        return data

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        for sub in ("blobs", "blobs/sha256"):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISDIR(os.lstat(self.root / sub).st_mode):
                    raise ImportRejected(f"{sub} in {self.label} is a symlink or not a directory")
        f = self._open(f"blobs/sha256/{desc.digest.hex}", f"blob {desc.digest}")
        size = os.fstat(f.fileno()).st_size
        if size != desc.size:
            f.close()
            raise ImportRejected(
                f"blob {desc.digest} in {self.label} is {size} bytes; its descriptor "
                f"says {desc.size}",
                hint=CORRUPT_HINT,
            )
        return f


@dataclass(frozen=True)
class _IndexEntry:
    descriptor: Descriptor
    platform: tuple[str, str, str | None] | None  # os, architecture, variant

    @property
    def ref(self) -> str | None:
        return dict(self.descriptor.annotations).get(REF_NAME)


def _index_entries(data: bytes, where: str) -> list[_IndexEntry]:
    doc = parse_document(data, where, MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict):
        raise ImportRejected(f"{where} must be a JSON object")
    if type(doc.get("schemaVersion")) is not int or doc.get("schemaVersion") != 2:
        raise ImportRejected(f"{where}: schemaVersion must be 2")
    media_type = doc.get("mediaType")
    if media_type is not None and media_type not in INDEX_TYPES:
        raise ImportRejected(f"{where}: mediaType {media_type!r} is not an image index")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ImportRejected(f"{where}: 'manifests' must be a list")
    entries = []
    for i, item in enumerate(manifests):
        desc = parse_descriptor(item, f"{where} manifests[{i}]")
        ref = dict(desc.annotations).get(REF_NAME)
        if ref is not None and not is_valid_ref_name(ref):
            # Only this annotation is ever read, and only to match --ref and to list the
            # images in messages; a value outside the image-spec's grammar (a NUL, a
            # newline, an escape sequence, '..') marks a crafted index.
            raise ImportRejected(
                f"{where} manifests[{i}].annotations: {REF_NAME} {_shown(ref)} is not a "
                f"valid ref name (the image-spec's grammar, at most {MAX_REF_NAME} characters)"
            )
        raw = item.get("platform")
        platform: tuple[str, str, str | None] | None = None
        if raw is not None:
            if not (
                isinstance(raw, dict)
                and isinstance(raw.get("os"), str)
                and isinstance(raw.get("architecture"), str)
                and isinstance(raw.get("variant"), str | None)
            ):
                raise ImportRejected(f"{where} manifests[{i}].platform is malformed")
            platform = (raw["os"], raw["architecture"], raw.get("variant"))
            for word in filter(None, platform):
                if not _PLATFORM_WORD.fullmatch(word):
                    raise ImportRejected(
                        f"{where} manifests[{i}].platform: {_shown(word)} is not an os, "
                        "architecture or variant name"
                    )
        entries.append(_IndexEntry(desc, platform))
    return entries


def _shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message: control characters escaped, cut at ``limit``."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _on_host(platform: tuple[str, str, str | None] | None) -> bool:
    if platform is None:
        return False
    arch, variant = host_platform()
    return (
        platform[0] == "linux"
        and platform[1] == arch
        and (variant is None or platform[2] in (None, variant))
    )


def _describe(entries: list[_IndexEntry]) -> str:
    names = []
    for e in entries:
        label = e.ref or e.descriptor.digest.short
        if e.platform is not None:
            label += f" ({'/'.join(p for p in e.platform if p)})"
        names.append(label)
    return ", ".join(names) or "nothing"


def _choose(entries: list[_IndexEntry], ref: str | None, label: str) -> Descriptor:
    found = entries if ref is None else [e for e in entries if e.ref == ref]
    if not found:
        if ref is not None:
            raise ImportRejected(
                f"{label} has no image named {ref!r}",
                hint=f"It holds: {_describe(entries)}. Pass one of those with --ref.",
            )
        raise ImportRejected(f"{label} lists no images")
    if len(found) > 1:
        host = [e for e in found if _on_host(e.platform)]
        if len(host) != 1:
            raise ImportRejected(
                f"{label} holds {len(found)} images; choose one",
                hint=f"It holds: {_describe(found)}. Pass one with --ref.",
            )
        found = host
    return found[0].descriptor


def _import_layout_dir(
    store: ImageStore,
    layout: _Layout,
    ref: str | None,
    policy: ImportPolicy,
    progress: Progress | None,
) -> Image:
    marker = parse_document(
        layout.read_document("oci-layout", "the oci-layout file", MAX_LAYOUT_MARKER),
        "oci-layout file",
        MAX_LAYOUT_MARKER,
    )
    version = marker.get("imageLayoutVersion") if isinstance(marker, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImportRejected(
            f"{layout.label}: unsupported imageLayoutVersion {version!r} (expected 1.x)"
        )
    index = layout.read_document("index.json", "index.json", MAX_MANIFEST_BYTES)
    desc = _choose(_index_entries(index, "index.json"), ref, layout.label)
    if desc.media_type in INDEX_TYPES:
        nested = read_small_blob(layout.open_blob, desc, "image index", MAX_MANIFEST_BYTES)
        entries = _index_entries(nested, f"index {desc.digest}")
        host = [e for e in entries if _on_host(e.platform)]
        if len(host) != 1 and len(entries) != 1:
            raise ImportRejected(
                "multi-platform indexes are supported only with exactly one linux image "
                f"for this machine; {desc.digest.short} holds: {_describe(entries)}",
                hint="Copy the one platform out first, e.g. 'skopeo copy --override-arch ...'.",
            )
        desc = (host or entries)[0].descriptor
        if desc.media_type in INDEX_TYPES:
            raise ImportRejected("indexes nested more than one level are not supported")
    if desc.media_type not in MANIFEST_TYPES:
        raise ImportRejected(
            f"index entry {desc.digest} has unsupported mediaType {desc.media_type!r}"
        )
    manifest = read_small_blob(layout.open_blob, desc, "manifest", MAX_MANIFEST_BYTES)
    return import_from_manifest(
        store, manifest, desc.digest, layout.open_blob, policy=policy, progress=progress
    )


_ARCHIVE_SKIPPED = frozenset({"manifest.json", "repositories"})  # docker save's extras


def _spool_archive(source: Path, spool: Path, policy: ImportPolicy) -> None:
    """Copy the layout inside the oci-archive ``source`` into ``spool`` (in the store's
    tmp/), member by member: only ``oci-layout``, ``index.json`` and
    ``blobs/sha256/<64 hex>`` files are taken, each blob verified against its name.
    Nothing is ever extracted by a name taken from the archive."""
    label = f"archive {source}"
    blobs = spool / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def reject(member: str | None, reason: str) -> ImportRejected:
        return ImportRejected(reason, source=label, member=member)

    def too_big(limit: int) -> ImportRejected:
        return reject(None, f"the archive is larger than {limit} bytes")

    def header_too_big(after: str | None) -> ImportRejected:
        return reject(after, f"a header after this member exceeds {policy.max_header_bytes} bytes")

    try:
        with source.open("rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            plain: Readable = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
            stream = TarStream(plain, policy.max_archive_bytes, too_big)
            members = tar_members(stream, policy.max_header_bytes, header_too_big)
            for count, (tar, m) in enumerate(members, start=1):
                if count > policy.max_entries:
                    raise reject(None, f"more than {policy.max_entries} entries")
                try:
                    _spool_member(tar, m, spool, functools.partial(reject, m.name))
                except MemberDataError as e:
                    raise reject(m.name, f"its data is truncated or corrupt ({e})") from e
    except TarEndProblem as e:
        raise reject(None, e.reason) from e
    except HeaderProblem as e:
        raise reject(e.member, e.reason) from e
    except DECODE_ERRORS as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.filename:
            raise UsageError(f"cannot read {source}: {e.strerror}") from e
        raise reject(None, f"not a valid OCI archive (tar): {e}") from e


def _spool_member(
    tar: tarfile.TarFile, m: tarfile.TarInfo, spool: Path, reject: Callable[[str], ImportRejected]
) -> None:
    path = "/".join(path_parts(m.name, reject))
    check_header(tar, m, reject)
    if m.isdir():
        if m.size:
            raise reject(DATA_ON_NON_FILE.format(kind="dir", size=m.size))
        if path in ("", "blobs", "blobs/sha256"):
            return
        raise reject(
            "unexpected directory: an OCI archive holds oci-layout, index.json and "
            "blobs/sha256/<digest>"
        )
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.sparse is not None:
        kind = KINDS.get(m.type, f"type {m.type!r}")
        raise reject(f"a {kind}: an OCI archive holds only regular files and directories")
    if path in _ARCHIVE_SKIPPED:
        skip_data(tar, m)
        return
    blob = path.removeprefix("blobs/sha256/")
    if path in ("oci-layout", "index.json"):
        cap = MAX_LAYOUT_MARKER if path == "oci-layout" else MAX_MANIFEST_BYTES
        if m.size > cap:
            raise reject(f"larger than {cap} bytes")
        target = spool / path
    elif blob != path and _HEX64.match(blob):
        target = spool / "blobs" / "sha256" / blob
    else:
        raise reject(
            "unexpected entry: an OCI archive holds oci-layout, index.json and "
            "blobs/sha256/<64 hex digits> (convert other formats with "
            "'skopeo copy docker-archive:FILE oci-archive:FILE')"
        )
    h = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise reject("a second entry for the same path") from None
    except OSError as e:
        raise StoreError(f"cannot write to {spool}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in member_data(tar, m):
                h.update(chunk)
                out.write(chunk)
    except OSError as e:  # writing (reading problems are MemberDataError)
        raise StoreError(f"cannot write to {spool}: {e.strerror or e}") from e
    if target.parent.name == "sha256" and h.hexdigest() != blob:
        raise ImportRejected(
            f"blob {path} in the archive holds content with digest sha256:{h.hexdigest()}",
            member=m.name,
            hint=CORRUPT_HINT,
        )


def import_layout(
    store: ImageStore,
    source: Path,
    ref: str | None = None,
    *,
    name: str | None = None,
    policy: ImportPolicy = DEFAULT_POLICY,
    progress: Progress | None = None,
) -> Image:
    """Import an image from an OCI image layout directory or an oci-archive file.

    ``ref`` picks the image by its ``org.opencontainers.image.ref.name``; it may be
    left out when the layout holds one image (or one for this machine's platform). An
    archive is read as a stream and its blobs spooled into the store's ``tmp/`` (a tar
    has no order to rely on), then removed. Tagged ``name`` when given.
    ImportRejected when anything is wrong; nothing is recorded then."""
    if name is not None and not is_valid_name(name):
        raise UsageError(
            f"invalid image name {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter"
        )
    source = Path(source)
    if source.is_dir():
        image = _import_layout_dir(
            store, _Layout(source, f"layout {source}"), ref, policy, progress
        )
    elif source.is_file():
        spool = Path(tempfile.mkdtemp(prefix=".import-", dir=store.tmp_dir))
        try:
            _spool_archive(source, spool, policy)
            image = _import_layout_dir(
                store, _Layout(spool, f"archive {source}"), ref, policy, progress
            )
        finally:
            shutil.rmtree(spool, ignore_errors=True)
    elif not source.exists():
        raise UsageError(
            f"{source} does not exist",
            hint="Give an OCI layout directory or an oci-archive file.",
        )
    else:
        raise UsageError(f"{source} is neither a directory nor a regular file")
    if name is not None:
        store.tag(name, image.digest)
        image = replace(image, name=name)
    return image
