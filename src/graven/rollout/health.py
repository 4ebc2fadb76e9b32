"""HTTP health probes, async so one controller can watch many instances at once."""

from __future__ import annotations

import asyncio


async def probe_http(host: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """GET ``path``; healthy on a 2xx or 3xx status. Returns (ok, reason)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: graven-health\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            status_line = await reader.readline()
    except TimeoutError:
        return False, f"no answer within {timeout:g}s"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return False, "not an HTTP response"
    status = int(parts[1])
    if 200 <= status < 400:
        return True, f"HTTP {status}"
    return False, f"HTTP {status}"
