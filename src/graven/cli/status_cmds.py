"""``graven status`` and ``graven releases``: what runs, and what ran before."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from graven.cli import render
from graven.cli.context import AppContext, app_context
from graven.cli.options import output_option
from graven.cli.output import Output
from graven.controller.results import StatusView
from graven.errors import UsageError


def _status_data(
    app: AppContext, service: str | None, watch: bool, out: Output
) -> tuple[StatusView, dict[str, Any], bool]:
    """The status to show (after following running rollouts, with ``watch``), its
    JSON, and whether a rollout it followed failed or was aborted."""
    from graven.cli.rollouts import watch_status
    from graven.controller.results import to_json

    client = app.running_controller()  # a look starts no controller
    if client is None:
        from graven.controller.offline import stopped_status

        view = stopped_status(app.state_dir, service)
        running = [
            s.service
            for s in view.services
            if s.rollout is not None and s.rollout.state == "running"
        ]
        if watch and running:
            from graven.errors import ControllerNotRunning

            raise ControllerNotRunning(
                f"the controller is stopped: the rollout of {', '.join(running)} waits for it",
                hint="Start it with 'graven serve' (or any verb that changes state), "
                "then 'graven status -w' again.",
            )
        return view, to_json(view), False
    if not watch:
        view = client.status(service)
        return view, to_json(view), False
    view, finished = watch_status(client, service, out.progress)
    failed = any(ro.state not in ("succeeded", "running") for ro in finished)
    return view, to_json(view), failed


@click.command()
@click.argument("service", required=False)
@click.option(
    "-w",
    "--watch",
    is_flag=True,
    help="Follow running rollouts to their end; exit 1 if one failed or was aborted.",
)
@output_option
@click.pass_context
def status(ctx: click.Context, service: str | None, watch: bool, output: str) -> None:
    """Instances, release, image digest and health of each service."""
    out = Output(output)
    view, data, failed = _status_data(app_context(ctx), service, watch, out)
    out.show(data, render.status(view, time.time()))
    if failed:
        sys.exit(1)


@click.command()
@click.argument("service")
@output_option
@click.pass_context
def releases(ctx: click.Context, service: str, output: str) -> None:
    """List SERVICE's releases, newest last."""
    app = app_context(ctx)
    st = app.state()
    desired = st.desired_release(service)
    records = st.releases(service)
    if not records:
        raise UsageError(f"service {service!r} has no releases", hint="Run 'graven deploy'.")
    data = {
        "service": service,
        "releases": [
            {
                "release": r.id,
                "image": str(r.release.image),
                "image_name": r.image_name,
                "created_at": r.created_at,
                "healthy_at": r.healthy_at,
                "current": r.number == desired,
                "content_hash": r.release.content_hash,
            }
            for r in records
        ],
    }

    Output(output).show(data, render.releases(records, desired))
