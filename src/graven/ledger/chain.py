"""The tamper-evident ledger: each entry's hash covers its fields and the previous
entry's hash, so editing, deleting or reordering any entry breaks the chain there.

Pure code: the store persists entries; ``verify_chain`` proves them untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from graven.errors import LedgerTampered
from graven.model import canonical_json


@dataclass(frozen=True)
class LedgerEntry:
    """Who did what, when, why, to which release and image."""

    at: float
    actor: str
    action: str  # deploy | rollback | down | rollout-failed | ...
    service: str
    release: str = ""
    image: str = ""
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""

    def body(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": repr(self.at),  # repr keeps every bit of the float through JSON
            "actor": self.actor,
            "action": self.action,
            "service": self.service,
            "release": self.release,
            "image": self.image,
            "message": self.message,
            "details": self.details,
            "prev": self.prev_hash,
        }

    def sealed(self, *, seq: int, prev_hash: str) -> LedgerEntry:
        entry = replace(self, seq=seq, prev_hash=prev_hash)
        return replace(entry, hash=chain_hash(entry))

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "at": self.at, "hash": self.hash}


def chain_hash(entry: LedgerEntry) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(entry.body())).hexdigest()


def verify_chain(entries: list[LedgerEntry], head: tuple[int, str] | None = None) -> int:
    """Return the number of verified entries; raise ``LedgerTampered`` at the first bad one.

    ``head`` is the last (seq, hash) recorded outside the database, which catches the
    one edit a chain alone cannot: deleting entries from the end.
    """
    prev = ""
    for expected_seq, entry in enumerate(entries, start=1):
        if entry.seq != expected_seq:
            raise LedgerTampered(expected_seq, f"entry missing (found #{entry.seq} in its place)")
        if entry.prev_hash != prev:
            raise LedgerTampered(entry.seq, "its link to the previous entry does not match")
        if chain_hash(entry) != entry.hash:
            raise LedgerTampered(entry.seq, "its content does not match its hash")
        prev = entry.hash
    if head is not None:
        seq, digest = head
        if len(entries) < seq:
            raise LedgerTampered(len(entries) + 1, f"entries #{len(entries) + 1}..#{seq} deleted")
        if seq and entries[seq - 1].hash != digest:
            raise LedgerTampered(seq, "it differs from the recorded head of the chain")
    return len(entries)
