"""A real OCI registry on loopback for tests and benchmarks: ``docker-registry``
(distribution 2.8, which scripts/setup installs), its storage in a temp dir, stopped by
its pid at the end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graven.testing.net import free_port


@dataclass
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``, what references start with."""

    host: str
    root: Path
    pid: int
    username: str | None = None
    password: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def data(self) -> Path:
        """The registry's storage root (``docker/registry/v2/...`` below it)."""
        return self.root / "data"


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=1):  # noqa: S310 (http://127.0.0.1)
                return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # auth-protected: it answers, so it is up
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not answer within {timeout}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextlib.contextmanager
def running_registry(
    tmp: Path, auth: dict[str, Any] | None = None, *, log_level: str = "warn"
) -> Iterator[Registry]:
    """``docker-registry serve`` on a free loopback port with storage under ``tmp``;
    stopped by its pid when the block ends."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": log_level, "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(tmp / "data")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "graven-test-secret"},
    }
    if auth:
        config["auth"] = auth
    config_path = tmp / "config.yml"
    # JSON is YAML: no YAML writer needed.
    config_path.write_text(json.dumps(config, indent=2))
    log = tmp / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        host = f"127.0.0.1:{port}"
        _wait_ready(f"http://{host}", proc, log)
        yield Registry(host, tmp, proc.pid)
    finally:
        _stop(proc)
