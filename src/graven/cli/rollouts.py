"""Waiting for the rollouts a verb started, and ``graven rollback`` itself.

Shared by ``deploy``, ``promote``, ``status -w`` and ``rollback``; ``rollback`` runs
from here whichever entry path recognised it. Neither click nor rich is imported:
progress goes to a callable taking a styled line (:mod:`graven.cli.lines`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from graven.cli import render
from graven.cli.exits import StoppedWatching

if TYPE_CHECKING:
    from graven.cli.context import AppContext
    from graven.cli.lines import Line
    from graven.cli.output import Output
    from graven.controller.client import ControllerClient

Progress = Callable[["Line"], None]


def wait_rollouts(
    client: ControllerClient,
    rollouts: dict[str, int],
    progress: Progress,
    *,
    ended: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Poll each rollout until it ends or pauses (or ``ended`` says so); ``progress``
    gets each new step. Ctrl-C raises StoppedWatching: watching is all it stops."""
    pending = dict(rollouts)
    done: dict[str, dict[str, Any]] = {}
    last: dict[str, str] = {}
    try:
        while pending:
            for service, rid in list(pending.items()):
                # Raw JSON: the lean rollback path waits here too, and skips the
                # typed replies' import (see graven.cli.entry).
                r = client.request("GET", "/v1/rollout", id=rid)["rollout"]
                if r["progress"] and r["progress"] != last.get(service):
                    last[service] = r["progress"]
                    progress(render.rollout_step(service, r["progress"]))
                # A rollout paused at a manual gate is done as far as this command goes.
                if (ended or _ended)(r):
                    done[service] = r
                    del pending[service]
            if pending:
                time.sleep(0.1)
    except KeyboardInterrupt:
        raise StoppedWatching(sorted(pending)) from None
    return [done[s] for s in rollouts]


def _ended(rollout: dict[str, Any]) -> bool:
    return rollout["state"] != "running" or str(rollout["progress"]).startswith("paused")


def watch_status(
    client: ControllerClient, service: str | None, progress: Progress
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``graven status -w``: follow the rollouts running now to their end (or a manual
    gate), then the status as it is then, and how each watched rollout ended."""
    status = client.request("GET", "/v1/status", service=service)
    running = {
        s["service"]: s["rollout"]["id"]
        for s in status["services"]
        if s["rollout"] and s["rollout"]["state"] == "running"
    }
    if not running:
        progress(("no rollout running",))
        return status, []
    try:
        for name, rid in running.items():
            progress(render.following(name, rid))
    except KeyboardInterrupt:
        raise StoppedWatching(sorted(running)) from None
    finished = wait_rollouts(client, running, progress)
    for name, ro in zip(running, finished, strict=True):
        progress(render.followed(name, ro["state"], ro.get("reason")))
    return client.request("GET", "/v1/status", service=service), finished


def await_results(
    connect: Callable[[], ControllerClient],
    results: list[dict[str, Any]],
    *,
    no_wait: bool,
    progress: Progress,
) -> None:
    """Unless ``no_wait``, wait for the rollouts in ``results`` and attach how each
    ended as ``rollout_result``. ``connect`` is only called when there is a wait."""
    waiting = {r["service"]: r["rollout"] for r in results if r.get("rollout")}
    if no_wait or not waiting:
        return
    finished = wait_rollouts(connect(), waiting, progress)
    by_service = dict(zip(waiting, finished, strict=True))
    for r in results:
        if r["service"] in by_service:
            r["rollout_result"] = by_service[r["service"]]


def rollback(
    app: AppContext, service: str, to: int | None, message: str, *, no_wait: bool, out: Output
) -> int:
    """``graven rollback``: return ``service`` to the release that served before (or
    release ``to``); unless ``no_wait``, wait for the rollout. The exit code.

    The request goes out before anything only the output needs is imported: inside a
    blue-green rollback window the traffic switch waits for nothing else."""
    from graven.cli.context import actor
    from graven.controller.client import ControllerClient
    from graven.errors import ControllerNotRunning

    body = {"service": service, "to": to, "actor": actor(), "message": message}
    client = ControllerClient(app.state_dir)
    try:
        r = client.request("POST", "/v1/rollback", body)
    except ControllerNotRunning:
        # Nothing was sent: start the controller, as every verb that changes state does.
        client = app.controller()
        r = client.request("POST", "/v1/rollback", body)
    out.progress(render.change_recorded("rollback", service, r["release"]))
    results = [{"service": service, **r}]

    def connect() -> ControllerClient:
        client.ensure_running()
        return client

    await_results(connect, results, no_wait=no_wait, progress=out.progress)
    status = client.request("GET", "/v1/status", service=service)["services"]
    url = status[0]["url"] if status else None
    outcomes = [render.ServiceOutcome.of(x) for x in results]
    out.show({"results": results, "url": url}, render.outcomes(outcomes, "rollback", url))
    return 1 if render.any_failed(outcomes) else 0
