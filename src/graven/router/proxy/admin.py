"""The embedded router's admin API (HTTP/1.1 + JSON on a unix socket): routing a
request to the ``AdminHandler`` (the supervisor) and serving one request per connection."""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Final, Protocol

from graven.router.base import Backend, BackendSetError
from graven.router.proxy.backends import parse_backends
from graven.router.proxy.http1 import _BadMessage, _parse_request

log = logging.getLogger(__name__)

ADMIN_BODY_LIMIT: Final = 1024 * 1024


class AdminHandler(Protocol):
    """What the admin API serves: the supervisor of a router's worker proxies."""

    def health(self) -> dict[str, object]: ...

    async def get_backends(self) -> tuple[int, dict[str, object]]: ...

    async def put_backends(self, backends: list[Backend]) -> tuple[int, dict[str, object]]: ...


async def route_admin(
    handler: AdminHandler, method: bytes, target: bytes, body: bytes
) -> tuple[int, dict[str, object]]:
    path = target.split(b"?", 1)[0]
    if path == b"/health":
        if method != b"GET":
            return 405, {"error": "use GET /health"}
        return 200, handler.health()
    if path != b"/backends":
        return 404, {
            "error": f"no such resource {path.decode(errors='replace')!r}; "
            "try GET /health, GET /backends or PUT /backends"
        }
    if method == b"GET":
        return await handler.get_backends()
    if method != b"PUT":
        return 405, {"error": "use GET or PUT /backends"}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return 400, {"error": f"body is not valid JSON: {exc}"}
    if not isinstance(doc, dict) or set(doc) != {"backends"}:
        return 400, {"error": 'body must be a JSON object with exactly one key, "backends"'}
    try:
        backends = parse_backends(doc["backends"])
    except BackendSetError as exc:
        return 400, {"error": str(exc)}
    return await handler.put_backends(backends)


async def serve_admin_request(
    handler: AdminHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One admin request per connection (``start_unix_server`` callback, with the
    handler bound); the answer closes the connection."""
    try:
        try:
            async with asyncio.timeout(10.0):
                head = await reader.readuntil(b"\r\n\r\n")
                req = _parse_request(head)
                if req.chunked:
                    raise _BadMessage(411, "send the body with a Content-Length")
                if req.length > ADMIN_BODY_LIMIT:
                    raise _BadMessage(413, "body larger than 1 MiB")
                body = await reader.readexactly(req.length) if req.length else b""
            status, doc = await route_admin(handler, req.method, req.target, body)
        except _BadMessage as exc:
            status, doc = exc.status, {"error": exc.reason}
        except asyncio.LimitOverrunError:
            status, doc = 431, {"error": "request head larger than 64 KiB"}
        data = json.dumps(doc).encode()
        writer.write(
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (status, HTTPStatus(status).phrase.encode(), len(data), data)
        )
        await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    except Exception:
        log.exception("unexpected error on the admin socket")
    finally:
        writer.close()
