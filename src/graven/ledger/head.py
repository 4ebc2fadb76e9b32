"""The ledger's head outside the database: the newest entry's sequence and hash.

``audit --verify`` checks the chain against this file to catch entries deleted from
the end, which the chain alone cannot show.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

from graven.atomic import write_atomic
from graven.ledger.chain import LedgerEntry

log = logging.getLogger("graven.ledger")

HEAD_FILE = "ledger.head"


class LedgerHead:
    """Writes ``ledger.head`` in ``state_dir`` after each committed ledger entry."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / HEAD_FILE
        self._head: tuple[int, str] | None = None  # the newest head to write out
        self._scheduled = False
        self._lock = threading.Lock()

    def advance(self, entry: LedgerEntry) -> None:
        """Record ``entry`` (just committed) as the head.

        In the controller the file is written on a worker thread, so neither the API
        reply nor the service worker a change woke waits for its two fsyncs. A head one
        entry behind (a crash in between) is one the verifier accepts; the change itself
        is durable in the database already."""
        self._head = (entry.seq, entry.hash)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the controller's loop (tools, tests)
            self.flush()
            return
        if not self._scheduled:
            self._scheduled = True
            loop.run_in_executor(None, self.flush)

    def flush(self) -> None:
        """Write the newest head now."""
        # Under the lock the newest head is read and written, so a slower thread never
        # writes an older head over a newer one.
        with self._lock:
            self._scheduled = False
            if self._head is None:
                return
            seq, digest = self._head
            try:
                write_atomic(
                    self.path, json.dumps({"seq": seq, "hash": digest}).encode(), mode=0o600
                )
            except OSError as exc:
                # The next change writes it again; the ledger is safe in the database.
                log.error("cannot write %s: %s", self.path, exc)  # noqa: TRY400 - no traceback needed
