"""Health probes (HTTP, TCP, command), async so one controller can watch many
instances at once."""

from __future__ import annotations

import asyncio
import os

from graven.model import HealthCheck, Instance


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


async def probe_tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Healthy when a TCP connection opens within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return False, f"no TCP connection within {timeout:g}s"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    writer.close()
    return True, "TCP connect"


async def probe_command(
    command: tuple[str, ...], env: dict[str, str], timeout: float
) -> tuple[bool, str]:
    """Healthy when ``command`` exits 0 within ``timeout``; it gets the instance's
    address in PORT and HOST."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    except OSError as exc:
        return False, f"cannot run {command[0]}: {exc.strerror or exc}"
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"command took longer than {timeout:g}s"
    if proc.returncode == 0:
        return True, "exit 0"
    last = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
    return False, f"exit {proc.returncode}" + (f": {last[0][:200]}" if last else "")


async def probe(instance: Instance, check: HealthCheck) -> tuple[bool, str]:
    """Run ``check`` against ``instance``."""
    if check.kind == "tcp":
        return await probe_tcp(instance.host, instance.port, check.timeout)
    if check.kind == "command":
        env = {
            "HOST": instance.host,
            "PORT": str(instance.port),
            "GRAVEN_INSTANCE": instance.id,
        }
        return await probe_command(check.command, env, check.timeout)
    return await probe_http(instance.host, instance.port, check.path, check.timeout)
