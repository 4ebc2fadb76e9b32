"""The build step cache: ``cache/sha256/ab/cdef...`` maps sha256(key) to a small value
(typically JSON), so a step with the same inputs never runs twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

from graven.store.cas.blobs import BlobStore


class StepCacheStore(BlobStore):
    """Blobs plus the step cache. A value is written durably, after the blobs it may
    name (``_write_atomic`` syncs them first)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._cache = self.root / "cache" / "sha256"
        self._open_dirs(self._cache)

    def _cache_path(self, key: str) -> Path:
        # Hashing the key keeps any key (however odd) inside cache/ at a fixed depth.
        hex_ = hashlib.sha256(key.encode()).hexdigest()
        return self._cache / hex_[:2] / hex_[2:]

    def cache_get(self, key: str) -> str | None:
        """The value cached under ``key``, or None."""
        try:
            return self._cache_path(key).read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def cache_put(self, key: str, value: str) -> None:
        """Cache ``value`` (a small string, typically JSON) under ``key``, atomically."""
        self._write_atomic(self._cache_path(key), value.encode("utf-8"))
