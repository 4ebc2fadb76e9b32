"""The controller API on a real unix socket, spoken to over raw sockets.

A real ``Api`` served by asyncio in a thread, over an Engine with fake runtime and
router: what is under test is the wire (deadlines, the connection bound, strict
parsing), so nothing else needs to run. Every refusal must be a JSON error, and
the log must never show a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graven.controller.api import Api
from graven.controller.client import ControllerClient
from graven.controller.engine import Engine
from graven.controller.paths import controller_socket
from graven.ledger.sqlite import SqliteStateStore
from graven.model import HealthCheck, ImageConfig, ServiceConfig
from graven.store.cas import ContentStore
from graven.store.tree_model import Tree
from graven.testing.clock import FakeClock
from graven.testing.fakes import FakeRouter
from graven.testing.runtime import FakeRuntime

# Generous: how long a test waits for a reply the server owes it. Never a goal.
WAIT = 20.0


class ApiServer:
    """``Api`` on ``controller_socket(state_dir)``, its loop in a daemon thread."""

    def __init__(self, state_dir: Path, **api_options: Any) -> None:
        self.state_dir = state_dir
        self.socket = controller_socket(state_dir)
        self.api_options = api_options
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.image = ""
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        assert self.ready.wait(WAIT), "the API server did not start"
        if self.failure is not None:
            raise self.failure
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the API server did not stop"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test by __enter__
            self.failure = exc
            self.ready.set()

    async def _serve(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = SqliteStateStore(self.state_dir / "state.db")
        store = ContentStore(self.state_dir / "store")
        runtime = FakeRuntime()
        engine = Engine(
            self.state_dir, state, store, runtime, FakeRouter(), FakeClock(), probe=runtime.probe
        )
        rootfs = store.put_tree(Tree.of([]))
        digest = store.put_image(rootfs, ImageConfig(entrypoint=("app",))).digest
        self.image = str(digest)
        config = ServiceConfig(replicas=1, port=18080, health=HealthCheck(start_timeout=5))
        engine.commands.deploy("web", digest, "web", config, "ana@host", "first", {})
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        api = Api(engine, self.stop.set, **self.api_options)
        server = await asyncio.start_unix_server(api.serve_connection, path=str(self.socket))
        self.ready.set()
        try:
            await self.stop.wait()
        finally:
            server.close()
            state.close()


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, "\n".join(caplog.text.splitlines()[-40:])


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(str(path))
    return sock


def read_reply(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the one reply, read to the end of the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    payload = json.loads(body)
    assert isinstance(payload, dict)
    return status, payload


def exchange(path: Path, request: bytes) -> tuple[int, dict[str, Any]]:
    with connect(path) as sock:
        sock.sendall(request)
        return read_reply(sock)


def post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: graven\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def still_open(sock: socket.socket) -> bool:
    """True while the server has neither replied on nor closed ``sock``."""
    sock.setblocking(False)
    try:
        return not sock.recv(1, socket.MSG_PEEK)  # b"" would mean closed
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(WAIT)


GOOD_CONFIG = {"replicas": 1, "port": 18080, "health": {"start_timeout": 5}}


def deploy_body(image: str, **config: Any) -> bytes:
    return json.dumps(
        {
            "service": "web",
            "image": image,
            "image_name": "web",
            "config": {**GOOD_CONFIG, **config},
            "actor": "ana@host",
            "message": "why",
        }
    ).encode()


# Requests the old parser answered with a 500 and a traceback, or took at a wrong value.
MALFORMED: dict[str, bytes] = {
    # latin-1 '²' passes str.isdigit() but not int()
    "content-length-superscript": b"GET /v1/health HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
    # past int()'s 4300-digit limit
    "content-length-5000-digits": b"GET /v1/health HTTP/1.1\r\nContent-Length: "
    + b"9" * 5000
    + b"\r\n\r\n",
    "conflicting-content-lengths": b"POST /v1/down HTTP/1.1\r\nContent-Length: 2\r\n"
    b"Content-Length: 40\r\n\r\n{}",
    # urllib's urlsplit() raises on it; the target is a plain path: no route
    "target-urlsplit-rejects": b"GET //[/v1/health HTTP/1.1\r\n\r\n",
    "rollout-id-arabic-digit": b"GET /v1/rollout?id=%D9%A1 HTTP/1.1\r\n\r\n",
    "rollout-id-superscript": b"GET /v1/rollout?id=%C2%B9 HTTP/1.1\r\n\r\n",
    "rollout-id-beyond-int64": b"GET /v1/rollout?id=9223372036854775808 HTTP/1.1\r\n\r\n",
    "rollback-to-beyond-int64": post(
        "/v1/rollback",
        b'{"service": "web", "to": 18446744073709551616, "actor": "a", "message": "m"}',
    ),
    "json-nested-5000-deep": post("/v1/down", b"[" * 5000 + b"]" * 5000),
    "json-nested-5000-deep-in-object": post(
        "/v1/down", b'{"details": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    ),
    # a service name becomes file names under the state dir
    "service-name-climbs-out": post(
        "/v1/plan",
        b'{"service": "../../x", "image": "sha256:'
        + b"0" * 64
        + b'", "config": '
        + json.dumps(GOOD_CONFIG).encode()
        + b"}",
    ),
    "lone-surrogate-service": post(
        "/v1/plan",
        b'{"service": "\\ud800", "image": "sha256:'
        + b"0" * 64
        + b'", "config": '
        + json.dumps(GOOD_CONFIG).encode()
        + b"}",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_is_a_json_400_and_logs_no_traceback(
    tmp_path: Path, no_tracebacks: None, name: str
) -> None:
    with ApiServer(tmp_path / "state") as server:
        status, payload = exchange(server.socket, MALFORMED[name])
        if name == "target-urlsplit-rejects":
            assert (status, payload["error"]) == (404, "NotFound"), payload
        else:
            assert (status, payload["error"]) == (400, "BadRequest"), payload
        assert payload["message"]
        # The server is still there for the next request.
        assert exchange(server.socket, b"GET /v1/health HTTP/1.1\r\n\r\n")[0] == 200


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"replicas": "3"}, "config.replicas"),
        ({"port": 10**20}, "config.port"),
        ({"port": 70000}, "config.port"),
        ({"max_surge": 2**63}, "config.max_surge"),
        ({"health": {"interval": "1s"}}, "config.health.interval"),
        ({"canary_steps": [[10, None]]}, "config.canary_steps[0]"),
    ],
)
def test_service_config_of_wrong_type_or_range_is_a_400_naming_the_key(
    tmp_path: Path, no_tracebacks: None, config: dict[str, Any], key: str
) -> None:
    with ApiServer(tmp_path / "state") as server:
        status, payload = exchange(
            server.socket, post("/v1/plan", deploy_body(server.image, **config))
        )
        assert status == 400, payload
        assert key in payload["message"]


def test_a_stalled_head_or_body_is_dropped_with_408(tmp_path: Path, no_tracebacks: None) -> None:
    with ApiServer(tmp_path / "state", head_timeout=0.5, body_timeout=0.5) as server:
        halves = [b"GET /v1/health HTTP/1.1\r\nHost: gra"] * 5 + [
            b'POST /v1/down HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"actor": '
        ] * 5
        socks = [connect(server.socket) for _ in halves]
        try:
            for sock, half in zip(socks, halves, strict=True):
                sock.sendall(half)
            replies = [read_reply(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        assert [status for status, _ in replies] == [408] * 10
        assert "head" in replies[0][1]["message"] and "body" in replies[-1][1]["message"]
        assert exchange(server.socket, b"GET /v1/health HTTP/1.1\r\n\r\n")[0] == 200


def test_full_house_of_stalled_connections_still_serves_status(
    tmp_path: Path, no_tracebacks: None
) -> None:
    bound = 8
    # Deadlines far away: whatever is closed here was closed by the bound, not a timeout.
    with ApiServer(tmp_path / "state", head_timeout=300, max_connections=bound) as server:
        stalled = []
        try:
            for _ in range(3 * bound):
                sock = connect(server.socket)
                sock.sendall(b"GET /v1/status HTTP/1.1\r\n")
                stalled.append(sock)
            # Each connection past the bound pushed out the oldest one still reading.
            for sock in stalled[: 2 * bound]:
                status, payload = read_reply(sock)
                assert status == 503 and "connections open" in payload["message"]
            assert all(still_open(sock) for sock in stalled[2 * bound :])

            # The CLI's own client is served at once, at the cost of one more stalled one.
            client = ControllerClient(server.state_dir, timeout=WAIT)
            services = client.request("GET", "/v1/status")["services"]
            assert [s["service"] for s in services] == ["web"]
            assert read_reply(stalled[2 * bound])[0] == 503
            assert all(still_open(sock) for sock in stalled[2 * bound + 1 :])

            # And so is the real CLI.
            env = {**os.environ, "GRAVEN_STATE_DIR": str(server.state_dir)}
            out = subprocess.run(
                [sys.executable, "-m", "graven", "status", "-o", "json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert out.returncode == 0, out.stderr
            assert [s["service"] for s in json.loads(out.stdout)["services"]] == ["web"]
        finally:
            for sock in stalled:
                with contextlib.suppress(OSError):
                    sock.close()
