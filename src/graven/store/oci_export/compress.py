"""Byte pipelines: layer compressors and a digesting stage, each a sink bytes go through.

gzip is written with a fixed header (mtime 0, no file name, OS "unknown") at a fixed
level, zstd at a fixed level with a checksum: the same input gives the same bytes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Literal, Protocol

from graven.errors import UsageError
from graven.model import Digest
from graven.store.oci_types import (
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
)

Compression = Literal["gzip", "zstd", "none"]
COMPRESSIONS: tuple[Compression, ...] = ("gzip", "zstd", "none")
MEDIA_TYPES: dict[Compression, str] = {
    "gzip": OCI_LAYER_GZIP,
    "zstd": OCI_LAYER_ZSTD,
    "none": OCI_LAYER_TAR,
}
GZIP_LEVEL = 6  # zlib's default: level 9 costs far more time for a few percent
ZSTD_LEVEL = 3  # zstd's default
# RFC 1952 header: magic, CM=deflate, FLG=0 (no name, no comment), MTIME=0,
# XFL=0 (level 6 is neither "best" nor "fastest"), OS=255 (unknown).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


class ByteSink(Protocol):
    """Anything bytes can be written to (a binary file, a hashing or compressing stage)."""

    def write(self, data: bytes, /) -> object: ...


def check_compression(value: str) -> Compression:
    """``value`` as a Compression; UsageError naming the choices otherwise."""
    for c in COMPRESSIONS:
        if value == c:
            return c
    raise UsageError(f"unknown compression {value!r}: expected one of {', '.join(COMPRESSIONS)}")


class Digesting:
    """Passes bytes through to ``out`` and hashes them on the way."""

    def __init__(self, out: ByteSink | None = None) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)
        return len(data)

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._hash.hexdigest())


class _Compressor(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def finish(self) -> None: ...


class _Plain:
    def __init__(self, out: ByteSink) -> None:
        self._out = out

    def write(self, data: bytes, /) -> int:
        self._out.write(data)
        return len(data)

    def finish(self) -> None:
        return None


class _Gzip:
    """Gzip with a fixed header: the same input gives the same bytes (RFC 1952)."""

    def __init__(self, out: ByteSink) -> None:
        self._out = out
        self._deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0
        out.write(_GZIP_HEADER)

    def write(self, data: bytes, /) -> int:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        if chunk := self._deflate.compress(data):
            self._out.write(chunk)
        return len(data)

    def finish(self) -> None:
        self._out.write(self._deflate.flush())
        self._out.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))


class _Zstd:
    """One zstd frame, with checksum, without content size (the input is streamed)."""

    def __init__(self, out: ByteSink) -> None:
        import zstandard  # lazily: only zstd exports pay for the import

        self._out = out
        self._z = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()

    def write(self, data: bytes, /) -> int:
        if chunk := self._z.compress(data):
            self._out.write(chunk)
        return len(data)

    def finish(self) -> None:
        self._out.write(self._z.flush())


def open_compressor(compression: Compression, out: ByteSink) -> _Compressor:
    """The compressor for ``compression``, writing its output to ``out``."""
    if compression == "gzip":
        return _Gzip(out)
    if compression == "zstd":
        return _Zstd(out)
    return _Plain(out)
