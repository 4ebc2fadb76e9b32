"""Tar member names and kinds: path components checked before anything is recorded,
symlink targets, whiteout names, and what each tar type is called in messages.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable

from graven.store.oci_import.policy import ImportRejected

AUFS_META_PREFIX = ".wh..wh."
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 256


def path_parts(name: str, reject: Callable[[str], ImportRejected], what: str = "name") -> list[str]:
    """``name`` as path components below the image root; raise ``reject(reason)`` if unsafe."""
    if "\0" in name:
        raise reject(f"the {what} contains a NUL byte")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise reject(f"the {what} is not valid UTF-8") from None
    if name.startswith("/"):
        raise reject(f"the {what} is an absolute path (members must be relative to the root)")
    if len(encoded) > MAX_PATH_BYTES:
        raise reject(f"the {what} is longer than {MAX_PATH_BYTES} bytes")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise reject(f"the {what} has a '..' component (path traversal)")
    if len(parts) > MAX_DEPTH:
        raise reject(f"the {what} is nested deeper than {MAX_DEPTH} directories")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise reject(f"a component of the {what} is longer than {MAX_NAME_BYTES} bytes")
    return parts


def symlink_target(target: str, reject: Callable[[str], ImportRejected]) -> str:
    """``target`` if a symlink may hold it (non-empty, UTF-8, no NUL, within the caps)."""
    if not target:
        raise reject("the symlink has an empty target")
    if "\0" in target:
        raise reject("the symlink target contains a NUL byte")
    try:
        size = len(target.encode("utf-8"))
    except UnicodeEncodeError:
        raise reject("the symlink target is not valid UTF-8") from None
    if size >= MAX_PATH_BYTES:
        raise reject(f"the symlink target is longer than {MAX_PATH_BYTES - 1} bytes")
    return target


KINDS: dict[bytes, str] = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}
DEVICES = frozenset({"character device", "block device", "fifo"})
# tarfile reads the next header right after such a member, other readers after its data.
DATA_ON_NON_FILE = (
    "a {kind} that declares {size} bytes of data: only files carry data, and readers "
    "disagree on where the next member starts"
)
