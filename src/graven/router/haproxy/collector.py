"""The latency collector beside each haproxy: ``python -m graven.router.haproxy.collector``.

haproxy keeps no histogram, but it logs every request: the frontend logs
``<server> <Tc> <Tr>`` to a unix datagram socket served here; this process sums the
times into ``LATENCY_BOUNDS`` buckets per server and answers a query socket
(``dump``, ``forget NAME``, ``ping``). It exits by itself when the haproxy it watches
is gone, so its counters reset exactly when haproxy's do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

from graven import detached
from graven.router.base import LATENCY_BOUNDS, latency_bucket


class LatencyCollector:
    """Per-server latency histograms from haproxy's request log lines.

    A line is ``<server> <Tc> <Tr>`` (milliseconds; -1 when that phase never ended).
    Requests that got no response headers are not counted: the histogram is of
    completed requests, the way ``BackendStats.latency_buckets`` defines it.
    """

    def __init__(self, watch: int = 0) -> None:
        self.watch = watch  # the haproxy pid these histograms are of
        self.histograms: dict[str, list[int]] = {}

    def add_line(self, line: bytes) -> None:
        parts = line.split()
        if len(parts) != 3 or parts[0] == b"<NOSRV>":
            return
        try:
            connect_ms, response_ms = int(parts[1]), int(parts[2])
        except ValueError:
            return
        if connect_ms < 0 or response_ms < 0:
            return
        name = parts[0].decode(errors="replace")
        counts = self.histograms.get(name)
        if counts is None:
            counts = self.histograms[name] = [0] * (len(LATENCY_BOUNDS) + 1)
        counts[latency_bucket((connect_ms + response_ms) / 1000)] += 1

    def answer(self, request: str) -> dict[str, object]:
        verb, _, arg = request.strip().partition(" ")
        if verb == "dump":
            return {"pid": os.getpid(), "servers": self.histograms}
        if verb == "forget":
            self.histograms.pop(arg, None)
            return {"ok": True}
        if verb == "ping":
            return {"pid": os.getpid(), "watch": self.watch}
        return {"error": f"unknown request {verb!r}"}


def _bind_unix(kind: socket.SocketKind, path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # Bound under a private umask: no window where another user could connect.
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    return sock


def run_collector(log_socket: Path, query_socket: Path, watch: tuple[int, int]) -> int:
    """Serve ``log_socket`` (haproxy's log datagrams) and ``query_socket`` until the
    watched haproxy ``(pid, start time)`` is gone or SIGTERM arrives."""
    collector = LatencyCollector(watch[0])
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logs = _bind_unix(socket.SOCK_DGRAM, log_socket)
    # A deep receive buffer absorbs bursts; beyond it haproxy drops log lines.
    with contextlib.suppress(OSError):
        logs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    logs.setblocking(False)
    queries = _bind_unix(socket.SOCK_STREAM, query_socket)
    queries.listen(16)
    queries.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(logs, selectors.EVENT_READ, "logs")
    selector.register(queries, selectors.EVENT_READ, "queries")
    next_check = 0.0
    try:
        while not stopping:
            now = time.monotonic()
            if now >= next_check:
                if not detached.is_running(*watch):
                    break
                next_check = now + 0.5
            for key, _ in selector.select(timeout=0.5):
                if key.data == "logs":
                    for _ in range(1000):  # bounded: queries get their turn
                        try:
                            collector.add_line(logs.recv(2048))
                        except BlockingIOError:
                            break
                else:
                    _serve_query(queries, collector)
    finally:
        selector.close()
        logs.close()
        queries.close()
        for path in (log_socket, query_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return 0


def _serve_query(listener: socket.socket, collector: LatencyCollector) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(2.0)
        try:
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            reply = collector.answer(data.decode(errors="replace"))
            conn.sendall(json.dumps(reply).encode())
        except OSError:
            pass  # the asker went away; nothing to clean up


def main(argv: list[str] | None = None) -> int:
    """``python -m graven.router.haproxy.collector ...``: the latency collector."""
    parser = argparse.ArgumentParser(
        prog="python -m graven.router.haproxy.collector",
        description="collect haproxy request latencies",
    )
    parser.add_argument("--log-socket", type=Path, required=True)
    parser.add_argument("--query-socket", type=Path, required=True)
    parser.add_argument("--watch", required=True, help="PID:START_TIME of the haproxy")
    args = parser.parse_args(argv)
    pid_text, _, start_text = str(args.watch).partition(":")
    try:
        watch = (int(pid_text), int(start_text))
    except ValueError:
        parser.error(f"--watch: expected PID:START_TIME (got {args.watch!r})")
    return run_collector(args.log_socket, args.query_socket, watch)


if __name__ == "__main__":
    sys.exit(main())
