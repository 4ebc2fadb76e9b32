"""The controller's HTTP API, served on a unix socket in the state dir.

Requests are untrusted: bodies are size-capped JSON objects checked key by key, and
every refusal is a JSON error with a message the CLI can show as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from graven.controller.engine import Engine
from graven.disk import disk_error
from graven.errors import GravenError, NotFoundError, UsageError
from graven.model import Digest, ServiceConfig

log = logging.getLogger("graven.controller.api")

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024

Handler = Callable[[dict[str, Any], dict[str, list[str]]], Awaitable[Any]]


class BadRequest(UsageError):
    pass


def _field(body: dict[str, Any], key: str, kind: type, *, required: bool = True) -> Any:
    if key not in body or body[key] is None:
        if required:
            raise BadRequest(f"request body: missing key {key!r}")
        return None
    value = body[key]
    if kind is int and isinstance(value, bool):
        raise BadRequest(f"request body: {key!r} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"request body: {key!r} must be {kind.__name__}, got {value!r}")
    return value


class Api:
    def __init__(self, engine: Engine, on_shutdown: Callable[[], None]) -> None:
        self.engine = engine
        self.on_shutdown = on_shutdown
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/health"): self.health,
            ("GET", "/v1/status"): self.status,
            ("GET", "/v1/rollout"): self.rollout,
            ("POST", "/v1/deploy"): self.deploy,
            ("POST", "/v1/plan"): self.plan,
            ("POST", "/v1/rollback"): self.rollback,
            ("POST", "/v1/down"): self.down,
            ("POST", "/v1/promote"): self.promote,
            ("POST", "/v1/abort"): self.abort,
            ("POST", "/v1/shutdown"): self.shutdown,
        }

    # --- handlers -----------------------------------------------------------------------

    async def health(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        return {"ok": True, "pid": os.getpid()}

    async def status(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        wanted = query.get("service", [None])[0]
        return {
            "services": self.engine_status(wanted),
            "state_dir": self.engine.upkeep.disk.report(),
        }

    def engine_status(self, wanted: str | None) -> list[dict[str, Any]]:
        st = self.engine.state
        services = st.services()
        if wanted is not None and wanted not in services:
            raise NotFoundError(
                f"service {wanted!r} was never deployed",
                hint="Run 'graven status' to list deployed services.",
            )
        running_routers = self.engine.router.running()
        out = []
        for name in sorted(services):
            if wanted is not None and name != wanted:
                continue
            desired = services[name]
            release = st.release(name, desired) if desired is not None else None
            row = st.release_row(name, desired) if desired is not None else None
            rollout = st.last_rollout(name)
            instances = []
            for inst in st.live_instances(name):
                mem = self.engine.health.get(inst.id)
                instances.append(
                    {
                        "id": inst.id,
                        "release": f"{name}@r{inst.release}",
                        "image": str(inst.image),
                        "address": inst.address,
                        "pid": inst.pid,
                        "state": inst.state,
                        "started_at": inst.started_at,
                        "health": mem.last if mem else "",
                    }
                )
            port = running_routers.get(name)
            out.append(
                {
                    "service": name,
                    "desired_release": release.id if release else None,
                    "image": str(release.image) if release else None,
                    "image_name": row["image_name"] if row else None,
                    "replicas": release.config.replicas if release else 0,
                    "url": f"http://127.0.0.1:{port}/" if port else None,
                    "rollout": rollout.to_dict() if rollout else None,
                    "instances": instances,
                }
            )
        return out

    async def rollout(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        raw = query.get("id", [""])[0]
        if not raw.isdigit():
            raise BadRequest("query: 'id' must be a rollout number")
        rollout = self.engine.state.rollout(int(raw))
        return {
            "rollout": rollout.to_dict(),
            "instances": [
                {"id": i.id, "release": i.release, "state": i.state}
                for i in self.engine.state.live_instances(rollout.service)
            ],
        }

    @staticmethod
    def _candidate(body: dict[str, Any]) -> tuple[str, Digest, ServiceConfig]:
        service = _field(body, "service", str)
        try:
            image = Digest(_field(body, "image", str))
            config = ServiceConfig.from_dict(_field(body, "config", dict))
        except (ValueError, TypeError, KeyError) as exc:
            raise BadRequest(f"request body: {exc}") from exc
        return service, image, config

    async def plan(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        return self.engine.preview(*self._candidate(body))

    async def deploy(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        service, image, config = self._candidate(body)
        details = _field(body, "details", dict, required=False) or {}
        return self.engine.deploy(
            service,
            image,
            _field(body, "image_name", str),
            config,
            _field(body, "actor", str),
            _field(body, "message", str),
            details,
        )

    async def rollback(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        return self.engine.rollback(
            _field(body, "service", str),
            _field(body, "to", int, required=False),
            _field(body, "actor", str),
            _field(body, "message", str),
        )

    async def promote(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        return self.engine.promote(
            _field(body, "service", str), _field(body, "actor", str), _field(body, "message", str)
        )

    async def abort(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        return self.engine.abort(
            _field(body, "service", str), _field(body, "actor", str), _field(body, "message", str)
        )

    async def down(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        service = _field(body, "service", str, required=False)
        actor = _field(body, "actor", str)
        message = _field(body, "message", str)
        names = [service] if service else sorted(self.engine.state.services())
        return {"results": [self.engine.down(n, actor, message) for n in names]}

    async def shutdown(self, body: dict[str, Any], query: dict[str, list[str]]) -> Any:
        asyncio.get_running_loop().call_later(0.05, self.on_shutdown)
        return {"ok": True}

    # --- wire ---------------------------------------------------------------------------

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            status, payload = await self._handle(reader)
        except Exception as exc:
            refused = disk_error(exc, self.engine.state_dir)
            if refused is None:
                log.exception("API request failed")
                status, payload = 500, {"error": "InternalError", "message": "controller error"}
            else:
                # A full or read-only state dir: what to do, and status shows it too.
                self.engine.upkeep.disk.refused(exc)
                status, payload = 507, refused.to_dict()
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return 400, {"error": "BadRequest", "message": "malformed or oversized request head"}
        if len(head) > MAX_HEAD:
            return 431, {"error": "BadRequest", "message": "request head too large"}
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 400, {"error": "BadRequest", "message": "malformed request line"}
        method, target, _ = parts
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                if not value.strip().isdigit():
                    return 400, {"error": "BadRequest", "message": "bad Content-Length"}
                length = int(value.strip())
        if length > MAX_BODY:
            return 413, {"error": "BadRequest", "message": "request body too large"}
        raw = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        handler = self.routes.get((method, url.path))
        if handler is None:
            return 404, {"error": "NotFound", "message": f"no route {method} {url.path}"}
        body: Any = {}
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return 400, {"error": "BadRequest", "message": "request body is not JSON"}
            if not isinstance(body, dict):
                return 400, {"error": "BadRequest", "message": "request body must be an object"}
        try:
            return 200, await handler(body, parse_qs(url.query))
        except GravenError as exc:
            return (400 if exc.exit_code == 2 else 409), exc.to_dict()
