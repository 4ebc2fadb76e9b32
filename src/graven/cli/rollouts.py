"""Waiting for the rollouts a verb started and reporting how they ended.

Shared by ``deploy`` and ``rollback`` in the full CLI and by the lean ``rollback``
in ``graven.cli.entry``, so both paths wait, print and exit alike. Neither click nor
rich is imported here: ``con`` is anything with rich's ``print(markup)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graven.controller.client import ControllerClient


class StoppedWatching(Exception):
    """Ctrl-C while a verb waits for rollouts: the verb stops watching, the controller
    goes on. Both CLI paths print ``message`` and exit 130."""

    exit_code = 130

    def __init__(self, services: list[str]) -> None:
        self.services = services
        target = services[0] if len(services) == 1 else "SERVICE"
        self.message = (
            "stopped watching; the rollout goes on — 'graven status -w' to follow, "
            f"'graven abort {target}' to stop it"
        )
        if len(services) > 1:
            self.message += f" (rolling out: {', '.join(services)})"
        super().__init__(self.message)


def wait_rollouts(
    client: ControllerClient,
    rollouts: dict[str, int],
    progress: Callable[[str], None],
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
                    progress(f"  {service}: {r['progress']}")
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
    client: ControllerClient, service: str | None, progress: Callable[[str], None]
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
        progress("no rollout running")
        return status, []
    try:
        for name, rid in running.items():
            progress(f"[bold]following[/] {name}: rollout #{rid}")
    except KeyboardInterrupt:
        raise StoppedWatching(sorted(running)) from None
    finished = wait_rollouts(client, running, progress)
    for name, ro in zip(running, finished, strict=True):
        progress(f"  {name}: {ro['state']}" + (f" — {ro['reason']}" if ro.get("reason") else ""))
    return client.request("GET", "/v1/status", service=service), finished


def await_results(
    connect: Callable[[], ControllerClient],
    results: list[dict[str, Any]],
    *,
    no_wait: bool,
    progress: Callable[[str], None],
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


def render_results(con: Any, data: dict[str, Any], verb: str) -> None:
    """One line per service (how its rollout ended), then the URL if there is one."""
    for r in data["results"]:
        if not r.get("changed", True):
            con.print(f"[green]{r['service']}[/]: already at {r['release']}; nothing to do")
            continue
        ro = r.get("rollout_result")
        if ro is None:
            # --no-wait: the change is recorded; how its rollout ends is not known here.
            con.print(
                f"[green]{verb} {r['service']}[/]: {r.get('release', '')} recorded; "
                "rolling out (not waiting)"
            )
        elif ro.get("state") == "running":
            con.print(f"[yellow]{verb} {r['service']}[/]: {ro.get('progress', '')}")
        elif ro.get("state") == "succeeded":
            con.print(f"[green]{verb} {r['service']}[/]: {r.get('release', 'done')} serving")
        else:
            con.print(
                f"[red]{verb} {r['service']} {ro.get('state', 'failed')}[/]: {ro.get('reason', '')}"
            )
    if data.get("url"):
        con.print(f"url: {data['url']}")


def any_failed(results: list[dict[str, Any]]) -> bool:
    """Whether a rollout that was waited for ended other than succeeded or paused."""
    finished = ("succeeded", "running")  # running: paused at a manual gate, not failed
    return any(
        (r.get("rollout_result") or {}).get("state", "succeeded") not in finished for r in results
    )
