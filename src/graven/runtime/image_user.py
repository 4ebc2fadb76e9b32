"""Who an instance runs as: the image config's ``user`` resolved against the image's own
``/etc/passwd`` and ``/etc/group`` (never the host's: a name means what the image says).

``user`` is what the recipe's ``user:`` step recorded: ``UID``, ``UID:GID``, ``NAME``,
``NAME:GROUP`` (names and numbers mix). An empty ``user`` gives the runtime's default.
The parsing is pure (``resolve_user`` takes the files' text); ``image_user`` reads them
from the image store by path inside the image, so a symlink in the image can never lead
to a host file.
"""

from __future__ import annotations

from dataclasses import dataclass

from graven.errors import RuntimeFailure
from graven.model import Image
from graven.store.base import ImageStore

NOBODY = 65534  # the uid and gid of "nobody" on Debian and most distributions
USERS_FILE = "/etc/passwd"
GROUP_FILE = "/etc/group"
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel


@dataclass(frozen=True)
class ImageUser:
    """Numeric ids an instance runs with, and the home its passwd entry names."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def _records(text: str | None, fields: int) -> list[list[str]]:
    out = []
    for line in (text or "").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= fields:
            out.append(parts)
    return out


def _number(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def resolve_user(
    user: str, passwd: str | None, group: str | None, *, default: ImageUser
) -> ImageUser:
    """``user`` as numeric ids. ``passwd`` and ``group`` are the image's files (None when
    it has none). A name the image does not define raises RuntimeFailure. Without a
    group, the gid is the passwd entry's, else the uid's own number: never root's group
    by accident. Supplementary groups are those of ``/etc/group`` listing the login."""
    if not user:
        return default
    name, _, group_name = user.partition(":")
    users = _records(passwd, 7)
    groups = _records(group, 4)
    uid = _number(name)
    entry = next((u for u in users if (u[0] == name if uid is None else u[2] == name)), None)
    if uid is None:
        if entry is None or _number(entry[2]) is None:
            raise RuntimeFailure(
                f"image user {name!r} is not defined in the image's {USERS_FILE}",
                hint="Use a numeric uid in the recipe's 'user:' step (such as 1000:1000), "
                f"or add the user to the image's {USERS_FILE}.",
            )
        uid = int(entry[2])
    if group_name:
        gid = _number(group_name)
        if gid is None:
            found = next((g for g in groups if g[0] == group_name), None)
            if found is None or _number(found[2]) is None:
                raise RuntimeFailure(
                    f"image group {group_name!r} is not defined in the image's {GROUP_FILE}",
                    hint="Use a numeric gid in the recipe's 'user:' step, or add the group "
                    f"to the image's {GROUP_FILE}.",
                )
            gid = int(found[2])
    elif entry is not None and _number(entry[3]) is not None:
        gid = int(entry[3])
    else:
        gid = uid
    login = entry[0] if entry is not None else None
    extra = sorted(
        {
            int(g[2])
            for g in groups
            if login is not None and login in g[3].split(",") and _number(g[2]) is not None
        }
        - {gid}
    )
    home = entry[5] if entry is not None and entry[5].startswith("/") else "/"
    return ImageUser(uid, gid, tuple(extra), home)


def _image_file(store: ImageStore, image: Image, path: str) -> str | None:
    entry = store.lookup(image.rootfs, path)
    if entry is None or entry.type != "file" or entry.digest is None:
        return None  # absent, or a symlink: not followed (it could point anywhere)
    if entry.size > 4 << 20:
        return None
    return store.read_blob(entry.digest).decode("utf-8", errors="replace")


def image_user(store: ImageStore, image: Image, *, default: ImageUser) -> ImageUser:
    """The image config's user as numeric ids, names looked up in the image's files."""
    user = image.config.user
    if not user:
        return default
    passwd = _image_file(store, image, USERS_FILE)
    group = _image_file(store, image, GROUP_FILE)
    return resolve_user(user, passwd, group, default=default)
