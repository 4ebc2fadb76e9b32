"""Images and names: image documents by digest, and the refs that name them.

    refs/<name>           the image digest a name points at
    refs/<name>.history   every digest the name pointed at, one a line, newest last

A name moves atomically, under a lock, and its history is written first, so every
digest a name ever pointed at is listed there (gc keeps what history lists).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from graven.errors import NotFoundError, StoreError, UsageError
from graven.model import Digest, Image, ImageConfig, canonical_json, is_valid_name
from graven.store.cas.trees import TreeStore
from graven.store.tree_model import MAX_DOCUMENT, InvalidDocument, load_json

IMAGE_SCHEMA = "graven.image/v1"
_HEX = frozenset("0123456789abcdef")


def parse_image(digest: Digest, data: bytes) -> Image:
    """Validate an untrusted image document (exactly its canonical form); ValueError if not."""
    if len(data) > MAX_DOCUMENT:
        raise InvalidDocument("image document is too large")
    doc = load_json(data)
    if not isinstance(doc, dict) or set(doc) != {"schema", "rootfs", "layers", "config"}:
        raise InvalidDocument(
            "an image document has exactly the keys 'schema', 'rootfs', 'layers', 'config'"
        )
    if doc["schema"] != IMAGE_SCHEMA:
        raise InvalidDocument(f"schema must be {IMAGE_SCHEMA!r}, got {doc['schema']!r}")
    config = doc["config"]
    keys = {"entrypoint", "env", "workdir", "cmd", "user", "ports", "labels"}
    if not isinstance(config, dict) or set(config) != keys:
        raise InvalidDocument(f"'config' has exactly the keys {sorted(keys)}")
    workdir = config["workdir"]
    for key in ("entrypoint", "cmd"):
        if not isinstance(config[key], list) or not all(isinstance(a, str) for a in config[key]):
            raise InvalidDocument(f"'config.{key}' must be a list of strings")
    for key in ("env", "labels"):
        pairs = config[key]
        if not isinstance(pairs, list) or not all(
            isinstance(kv, list) and len(kv) == 2 and all(isinstance(s, str) for s in kv)
            for kv in pairs
        ):
            raise InvalidDocument(f"'config.{key}' must be a list of [name, value] string pairs")
    if not isinstance(config["user"], str):
        raise InvalidDocument("'config.user' must be a string")
    ports = config["ports"]
    if not isinstance(ports, list) or not all(type(p) is int and 1 <= p <= 65535 for p in ports):
        raise InvalidDocument("'config.ports' must be a list of port numbers")
    if not isinstance(workdir, str) or not workdir.startswith("/"):
        raise InvalidDocument("'config.workdir' must be an absolute path")
    if not isinstance(doc["rootfs"], str):
        raise InvalidDocument("'rootfs' must be a digest string")
    layers = doc["layers"]
    if not isinstance(layers, list) or not all(isinstance(d, str) for d in layers):
        raise InvalidDocument("'layers' must be a list of digest strings")
    if layers and layers[-1] != doc["rootfs"]:
        raise InvalidDocument("the last of 'layers' must be 'rootfs'")
    image = Image(
        digest=digest,
        rootfs=Digest(doc["rootfs"]),
        config=ImageConfig.from_dict(config),
        layers=tuple(Digest(d) for d in layers),
    )
    if canonical_json(image.document()) != data:
        raise InvalidDocument("image document is not in canonical form (sorted, compact JSON)")
    return image


class RefStore(TreeStore):
    """Trees plus image documents and the names (refs) pointing at them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._refs = self.root / "refs"
        self._open_dirs(self._refs)

    def put_image(
        self, rootfs: Digest, config: ImageConfig, layers: tuple[Digest, ...] | None = None
    ) -> Image:
        """Store an image document for tree ``rootfs``; its digest is the blob's digest.

        ``layers`` are the snapshot trees layer by layer (default: one layer, ``rootfs``)."""
        layers = (rootfs,) if layers is None else layers
        if layers and layers[-1] != rootfs:
            raise StoreError("an image's last layer snapshot must be its rootfs")
        for tree in {rootfs, *layers}:
            self.read_tree(tree)  # an image must never point at a missing or bad tree
        # Image.document() leaves the digest out, so a placeholder is fine here.
        draft = Image(digest=rootfs, rootfs=rootfs, config=config, layers=layers)
        digest = self.put_bytes(canonical_json(draft.document()))
        return Image(digest=digest, rootfs=rootfs, config=config, layers=layers)

    def get_image(self, digest: Digest) -> Image:
        """The image named ``digest``; StoreError when missing, corrupt or not an image."""
        data = self.read_blob(digest)
        try:
            return parse_image(digest, data)
        except ValueError as e:
            raise StoreError(f"blob {digest} is not a valid image: {e}") from None

    def _ref_path(self, name: str) -> Path:
        if not is_valid_name(name):
            raise UsageError(
                f"invalid image name {name!r}: use lowercase letters, digits and '-', "
                "starting with a letter"
            )
        return self._refs / name

    def tag(self, name: str, digest: Digest) -> None:
        """Point ``name`` at image ``digest`` (atomically) and record it in the history."""
        ref = self._ref_path(name)
        self.get_image(digest)
        with self._lock("refs"):
            history = self.history(name)
            if not history or history[-1] != digest:
                # History first: every digest a name ever pointed at is in its history,
                # even if we crash before the ref moves (gc keeps what history lists).
                text = "".join(f"{d}\n" for d in [*history, digest])
                self._write_atomic(ref.with_name(name + ".history"), text.encode())
            if self._read_ref(name) != digest:
                self._write_atomic(ref, f"{digest}\n".encode())

    def history(self, name: str) -> list[Digest]:
        """Every digest ``name`` pointed at, oldest first; empty for an unknown name."""
        path = self._ref_path(name).with_name(name + ".history")
        try:
            lines = path.read_text().split()
        except FileNotFoundError:
            return []
        try:
            return [Digest(line) for line in lines]
        except ValueError as e:
            raise StoreError(f"{path} is corrupt: {e}") from None

    def _read_ref(self, name: str) -> Digest | None:
        path = self._ref_path(name)
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return Digest(text)
        except ValueError:
            raise StoreError(f"ref {path} is corrupt: {text[:80]!r} is not a digest") from None

    def _names(self) -> list[str]:
        return sorted(p.name for p in self._refs.iterdir() if is_valid_name(p.name) and p.is_file())

    def list_images(self) -> list[tuple[str, Image]]:
        """Every named image, sorted by name. Broken refs are left to ``fsck``."""
        out: list[tuple[str, Image]] = []
        for name in self._names():
            digest = self._read_ref(name)
            if digest is None:
                continue
            try:
                out.append((name, replace(self.get_image(digest), name=name)))
            except StoreError:
                continue
        return out

    def resolve(self, ref: str) -> Image:
        """Find an image by ``name``, ``name@sha256:...``, full digest or short digest.

        A short digest is at least 6 hex digits (``sha256:`` optional) and must match
        exactly one image. NotFoundError (listing the known names) otherwise.
        """
        if "@" in ref:
            name, _, digest_text = ref.partition("@")
            digest = self._digest_or_none(digest_text)
            if digest is None:
                raise UsageError(f"invalid image reference {ref!r}: expected NAME@sha256:<64 hex>")
            if digest not in self.history(name):
                raise self._not_found(ref, f"image {name!r} never had version {digest.short}")
            return replace(self._image_or_not_found(ref, digest), name=name)
        if (digest := self._digest_or_none(ref)) is not None:
            return self._image_or_not_found(ref, digest)
        if is_valid_name(ref) and (digest := self._read_ref(ref)) is not None:
            return replace(self.get_image(digest), name=ref)
        prefix = ref.removeprefix("sha256:")
        if len(prefix) >= 6 and set(prefix) <= _HEX:
            matches = self._images_with_prefix(prefix)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UsageError(
                    f"short digest {ref!r} is ambiguous: it matches "
                    + ", ".join(m.digest.short for m in matches),
                    hint="Give more digits.",
                )
        raise self._not_found(ref, f"no image {ref!r}")

    @staticmethod
    def _digest_or_none(text: str) -> Digest | None:
        try:
            return Digest(text)
        except ValueError:
            return None

    def _image_or_not_found(self, ref: str, digest: Digest) -> Image:
        if not self.has(digest):
            raise self._not_found(ref, f"no image {digest}")
        try:
            return parse_image(digest, self.read_blob(digest))
        except ValueError:
            raise self._not_found(ref, f"{digest} is in the store but is not an image") from None

    def _images_with_prefix(self, prefix: str) -> list[Image]:
        fan = self._blobs / prefix[:2]
        if not fan.is_dir():
            return []
        found: list[Image] = []
        for path in sorted(fan.iterdir()):
            if not path.name.startswith(prefix[2:]) or path.stat().st_size > MAX_DOCUMENT:
                continue
            digest = Digest("sha256:" + prefix[:2] + path.name)
            with contextlib.suppress(ValueError, StoreError):
                found.append(parse_image(digest, self.read_blob(digest)))
        return found

    def _not_found(self, ref: str, message: str) -> NotFoundError:
        names = self._names()
        known = f"known images: {', '.join(names)}" if names else "the store has no images yet"
        return NotFoundError(
            f"{message} ({known})",
            hint="Run 'graven images' to list images, or 'graven build' to bake one.",
        )
