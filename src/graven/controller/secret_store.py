"""The controller's secrets store: secret env values, kept apart from every record.

A release's config holds a reference, ``<secret sha256:HEX>``, in place of each secret
value; the value itself is one file, ``STATE/secrets/HEX`` (0600, in a 0700 dir), so
the controller can start instances again (a crash, a restart, a rollback) without the
CLI that deployed them.

``HEX`` is HMAC-SHA256 of the value under a random key kept in the same directory
(``STATE/secrets/key``), not a bare SHA-256: references reach the ledger, ``plan``
output and whatever those are pasted into, and a bare hash of a short password is
found by guessing. A changed value still shows as a changed reference.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets as _random
from pathlib import Path

from graven.atomic import write_atomic
from graven.errors import GravenError

SECRET_REF_RE = re.compile(r"<secret sha256:([0-9a-f]{64})>")
_KEY_FILE = "key"


def is_secret_ref(value: str) -> bool:
    return SECRET_REF_RE.fullmatch(value) is not None


class SecretMissing(GravenError):
    """A release refers to a secret the store does not hold."""


class SecretStore:
    """Content-addressed (by keyed hash) secret values under ``STATE/secrets``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._key: bytes | None = None

    def _ensure_dir(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_mode & 0o077:
            self.root.chmod(0o700)

    def key(self) -> bytes:
        if self._key is None:
            path = self.root / _KEY_FILE
            try:
                key = path.read_bytes()
            except FileNotFoundError:
                self._ensure_dir()
                key = _random.token_bytes(32)
                write_atomic(path, key, mode=0o600)
            if len(key) != 32:
                raise GravenError(
                    f"the secrets key {path} is damaged ({len(key)} bytes, expected 32)",
                    hint="Restore it from backup; without it stored secrets cannot be matched.",
                )
            self._key = key
        return self._key

    def reference(self, value: str) -> str:
        """The reference recorded in place of ``value``; stores nothing."""
        digest = hmac.new(self.key(), value.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"<secret sha256:{digest}>"

    def put(self, value: str) -> str:
        """Keep ``value`` (durably, before any record refers to it); its reference."""
        ref = self.reference(value)
        path = self._path(ref)
        if not path.exists():
            self._ensure_dir()
            write_atomic(path, value.encode("utf-8"), mode=0o600)
        return ref

    def reveal(self, ref: str) -> str:
        path = self._path(ref)
        try:
            return path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SecretMissing(
                f"{ref} is missing from the secrets store {self.root} ({why})",
                hint="Deploy again from the spec so the CLI hands the secret over anew.",
            ) from exc

    def reveal_env(self, env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """``env`` with every reference replaced by its value: what an instance gets."""
        return tuple((k, self.reveal(v) if is_secret_ref(v) else v) for k, v in env)

    def _path(self, ref: str) -> Path:
        match = SECRET_REF_RE.fullmatch(ref)
        if match is None:
            raise ValueError(f"not a secret reference: {ref!r}")
        return self.root / match.group(1)
