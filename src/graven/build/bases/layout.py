"""The OCI layout base: ``{layout: DIR, ref: REF}`` imported once from a layout in the
project, then found in the store by the manifest digest its ``index.json`` names."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from graven.build.bases.common import imported, located, remember_import
from graven.errors import GravenError, UsageError
from graven.model import Digest, Image
from graven.spec.recipe import LayoutBase
from graven.store.base import ImageStore

MAX_INDEX_BYTES = 4 * 1024 * 1024  # an OCI layout's index.json, read to find a cached import


def layout_base(
    base: LayoutBase,
    context: Path,
    store: ImageStore,
    where: str,
    on_progress: Callable[[str], None] | None,
) -> Image:
    from graven.store.oci_import.layouts import import_layout

    path = context.joinpath(*PurePosixPath(base.layout).parts)
    try:
        inside = path.resolve().is_relative_to(context.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise UsageError(
            f"{where}: layout {base.layout!r} leaves the project directory {context}",
            hint="Keep base layouts inside the directory that holds graven.yaml.",
        )
    manifest = _layout_manifest(path, base.ref)
    if manifest is not None and (image := imported(store, manifest)) is not None:
        return image
    if on_progress is not None:
        on_progress(
            f"base: importing layout {base.layout}" + (f" ({base.ref})" if base.ref else "")
        )
    try:
        image = import_layout(store, path, base.ref)
    except GravenError as e:
        raise located(where, e) from None
    if manifest is not None:
        remember_import(store, manifest, image)
    return image


def _layout_manifest(layout: Path, ref: str | None) -> Digest | None:
    """The digest ``index.json`` names for ``ref`` (or its only image); None when the
    index does not say unambiguously: the importer then decides, and explains."""
    from graven.store.oci_types import REF_NAME

    try:
        fd = os.open(
            layout / "index.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = f.read(MAX_INDEX_BYTES + 1)
    try:
        doc = json.loads(data) if len(data) <= MAX_INDEX_BYTES else None
        entries = doc["manifests"] if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            return None
        found = [
            e
            for e in entries
            if isinstance(e, dict)
            and (ref is None or (e.get("annotations") or {}).get(REF_NAME) == ref)
        ]
        return Digest(found[0]["digest"]) if len(found) == 1 else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
