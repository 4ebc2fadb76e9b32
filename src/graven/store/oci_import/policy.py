"""What an import accepts, how it reports progress, and how it refuses an image."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO

from graven.errors import UsageError
from graven.model import Digest
from graven.store.oci_types import Descriptor

# Opens the blob a descriptor names: a layout's file, an archive's spool, a download.
BlobOpener = Callable[[Descriptor], AbstractContextManager[BinaryIO]]

_DEFAULT_HINT = (
    "Nothing was imported. Rebuild or re-export the image with a standard tool "
    "(graven image export, skopeo, buildah, docker) and import that."
)
CORRUPT_HINT = (
    "The source is corrupt or was tampered with: nothing was imported. Fetch or export "
    "the image again."
)


class ImportRejected(UsageError):
    """An image to import was refused. ``reason`` says why; ``layer`` (a blob digest)
    and ``member`` (a tar member name) say where, when the problem is inside a layer."""

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        layer: Digest | None = None,
        member: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.source = source
        self.layer = layer
        self.member = member
        where = [source] if source is not None else []
        if layer is not None:
            where.append(f"layer {layer}")
        if member is not None:
            where.append(f"member {member!r}")  # repr: a hostile name cannot drive a terminal
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"import rejected: {prefix}{reason}", hint=hint or _DEFAULT_HINT)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.source is not None:
            out["source"] = self.source
        if self.layer is not None:
            out["layer"] = str(self.layer)
        if self.member is not None:
            out["member"] = self.member
        return out


@dataclass(frozen=True)
class ImportPolicy:
    """What an import accepts. The caps bound the time, memory and space a hostile image
    can cost; the defaults fit any reasonable image."""

    allow_devices: bool = False  # then device nodes and fifos are left out, not rejected
    allow_setuid: bool = False  # then setuid/setgid files are imported without the bit
    max_layers: int = 256
    max_entries: int = 1_000_000  # tar members over all layers
    max_layer_bytes: int = 16 << 30  # one layer: its blob, and its uncompressed tar
    max_image_bytes: int = 64 << 30  # all layers' uncompressed tars together
    max_header_bytes: int = 1 << 20  # one member's header records (pax, GNU long names)
    max_archive_bytes: int = 64 << 30  # an oci-archive, spooled into the store's tmp/


DEFAULT_POLICY = ImportPolicy()


@dataclass(frozen=True)
class LayerImported:
    """Progress: layer ``index`` (0-based) of ``count`` is in, as tree ``snapshot``."""

    index: int
    count: int
    digest: Digest
    snapshot: Digest
    entries: int
    size: int  # bytes of the uncompressed tar
    devices_skipped: int


Progress = Callable[[LayerImported], None]
