"""``graven status`` and ``graven releases``: what runs, and what ran before."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from graven.cli.context import AppContext, app_context
from graven.cli.options import output_option
from graven.cli.output import Output
from graven.errors import UsageError


def say_if_stopped(con: Any, d: dict[str, Any]) -> None:
    if d.get("controller") == "stopped":
        con.print(
            "[yellow]controller: stopped[/] (answered from the records; 'graven serve' "
            "or any verb that changes state starts it)"
        )


def _status_data(
    app: AppContext, service: str | None, watch: bool, out: Output
) -> tuple[dict[str, Any], bool]:
    """The status to show (after following running rollouts, with ``watch``), and
    whether a rollout it followed failed or was aborted."""
    from graven.cli.rollouts import watch_status
    from graven.controller.results import to_json

    client = app.running_controller()  # a look starts no controller
    if client is None:
        from graven.controller.offline import stopped_status

        data: dict[str, Any] = to_json(stopped_status(app.state_dir, service))
        running = [
            s["service"]
            for s in data["services"]
            if s["rollout"] and s["rollout"]["state"] == "running"
        ]
        if watch and running:
            from graven.errors import ControllerNotRunning

            raise ControllerNotRunning(
                f"the controller is stopped: the rollout of {', '.join(running)} waits for it",
                hint="Start it with 'graven serve' (or any verb that changes state), "
                "then 'graven status -w' again.",
            )
        return data, False
    if not watch:
        return to_json(client.status(service)), False
    data, finished = watch_status(client, service, out.progress)
    return data, any(ro["state"] not in ("succeeded", "running") for ro in finished)


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
    data, failed = _status_data(app_context(ctx), service, watch, out)

    def render(con: Any, d: Any) -> None:
        from rich.markup import escape
        from rich.table import Table

        from graven.cli.output import ago, short

        say_if_stopped(con, d)
        print_state_dir_problem(con, d)
        if not d["services"]:
            con.print("nothing deployed yet: run 'graven deploy -m WHY'")
        now = time.time()
        for s in d["services"]:
            head = f"[bold]{s['service']}[/]  release {s['desired_release'] or '(down)'}"
            if s["image"]:
                head += f"  image {s['image_name']}@{short(s['image'])}"
            if s["url"]:
                head += f"  {s['url']}"
            con.print(head)
            if s.get("preview_url"):
                con.print(f"  preview {s['preview_url']}")
            if s.get("releases"):
                con.print(
                    "  traffic: "
                    + " · ".join(
                        f"{r['release']} {r['traffic_percent']:g}% {r['role']}"
                        for r in s["releases"]
                    )
                )
            if s.get("problem"):
                con.print(f"  [red]problem:[/] {escape(s['problem'])}")
            if s.get("restarts"):
                what = "[red]crash-looping[/]" if s.get("crash_looping") else "[yellow]restarted[/]"
                line = (
                    f"  {what}: {s['restarts']} unexpected exits in a row, "
                    f"last: {escape(s['last_exit'])}"
                )
                if s.get("next_start_in"):
                    line += f"; next start in {s['next_start_in']:.0f}s"
                con.print(line)
            ro = s["rollout"]
            if ro:
                line = (
                    f"  last rollout #{ro['id']} {ro['kind']} -> r{ro['to_release']}: {ro['state']}"
                )
                if ro["state"] == "running" and ro["progress"]:
                    line += f" ({ro['progress']})"
                if ro["reason"]:
                    line += f" — {ro['reason']}"
                con.print(escape(line))
            t = Table(
                "INSTANCE",
                "RELEASE",
                "STATE",
                "HEALTH",
                "TRAFFIC",
                "RESTARTS",
                "ADDRESS",
                "PID",
                "AGE",
                box=None,
            )
            for i in s["instances"]:
                color = {"healthy": "green", "starting": "yellow", "degraded": "yellow"}.get(
                    i["state"], "red"
                )
                health = i.get("health", "")
                hcolor = "green" if health == "passing" else "yellow"
                t.add_row(
                    i["id"],
                    i["release"],
                    f"[{color}]{i['state']}[/]",
                    f"[{hcolor}]{escape(health)}[/]",
                    f"{i.get('traffic_percent', 0):g}%" + (" preview" if i.get("preview") else ""),
                    str(i.get("restarts", 0)),
                    i["address"],
                    str(i["pid"]),
                    ago(now - i["started_at"]),
                )
            if s["instances"]:
                con.print(t)

    out.emit(data, render)
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

    def render(con: Any, d: Any) -> None:
        from rich.table import Table

        from graven.cli.output import short

        t = Table("", "RELEASE", "IMAGE", "CREATED", "SERVED", box=None)
        for r in d["releases"]:
            t.add_row(
                "*" if r["current"] else "",
                r["release"],
                f"{r['image_name']}@{short(r['image'])}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
                "yes" if r["healthy_at"] else "no",
            )
        con.print(t)

    Output(output).emit(data, render)


def print_state_dir_problem(con: Any, d: Any) -> None:
    """The state dir's problem (full, refusing writes) from a status reply, if any."""
    from rich.text import Text

    state_dir = d.get("state_dir") or {}
    if state_dir.get("problem"):
        con.print(Text(state_dir["problem"], style="red"))
        if state_dir.get("hint"):
            con.print(Text(f"  hint: {state_dir['hint']}"))
