"""OCI image-spec vocabulary shared by export, import and the registry client.

Documents from outside (layouts, archives, registries) are untrusted: ``Descriptor``
validates what it is given and says which field is wrong.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from typing import Any

from graven.model import Digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

REF_NAME = "org.opencontainers.image.ref.name"

# Whiteouts (image-spec, layer.md): a file ``.wh.NAME`` deletes NAME of the layers below;
# ``.wh..wh..opq`` in a directory hides everything the layers below have there.
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
# The image-spec's grammar for REF_NAME values, and graven's cap on their length (the
# grammar has none; a reference a registry accepts is far shorter).
_REF_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME_RE = re.compile(rf"{_REF_COMPONENT}(?:/{_REF_COMPONENT})*")
MAX_REF_NAME = 512
# graven's own annotation on exported manifests: the graven image digest they carry.
GRAVEN_IMAGE = "dev.graven.image.digest"

# Caps on documents we parse (blobs are streamed, never held whole).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 8 * 1024 * 1024


class InvalidOCI(ValueError):
    """An OCI document is malformed; the message names the field."""


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and exact size."""

    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_dict(cls, data: object, where: str) -> Descriptor:
        if not isinstance(data, dict):
            raise InvalidOCI(f"{where}: a descriptor must be an object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidOCI(f"{where}.mediaType: expected a media type string, got {media_type!r}")
        if not isinstance(digest, str):
            raise InvalidOCI(f"{where}.digest: expected a digest string, got {digest!r}")
        try:
            parsed = Digest(digest)
        except ValueError as exc:
            raise InvalidOCI(f"{where}.digest: {exc}") from None
        if type(size) is not int or size < 0:
            raise InvalidOCI(f"{where}.size: expected a non-negative integer, got {size!r}")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise InvalidOCI(f"{where}.annotations: expected a map of strings")
        return cls(media_type, parsed, size, tuple(sorted(annotations.items())))


def is_valid_ref_name(ref_name: str) -> bool:
    """Whether ``ref_name`` fits the image-spec's grammar for REF_NAME (and MAX_REF_NAME):
    no NUL, newline, ``..`` or empty component can pass."""
    return len(ref_name) <= MAX_REF_NAME and _REF_NAME_RE.fullmatch(ref_name) is not None


# platform.machine() -> (GOARCH, variant)
_GOARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def host_platform() -> tuple[str, str | None]:
    """The host's (GOARCH, variant), e.g. ``("amd64", None)``."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, (machine or "unknown", None))
