"""Byte streams of one layer: the verified blob, decompression, the size- and
digest-checked tar stream, and tar headers read strictly, one member at a time.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol, cast

from graven.model import Digest
from graven.store.cas.blobs import CHUNK_SIZE
from graven.store.oci_import.policy import CORRUPT_HINT, ImportRejected
from graven.store.oci_types import (
    DOCKER_LAYER_GZIP,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Descriptor,
)

MAX_ID = 2**32 - 2  # (uid_t)-1 is no owner at all: chown(2) reads it as "leave unchanged"
MAX_MODE = 0o177777  # permission bits, and the file-type bits some writers copy from st_mode

_BLOCK = 512
_TAR_BUFSIZE = 64 * 1024
# pax numbers as POSIX writes them: decimal; times may be negative and have a fraction.
_PAX_COUNT = re.compile(r"[0-9]{1,20}")
_PAX_TIME = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]+)?")
_PAX_NUMBERS = {"size": _PAX_COUNT, "uid": _PAX_COUNT, "gid": _PAX_COUNT}
_PAX_NUMBERS |= dict.fromkeys(("mtime", "atime", "ctime"), _PAX_TIME)
# What a global pax header may not set: tarfile applies it to every later member, and
# other readers do not.
_PAX_MEMBER_ONLY = frozenset({"path", "linkpath", "size"})


class Readable(Protocol):
    """What a layer's bytes are read from: a blob, a decompressor, the tar stream."""

    def read(self, n: int = -1, /) -> bytes: ...


class _CorruptStream(ValueError):
    """A decompressor found the compressed bytes malformed."""


class VerifiedBlob:
    """A blob read as its descriptor says: exactly ``size`` bytes hashing to ``digest``.

    More bytes, fewer bytes or another digest raise ImportRejected as soon as known; the
    first such problem is kept in ``failure`` (decoders above may swallow or wrap it)."""

    def __init__(
        self, raw: BinaryIO, desc: Descriptor, what: str, layer: Digest | None = None
    ) -> None:
        self._raw = raw
        self._desc = desc
        self._what = what
        self._layer = layer
        self._hash = hashlib.sha256()
        self._left = desc.size
        self._done = False
        self.failure: ImportRejected | None = None

    def _fail(self, reason: str) -> ImportRejected:
        # A layer's digest is in the message's "where" already.
        subject = "the blob" if self._layer is not None else f"the {self._what} {self._desc.digest}"
        self.failure = ImportRejected(f"{subject} {reason}", layer=self._layer, hint=CORRUPT_HINT)
        return self.failure

    def read(self, n: int = -1, /) -> bytes:
        if self.failure is not None:
            raise self.failure
        if self._done or n == 0:
            return b""
        want = min(CHUNK_SIZE if n < 0 else n, self._left + 1)  # +1 notices an overlong blob
        try:
            data = self._raw.read(want)
        except OSError as e:
            raise self._fail(f"cannot be read: {e.strerror or e}") from e
        if not data:
            if self._left:
                got = self._desc.size - self._left
                raise self._fail(f"ends after {got} of {self._desc.size} bytes (truncated)")
            self._finish()
            return b""
        if len(data) > self._left:
            raise self._fail(f"is longer than the {self._desc.size} bytes declared")
        self._hash.update(data)
        self._left -= len(data)
        if not self._left:
            if self._raw.read(1):
                raise self._fail(f"is longer than the {self._desc.size} bytes declared")
            self._finish()
        return data

    def _finish(self) -> None:
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._desc.digest:
            raise self._fail(f"hashes to {actual}, not to its declared digest")
        self._done = True

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass

    def integrity_problem(self) -> ImportRejected | None:
        """Read to the end; the size or digest problem found, if any (else None)."""
        if self.failure is None:
            with contextlib.suppress(ImportRejected):
                self.drain()
        return self.failure


class _ZstdStream:
    """zstandard's stream reader, its errors turned into ``_CorruptStream``."""

    def __init__(self, source: VerifiedBlob) -> None:
        import zstandard  # lazily: only zstd layers pay for the import

        self._error = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, source), read_across_frames=True
        )

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._reader.read(CHUNK_SIZE if n < 0 else n)
        except self._error as e:
            raise _CorruptStream(f"corrupt zstd data: {e}") from e


def zstd_available() -> bool:
    """Whether the optional zstandard module is installed."""
    return importlib.util.find_spec("zstandard") is not None


def decompressed_stream(media_type: str, blob: VerifiedBlob) -> Readable:
    """The uncompressed bytes of a layer blob of ``media_type``."""
    if media_type in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP):
        return gzip.GzipFile(fileobj=cast(BinaryIO, blob), mode="rb")
    if media_type == OCI_LAYER_ZSTD:
        return _ZstdStream(blob)
    return blob


class TarStream:
    """The uncompressed tar as tarfile reads it: hashed, capped, watched.

    ``data_end`` is the offset just past the last non-zero byte, so whatever follows
    the archive's end can be proven to be zero padding. While ``header_budget`` is in
    force, reads are capped: tarfile holds a member's pax or long-name records in
    memory, and a hostile archive could declare them gigabytes long."""

    def __init__(
        self, source: Readable, cap: int, too_big: Callable[[int], ImportRejected]
    ) -> None:
        self._source = source
        self._cap = cap
        self._too_big = too_big
        self._hash = hashlib.sha256()
        self._budget: int | None = None
        self._budget_error: Callable[[], ImportRejected] | None = None
        self.size = 0
        self.data_end = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(CHUNK_SIZE if n < 0 else n)
        if not data:
            return b""
        start = self.size
        self.size += len(data)
        if self.size > self._cap:
            raise self._too_big(self._cap)
        if self._budget is not None:
            self._budget -= len(data)
            if self._budget < 0 and self._budget_error is not None:
                raise self._budget_error()
        self._hash.update(data)
        if kept := len(data.rstrip(b"\0")):
            self.data_end = start + kept
        return data

    @contextlib.contextmanager
    def header_budget(self, limit: int, error: Callable[[], ImportRejected]) -> Iterator[None]:
        self._budget, self._budget_error = limit, error
        try:
            yield
        finally:
            self._budget, self._budget_error = None, None

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._hash.hexdigest())


# Errors tarfile and the decompressors raise on malformed input (tarfile passes some
# parsing errors through as ValueError; gzip raises EOFError when truncated, and
# BadGzipFile, an OSError, on a bad header).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    ValueError,
)


class TarEndProblem(Exception):
    """The tar stream does not end as a tar must (found after its last member)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HeaderProblem(Exception):
    """A member's header records say something tarfile would quietly reinterpret."""

    def __init__(self, reason: str, member: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.member = member


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a GNU long name or long link target with a NUL inside.

    tarfile (as GNU tar and Go) cuts such a record at its first NUL: whatever follows is
    hidden from every reader, which is only ever useful to hide something."""

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile's own method, with the check: the record cannot be read twice.
        fileobj = cast(BinaryIO, tar.fileobj)
        record = fileobj.read(-(-self.size // _BLOCK) * _BLOCK)[: self.size].rstrip(b"\0")
        try:
            following = self.fromtarfile(tar)
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(str(e)) from None  # what tarfile makes of it
        following.offset = self.offset
        cut = record.split(b"\0", 1)[0].decode(tar.encoding or "utf-8", tar.errors)
        what = "long name"
        if self.type == tarfile.GNUTYPE_LONGNAME:
            following.name = cut
        else:
            following.linkname, what = cut, "long link target"
        if following.isdir():
            following.name = following.name.removesuffix("/")
        if b"\0" in record:
            raise HeaderProblem(
                f"its GNU {what} goes on after a NUL byte (readers cut it there)",
                following.name,
            )
        return following


def check_header(
    tar: tarfile.TarFile, m: tarfile.TarInfo, reject: Callable[[str], ImportRejected]
) -> None:
    """Refuse header values no tool writes, or that readers would take differently.

    tarfile reads a malformed pax number as 0, lets a global pax header rename or resize
    every later member, and takes ``GNU.sparse.name`` as the name even of a file that is
    not sparse; owners, modes and times beyond any file system's range mark a crafted
    archive (graven records none of them, so valid values are simply dropped)."""
    overriding = sorted(_PAX_MEMBER_ONLY.intersection(tar.pax_headers))
    if overriding:
        raise reject(f"a global pax header sets {overriding[0]!r} for every member that follows")
    for key, value in m.pax_headers.items():
        if key.startswith("GNU.sparse."):
            raise reject(f"a GNU sparse record ({key!r}): sparse files are not supported")
        pattern = _PAX_NUMBERS.get(key)
        if pattern is not None and not pattern.fullmatch(value):
            raise reject(f"the pax record {key}={value!r:.40} is not a valid number")
    for field_name, owner in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= owner <= MAX_ID:
            raise reject(f"{field_name} {owner} is out of range (0 to {MAX_ID})")
    if not 0 <= m.mode <= MAX_MODE:
        raise reject(f"mode {m.mode:#o} is out of range (at most {MAX_MODE:#o})")


def _open_tar(stream: TarStream, header_limit: int, error: Callable[[], ImportRejected]) -> Any:
    with stream.header_budget(header_limit, error):
        try:
            return tarfile.open(
                fileobj=cast(BinaryIO, stream),
                mode="r|",
                bufsize=_TAR_BUFSIZE,
                tarinfo=_StrictTarInfo,
                encoding="utf-8",
                errors="surrogateescape",  # undecodable names stay visible, and are refused
            )
        except tarfile.ReadError:
            if stream.size == 0:
                raise TarEndProblem(
                    "the tar stream is empty (an empty or truncated blob)"
                ) from None
            raise


def tar_members(
    stream: TarStream, header_limit: int, error: Callable[[str | None], ImportRejected]
) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The members of the tar in ``stream``, one at a time, then the end check.

    The caller reads (or skips) each member's data before asking for the next."""
    # tarfile reads ahead a buffer or two past the header records it parses.
    limit = header_limit + 4 * _TAR_BUFSIZE
    last: str | None = None
    tar: tarfile.TarFile = _open_tar(stream, limit, lambda: error(None))
    while True:
        with stream.header_budget(limit, functools.partial(error, last)):
            member = tar.next()
        if member is None:
            break
        cast(Any, tar).members.clear()  # stream mode: keep memory flat however many members
        yield tar, member
        last = member.name
    stream.drain()
    end = tar.offset
    if stream.size < end + _BLOCK:
        raise TarEndProblem(
            "the tar ends inside a header or without its end-of-archive marker (truncated)"
        )
    if stream.data_end > end:
        after = f"member {last!r}" if last is not None else "the start"
        raise TarEndProblem(
            f"bytes after {after} are not a valid tar header (a corrupt or crafted archive)"
        )
