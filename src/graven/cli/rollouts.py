"""Waiting for the rollouts a verb started, and ``graven rollback`` itself.

Shared by ``deploy``, ``promote``, ``down``, ``status -w`` and ``rollback``;
``rollback`` runs from here whichever entry path recognised it. The controller's
replies are the typed values of :mod:`graven.controller.results`, read through the
typed client; a verb's JSON is built from them (:func:`change_json`). Neither click nor
rich is imported: progress goes to a callable taking a styled line
(:mod:`graven.cli.lines`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from graven.cli.exits import StoppedWatching

if TYPE_CHECKING:
    from graven.cli.context import AppContext
    from graven.cli.lines import Line
    from graven.cli.output import Output
    from graven.controller.client import ControllerClient
    from graven.controller.results import (
        DeployResult,
        DownResult,
        RollbackResult,
        RolloutView,
        StatusView,
    )

Progress = Callable[["Line"], None]


def wait_rollouts(
    client: ControllerClient,
    rollouts: Mapping[str, int],
    progress: Progress,
    *,
    ended: Callable[[RolloutView], bool] | None = None,
) -> list[RolloutView]:
    """Poll each service's rollout until it ends or pauses (or ``ended`` says so);
    ``progress`` gets each new step. How each ended, in the order of ``rollouts``.
    Ctrl-C raises StoppedWatching: watching is all it stops."""
    from graven.cli import render

    pending = dict(rollouts)
    done: dict[str, RolloutView] = {}
    last: dict[str, str] = {}
    try:
        while pending:
            for service, rid in list(pending.items()):
                ro = client.rollout(rid).rollout
                if ro.progress and ro.progress != last.get(service):
                    last[service] = ro.progress
                    progress(render.rollout_step(service, ro.progress))
                # A rollout paused at a manual gate is done as far as this command goes.
                if (ended or _ended)(ro):
                    done[service] = ro
                    del pending[service]
            if pending:
                time.sleep(0.1)
    except KeyboardInterrupt:
        raise StoppedWatching(sorted(pending)) from None
    return [done[s] for s in rollouts]


def _ended(rollout: RolloutView) -> bool:
    return rollout.state != "running" or rollout.progress.startswith("paused")


def await_rollouts(
    connect: Callable[[], ControllerClient],
    rollouts: Mapping[str, int | None],
    *,
    no_wait: bool,
    progress: Progress,
) -> dict[str, RolloutView]:
    """Unless ``no_wait``, wait for each service's rollout (None: it started none);
    how each ended, by service. ``connect`` is only called when there is a wait."""
    waiting = {service: rid for service, rid in rollouts.items() if rid is not None}
    if no_wait or not waiting:
        return {}
    finished = wait_rollouts(connect(), waiting, progress)
    return dict(zip(waiting, finished, strict=True))


def change_json(
    service: str,
    reply: DeployResult | RollbackResult | DownResult,
    ended: RolloutView | None,
) -> dict[str, Any]:
    """One service's entry in a verb's ``results``: the controller's reply, the service
    it is about, and (once waited for) how its rollout ended as ``rollout_result``."""
    from graven.controller.results import to_json

    data: dict[str, Any] = {"service": service, **to_json(reply)}
    if ended is not None:
        data["rollout_result"] = to_json(ended)
    return data


def watch_status(
    client: ControllerClient, service: str | None, progress: Progress
) -> tuple[StatusView, list[RolloutView]]:
    """``graven status -w``: follow the rollouts running now to their end (or a manual
    gate), then the status as it is then, and how each watched rollout ended."""
    from graven.cli import render

    now = client.status(service)
    running = {
        s.service: s.rollout.id
        for s in now.services
        if s.rollout is not None and s.rollout.state == "running"
    }
    if not running:
        progress(("no rollout running",))
        return now, []
    try:
        for name, rid in running.items():
            progress(render.following(name, rid))
    except KeyboardInterrupt:
        raise StoppedWatching(sorted(running)) from None
    finished = wait_rollouts(client, running, progress)
    for name, ro in zip(running, finished, strict=True):
        progress(render.followed(name, ro.state, ro.reason))
    return client.status(service), finished


def rollback(
    app: AppContext, service: str, to: int | None, message: str, *, no_wait: bool, out: Output
) -> int:
    """``graven rollback``: return ``service`` to the release that served before (or
    release ``to``); unless ``no_wait``, wait for the rollout. The exit code.

    The request goes out before anything only the reply and the output need is
    imported (the client imports reply types after sending): inside a blue-green
    rollback window the traffic switch waits for nothing else."""
    from graven.cli.context import actor
    from graven.controller.client import ControllerClient
    from graven.errors import ControllerNotRunning

    who = actor()
    client = ControllerClient(app.state_dir)
    try:
        r = client.rollback(service, to=to, actor=who, message=message)
    except ControllerNotRunning:
        # Nothing was sent: start the controller, as every verb that changes state does.
        client = app.controller()
        r = client.rollback(service, to=to, actor=who, message=message)
    from graven.cli import render

    out.progress(render.change_recorded("rollback", service, r.release))

    def connect() -> ControllerClient:
        client.ensure_running()
        return client

    ended = await_rollouts(
        connect, {service: r.rollout}, no_wait=no_wait, progress=out.progress
    ).get(service)
    status = client.status(service).services
    url = status[0].url if status else None
    outcomes = [render.ServiceOutcome.of(service, r, ended)]
    data = {"results": [change_json(service, r, ended)], "url": url}
    out.show(data, render.outcomes(outcomes, "rollback", url))
    return 1 if render.any_failed(outcomes) else 0
