"""Hand-built OCI layouts and archives for the import tests, hostile ones included.

Tar members are written header by header (``TarInfo.tobuf``), so a test can put any
name, type, mode or link target in an archive, exactly as an attacker would; digests
are computed for real unless a test sets out to falsify one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from graven.store.oci_types import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME,
)

Member = tuple[tarfile.TarInfo, bytes | None]

MEDIA = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER_TAR}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    return info


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    info = _info(name, tarfile.REGTYPE, mode)
    info.size = len(data)
    return info, data


def dir_(name: str, mode: int = 0o755) -> Member:
    return _info(name, tarfile.DIRTYPE, mode), None


def sym(name: str, target: str) -> Member:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, None


def link(name: str, target: str) -> Member:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, None


def dev(name: str, kind: bytes = tarfile.CHRTYPE) -> Member:
    info = _info(name, kind, 0o600)
    info.devmajor, info.devminor = 1, 3
    return info, None


def pax(name: str, data: bytes = b"", **headers: str) -> Member:
    """A regular file whose pax records can say anything (a NUL in ``path``, say)."""
    info, content = reg(name, data)
    info.pax_headers = dict(headers)
    return info, content


def pax_records(**records: str) -> bytes:
    """Pax extended-header records ("LEN key=value\\n"), written as given."""
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return out


def raw_header(kind: bytes, payload: bytes, name: str = "././@LongLink") -> Member:
    """A header member of type ``kind`` (a GNU long name, a global pax header) whose
    data is ``payload`` exactly, for tarfile to interpret."""
    info = _info(name, kind, 0o644)
    info.size = len(payload)
    return info, payload


def patched(member: Member, at: int, value: bytes, fmt: int = tarfile.GNU_FORMAT) -> Member:
    """``member`` with bytes ``at`` of its (last) header replaced by ``value`` and the
    checksum redone: for numbers tarfile would never write (a mode with bits beyond
    0o7777, a negative size). ``tar_of`` writes the result as it is."""
    info, data = member
    raw = bytearray(info.tobuf(fmt, "utf-8", "surrogateescape"))
    start = len(raw) - 512
    raw[start + at : start + at + len(value)] = value
    raw[start + 148 : start + 156] = b" " * 8
    raw[start + 148 : start + 156] = b"%06o\x00 " % sum(raw[start:])
    return _Raw(bytes(raw)), data


class _Raw(tarfile.TarInfo):
    """Header bytes written verbatim by ``tar_of``."""

    def __init__(self, header: bytes) -> None:
        super().__init__()
        self._header = header

    def tobuf(self, *args: Any, **kwargs: Any) -> bytes:
        return self._header


def tar_of(
    *members: Member,
    fmt: Literal[0, 1, 2] = tarfile.PAX_FORMAT,
    end: bool = True,
    size_lie: int = 0,
) -> bytes:
    """A tar stream of ``members``; ``size_lie`` adds to the last file's declared size."""
    out = io.BytesIO()
    for i, (info, data) in enumerate(members):
        if size_lie and i == len(members) - 1:
            info.size += size_lie
        out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        if data:
            out.write(data)
            out.write(b"\0" * (-len(data) % 512))
    if end:
        out.write(b"\0" * 1024)
    return out.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


@dataclass
class Written:
    path: Path
    manifest: bytes
    manifest_digest: str
    config: bytes
    layer_blobs: list[bytes] = field(default_factory=list)
    layer_digests: list[str] = field(default_factory=list)

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _put(blobs: Path, data: bytes) -> str:
    digest = sha(data)
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    return digest


def write_layout(
    dest: Path,
    layers: Sequence[bytes],
    *,
    compression: str = "gzip",
    run: dict[str, Any] | None = None,
    docker: bool = False,
    ref: str | None = "latest",
    blobs: Sequence[bytes] | None = None,
    config_hook: Callable[[dict[str, Any]], Any] | None = None,
    manifest_hook: Callable[[dict[str, Any]], Any] | None = None,
    config_bytes: bytes | None = None,
    manifest_bytes: bytes | None = None,
    index_hook: Callable[[dict[str, Any]], Any] | None = None,
) -> Written:
    """An OCI layout at ``dest`` holding one image made of ``layers`` (uncompressed tars).

    ``blobs`` replaces the compressed layer blobs (descriptors follow them); the hooks
    edit the documents before they are serialized, ``*_bytes`` replace them whole."""
    blob_dir = dest / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    layer_media = DOCKER_LAYER_GZIP if docker else MEDIA[compression]
    compressed = list(blobs) if blobs is not None else [compress(t, compression) for t in layers]
    descriptors: list[dict[str, Any]] = []
    for blob in compressed:
        descriptors.append(
            {"mediaType": layer_media, "digest": _put(blob_dir, blob), "size": len(blob)}
        )
    config_doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/app"]} if run is None else run,
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
    }
    if config_hook is not None:
        config_hook(config_doc)
    config = config_bytes if config_bytes is not None else json.dumps(config_doc).encode()
    config_digest = _put(blob_dir, config)
    manifest_doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": config_digest,
            "size": len(config),
        },
        "layers": descriptors,
    }
    if manifest_hook is not None:
        manifest_hook(manifest_doc)
    manifest = manifest_bytes if manifest_bytes is not None else json.dumps(manifest_doc).encode()
    manifest_digest = _put(blob_dir, manifest)
    entry: dict[str, Any] = {
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "digest": manifest_digest,
        "size": len(manifest),
    }
    if ref is not None:
        entry["annotations"] = {REF_NAME: ref}
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    if index_hook is not None:
        index_hook(index)
    (dest / "index.json").write_bytes(json.dumps(index).encode())
    (dest / "oci-layout").write_bytes(b'{"imageLayoutVersion":"1.0.0"}')
    return Written(
        dest, manifest, manifest_digest, config, compressed, [d["digest"] for d in descriptors]
    )


def add_manifest(
    layout: Path, written: Written, ref: str, platform: dict[str, str] | None = None
) -> None:
    """Add another index entry (same manifest, another ref or platform) to ``layout``."""
    index = json.loads((layout / "index.json").read_bytes())
    entry: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": written.manifest_digest,
        "size": len(written.manifest),
        "annotations": {REF_NAME: ref},
    }
    if platform is not None:
        entry["platform"] = platform
    index["manifests"].append(entry)
    (layout / "index.json").write_bytes(json.dumps(index).encode())


def archive_of(
    layout: Path, dest: Path, *, extra: Sequence[Member] = (), index_first: bool = False
) -> Path:
    """An oci-archive tar of ``layout`` (blobs, then index.json and oci-layout, as
    ``graven image export`` writes them), with ``extra`` members appended."""
    members: list[Member] = [dir_("blobs"), dir_("blobs/sha256")]
    for path in sorted((layout / "blobs" / "sha256").iterdir()):
        members.append(reg(f"blobs/sha256/{path.name}", path.read_bytes()))
    tail = [reg(name, (layout / name).read_bytes()) for name in ("index.json", "oci-layout")]
    members = tail + members if index_first else members + tail
    dest.write_bytes(tar_of(*members, *extra))
    return dest


def tree_listing(root: Path, skip: Path | None = None) -> dict[str, tuple[str, int, str]]:
    """Every path below ``root`` (not following symlinks) with type, mode and content
    hash: what "nothing was written" is checked against."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if skip is not None and path == skip:
                continue
            st = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("symlink", st.st_mode, os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", st.st_mode, "")
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
                out[str(path)] = ("file", st.st_mode, digest)
    return out
