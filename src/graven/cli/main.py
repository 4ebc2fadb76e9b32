"""The ``graven`` command line: parse, call the library, render.

Exit codes scripts can trust: 0 success, 1 failure, 2 usage or invalid input.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from graven.cli.context import AppContext, actor, app_context, source_commit
from graven.cli.output import Output
from graven.cli.plain import report_error, write_json
from graven.cli.rollouts import (
    StoppedWatching,
    any_failed,
    await_results,
    render_results,
    wait_rollouts,
)
from graven.errors import GravenError, SpecProblem, UsageError

if TYPE_CHECKING:
    from graven.spec.loader import LoadedSpec
    from graven.spec.models import Recipe

F = TypeVar("F", bound=Callable[..., Any])


def output_option(f: F) -> F:
    return click.option(
        "-o",
        "--output",
        "output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Output format: rich text for people, json for scripts.",
    )(f)


# Verbs defined in their own modules, imported only when used: a 'graven rollback'
# must not pay for the image engine's imports.
_LAZY_VERBS: dict[str, tuple[str, ...]] = {
    "image": ("graven.cli.image_cmds", "graven.cli.import_cmds"),
    "push": ("graven.cli.registry_cmds",),
    "pull": ("graven.cli.registry_cmds",),
    "base": ("graven.cli.base_cmds",),
    "store": ("graven.cli.store_cmds",),
    "gc": ("graven.cli.store_cmds",),
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        # Definition order teaches the workflow; the image engine's verbs follow.
        return list(dict.fromkeys([*self.commands, *_LAZY_VERBS]))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in _LAZY_VERBS:
            import importlib

            for module in _LAZY_VERBS[name]:
                importlib.import_module(module)  # registers its verbs on this group
        return self.commands.get(name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-f",
    "--file",
    "spec_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The spec (default: graven.yaml here or in a parent directory).",
)
@click.option(
    "--state-dir",
    # readable=False: graven itself says whose state dir it is when it cannot be read.
    type=click.Path(path_type=Path, file_okay=False, readable=False),
    help="Where graven keeps images, state and the ledger (default: .graven beside the spec; "
    "env GRAVEN_STATE_DIR).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="graven")
@click.pass_context
def cli(ctx: click.Context, spec_file: Path | None, state_dir: Path | None, debug: bool) -> None:
    """graven: bake a service into an image once, ship every change by replacing instances.

    \b
    Start here:
      graven init            scaffold graven.yaml and an example service
      graven deploy -m WHY   build (cached), release and roll out, health-gated
      graven status          what runs, from which release and image
      graven rollback        back to the release that served before
      graven audit --verify  who changed what, when and why; proven untouched
      graven demo            the guided tour
    """
    ctx.obj = AppContext(spec_file=spec_file, state_dir_option=state_dir, debug=debug)


# --- project ---------------------------------------------------------------------------


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=".")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@output_option
def init(directory: Path, force: bool, output: str) -> None:
    """Scaffold graven.yaml and an example service in DIRECTORY."""
    from graven.spec import scaffold

    written = scaffold(directory, force=force)
    data = {"directory": str(directory.resolve()), "written": [str(p) for p in written]}

    def render(con: Any, d: Any) -> None:
        for p in d["written"]:
            con.print(f"[green]created[/] {p}")
        con.print("\nNext: [bold]graven deploy -m 'first deploy'[/] in that directory.")

    Output(output).emit(data, render)


@cli.command()
@output_option
@click.pass_context
def check(ctx: click.Context, output: str) -> None:
    """Validate the spec; every problem names file:line and key path.

    Ports already taken by another program are warnings: the spec is valid, but a
    deploy could not start the service's router there until the port is freed.
    """
    app = app_context(ctx)
    loaded = app.spec()
    spec = loaded.spec
    warnings = _port_warnings(app, loaded)
    data = {
        "file": str(loaded.path),
        "valid": True,
        "images": sorted(spec.images),
        "services": sorted(spec.services),
        "targets": sorted(spec.targets),
        "warnings": [w.to_dict() for w in warnings],
    }
    out = Output(output)

    def render(con: Any, d: Any) -> None:
        from rich.markup import escape

        for warning in warnings:
            out.err.print(f"[yellow]warning:[/] {escape(str(warning))}")
        con.print(
            f"[green]ok[/] {d['file']}: {len(d['images'])} image(s), "
            f"{len(d['services'])} service(s), {len(d['targets'])} target(s)"
        )

    out.emit(data, render)


# Routers listen on loopback (the spec's 'port' says so).
ROUTER_HOST = "127.0.0.1"


def _port_warnings(app: AppContext, loaded: LoadedSpec) -> list[SpecProblem]:
    """A warning for each service port (and preview port) another process listens on.

    The service's own graven router, already serving it there, is no reason to warn.
    """
    from graven.netports import descends_from, port_holder
    from graven.router.embedded import EmbeddedRouter
    from graven.router.haproxy.adapter import HAProxyRouter

    routers: list[EmbeddedRouter | HAProxyRouter] = []
    try:
        state_dir: Path | None = app.state_dir
    except GravenError:
        state_dir = None
    if loaded.spec.services and state_dir is not None and state_dir.is_dir():
        routers = [EmbeddedRouter(state_dir, workers=1), HAProxyRouter(state_dir)]
    running = [(router, router.running()) for router in routers]

    def ours(route: str, port: int, pids: tuple[int, ...]) -> bool:
        for router, ports in running:
            if ports.get(route) != port:
                continue
            pid = router.pid(route)
            # No pids: the owner cannot be seen, but our router says it is on the port.
            if not pids or (pid is not None and any(descends_from(p, pid) for p in pids)):
                return True
        return False

    found: list[SpecProblem] = []
    for name, service in sorted(loaded.spec.services.items()):
        routes = [(name, "port", service.port)]
        if preview := service.strategy.preview_port:
            routes.append((f"{name}-preview", "strategy.preview_port", preview))
        for route, key, port in routes:
            holder = port_holder(ROUTER_HOST, port)
            if holder is None or ours(route, port, holder.pids):
                continue
            key_path = f"services.{name}.{key}"
            found.append(
                SpecProblem(
                    str(loaded.path),
                    loaded.line_of(key_path),
                    key_path,
                    f"{holder.describe()}; service {name!r} cannot be served there until it"
                    " is freed (or choose another port)",
                )
            )
    return found


@cli.command()
@output_option
def schema(output: str) -> None:
    """Print the JSON Schema of graven.yaml (for editor completion)."""
    import json

    from graven.spec import json_schema

    doc = json_schema()
    if output == "json":
        Output(output).emit(doc)
    else:
        click.echo(json.dumps(doc, indent=2))


# --- images ----------------------------------------------------------------------------


def _build(
    app: AppContext, names: list[str], out: Output, *, no_cache: bool
) -> list[dict[str, Any]]:
    """Build ``names`` (default: all); each result is a JSON-ready summary."""
    from graven.build import fingerprint

    spec_path = app.spec_path()
    if not no_cache:
        fast = fingerprint.unchanged_images(app.state_dir, spec_path, names)
        if fast is not None:
            for img in fast:
                out.progress(f"build {img['name']}: nothing changed since the last build")
            return [
                {
                    "name": img["name"],
                    "digest": img["digest"],
                    "steps_run": 0,
                    "steps_cached": img["steps"],
                    "steps": [],
                }
                for img in fast
            ]

    from graven.build.builder import build_image, build_order
    from graven.model import Image
    from graven.spec.inputs import MAX_SPEC_BYTES, read_regular_file

    # Read before the spec is parsed, so the bytes remembered are never newer than the
    # build; a FIFO or an oversized file is refused here at once, and reported below.
    try:
        spec_bytes = read_regular_file(spec_path, MAX_SPEC_BYTES)
    except OSError:
        spec_bytes = b""  # load_spec says what is wrong; b"" never matches a record
    loaded = app.spec()
    unknown = [n for n in names if n not in loaded.spec.images]
    if unknown:
        raise UsageError(
            f"no image named {unknown[0]!r} in {loaded.path}",
            hint="Images: " + (", ".join(sorted(loaded.spec.images)) or "(none)"),
        )
    store = app.store()
    requested = list(dict.fromkeys(names)) or sorted(loaded.spec.images)
    images: dict[str, Image] = {}  # built in this run, for the images based on them
    results: dict[str, dict[str, Any]] = {}
    built: dict[str, tuple[str, int, list[str], str, float]] = {}
    # Bases first: 'graven build web' builds the spec images web starts from, too.
    for name in build_order(loaded.spec.images, names):
        out.progress(f"[bold]build[/] {name}" + ("" if name in requested else " (a base)"))
        recipe = loaded.spec.images[name]
        sources = _read_paths(loaded.spec.images, name)
        # Taken before the build reads anything: a file edited meanwhile mismatches later.
        sig, newest = fingerprint.signature(loaded.root, sources, app.state_dir.resolve())

        with out.bar(f"build {name}", total=len(recipe.steps)) as bar:

            def on_step(s: Any) -> None:
                mark = "[dim]cached[/]" if s.cached else f"[cyan]ran[/] {s.seconds:.2f}s"
                bar.line(f"  step {s.index + 1} {s.kind:<10} {mark}  {s.summary}")
                bar.update(completed=s.index + 1)

            r = build_image(
                name,
                recipe,
                loaded.root,
                store,
                no_cache=no_cache,
                on_step=on_step,
                built=images,
                on_progress=lambda line: bar.line(f"  {line}"),
            )
        images[name] = r.image
        built[name] = (str(r.image.digest), len(r.steps), sources, sig, newest)
        if name not in requested:
            continue
        results[name] = {
            "name": name,
            "digest": str(r.image.digest),
            "steps_run": sum(not s.cached for s in r.steps),
            "steps_cached": sum(s.cached for s in r.steps),
            "steps": [
                {"index": s.index, "kind": s.kind, "cached": s.cached, "seconds": s.seconds}
                for s in r.steps
            ],
        }
    fingerprint.remember(app.state_dir, spec_path, spec_bytes, built)
    return [results[name] for name in requested]  # in the order asked for, as the fast path


def _read_paths(recipes: Mapping[str, Recipe], name: str) -> list[str]:
    """Project paths image ``name`` depends on: the copy sources and base layouts of its
    recipe and of the spec images it starts from. The no-op fast path watches them."""
    from graven.build.builder import spec_bases
    from graven.spec.models import CopyStep, LayoutBase

    paths: list[str] = []
    for image in [name, *spec_bases(recipes, name)]:
        recipe = recipes[image]
        if isinstance(recipe.base, LayoutBase):
            paths.append(recipe.base.layout)
        paths.extend(s.source for s in recipe.steps if isinstance(s, CopyStep))
    return list(dict.fromkeys(paths))


@cli.command()
@click.argument("images", nargs=-1)
@click.option("--no-cache", is_flag=True, help="Run every step even when its result is cached.")
@output_option
@click.pass_context
def build(ctx: click.Context, images: tuple[str, ...], no_cache: bool, output: str) -> None:
    """Bake IMAGES (default: all): cached, content-addressed -> digests.

    A step whose inputs are unchanged never runs again; when nothing at all changed
    since the last build, not even the spec is parsed."""
    out = Output(output)
    data = {"images": _build(app_context(ctx), list(images), out, no_cache=no_cache)}

    def render(con: Any, d: Any) -> None:
        for img in d["images"]:
            con.print(
                f"[green]built[/] {img['name']} {img['digest']}  "
                f"({img['steps_run']} step(s) ran, {img['steps_cached']} cached)"
            )

    out.emit(data, render)


@cli.command()
@output_option
@click.pass_context
def images(ctx: click.Context, output: str) -> None:
    """List images in the store."""
    listing = app_context(ctx).store().list_images()
    data = {
        "images": [
            {"name": name, "digest": str(img.digest), "entrypoint": list(img.config.entrypoint)}
            for name, img in listing
        ]
    }

    def render(con: Any, d: Any) -> None:
        from rich.table import Table

        t = Table("NAME", "DIGEST", "ENTRYPOINT", box=None)
        for i in d["images"]:
            t.add_row(i["name"], i["digest"], " ".join(i["entrypoint"]))
        con.print(t if d["images"] else "no images yet: run 'graven build'")

    Output(output).emit(data, render)


# --- releases and rollouts -------------------------------------------------------------


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


def _candidates(app: AppContext, services: list[str], out: Output) -> list[dict[str, Any]]:
    """Build each service's image (cached) and describe the release deploy would make."""
    spec = app.spec().spec
    image_names = sorted({spec.services[s].image for s in services})
    configs = {s: _config_and_secrets(app, s) for s in services}  # before a long build
    built = {r["name"]: r["digest"] for r in _build(app, image_names, out, no_cache=False)}
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


def _wait_rollouts(app: AppContext, rollouts: dict[str, int], out: Output) -> list[dict[str, Any]]:
    return wait_rollouts(app.controller(), rollouts, out.progress)


@cli.command()
@click.argument("services", nargs=-1)
@output_option
@click.pass_context
def plan(ctx: click.Context, services: tuple[str, ...], output: str) -> None:
    """Show what deploy would do, step by step, without doing it."""
    app = app_context(ctx)
    out = Output(output)
    chosen = _services_from(app, services)
    candidates = _candidates(app, chosen, out)
    client = app.running_controller()  # a look starts no controller
    if client is None:
        from graven.controller.offline import STOPPED, stopped_plan

        plans = [stopped_plan(app.state_dir, c) for c in candidates]
    else:
        plans = [client.request("POST", "/v1/plan", c) for c in candidates]
    data: dict[str, Any] = {
        "plans": [{"service": c["service"], **p} for c, p in zip(candidates, plans, strict=True)]
    }
    if client is None:
        data["controller"] = STOPPED

    def render(con: Any, d: Any) -> None:
        _say_if_stopped(con, d)
        for p in d["plans"]:
            if not p["changed"]:
                con.print(f"[green]{p['service']}[/]: up to date ({p['from']}); nothing to do")
                continue
            con.print(f"[bold]{p['service']}[/]: {p['from'] or '(nothing)'} -> {p['to']}")
            for c in p["changes"]:
                con.print(f"  ~ {c}")
            for n, step in enumerate(p["steps"]["steps"], start=1):
                con.print(f"  {n:>2}. {step['description']}")

    out.emit(data, render)


def _require_message(message: str | None, verb: str) -> str:
    if not message or not message.strip():
        raise UsageError(
            f"{verb} needs a reason: the ledger records why every change was made",
            hint=f"Run 'graven {verb} ... -m \"why you are doing this\"'.",
        )
    return message.strip()


def _finish(out: Output, data: dict[str, Any], results: list[dict[str, Any]], verb: str) -> None:
    out.emit(data, lambda con, d: render_results(con, d, verb))
    if any_failed(results):
        sys.exit(1)


@cli.command()
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
    candidates = _candidates(app, chosen, out)
    client = app.controller()
    details: dict[str, Any] = {"spec": str(app.spec().path)}
    commit = source_commit(app.spec().root)
    if commit:
        details["source_commit"] = commit
    results = []
    for c in candidates:
        r = client.request(
            "POST", "/v1/deploy", {**c, "actor": actor(), "message": why, "details": details}
        )
        out.progress(
            f"[bold]deploy[/] {c['service']}: {r['release']}"
            + ("" if r["changed"] else " (unchanged)")
        )
        results.append({"service": c["service"], **r})
    _await(app, out, results, no_wait)
    status = client.request("GET", "/v1/status")["services"]
    urls = {s["service"]: s["url"] for s in status}
    _finish(out, {"results": results, "urls": urls, "url": urls.get(chosen[0])}, results, "deploy")


def _await(app: AppContext, out: Output, results: list[dict[str, Any]], no_wait: bool) -> None:
    await_results(app.controller, results, no_wait=no_wait, progress=out.progress)


@cli.command()
@click.argument("service")
@click.option("--to", "to", type=int, metavar="N", help="Release number to return to (r N).")
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
    ctx: click.Context, service: str, to: int | None, message: str, no_wait: bool, output: str
) -> None:
    """Return SERVICE to the release that served before (or --to N)."""
    app = app_context(ctx)
    out = Output(output)
    client = app.controller()
    r = client.request(
        "POST",
        "/v1/rollback",
        {"service": service, "to": to, "actor": actor(), "message": message},
    )
    out.progress(f"[bold]rollback[/] {service} -> {r['release']}")
    results = [{"service": service, **r}]
    _await(app, out, results, no_wait)
    status = client.request("GET", "/v1/status", service=service)["services"]
    _finish(
        out, {"results": results, "url": status[0]["url"] if status else None}, results, "rollback"
    )


@cli.command()
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
    r = client.request(
        "POST", "/v1/promote", {"service": service, "actor": actor(), "message": message}
    )
    out.progress(f"[bold]promote[/] {service}: {r['release']}")
    data = {"service": service, "rollout": r["rollout"], "release": r["release"]}
    if not no_wait:
        # Until it finishes or pauses again.
        data["rollout_result"] = wait_rollouts(
            client,
            {service: r["rollout"]},
            out.progress,
            ended=lambda ro: (
                ro["state"] != "running"
                or (ro["progress"].startswith("paused") and not ro["promoted"])
            ),
        )[0]

    def render(con: Any, d: Any) -> None:
        ro = d.get("rollout_result") or {}
        con.print(
            f"[green]{d['service']}[/]: {ro.get('state', 'promoted')} {ro.get('progress', '')}"
        )

    out.emit(data, render)


@cli.command()
@click.argument("service")
@click.option("-m", "--message", default="aborted", help="Why: recorded in the ledger and shown.")
@output_option
@click.pass_context
def abort(ctx: click.Context, service: str, message: str, output: str) -> None:
    """Stop SERVICE's rollout and return to the release that served before it."""
    app = app_context(ctx)
    out = Output(output)
    client = app.controller()
    r = client.request(
        "POST", "/v1/abort", {"service": service, "actor": actor(), "message": message}
    )
    out.emit(r, lambda con, d: con.print(f"[yellow]{d['service']}[/]: {d['reason']}"))


def _say_if_stopped(con: Any, d: dict[str, Any]) -> None:
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

    client = app.running_controller()  # a look starts no controller
    if client is None:
        from graven.controller.offline import stopped_status

        data = stopped_status(app.state_dir, service)
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
        return client.request("GET", "/v1/status", service=service), False
    data, finished = watch_status(client, service, out.progress)
    return data, any(ro["state"] not in ("succeeded", "running") for ro in finished)


@cli.command()
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

        _say_if_stopped(con, d)
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


@cli.command()
@click.argument("service")
@output_option
@click.pass_context
def releases(ctx: click.Context, service: str, output: str) -> None:
    """List SERVICE's releases, newest last."""
    app = app_context(ctx)
    st = app.state()
    desired = st.desired_release(service)
    rows = st.releases(service)
    if not rows:
        raise UsageError(f"service {service!r} has no releases", hint="Run 'graven deploy'.")
    data = {
        "service": service,
        "releases": [
            {
                "release": rel.id,
                "image": str(rel.image),
                "image_name": row["image_name"],
                "created_at": row["created_at"],
                "healthy_at": row["healthy_at"],
                "current": rel.number == desired,
                "content_hash": rel.content_hash,
            }
            for rel, row in rows
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


@cli.command()
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
            out.emit(
                {"results": [], "controller": "not running"},
                lambda c, d: c.print("nothing running"),
            )
            return
    client = app.controller()
    r = client.request(
        "POST", "/v1/down", {"service": service, "actor": actor(), "message": message}
    )
    results = r["results"]
    _await(app, out, results, False)
    data: dict[str, Any] = {"results": results}
    if service is None:
        client.request("POST", "/v1/shutdown", {})
        data["controller"] = "stopped"

    def render(con: Any, d: Any) -> None:
        for x in d["results"]:
            state = "stopped" if x.get("changed") else "already down"
            con.print(f"[green]{x['service']}[/]: {state}")
        if d.get("controller"):
            con.print("controller stopped")

    out.emit(data, render)


# --- ledger ----------------------------------------------------------------------------


@cli.command()
@click.argument("service", required=False)
@click.option(
    "--verify",
    is_flag=True,
    help="Prove the ledger untouched; exit 1 naming the first altered entry.",
)
@output_option
@click.pass_context
def audit(ctx: click.Context, service: str | None, verify: bool, output: str) -> None:
    """The ledger: who changed what, when and why."""
    import json as _json

    from graven.errors import LedgerTampered
    from graven.ledger.chain import verify_chain

    app = app_context(ctx)
    st = app.state()
    entries = st.ledger()
    data: dict[str, Any] = {
        "entries": [e.to_dict() for e in entries if service is None or e.service == service]
    }
    if verify:
        head_file = app.state_dir / "ledger.head"
        head = None
        if head_file.exists():
            try:
                raw = _json.loads(head_file.read_text())
                head = (int(raw["seq"]), str(raw["hash"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise LedgerTampered(0, f"the head record {head_file} is unreadable") from exc
        try:
            count = verify_chain(entries, head)
        except LedgerTampered as exc:
            if output != "json":
                raise
            data.update(verified=False, first_bad_entry=exc.seq, **exc.to_dict())
            Output(output).emit(data)
            sys.exit(exc.exit_code)
        data["verified"] = True
        data["verified_entries"] = count

    def render(con: Any, d: Any) -> None:
        from rich.table import Table

        t = Table("#", "WHEN", "WHO", "ACTION", "RELEASE", "WHY", box=None)
        for e in d["entries"]:
            t.add_row(
                str(e["seq"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])),
                e["actor"],
                e["action"],
                e["release"],
                e["message"],
            )
        con.print(t)
        if d.get("verified"):
            con.print(f"[green]verified[/]: {d['verified_entries']} entries, chain intact")

    Output(output).emit(data, render)


# --- controller ------------------------------------------------------------------------


@cli.command()
@output_option
@click.pass_context
def serve(ctx: click.Context, output: str) -> None:
    """Run the controller in the foreground (verbs that change state start it when
    absent)."""
    from graven.controller.daemon import serve as run

    app = app_context(ctx)
    Output(output).progress(
        f"controller for {app.state_dir}; Ctrl-C stops it (instances keep running)"
    )
    run(app.state_dir)
    Output(output).emit({"state_dir": str(app.state_dir), "stopped": True})


@cli.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("graven-demo"),
    show_default=True,
    help="Where the demo project goes.",
)
@click.option(
    "--requests-per-phase",
    default=600,
    show_default=True,
    help="Minimum requests sent during each deploy and rollback.",
)
@output_option
def demo(directory: Path, requests_per_phase: int, output: str) -> None:
    """The guided tour: build, deploy 3 replicas, deploy v2 under load, roll back."""
    from graven.cli.demo import run_demo

    run_demo(directory, Output(output), requests_per_phase)


def print_state_dir_problem(con: Any, d: Any) -> None:
    """The state dir's problem (full, refusing writes) from a status reply, if any."""
    from rich.text import Text

    state_dir = d.get("state_dir") or {}
    if state_dir.get("problem"):
        con.print(Text(state_dir["problem"], style="red"))
        if state_dir.get("hint"):
            con.print(Text(f"  hint: {state_dir['hint']}"))


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps every error to a message and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    as_json = _wants_json(args)
    try:
        cli.main(args=args, prog_name="graven", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            click.echo("interrupted", err=True)  # Ctrl-C outside a rollout wait
            sys.exit(130)
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        if as_json:
            _json_error({"error": "UsageError", "message": exc.format_message()})
        else:
            exc.show()
        sys.exit(2)
    except GravenError as exc:
        if debug:
            raise
        report_error(exc, as_json=as_json)
        sys.exit(exc.exit_code)
    except StoppedWatching as exc:
        sys.stderr.write(exc.message + "\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        _exit_if_refused_write(exc, debug=debug, as_json=as_json)
        raise


def _exit_if_refused_write(exc: Exception, *, debug: bool, as_json: bool) -> None:
    """A write the filesystem refused (full, over quota, read-only) is the operator's
    to fix, not a bug: a message and exit 1, no traceback (unless ``--debug``)."""
    from graven.disk import disk_error

    refused = disk_error(exc)
    if refused is None or debug:
        return
    report_error(refused, as_json=as_json)
    sys.exit(refused.exit_code)


def _wants_json(args: list[str]) -> bool:
    for i, a in enumerate(args):
        if a in ("-o", "--output") and i + 1 < len(args) and args[i + 1] == "json":
            return True
        if a in ("-ojson", "--output=json"):
            return True
    return False


def _json_error(data: dict[str, Any]) -> None:
    write_json(data, sort_keys=False)
