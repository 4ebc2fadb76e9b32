"""What every base shares: the label prefix, progress lines, storing a made base, and
the import cache that lets an imported or pulled base be found again by manifest."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from graven.build.interpreter import LABEL_PREFIX
from graven.errors import GravenError
from graven.model import Digest, Image, ImageConfig, canonical_json
from graven.store.base import ImageStore
from graven.store.layers import split
from graven.store.tree_model import Tree

BASE_LABEL = "dev.graven.base."
BASE_IMPORT_SCHEMA = "graven.base-import/v1"

ProgressFn = Callable[[str], None]


def say(on_progress: ProgressFn | None, text: str) -> None:
    if on_progress is not None:
        on_progress(text)


def store_base(store: ImageStore, rootfs: Digest, config: ImageConfig, name: str) -> Image:
    """Store a made base's image, its layers split by content (so a push moves a large
    base in resumable pieces), and tag it ``name``."""
    layers = tuple(split(store, store.put_tree(Tree()), rootfs)) or (rootfs,)
    image = store.put_image(rootfs, config, layers)
    store.tag(name, image.digest)
    return replace(image, name=name)


@dataclass(frozen=True)
class MadeBase:
    """A base image as ``graven base`` reports it: the image, the size of its files and,
    where it is known, whether it was ``cached`` (made earlier with the same parameters)."""

    image: Image
    size: int
    cached: bool | None = None

    @classmethod
    def of(cls, store: ImageStore, image: Image, *, cached: bool | None = None) -> MadeBase:
        return cls(image, store.read_tree(image.rootfs).size, cached)

    @property
    def interpreter(self) -> dict[str, str]:
        """The recorded interpreter's labels without their prefix (path, source, ...)."""
        return {
            key.removeprefix(LABEL_PREFIX): value
            for key, value in self.image.config.labels
            if key.startswith(LABEL_PREFIX)
        }

    def to_dict(self) -> dict[str, Any]:
        image = self.image
        data: dict[str, Any] = {
            "name": image.name,
            "digest": str(image.digest),
            "rootfs": str(image.rootfs),
            "size": self.size,
            "layers": len(image.layers),
            "entrypoint": list(image.config.entrypoint),
            "labels": dict(image.config.labels),
            "interpreter": self.interpreter,
        }
        if self.cached is not None:
            data["cached"] = self.cached
        return data


def located(where: str, error: GravenError) -> GravenError:
    """``error`` with the key path it concerns before its message; its class (and so
    its exit code and details) kept."""
    error.message = f"{where}: {error.message}"
    error.args = (error.message,)
    return error


def _import_key(manifest: Digest) -> str:
    return f"{BASE_IMPORT_SCHEMA} {manifest}"


def imported(store: ImageStore, manifest: Digest) -> Image | None:
    """The image a manifest was imported as before, if it is still whole in the store."""
    text = store.cache_get(_import_key(manifest))
    if text is None:
        return None
    try:
        doc = json.loads(text)
        if doc["schema"] != BASE_IMPORT_SCHEMA or doc["manifest"] != manifest:
            return None
        image = store.get_image(Digest(doc["image"]))
    except (ValueError, KeyError, TypeError, GravenError):
        return None  # a damaged entry or a collected image only costs a new import
    if not all(store.has(d) for d in {image.rootfs, *image.layers}):
        return None
    return image


def remember_import(store: ImageStore, manifest: Digest, image: Image) -> None:
    doc = {"schema": BASE_IMPORT_SCHEMA, "manifest": str(manifest), "image": str(image.digest)}
    store.cache_put(_import_key(manifest), canonical_json(doc).decode())
