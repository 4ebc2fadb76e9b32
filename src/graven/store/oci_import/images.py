"""Images: a manifest and its blobs, imported layer by layer into the content store."""

from __future__ import annotations

from dataclasses import dataclass

from graven.model import Digest, Image
from graven.store.base import ImageStore
from graven.store.oci_import.changes import LayerChanges, MemberDataError
from graven.store.oci_import.documents import parse_config, parse_manifest, read_small_blob
from graven.store.oci_import.policy import (
    CORRUPT_HINT,
    DEFAULT_POLICY,
    BlobOpener,
    ImportPolicy,
    ImportRejected,
    LayerImported,
    Progress,
)
from graven.store.oci_import.streams import (
    DECODE_ERRORS,
    HeaderProblem,
    TarEndProblem,
    TarStream,
    VerifiedBlob,
    decompressed_stream,
    tar_members,
)
from graven.store.oci_types import (
    DOCKER_LAYER_GZIP,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Descriptor,
)
from graven.store.tree_model import Tree, TreeEntry


@dataclass
class _Totals:
    entries: int = 0
    size: int = 0


def import_from_manifest(
    store: ImageStore,
    manifest: bytes,
    expected_digest: Digest | None,
    open_blob: BlobOpener,
    *,
    policy: ImportPolicy = DEFAULT_POLICY,
    progress: Progress | None = None,
) -> Image:
    """Import the image ``manifest`` describes; return it (unnamed).

    ``manifest`` is the exact manifest bytes; when ``expected_digest`` is given (it was
    asked for by digest) they must hash to it. ``open_blob(descriptor)`` opens a blob
    for streaming; it need not check anything: every blob is read to its end and checked
    against its descriptor's size and digest here, and each layer against the config's
    diff_id. Layers are applied in order, each giving the next snapshot tree.

    ImportRejected (a UsageError) names what is wrong and where; no image is recorded
    then. ``progress`` is called once per layer."""
    if len(manifest) > MAX_MANIFEST_BYTES:
        raise ImportRejected(
            f"the manifest is {len(manifest)} bytes; the limit is {MAX_MANIFEST_BYTES}"
        )
    if expected_digest is not None and Digest.of_bytes(manifest) != expected_digest:
        raise ImportRejected(
            f"the manifest's digest is {Digest.of_bytes(manifest)}, not the expected "
            f"{expected_digest}",
            hint=CORRUPT_HINT,
        )
    parsed = parse_manifest(manifest, policy)
    config_bytes = read_small_blob(open_blob, parsed.config, "image config", MAX_CONFIG_BYTES)
    config, diff_ids = parse_config(config_bytes, len(parsed.layers))
    root = store.put_tree(Tree())
    snapshots: list[Digest] = []
    totals = _Totals()
    memo: dict[Digest, dict[str, TreeEntry]] = {}
    for index, (desc, diff_id) in enumerate(zip(parsed.layers, diff_ids, strict=True)):
        changes, size = _import_layer(
            store, root, desc, diff_id, index, open_blob, policy, totals, memo
        )
        root = changes.snapshot()
        snapshots.append(root)
        if progress is not None:
            progress(
                LayerImported(
                    index,
                    len(parsed.layers),
                    desc.digest,
                    root,
                    changes.entries,
                    size,
                    changes.devices_skipped,
                )
            )
    image = store.put_image(root, config, tuple(snapshots))
    store.get_image(image.digest)  # what was recorded must read back as a valid image
    return image


def _import_layer(
    store: ImageStore,
    lower: Digest,
    desc: Descriptor,
    diff_id: Digest,
    index: int,
    open_blob: BlobOpener,
    policy: ImportPolicy,
    totals: _Totals,
    memo: dict[Digest, dict[str, TreeEntry]],
) -> tuple[LayerChanges, int]:
    layer = desc.digest
    changes = LayerChanges(store, lower, layer, policy, memo)
    cap = min(policy.max_layer_bytes, policy.max_image_bytes - totals.size)

    def too_big(limit: int) -> ImportRejected:
        if limit == policy.max_layer_bytes:
            what = f"the uncompressed layer exceeds the limit of {limit} bytes"
        else:
            what = (
                f"the uncompressed layers exceed the image limit of {policy.max_image_bytes} bytes"
            )
        return ImportRejected(
            f"{what} (a compression bomb, or an image too large for this policy)", layer=layer
        )

    def header_too_big(after: str | None) -> ImportRejected:
        where = f"after member {after!r}" if after is not None else "at the start"
        return ImportRejected(
            f"a member's header records {where} exceed {policy.max_header_bytes} bytes",
            layer=layer,
        )

    with open_blob(desc) as raw:
        blob = VerifiedBlob(raw, desc, f"layer {index + 1}", layer)
        stream = TarStream(decompressed_stream(desc.media_type, blob), cap, too_big)
        try:
            for tar, member in tar_members(stream, policy.max_header_bytes, header_too_big):
                totals.entries += 1
                changes.entries += 1
                if totals.entries > policy.max_entries:
                    raise ImportRejected(
                        f"the image has more than {policy.max_entries} entries", layer=layer
                    )
                try:
                    changes.add(tar, member)
                except MemberDataError as e:
                    raise _blame(blob, e) or changes.reject(
                        member.name, f"its data is truncated or corrupt ({e})"
                    ) from e
            blob.drain()
        # A corrupt blob explains a decoding error better than the error itself; what
        # the checks above refuse is refused as it is (no reading on to find out).
        except TarEndProblem as e:
            raise _blame(blob, e) or ImportRejected(e.reason, layer=layer) from e
        except HeaderProblem as e:
            raise changes.reject(e.member, e.reason) from e
        except DECODE_ERRORS as e:
            raise _blame(blob, e) or ImportRejected(
                f"not a valid {_format(desc.media_type)}: {e}", layer=layer
            ) from e
    if stream.digest != diff_id:
        raise ImportRejected(
            f"the uncompressed layer's digest is {stream.digest}, but the config's "
            f"rootfs.diff_ids[{index}] is {diff_id}",
            layer=layer,
            hint=CORRUPT_HINT,
        )
    totals.size += stream.size
    return changes, stream.size


def _blame(blob: VerifiedBlob, error: BaseException) -> ImportRejected | None:
    """The blob's own size or digest problem, which explains any decoding error better."""
    problem = blob.integrity_problem()
    return problem if problem is not None and problem is not error else None


def _format(media_type: str) -> str:
    if media_type == OCI_LAYER_ZSTD:
        return "zstd-compressed tar"
    if media_type in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP):
        return "gzip-compressed tar"
    return "tar"
