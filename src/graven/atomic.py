"""Crash-safe file writes: a reader sees the old content or the new, never a mix.

One sequence serves every writer: a temp file on the target's filesystem, written,
fsynced, given its mode, renamed over the target, then the directory fsynced.
``write_atomic`` is it for bytes in hand; ``PendingFile`` for content that is streamed
or whose target is known only at the end (a blob named by the digest of what was
written). ``durable=False`` skips both fsyncs, for a writer that makes many files
durable at once (the content store's one syncfs) or can afford to lose the write.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO


class PendingFile:
    """A temp file in ``directory`` that becomes its target on ``commit``, and is
    removed if the block ends without one::

        with PendingFile(tmp_dir, prefix=".w-") as pending:
            pending.file.write(data)
            pending.commit(final, mode=0o444)

    The target's parent directory must exist and be on the same filesystem.
    """

    __slots__ = ("_committed", "_tmp", "file")

    def __init__(self, directory: Path, *, prefix: str = ".tmp-", suffix: str = "") -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
        self._tmp = Path(name)
        self._committed = False
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.file.close()
        finally:
            if not self._committed:
                self._tmp.unlink(missing_ok=True)

    def commit(self, target: Path, *, mode: int | None = 0o644, durable: bool = True) -> None:
        """Put the content written so far at ``target`` (``mode`` None: keep 0o600)."""
        self.file.flush()
        if durable:
            os.fsync(self.file.fileno())
        self.file.close()
        if mode is not None:
            self._tmp.chmod(mode)
        self._tmp.replace(target)
        self._committed = True
        if durable:
            fsync_dir(target.parent)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    tmp_dir: Path | None = None,
    durable: bool = True,
) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename + directory fsync.

    The temp file goes beside ``path`` unless ``tmp_dir`` (same filesystem) is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with PendingFile(tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".tmp") as f:
            f.file.write(data)
            f.commit(path, mode=mode, durable=durable)
    except OSError as exc:
        if exc.filename is None:  # a write to the temp file: say which file it was for
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it, say) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
