"""Notes kept in PostgreSQL: the instance holds no data, so any instance of any
release serves every note.

    GET  /         JSON: the version that answered, the number of notes, the last 20
    GET  /count    JSON: the number of notes (cheap: what a load test asks)
    POST /         add a note: a JSON body {"text": ...}; 201 with its id
    GET  /healthz  200 once the database answers

The server comes from libpq's variables (PGHOST, PGPORT, PGUSER, PGPASSWORD,
PGDATABASE). The client is pg8000 (pure Python), vendored into ./vendor because the
image's interpreter has no site-packages: 'pip install --target app/vendor pg8000'.
Listens on $HOST:$PORT; on SIGTERM it stops accepting, finishes what is in flight and
exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent / "vendor"))

import pg8000.native

VERSION = os.environ.get("VERSION", "dev")
INSTANCE = os.environ.get("GRAVEN_INSTANCE", "local")
MAX_BODY = 64 * 1024
POOL_SIZE = 4
_SCHEMA_LOCK = 7_401_001  # advisory lock: instances starting together create it once


class Pool:
    """A few open connections, shared by the request threads."""

    def __init__(self, size: int) -> None:
        self._idle: queue.LifoQueue[pg8000.native.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)

    def _open(self) -> pg8000.native.Connection:
        return pg8000.native.Connection(
            os.environ.get("PGUSER", "postgres"),
            host=os.environ.get("PGHOST", "127.0.0.1"),
            port=int(os.environ.get("PGPORT", "5432")),
            password=os.environ.get("PGPASSWORD"),
            database=os.environ.get("PGDATABASE", "postgres"),
            timeout=10,
            application_name=INSTANCE,
        )

    @contextlib.contextmanager
    def connection(self) -> Iterator[pg8000.native.Connection]:
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._open()
            try:
                yield conn
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()  # it may be broken: the next request opens another
                raise
            self._idle.put(conn)

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()


POOL = Pool(POOL_SIZE)


def create_schema() -> None:
    with POOL.connection() as conn:
        conn.run("SELECT pg_advisory_lock(:key)", key=_SCHEMA_LOCK)
        try:
            conn.run(
                "CREATE TABLE IF NOT EXISTS notes (id BIGSERIAL PRIMARY KEY, text TEXT NOT NULL,"
                " by_version TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
        finally:
            conn.run("SELECT pg_advisory_unlock(:key)", key=_SCHEMA_LOCK)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a drain waits for no idle client

    def do_GET(self) -> None:
        with POOL.connection() as conn:
            if self.path == "/healthz":
                conn.run("SELECT 1")
                self.reply(200, {"ok": True})
            elif self.path == "/count":
                ((count,),) = conn.run("SELECT count(*) FROM notes")
                self.reply(200, {"version": VERSION, "count": count})
            elif self.path == "/":
                ((count,),) = conn.run("SELECT count(*) FROM notes")
                rows = conn.run("SELECT id, text, by_version FROM notes ORDER BY id DESC LIMIT 20")
                notes = [{"id": i, "text": t, "by_version": v} for i, t, v in rows]
                self.reply(200, {"version": VERSION, "count": count, "notes": notes})
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
            text = str(json.loads(self.rfile.read(length))["text"])
        except (ValueError, KeyError, TypeError) as exc:
            self.reply(400, {"error": f"expected JSON {{text}}: {exc}"})
            return
        with POOL.connection() as conn:
            ((note_id,),) = conn.run(
                "INSERT INTO notes (text, by_version) VALUES (:text, :version) RETURNING id",
                text=text,
                version=VERSION,
            )
        self.reply(201, {"id": note_id, "version": VERSION})

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # every request under load would flood the instance log


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
    print(f"{INSTANCE}: notes {VERSION} on postgresql://{os.environ.get('PGHOST')}", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    POOL.close()
    print(f"{INSTANCE}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
