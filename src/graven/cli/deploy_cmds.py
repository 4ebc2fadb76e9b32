"""The verbs that change what runs: ``plan`` (the look before), ``deploy``,
``rollback``, ``promote``, ``abort`` and ``down``."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from graven.cli import render
from graven.cli.build_flow import build
from graven.cli.context import AppContext, actor, app_context, source_commit
from graven.cli.options import output_option
from graven.cli.output import Output
from graven.cli.rollouts import await_rollouts, change_json, wait_rollouts
from graven.controller.results import DeployResult, RolloutView, to_json
from graven.errors import UsageError
from graven.model import ReleaseId


def _services_from(app: AppContext, services: tuple[str, ...]) -> list[str]:
    spec = app.spec().spec
    for name in services:
        if name not in spec.services:
            raise UsageError(
                f"no service named {name!r} in {app.spec().path}",
                hint="Services: " + (", ".join(sorted(spec.services)) or "(none)"),
            )
    chosen = list(services) or sorted(spec.services)
    if not chosen:
        raise UsageError(f"{app.spec().path} defines no services", hint="Add one under 'services'.")
    return chosen


def release_candidates(app: AppContext, services: list[str], out: Output) -> list[dict[str, Any]]:
    """Build each service's image (cached) and describe the release deploy would make."""
    spec = app.spec().spec
    image_names = sorted({spec.services[s].image for s in services})
    configs = {s: _config_and_secrets(app, s) for s in services}  # before a long build
    built = {i.name: i.digest for i in build(app, image_names, out)}
    return [
        {
            "service": s,
            "image": built[spec.services[s].image],
            "image_name": spec.services[s].image,
            **configs[s],
        }
        for s in services
    ]


def _config_and_secrets(app: AppContext, service: str) -> dict[str, Any]:
    """The release config with plain env only; secret values go apart, for the
    controller's secrets store (they are never part of a record or an output)."""
    from graven.spec.envfile import resolve_service_env

    loaded = app.spec()
    svc = loaded.spec.services[service]
    env = resolve_service_env(
        service, svc.env, svc.env_file, loaded.root, str(loaded.path), loaded.lines, os.environ
    )
    config = svc.to_config().to_dict()
    config["env"] = sorted([k, v] for k, v in env.plain.items())
    return {"config": config, "secrets": env.secret}


def wait_for_rollouts(app: AppContext, rollouts: dict[str, int], out: Output) -> list[RolloutView]:
    return wait_rollouts(app.controller(), rollouts, out.progress)


@click.command()
@click.argument("services", nargs=-1)
@output_option
@click.pass_context
def plan(ctx: click.Context, services: tuple[str, ...], output: str) -> None:
    """Show what deploy would do, step by step, without doing it."""
    app = app_context(ctx)
    out = Output(output)
    chosen = _services_from(app, services)
    candidates = release_candidates(app, chosen, out)
    client = app.running_controller()  # a look starts no controller
    controller: str | None = None
    if client is None:
        from graven.controller.offline import STOPPED, stopped_plan

        plans = [stopped_plan(app.state_dir, c) for c in candidates]
        controller = STOPPED
    else:
        plans = [client.plan(c) for c in candidates]
    previews = [(c["service"], p) for c, p in zip(candidates, plans, strict=True)]
    data: dict[str, Any] = {"plans": [{"service": s, **to_json(p)} for s, p in previews]}
    if controller is not None:
        data["controller"] = controller
    out.show(data, render.plans(previews, controller))


def _require_message(message: str | None, verb: str) -> str:
    if not message or not message.strip():
        raise UsageError(
            f"{verb} needs a reason: the ledger records why every change was made",
            hint=f"Run 'graven {verb} ... -m \"why you are doing this\"'.",
        )
    return message.strip()


@click.command()
@click.argument("services", nargs=-1)
@click.option("-m", "--message", help="Why: recorded in the ledger (required).")
@click.option(
    "--detach",
    "--no-wait",
    "no_wait",
    is_flag=True,
    help="Return at once, the release recorded; the rollout goes on ('graven status -w').",
)
@output_option
@click.pass_context
def deploy(
    ctx: click.Context, services: tuple[str, ...], message: str | None, no_wait: bool, output: str
) -> None:
    """Build, release and roll out SERVICES (default: all), replacing instances."""
    app = app_context(ctx)
    out = Output(output)
    why = _require_message(message, "deploy")
    chosen = _services_from(app, services)
    candidates = release_candidates(app, chosen, out)
    client = app.controller()
    details: dict[str, Any] = {"spec": str(app.spec().path)}
    commit = source_commit(app.spec().root)
    if commit:
        details["source_commit"] = commit
    changes: list[tuple[str, DeployResult]] = []
    for c in candidates:
        r = client.deploy(c, actor=actor(), message=why, details=details)
        out.progress(render.change_recorded("deploy", c["service"], r.release, changed=r.changed))
        changes.append((c["service"], r))
    rollouts = {service: r.rollout for service, r in changes}
    ended = await_rollouts(app.controller, rollouts, no_wait=no_wait, progress=out.progress)
    urls = {s.service: s.url for s in client.status().services}
    url = urls.get(chosen[0])
    results = [change_json(service, r, ended.get(service)) for service, r in changes]
    outcomes = [render.ServiceOutcome.of(service, r, ended.get(service)) for service, r in changes]
    out.show(
        {"results": results, "urls": urls, "url": url}, render.outcomes(outcomes, "deploy", url)
    )
    if render.any_failed(outcomes):
        sys.exit(1)


@click.command()
@click.argument("service")
@click.option("--to", "to", metavar="RELEASE", help="Release to return to: 3, r3 or SERVICE@r3.")
@click.option("-m", "--message", help="Why: recorded in the ledger.", default="rollback")
@click.option(
    "--detach",
    "--no-wait",
    "no_wait",
    is_flag=True,
    help="Return at once, the rollback recorded; it goes on ('graven status -w').",
)
@output_option
@click.pass_context
def rollback(
    ctx: click.Context, service: str, to: str | None, message: str, no_wait: bool, output: str
) -> None:
    """Return SERVICE to the release that served before (or --to RELEASE)."""
    from graven.cli.rollouts import rollback as run

    number = ReleaseId.parse(to, service=service).number if to is not None else None
    if code := run(app_context(ctx), service, number, message, no_wait=no_wait, out=Output(output)):
        sys.exit(code)


@click.command()
@click.argument("service")
@click.option("-m", "--message", default="promote", help="Why: recorded in the ledger.")
@click.option(
    "--detach",
    "--no-wait",
    "no_wait",
    is_flag=True,
    help="Return at once, the promotion recorded; the rollout goes on ('graven status -w').",
)
@output_option
@click.pass_context
def promote(ctx: click.Context, service: str, message: str, no_wait: bool, output: str) -> None:
    """Let SERVICE's paused rollout go on (a manual blue-green switch, a canary step)."""
    app = app_context(ctx)
    out = Output(output)
    client = app.controller()
    r = client.promote(service, actor=actor(), message=message)
    out.progress(render.change_recorded("promote", service, r.release))
    data: dict[str, Any] = {"service": service, "rollout": r.rollout, "release": r.release}
    if no_wait:
        out.show(data, [render.promoted(service, None, "")])
        return
    # Until it finishes or pauses again.
    [ro] = wait_rollouts(
        client,
        {service: r.rollout},
        out.progress,
        ended=lambda ro: (
            ro.state != "running" or (ro.progress.startswith("paused") and not ro.promoted)
        ),
    )
    data["rollout_result"] = to_json(ro)
    out.show(data, [render.promoted(service, ro.state, ro.progress)])


@click.command()
@click.argument("service")
@click.option("-m", "--message", default="aborted", help="Why: recorded in the ledger and shown.")
@output_option
@click.pass_context
def abort(ctx: click.Context, service: str, message: str, output: str) -> None:
    """Stop SERVICE's rollout and return to the release that served before it."""
    app = app_context(ctx)
    out = Output(output)
    client = app.controller()
    r = client.abort(service, actor=actor(), message=message)
    out.show(to_json(r), [render.aborted(r)])


@click.command()
@click.argument("service", required=False)
@click.option("-m", "--message", default="down", help="Why: recorded in the ledger.")
@output_option
@click.pass_context
def down(ctx: click.Context, service: str | None, message: str, output: str) -> None:
    """Drain and stop SERVICE's instances and router (default: every service, then
    the controller)."""
    app = app_context(ctx)
    out = Output(output)
    from graven.controller.client import ControllerClient

    if service is None and not ControllerClient(app.state_dir).alive():
        # Nothing to reach; starting a controller only to stop it would be silly,
        # unless something is still recorded as running.
        from graven.controller.offline import routers_running
        from graven.controller.paths import state_db

        recorded = state_db(app.state_dir).exists()
        if not recorded or not (app.state().live_instances() or routers_running(app.state_dir)):
            out.show({"results": [], "controller": "not running"}, [render.nothing_running()])
            return
    client = app.controller()
    downs = client.down(service, actor=actor(), message=message)
    rollouts = {r.service: r.rollout for r in downs}
    ended = await_rollouts(app.controller, rollouts, no_wait=False, progress=out.progress)
    data: dict[str, Any] = {
        "results": [change_json(r.service, r, ended.get(r.service)) for r in downs]
    }
    if service is None:
        client.shutdown()
        data["controller"] = "stopped"

    out.show(data, render.taken_down(downs, controller_stopped=service is None))
