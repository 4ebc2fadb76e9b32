"""Blobs: immutable content named by its sha256, the ground floor of the content store.

Every write goes to a temp file in ``tmp/`` (same filesystem) and is renamed into
place, so a reader sees an object whole or not at all. Two writers of the same
content race harmlessly: both renames leave identical bytes behind. A new blob is
not fsynced on its own: ``sync`` (one syncfs) makes every blob written so far durable
before anything durable (a ref, a cache entry, a replaced damaged blob) may name it.

A write of a blob that is already present is skipped only once the present one is
proven right: a small blob is compared with the bytes being written, a large one is
hashed. So a damaged blob (bit rot, a stray write) is replaced by the next build or
pull that writes it, by temp file, fsync and rename. Hashing a large blob on every
skip would double the cost of re-ingesting a build context, so a blob that hashed
right is remembered by its stat signature (inode, size, mtime_ns, ctime_ns), in
memory and, for large blobs, in ``verified/``: an untouched blob is not hashed again,
while any write to it (even one that restores its mtime) changes its ctime and gets
it hashed. The ctime ticks coarsely, so a signature is remembered only once the
blob is ``SETTLED_NS`` old: a write in the same tick cannot hide behind it. Damage
that bypasses the kernel (a failing disk) keeps the signature; ``fsck`` hashes
everything, always.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from graven.atomic import PendingFile
from graven.errors import StoreError
from graven.model import Digest

CHUNK_SIZE = 1 << 20
# (inode, size, mtime_ns, ctime_ns): any write to a file changes its ctime.
_Signature = tuple[int, int, int, int]
_BlobState = Literal["sound", "absent", "damaged"]
_VERIFIED_MEMO_SIZE = 1 << 16
# A blob changed less than this long ago is never trusted by its stat signature.
SETTLED_NS = 2 * 10**9
REPAIR_HINT = "Run 'graven store fsck --repair', then rebuild or pull the affected images."
# Prefix of the store's temp files in tmp/.
_TMP_PREFIX = ".w-"


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    import ctypes  # only when something is written: reads stay lean

    try:
        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6", use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    return fn


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_blob(path: Path, digest: Digest, data: bytes | None) -> _Signature | None:
    """The signature of the blob at ``path`` when its content is ``data`` (or, without
    ``data``, hashes to ``digest``); None when it is not, or cannot be read. The
    signature is taken from the file that was read, not from a path looked up again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            if data is not None:
                same = f.read(len(data) + 1) == data
            else:
                h = hashlib.sha256()
                while chunk := f.read(CHUNK_SIZE):
                    h.update(chunk)
                same = "sha256:" + h.hexdigest() == digest
        except OSError:
            return None
    return _signature(st) if same else None


class BlobStore:
    """Blobs by content under ``root/blobs/sha256/ab/cdef...`` (an OCI layout's blob
    directory with a two-hex fan-out), with the store's temp and lock directories.

    Safe for concurrent use by several processes: blobs are immutable and written by
    atomic rename; read-modify-write updates are serialized with file locks.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self._locks = self.root / "locks"
        self._verified_dir = self.root / "verified"
        self._open_dirs(self._blobs, self.tmp_dir, self._locks)
        # Blobs proven right, by stat signature: a skipped write need not read them again.
        self._verified: dict[Digest, _Signature] = {}
        # Blobs are written without an fsync each; one syncfs makes them durable before
        # anything durable (a ref, a cache entry) may point at them.
        self._unsynced = False

    def _open_dirs(self, *dirs: Path) -> None:
        try:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot open the content store at {self.root}: {e}") from e

    # --- low-level writes -------------------------------------------------------------

    def _write_atomic(
        self,
        final: Path,
        data: bytes,
        *,
        mode: int = 0o644,
        tmp_dir: Path | None = None,
        durable: bool = True,
    ) -> None:
        try:
            if durable:
                self.sync()
            final.parent.mkdir(parents=True, exist_ok=True)
            with PendingFile(tmp_dir or self.tmp_dir, prefix=_TMP_PREFIX) as pending:
                pending.file.write(data)
                pending.commit(final, mode=mode, durable=durable)
        except OSError as e:
            raise StoreError(f"cannot write {final}: {e.strerror or e}") from e
        if not durable:
            self._unsynced = True

    def sync(self) -> None:
        """Make every blob written so far durable (one syncfs, not one fsync per blob)."""
        if not self._unsynced:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs = _libc_syncfs()
            if syncfs is None or syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)
        self._unsynced = False

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with (self._locks / f"{name}.lock").open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # --- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        """Where the blob lives (whether or not it is present)."""
        hex_ = Digest(digest).hex  # re-validated: the path must never leave blobs/
        return self._blobs / hex_[:2] / hex_[2:]

    def has(self, digest: Digest) -> bool:
        return self.blob_path(digest).is_file()

    def _blob_state(self, digest: Digest, size: int, data: bytes | None = None) -> _BlobState:
        """Whether the blob is present and right (``sound``), absent, or ``damaged``
        (wrong length, wrong content, not a regular file).

        ``data``, when given, is the blob's content: compared byte for byte instead of
        hashed. A signature remembered from an earlier check spares the read."""
        path = self.blob_path(digest)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return "absent"
        except OSError:
            return "damaged"
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return "damaged"  # a blob cut short by a power loss, say
        signature = _signature(st)
        if self._verified.get(digest) == signature:
            return "sound"
        large = data is None
        if large and self._recorded(digest) == signature:
            self._remember_sound(digest, signature)
            return "sound"
        checked = _check_blob(path, digest, data)
        if checked is None:
            return "damaged"
        self._remember_sound(digest, checked, record=large)
        return "sound"

    def _remember_sound(
        self, digest: Digest, signature: _Signature, *, record: bool = False
    ) -> None:
        if time.time_ns() - signature[3] < SETTLED_NS:
            # ctime ticks coarsely: a write just after this one could keep the same
            # signature. Trusted only once settled (like git's racy index entries).
            return
        if len(self._verified) >= _VERIFIED_MEMO_SIZE:
            self._verified.clear()
        self._verified[digest] = signature
        if record:
            # Not fsynced: a lost or torn record only costs one more hash.
            with contextlib.suppress(OSError):
                path = self._verified_path(digest)
                path.parent.mkdir(parents=True, exist_ok=True)
                with PendingFile(self.tmp_dir, prefix=_TMP_PREFIX) as pending:
                    pending.file.write((" ".join(str(n) for n in signature) + "\n").encode())
                    pending.commit(path, mode=None, durable=False)

    def _verified_path(self, digest: Digest) -> Path:
        hex_ = Digest(digest).hex
        return self._verified_dir / hex_[:2] / hex_[2:]

    def _recorded(self, digest: Digest) -> _Signature | None:
        try:
            fields = self._verified_path(digest).read_text().split()
            ino, size, mtime, ctime = (int(n) for n in fields)
        except (OSError, ValueError):
            return None
        return (ino, size, mtime, ctime)

    def forget_verified(self, digest: Digest) -> None:
        """Drop what is remembered about ``digest`` having hashed right (when it goes)."""
        self._verified.pop(digest, None)
        with contextlib.suppress(OSError):
            self._verified_path(digest).unlink()

    def has_verified(self, digest: Digest, size: int) -> bool:
        """True when the blob is present, ``size`` bytes long and hashes to ``digest``.

        Remembered by stat signature (see the module docstring), so asking again about
        an untouched blob costs a stat, not a read."""
        return self._blob_state(digest, size) == "sound"

    def put_bytes(self, data: bytes) -> Digest:
        """Store ``data``; return its digest. A no-op when the blob is present and right;
        a damaged one is replaced (durably)."""
        digest = Digest.of_bytes(data)
        state = self._blob_state(digest, len(data), data)
        if state != "sound":
            path = self.blob_path(digest)
            self._write_atomic(path, data, mode=0o444, durable=state == "damaged")
        return digest

    def put_file(self, path: Path) -> Digest:
        """Store a regular file (symlinks are not followed); return its digest.

        The file is hashed first and copied only when the store lacks the blob.
        """
        return self._put_regular(Path(path))[0]

    def _put_regular(self, path: Path) -> tuple[Digest, int]:
        try:
            # O_NONBLOCK: a fifo swapped in after the caller's lstat must not hang us.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{path} is not a regular file")
            try:
                return self._put_stream(f)
            except OSError as e:
                raise StoreError(f"cannot store {path}: {e.strerror or e}") from e

    def _put_stream(self, f: BinaryIO) -> tuple[Digest, int]:
        first = f.read(CHUNK_SIZE)
        if len(first) < CHUNK_SIZE:
            return self.put_bytes(first), len(first)
        h = hashlib.sha256(first)
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
        digest = Digest("sha256:" + h.hexdigest())
        state = self._blob_state(digest, f.tell())
        if state == "sound":
            return digest, f.tell()
        # Copy, hashing again: the file may change between the passes, and the store
        # must name what it actually holds.
        f.seek(0)
        h = hashlib.sha256()
        size = 0
        damaged = state == "damaged"
        with PendingFile(self.tmp_dir, prefix=_TMP_PREFIX) as pending:
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)
                pending.file.write(chunk)
                size += len(chunk)
            digest = Digest("sha256:" + h.hexdigest())
            final = self.blob_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Replacing a damaged blob: durable before it takes the old one's place.
            pending.commit(final, mode=0o444, durable=damaged)
        # Not remembered as verified: it has just changed, so its ctime has not settled.
        self._unsynced = True
        return digest, size

    def open_blob(self, digest: Digest) -> BinaryIO:
        """Open a blob for reading; StoreError when it is missing."""
        try:
            return self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise StoreError(
                f"blob {digest} is missing from the store at {self.root}",
                hint=REPAIR_HINT,
            ) from None

    def read_blob(self, digest: Digest) -> bytes:
        """A small blob's bytes, verified against its digest; StoreError if corrupt."""
        with self.open_blob(digest) as f:
            data = f.read()
        if Digest.of_bytes(data) != digest:
            raise StoreError(
                f"blob {digest} is corrupt: its content does not match its digest",
                hint=REPAIR_HINT,
            )
        return data

    def verify_blob(self, digest: Digest) -> bool:
        """True when the blob is present and its content hashes to its digest."""
        h = hashlib.sha256()
        try:
            with self.blob_path(digest).open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return "sha256:" + h.hexdigest() == digest

    @staticmethod
    def _mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path
