"""A tiny image for runtime tests: the host's static busybox, a few applet links, and
whatever files a test adds (an /etc/passwd, say). No interpreter, no libraries: what
runs in it is a shell script, inside a real root."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from graven.errors import UsageError
from graven.model import Image, ImageConfig
from graven.store.base import ImageStore

APPLETS = (
    "cat",
    "cut",
    "dd",
    "echo",
    "grep",
    "id",
    "kill",
    "ls",
    "mount",
    "sh",
    "sleep",
    "touch",
    "true",
    "unshare",
)


def busybox_image(
    store: ImageStore,
    work: Path,
    config: ImageConfig,
    *,
    files: Mapping[str, str] | None = None,
    busybox: str | None = None,
) -> Image:
    """Store a busybox image made in ``work`` with ``config``; ``files``: path inside
    the image -> text, added beside busybox (default: the one on PATH)."""
    busybox = busybox or shutil.which("busybox")
    if busybox is None:
        raise UsageError(
            "busybox is not installed", hint="Install busybox-static (scripts/setup does)."
        )
    root = work / "busybox-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for path, text in (files or {}).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return store.put_image(store.ingest_tree(root), config)
