"""Which uid and gid an image's ``user`` means, read from the image's own files.

A recipe's ``user:`` step says ``NAME``, ``UID``, ``NAME:GROUP`` or ``UID:GID``. Names
are looked up in the image's ``/etc/passwd`` and ``/etc/group`` (never the host's:
the same name may be another uid there). A bare uid that the image's passwd does not
list runs with gid = uid, as container runtimes do. Runtimes share this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, NamedTuple

from graven.errors import RuntimeFailure

# The uid and gid an instance runs as when graven is root and the image names no
# user: "nobody", which owns nothing on the host.
UNPRIVILEGED: Final = 65534
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel
_MAX_DB_BYTES = 1 << 20


class ImageUser(NamedTuple):
    """A numeric user and primary group."""

    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.uid}:{self.gid}"


def _numeric(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def _entries(root: Path, name: str) -> list[list[str]]:
    """The colon-separated lines of ``/etc/NAME`` in the image tree at ``root``.

    The file is read only if it is a regular file inside the image (not a symlink that
    could point at the host's)."""
    path = root / "etc" / name
    try:
        if path.is_symlink() or not path.is_file():
            return []
        data = path.read_bytes()[:_MAX_DB_BYTES]
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return [line.split(":") for line in lines if line and not line.startswith("#")]


def resolve_image_user(root: Path, user: str) -> ImageUser:
    """The uid and gid ``user`` (an image config's ``user``) names in the image at ``root``.

    RuntimeFailure naming the user when a name is not in the image's passwd or group."""
    name, _, group = user.partition(":")
    passwd = _entries(root, "passwd")
    uid = _numeric(name)
    gid: int | None = None
    for fields in passwd:
        if len(fields) < 4:
            continue
        if (uid is None and fields[0] == name) or (uid is not None and fields[2] == str(uid)):
            uid, gid = _numeric(fields[2]), _numeric(fields[3])
            break
    if uid is None:
        raise RuntimeFailure(
            f"image user {name!r} is not in the image's /etc/passwd",
            hint="Use a numeric uid in the recipe's 'user' step (such as 1000 or 1000:1000), "
            "or add the user to the image's /etc/passwd.",
        )
    if group:
        gid = _numeric(group)
        if gid is None:
            found = [f for f in _entries(root, "group") if len(f) >= 3 and f[0] == group]
            gid = _numeric(found[0][2]) if found else None
            if gid is None:
                raise RuntimeFailure(
                    f"image group {group!r} is not in the image's /etc/group",
                    hint="Use a numeric gid in the recipe's 'user' step (such as 1000:1000), "
                    "or add the group to the image's /etc/group.",
                )
    return ImageUser(uid, uid if gid is None else gid)
