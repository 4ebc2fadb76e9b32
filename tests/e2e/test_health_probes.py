"""Health probes against real loopback sockets and real commands."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from graven.errors import SpecError
from graven.model import HealthCheck, Instance
from graven.rollout.health import probe
from graven.spec import load_spec

pytestmark = pytest.mark.e2e


def _instance(port: int) -> Instance:
    return Instance("web-r1-abcd", "web", 1, "sha256:" + "0" * 64, "127.0.0.1", port, 1, 0.0)  # type: ignore[arg-type]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_probe() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ok, why = asyncio.run(probe(_instance(port), HealthCheck(kind="tcp")))
        assert ok, why
    ok, why = asyncio.run(probe(_instance(_closed_port()), HealthCheck(kind="tcp")))
    assert not ok and why


def test_command_probe_sees_the_instance_address() -> None:
    check = HealthCheck(
        kind="command",
        command=(
            sys.executable,
            "-c",
            "import os,sys; sys.exit(0 if os.environ['PORT']=='4242' else 3)",
        ),
    )
    assert asyncio.run(probe(_instance(4242), check)) == (True, "exit 0")
    ok, why = asyncio.run(probe(_instance(4343), check))
    assert not ok and why.startswith("exit 3")


def test_command_probe_timeout_and_missing_program() -> None:
    slow = HealthCheck(
        kind="command", timeout=0.2, command=(sys.executable, "-c", "import time; time.sleep(5)")
    )
    ok, why = asyncio.run(probe(_instance(1), slow))
    assert not ok and "longer than 0.2s" in why
    missing = HealthCheck(kind="command", command=("/nonexistent/probe",))
    ok, why = asyncio.run(probe(_instance(1), missing))
    assert not ok and "cannot run" in why


def test_http_probe_on_a_closed_port_fails_with_a_reason() -> None:
    ok, why = asyncio.run(probe(_instance(_closed_port()), HealthCheck(timeout=0.5)))
    assert not ok and why


SPEC = """\
images:
  web:
    steps:
      - entrypoint: /bin/app
services:
  web:
    image: web
    port: 8080
    health:
{health}
"""


@pytest.mark.parametrize(
    ("health", "needle"),
    [
        ("      type: command\n", "needs 'command'"),
        ("      type: tcp\n      command: true\n", "only for type 'command'"),
        ("      type: grpc\n", "grpc"),
    ],
)
def test_probe_spec_errors(tmp_path: Path, health: str, needle: str) -> None:
    (tmp_path / "graven.yaml").write_text(SPEC.format(health=health))
    with pytest.raises(SpecError) as exc:
        load_spec(tmp_path / "graven.yaml")
    assert needle in str(exc.value)
    assert "services.web.health" in str(exc.value)


def test_command_probe_spec_is_split_like_a_shell(tmp_path: Path) -> None:
    (tmp_path / "graven.yaml").write_text(
        SPEC.format(health="      type: command\n      command: curl -fs 'http://x/y z'\n")
    )
    cfg = load_spec(tmp_path / "graven.yaml").spec.services["web"].to_config()
    assert cfg.health.kind == "command"
    assert cfg.health.command == ("curl", "-fs", "http://x/y z")
