"""A guestbook on SQLite (standard library only): its data lives in a named volume.

    GET  /         JSON: the version that answered and every entry, oldest first
    POST /         add an entry: a JSON body {"name": ..., "message": ...}; 201
    GET  /healthz  200 once the database answers

The database is $DATA_DIR/guestbook.db (default /data, where graven.yaml mounts the
volume), in WAL mode so the instances of two releases can share it during a rollout.
Listens on $HOST:$PORT; on SIGTERM it stops accepting, finishes what is in flight and
exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

VERSION = os.environ.get("VERSION", "dev")
INSTANCE = os.environ.get("GRAVEN_INSTANCE", "local")
DATABASE = Path(os.environ.get("DATA_DIR", "/data")) / "guestbook.db"
MAX_BODY = 64 * 1024


@contextlib.contextmanager
def connect() -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode, closed after the block."""
    conn = sqlite3.connect(DATABASE, timeout=10, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA temp_store=MEMORY")  # the image's root is read-only
        yield conn
    finally:
        conn.close()


def create_schema() -> None:
    with connect() as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS entries ("
            " id INTEGER PRIMARY KEY, name TEXT NOT NULL, message TEXT NOT NULL,"
            " at REAL NOT NULL, by_version TEXT NOT NULL)"
        )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a drain waits for no idle client

    def do_GET(self) -> None:
        if self.path == "/healthz":
            with connect() as conn:
                conn.execute("SELECT 1").fetchone()
            self.reply(200, {"ok": True})
        elif self.path == "/":
            with connect() as conn:
                rows = conn.execute(
                    "SELECT id, name, message, at, by_version FROM entries ORDER BY id"
                ).fetchall()
            entries = [
                {"id": i, "name": n, "message": m, "at": at, "by_version": v}
                for i, n, m, at, v in rows
            ]
            self.reply(200, {"version": VERSION, "instance": INSTANCE, "entries": entries})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/":
            self.reply(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise ValueError(f"a body of 1 to {MAX_BODY} bytes is needed")
            entry = json.loads(self.rfile.read(length))
            name, message = str(entry["name"]), str(entry["message"])
        except (ValueError, KeyError, TypeError) as exc:
            self.reply(400, {"error": f"expected JSON {{name, message}}: {exc}"})
            return
        with connect() as conn:
            cur = conn.execute(
                "INSERT INTO entries (name, message, at, by_version) VALUES (?, ?, ?, ?)",
                (name, message, time.time(), VERSION),
            )
        self.reply(201, {"id": cur.lastrowid, "version": VERSION})

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{INSTANCE} {format % args}\n")


def main() -> int:
    create_schema()
    server = ThreadingHTTPServer(
        (os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))), Handler
    )
    server.daemon_threads = False  # server_close() waits for the replies in flight

    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"{INSTANCE}: guestbook {VERSION} on {DATABASE}", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    print(f"{INSTANCE}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
