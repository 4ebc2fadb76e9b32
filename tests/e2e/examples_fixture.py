"""The examples under ``examples/`` as e2e projects: copied to a temp dir, their spec
adjusted only where a test must (port, replicas, env, fast health checks).

The examples run sealed (bubblewrap, the image as the read-only root, a non-root
uid), so these tests need root and bwrap: off CI they skip without, under CI they fail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from graven.testing.specs import render
from tests.e2e.conftest import Project, _kill_recorded, free_port
from tests.requires import need_root, need_tool

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_project(tmp_path: Path, example: str) -> Iterator[Project]:
    """``examples/EXAMPLE`` copied into a project whose teardown stops what it started
    (by pid) and leaves the volumes with the temp dir."""
    need_root("sealed instances run as another uid, which needs root")
    need_tool("bwrap")
    root = tmp_path / example
    shutil.copytree(EXAMPLES / example, root, ignore=shutil.ignore_patterns("vendor", ".graven"))
    project = Project(root, free_port())
    try:
        yield project
    finally:
        pids = project.known_pids()
        with contextlib.suppress(Exception):
            project.graven("down", timeout=60, check=False)
        time.sleep(0.2)
        _kill_recorded(pids)


def write_spec(
    project: Project,
    example: str,
    *,
    replicas: int = 2,
    more_volumes: list[dict[str, Any]] | None = None,
    **env: str,
) -> None:
    """The example's own spec, with the project's port, ``replicas``, fast health checks, ``more_volumes`` and ``env`` added to the
    service's."""
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / example / "graven.yaml").read_text())
    doc.pop("version")
    ((_name, service),) = doc["services"].items()
    service.update(
        port=project.port,
        replicas=replicas,
        drain_timeout="3s",
        stop_grace="5s",
        health={**service["health"], "interval": "0.3s", "start_timeout": "30s"},
    )
    service["env"] = {**service.get("env", {}), **env}
    service["volumes"] = service.get("volumes", []) + (more_volumes or [])
    (project.root / "graven.yaml").write_text(render(doc))


def call(
    project: Project, method: str, path: str = "/", body: Mapping[str, Any] | None = None
) -> tuple[int, Any]:
    """One request to the service through its router: (status, decoded JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", project.port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def service_status(project: Project, service: str) -> dict[str, Any]:
    data: dict[str, Any] = project.graven("status", service, "-o", "json").json()["services"][0]
    return data


def deployed(project: Project, *args: str) -> dict[str, Any]:
    """``graven ARGS -o json`` (deploy or rollback), asserted to have succeeded."""
    result: dict[str, Any] = project.graven(*args, "-o", "json", timeout=240).json()
    (outcome,) = result["results"]
    assert outcome["rollout_result"]["state"] == "succeeded", outcome
    return outcome


def instance_uid(pid: int) -> int:
    """The real uid of the instance's app (the handle is its sandbox's init: the app is
    its child, and both run as the instance's user)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")
