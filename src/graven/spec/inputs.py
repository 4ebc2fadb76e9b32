"""Reading a file a user named (the spec, an env file) without trusting what it is.

Standard library only, so the lean paths of the CLI can use it too.

A path can name a FIFO, a device or a socket as easily as a file: reading one blocks
forever or never ends. So the file is opened without blocking, the *opened* file is
checked (a check of the path would race with a swap of what it names), and at most
``limit + 1`` bytes are read, whatever the file claims its size is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# A spec is a page of YAML; an env file a few lines. Anything this large is a mistake.
MAX_SPEC_BYTES = 4 * 1024 * 1024


class NotARegularFile(OSError):
    """The path names a directory, FIFO, device or socket; ``kind`` says which."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


class FileTooLarge(OSError):
    """The file holds more than ``limit`` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(f"{path} is larger than {limit} bytes")
        self.limit = limit


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words: ``a named pipe (FIFO)``."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, refusing anything else at once.

    Raises ``NotARegularFile``, ``FileTooLarge``, or the ``OSError`` of opening it
    (``FileNotFoundError``, ``PermissionError``, ...).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        # A Unix socket cannot be opened at all (ENXIO): say what it is instead.
        try:
            mode = path.stat().st_mode
        except OSError:
            raise exc from None
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise NotARegularFile(path, kind_of(mode)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(path, kind_of(info.st_mode))
        if info.st_size > limit:
            raise FileTooLarge(path, limit)
        chunks: list[bytes] = []
        left = limit + 1  # the file may have grown since fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise FileTooLarge(path, limit)
    return data
