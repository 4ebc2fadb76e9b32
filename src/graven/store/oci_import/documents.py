"""Documents of an image: index, manifest and config read as untrusted JSON (UTF-8, no
duplicate keys, size caps) into what the importer needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from graven.model import Digest, ImageConfig
from graven.store.cas.blobs import CHUNK_SIZE
from graven.store.oci_import.policy import BlobOpener, ImportPolicy, ImportRejected
from graven.store.oci_import.streams import VerifiedBlob, zstd_available
from graven.store.oci_types import (
    DOCKER_CONFIG,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    InvalidOCI,
)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_document(data: bytes, what: str, cap: int) -> Any:
    """Parse an untrusted JSON document: UTF-8, no duplicate keys, at most ``cap`` bytes."""
    if len(data) > cap:
        raise ImportRejected(f"the {what} is larger than {cap} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImportRejected(f"the {what} is not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ImportRejected(f"the {what} is nested too deeply") from None
    except ValueError as e:
        raise ImportRejected(f"the {what} is not valid JSON: {e}") from None


def parse_descriptor(data: object, where: str) -> Descriptor:
    """A descriptor from an untrusted document; ImportRejected naming the bad field."""
    try:
        return Descriptor.from_dict(data, where)
    except InvalidOCI as e:
        raise ImportRejected(str(e)) from None


@dataclass(frozen=True)
class _Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_manifest(data: bytes, policy: ImportPolicy) -> _Manifest:
    """An image manifest checked against the spec and ``policy``: its config and layers."""
    doc = parse_document(data, "manifest", MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict):
        raise ImportRejected("the manifest must be a JSON object")
    version = doc.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise ImportRejected(
            f"manifest schemaVersion must be 2, got {version!r}",
            hint="Docker schema 1 manifests are obsolete: re-push the image with a current tool.",
        )
    media_type = doc.get("mediaType")
    if media_type in INDEX_TYPES or (media_type is None and "manifests" in doc):
        raise ImportRejected("expected an image manifest, got an index (a multi-image list)")
    if media_type is not None and media_type not in MANIFEST_TYPES:
        raise ImportRejected(
            f"unsupported manifest mediaType {media_type!r} "
            f"(expected {OCI_MANIFEST} or the Docker v2 manifest)"
        )
    config = parse_descriptor(doc.get("config"), "manifest.config")
    if config.media_type not in (OCI_CONFIG, DOCKER_CONFIG):
        raise ImportRejected(
            f"manifest.config.mediaType {config.media_type!r} is not an image config: "
            "this is not a container image"
        )
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImportRejected("manifest.layers must be a list")
    if len(raw_layers) > policy.max_layers:
        raise ImportRejected(
            f"the image has {len(raw_layers)} layers; the limit is {policy.max_layers}"
        )
    layers = []
    for i, item in enumerate(raw_layers):
        desc = parse_descriptor(item, f"manifest.layers[{i}]")
        if desc.media_type not in LAYER_TYPES:
            raise ImportRejected(
                f"manifest.layers[{i}].mediaType {desc.media_type!r} is not supported "
                f"(supported: {', '.join(sorted(LAYER_TYPES))})"
            )
        if desc.size > policy.max_layer_bytes:
            raise ImportRejected(
                f"manifest.layers[{i}] ({desc.digest}) is {desc.size} bytes; the limit is "
                f"{policy.max_layer_bytes}"
            )
        layers.append(desc)
    if any(d.media_type == OCI_LAYER_ZSTD for d in layers) and not zstd_available():
        raise ImportRejected(
            "the image has zstd-compressed layers and the 'zstandard' package is not installed",
            hint="Install graven with its dependencies (pip install zstandard), or export the "
            "image with gzip layers.",
        )
    return _Manifest(config, tuple(layers))


def _strings(run: dict[str, Any], key: str) -> tuple[str, ...]:
    value = run.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ImportRejected(f"config.config.{key} must be a list of strings, got {value!r:.80}")
    for s in value:
        if "\0" in s:
            raise ImportRejected(f"config.config.{key} holds a string with a NUL byte")
    return tuple(value)


def _string(run: dict[str, Any], key: str) -> str:
    value = run.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or "\0" in value:
        raise ImportRejected(f"config.config.{key} must be a string, got {value!r:.80}")
    return value


def _ports(run: dict[str, Any]) -> tuple[int, ...]:
    value = run.get("ExposedPorts")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ImportRejected("config.config.ExposedPorts must be an object")
    ports = set()
    for key in value:
        number, _, proto = key.partition("/")
        if not number.isascii() or not number.isdigit() or proto not in ("", "tcp", "udp", "sctp"):
            raise ImportRejected(
                f"config.config.ExposedPorts: {key!r} is not PORT/tcp, PORT/udp or PORT/sctp"
            )
        port = int(number)
        if not 1 <= port <= 65535:
            raise ImportRejected(f"config.config.ExposedPorts: port {port} is out of range")
        ports.add(port)
    return tuple(sorted(ports))


def _string_map(run: dict[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    value = run.get(key)
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(v, str) and "\0" not in v and "\0" not in k for k, v in value.items()
    ):
        raise ImportRejected(f"config.config.{key} must be a map of strings")
    return tuple(sorted(value.items()))


def parse_config(data: bytes, layers: int) -> tuple[ImageConfig, tuple[Digest, ...]]:
    """The image config (untrusted) as graven's ImageConfig, and its diff_ids."""
    doc = parse_document(data, "image config", MAX_CONFIG_BYTES)
    if not isinstance(doc, dict):
        raise ImportRejected("the image config must be a JSON object")
    system = doc.get("os")
    if system is not None and system != "linux":
        raise ImportRejected(f"the image is for {system!r}; graven runs linux images")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImportRejected("config.rootfs must be an object with type 'layers'")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise ImportRejected("config.rootfs.diff_ids must be a list of digests")
    try:
        diff_ids = tuple(Digest(d) if isinstance(d, str) else Digest("") for d in raw_ids)
    except ValueError as e:
        raise ImportRejected(f"config.rootfs.diff_ids: {e}") from None
    if len(diff_ids) != layers:
        raise ImportRejected(
            f"the config lists {len(diff_ids)} diff_ids for the manifest's {layers} layers"
        )
    run = doc.get("config")
    if run is None:
        run = {}
    if not isinstance(run, dict):
        raise ImportRejected("config.config must be an object")
    env = []
    for item in _strings(run, "Env"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ImportRejected(f"config.config.Env: {item!r:.80} is not NAME=VALUE")
        env.append((key, value))
    workdir = _string(run, "WorkingDir") or "/"
    if not workdir.startswith("/"):
        workdir = "/" + workdir  # relative to the root, where a runtime would start it
    config = ImageConfig(
        entrypoint=_strings(run, "Entrypoint"),
        env=tuple(env),
        workdir=workdir,
        cmd=_strings(run, "Cmd"),
        user=_string(run, "User"),
        ports=_ports(run),
        labels=_string_map(run, "Labels"),
    )
    return config, diff_ids


def read_small_blob(open_blob: BlobOpener, desc: Descriptor, what: str, cap: int) -> bytes:
    """A document blob, whole, checked against its descriptor."""
    if desc.size > cap:
        raise ImportRejected(f"the {what} {desc.digest} is {desc.size} bytes; the limit is {cap}")
    chunks = []
    with open_blob(desc) as raw:
        blob = VerifiedBlob(raw, desc, what)
        while chunk := blob.read(CHUNK_SIZE):
            chunks.append(chunk)
    return b"".join(chunks)
