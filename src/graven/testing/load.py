"""A bounded HTTP load generator: the demo and the e2e tests use it to prove that
deploys and rollbacks drop no request.

Every loop is bounded in count and in time, and stops by itself.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    bodies: Counter[str] = field(default_factory=Counter)  # first line of each 200 body

    def to_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "errors": dict(self.errors),
            "versions": dict(self.bodies),
        }


class Load:
    """Sends GET requests from ``clients`` threads with keep-alive connections until
    ``stop()`` is called and at least ``min_requests`` were sent, or ``max_seconds`` pass,
    or ``max_requests`` were sent."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str = "/",
        clients: int = 4,
        min_requests: int = 0,
        max_requests: int = 200_000,
        max_seconds: float = 120.0,
        pause: float = 0.0,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.clients = clients
        self.min_requests = min_requests
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pause = pause
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._deadline = 0.0

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._deadline = time.monotonic() + self.max_seconds
        for n in range(self.clients):
            t = threading.Thread(target=self._client, name=f"load-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> LoadReport:
        """Ask the clients to finish once ``min_requests`` went out; wait for them."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.max_seconds + 10)
        return self.report

    def _done(self) -> bool:
        if time.monotonic() >= self._deadline or self.report.sent >= self.max_requests:
            return True
        return self._stop.is_set() and self.report.sent >= self.min_requests

    def _client(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._done():
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            outcome, body = "ok", ""
            current = conn
            try:
                current.request("GET", self.path)
                resp = current.getresponse()
                data = resp.read()
                if resp.status != 200:
                    outcome = f"HTTP {resp.status}"
                else:
                    body = data.decode(errors="replace").splitlines()[0] if data else ""
                if resp.will_close:
                    current.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                current.close()
                conn = None
            with self._lock:
                self.report.sent += 1
                if outcome == "ok":
                    self.report.ok += 1
                    self.report.bodies[body] += 1
                else:
                    self.report.failed += 1
                    self.report.errors[outcome] += 1
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()
