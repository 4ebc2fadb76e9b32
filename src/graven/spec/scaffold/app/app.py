"""A tiny HTTP service to deploy with graven (standard library only).

    GET /         JSON naming the version and the instance that answered
    GET /healthz  200 once the instance can serve

It listens on $HOST:$PORT (default 127.0.0.1:8000), keeps connections alive, and on
SIGTERM stops accepting, finishes the requests in flight, and exits 0: what graven
expects of an instance it drains and replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

VERSION = os.environ.get("VERSION", "dev")
INSTANCE = os.environ.get("GRAVEN_INSTANCE", "local")
# Share of requests to / answered with HTTP 500: a bad release to watch a canary abort.
ERROR_RATE = float(os.environ.get("ERROR_RATE", "0"))
# While this file exists the instance crashes (exit code 3): a crash loop to watch.
CRASH_FILE = os.environ.get("CRASH_FILE", "")


class Server(ThreadingHTTPServer):
    """Tracks idle keep-alive connections so a shutdown need not wait for clients."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, Handler)
        self.draining = False
        self._lock = threading.Lock()
        self._idle: set[socket.socket] = set()

    def set_idle(self, conn: socket.socket, idle: bool) -> None:
        with self._lock:
            if idle and self.draining:
                # Nothing more will be read: wake the handler so its thread ends.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
            elif idle:
                self._idle.add(conn)
            else:
                self._idle.discard(conn)

    def forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._idle.discard(conn)

    def drain(self) -> None:
        """Stop accepting; close idle connections; busy ones close after their reply."""
        with self._lock:
            self.draining = True
            for conn in self._idle:
                with contextlib.suppress(OSError):  # the client already went away
                    conn.shutdown(socket.SHUT_RD)
            self._idle.clear()
        self.shutdown()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length
    # Headers and body go out as two writes: with Nagle on, the body would wait for
    # the client's delayed ACK (~40 ms) on every keep-alive reply.
    disable_nagle_algorithm = True
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.set_idle(self.connection, idle=True)

    def finish(self) -> None:
        self.server.forget(self.connection)
        super().finish()

    def parse_request(self) -> bool:
        self.server.set_idle(self.connection, idle=False)
        return super().parse_request()

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if not self.close_connection:
            self.server.set_idle(self.connection, idle=True)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply(200, b"ok\n", "text/plain")
        elif self.path == "/":
            if ERROR_RATE and random.random() < ERROR_RATE:
                self.reply(500, b"injected failure\n", "text/plain")
                return
            body = {"service": "hello", "version": VERSION, "instance": INSTANCE}
            self.reply(200, json.dumps(body).encode() + b"\n", "application/json")
        else:
            self.reply(404, b"not found\n", "text/plain")

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.server.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{INSTANCE} {self.address_string()} {format % args}\n")


def crash_when_told() -> None:
    while not Path(CRASH_FILE).exists():
        time.sleep(0.1)
    print(f"{INSTANCE}: crashing ({CRASH_FILE} exists)", flush=True)
    os._exit(3)


def main() -> int:
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    server = Server((host, port))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever(), which runs in this very thread.
        threading.Thread(target=server.drain, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if CRASH_FILE:
        threading.Thread(target=crash_when_told, daemon=True).start()
    bound = server.server_address[1]  # differs from PORT when PORT is 0
    print(f"{INSTANCE}: version {VERSION} serving on http://{host}:{bound}", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()  # joins the request threads: in-flight replies finish
    print(f"{INSTANCE}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
