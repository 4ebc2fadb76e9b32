"""The ImageStore port's contract, run against every adapter: the in-memory fake and
the file content store (the embedded default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from graven.model import Digest
from graven.store.base import ImageStore
from graven.store.cas import ContentStore
from graven.testing.contracts.image_store import ImageStoreContract
from graven.testing.image_store import FakeImageStore


class TestFakeImageStore(ImageStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> FakeImageStore:
        return FakeImageStore(tmp_path / "store")

    def corrupt(self, store: ImageStore, digest: Digest, data: bytes) -> None:
        assert isinstance(store, FakeImageStore)
        store.blobs[digest] = data

    def stored_blobs(self, store: ImageStore) -> set[Digest]:
        assert isinstance(store, FakeImageStore)
        return set(store.blobs)


class TestFileImageStore(ImageStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> ContentStore:
        return ContentStore(tmp_path / "store")

    def corrupt(self, store: ImageStore, digest: Digest, data: bytes) -> None:
        assert isinstance(store, ContentStore)
        path = store.blob_path(digest)
        path.chmod(0o644)  # blobs are stored read-only
        with path.open("r+b") as f:  # in place, as a stray write or bit rot would
            f.truncate()
            f.write(data)
        path.chmod(0o444)

    def stored_blobs(self, store: ImageStore) -> set[Digest]:
        assert isinstance(store, ContentStore)
        fans = (store.root / "blobs" / "sha256").iterdir()
        return {Digest(f"sha256:{fan.name}{p.name}") for fan in fans for p in fan.iterdir()}

    def reopen(self, store: ImageStore) -> ImageStore:
        # Parsed trees are remembered per instance: a fresh one reads the damage.
        return ContentStore(store.root)
