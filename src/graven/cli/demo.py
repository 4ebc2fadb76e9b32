"""``graven demo``: the guided tour on embedded defaults.

Builds the example service, deploys three replicas, deploys v2 and rolls back while
live traffic flows through the router, and counts every failed request.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from graven.atomic import write_atomic
from graven.cli.context import AppContext, actor
from graven.cli.output import Output
from graven.errors import GravenError
from graven.testing.load import Load, LoadReport
from graven.testing.specs import hello_spec


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise GravenError("no free loopback port for the demo router")


def graven_command() -> str:
    """The ``graven`` this demo runs as, by full path, quoted for a shell: a fresh shell
    need not have the virtualenv on its PATH, so the commands the demo prints say
    which ``graven`` they mean."""
    beside = Path(sys.executable).parent / "graven"
    if beside.is_file() and os.access(beside, os.X_OK):
        return shlex.quote(str(beside.absolute()))
    found = shutil.which("graven")
    if found:
        return shlex.quote(str(Path(found).absolute()))
    return shlex.join([sys.executable, "-m", "graven"])


def _write_spec(directory: Path, port: int, version: str) -> None:
    spec = hello_spec(
        comment="graven demo: one service, three replicas, every change rolled out by replacement.",
        port=port,
        version=version,
        health_interval="1s",
    )
    write_atomic(directory / "graven.yaml", spec.encode())


def run_demo(directory: Path, out: Output, requests_per_phase: int) -> None:
    from graven.cli import deploy_cmds as cli
    from graven.cli import render_local as view
    from graven.controller.client import ControllerClient
    from graven.controller.results import to_json
    from graven.spec import scaffold

    directory = directory.resolve()
    app = AppContext(spec_file=directory / "graven.yaml")
    state_dir = directory / ".graven"
    app.state_dir_option = state_dir
    # A previous demo may still run here: take it down before rewriting its project.
    previous = ControllerClient(state_dir)
    if previous.alive():
        out.progress(view.demo_note("stopping the previous demo"))
        for r in previous.down(None, actor=actor(), message="demo restart"):
            if r.rollout:
                cli.wait_for_rollouts(app, {r.service: r.rollout}, Output("json"))
        previous.shutdown()
        time.sleep(0.3)
    scaffold(directory, force=True)
    port = _free_port(8080)
    _write_spec(directory, port, "v1")
    (directory / "app" / "RELEASE_NOTES").unlink(missing_ok=True)
    report: dict[str, Any] = {"directory": str(directory), "url": f"http://127.0.0.1:{port}/"}
    report["graven"] = graven_command()
    base = f"{report['graven']} -f {shlex.quote(str(directory / 'graven.yaml'))}"
    report["commands"] = {
        "what runs": f"{base} status",
        "who changed what": f"{base} audit --verify",
        "stop everything": f"{base} down",
    }

    out.progress(
        view.demo_phase("1. Build and deploy v1", f"(3 replicas) from {directory}/graven.yaml")
    )
    first = _deploy(app, out, "demo: first deploy of v1")
    report["v1"] = first

    out.progress(view.demo_phase("2. Deploy v2 while traffic flows", f"through {report['url']}"))
    write_atomic(directory / "app" / "RELEASE_NOTES", b"v2: the demo's second release\n")
    _write_spec(directory, port, "v2")
    app._loaded = None
    with Load("127.0.0.1", port, clients=4, min_requests=requests_per_phase) as load:
        report["v2"] = _deploy(app, out, "demo: roll out v2")
    report["deploy_traffic"] = _traffic(out, load.report, "during the v2 deploy")

    out.progress(view.demo_phase("3. Roll back to v1 while traffic flows"))
    client = app.controller()
    with Load("127.0.0.1", port, clients=4, min_requests=requests_per_phase) as load:
        back = client.rollback("hello", actor=actor(), message="demo: roll back")
        if back.rollout is None:
            raise GravenError("demo rollback changed nothing: v1 should have been desired again")
        done = cli.wait_for_rollouts(app, {"hello": back.rollout}, out)[0]
        report["rollback"] = {"release": back.release, "state": done.state}
    report["rollback_traffic"] = _traffic(out, load.report, "during the rollback")

    out.progress(view.demo_phase("4. Status"))
    status = client.status()
    report["status"] = to_json(status)
    from graven.ledger.chain import verify_chain

    entries = app.state().ledger()
    verify_chain(entries)
    report["audit"] = [e.to_dict() for e in entries]
    failed = report["deploy_traffic"]["failed"] + report["rollback_traffic"]["failed"]
    report["failed_requests"] = failed

    activate = Path(sys.executable).parent / "activate"
    tour = view.demo_tour(
        status,
        entries,
        (report["deploy_traffic"]["failed"], report["rollback_traffic"]["failed"]),
        report["url"],
        report["commands"],
        activate if activate.exists() else None,
    )
    out.show(report, tour)
    if failed:
        raise GravenError(f"{failed} request(s) failed during the demo's rollouts")


def _deploy(app: AppContext, out: Output, message: str) -> dict[str, Any]:
    from graven.cli import deploy_cmds as cli

    candidates = cli.release_candidates(app, ["hello"], out)
    client = app.controller()
    r = client.deploy(candidates[0], actor=actor(), message=message, details={})
    out.progress((f"  release {r.release}",))
    if r.rollout:
        done = cli.wait_for_rollouts(app, {"hello": r.rollout}, out)[0]
        if done.state != "succeeded":
            raise GravenError(f"demo deploy {done.state}: {done.reason}")
    return {"release": r.release, "image": candidates[0]["image"]}


def _traffic(out: Output, report: LoadReport, phase: str) -> dict[str, Any]:
    from graven.cli import render_local as view

    data = report.to_dict()
    by_version: Counter[str] = Counter()
    for body, n in report.bodies.items():
        try:
            by_version[str(json.loads(body).get("version"))] += n
        except (ValueError, AttributeError):
            by_version["other"] += n
    versions = sorted(by_version.items())
    out.progress(view.demo_traffic(report.sent, report.failed, phase, versions))
    return data
