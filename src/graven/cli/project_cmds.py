"""``graven init``, ``check``, ``schema`` and ``demo``: the project and its spec."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from graven.cli.context import AppContext, app_context
from graven.cli.options import output_option
from graven.cli.output import Output
from graven.errors import GravenError, SpecProblem

if TYPE_CHECKING:
    from graven.spec.loader import LoadedSpec


@click.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=".")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@output_option
def init(directory: Path, force: bool, output: str) -> None:
    """Scaffold graven.yaml and an example service in DIRECTORY."""
    from graven.cli import render_local
    from graven.spec import scaffold

    written = scaffold(directory, force=force)
    data = {"directory": str(directory.resolve()), "written": [str(p) for p in written]}
    Output(output).show(data, render_local.scaffolded(written))


@click.command()
@output_option
@click.pass_context
def check(ctx: click.Context, output: str) -> None:
    """Validate the spec; every problem names file:line and key path.

    Ports already taken by another program are warnings: the spec is valid, but a
    deploy could not start the service's router there until the port is freed.
    """
    from graven.cli import render_local
    from graven.runtime.isolation import probe
    from graven.spec.summary import SpecSummary

    app = app_context(ctx)
    loaded = app.spec()
    support = probe()
    warnings = [
        *_port_warnings(app, loaded),
        *_entrypoint_warnings(loaded),
        *_isolation_warnings(loaded, support.reason),
        *_limit_warnings(loaded),
    ]
    summary = SpecSummary.of(loaded, warnings, isolation=support.to_dict())
    out = Output(output)
    if not out.json:
        out.err_lines.write_all(render_local.spec_warnings(summary.warnings))
    out.show(summary.to_dict(), render_local.checked(summary))


def _limit_warnings(loaded: LoadedSpec) -> list[SpecProblem]:
    """Resource limits the spec asks that this machine cannot enforce."""
    if not any(s.resources.to_resources().limited for s in loaded.spec.services.values()):
        return []  # nothing asked: no probing
    from graven.runtime.machine import probe_machine, spec_warnings

    return spec_warnings(loaded, probe_machine())


def _entrypoint_warnings(loaded: LoadedSpec) -> list[SpecProblem]:
    """An image from scratch whose entrypoint names a program by PATH (``python3``)
    while no step copies anything onto a PATH directory: instances run with the image
    as their root, so that program is not there."""
    from graven.build.interpreter import DEFAULT_IMAGE_PATH, HOST_PYTHON_HINT
    from graven.spec.recipe import SCRATCH, CopyStep, EntrypointStep, RunStep

    path_dirs = DEFAULT_IMAGE_PATH.split(":")
    found = []
    for name, recipe in sorted(loaded.spec.images.items()):
        if recipe.base != SCRATCH or any(isinstance(s, RunStep) for s in recipe.steps):
            continue
        targets = [s.to.rstrip("/") or "/" for s in recipe.steps if isinstance(s, CopyStep)]
        for index, step in enumerate(recipe.steps):
            if not isinstance(step, EntrypointStep) or "/" in step.entrypoint[0]:
                continue
            if any(
                t == "/" or any(d.startswith(t) or t.startswith(d) for d in path_dirs)
                for t in targets
            ):
                continue
            key_path = f"images.{name}.steps[{index}].entrypoint"
            found.append(
                SpecProblem(
                    str(loaded.path),
                    loaded.line_of(key_path),
                    key_path,
                    f"{step.entrypoint[0]!r} is not in an image that starts from scratch and "
                    f"copies nothing onto its PATH; instances will not start. {HOST_PYTHON_HINT}",
                )
            )
    return found


def _isolation_warnings(loaded: LoadedSpec, reason: str) -> list[SpecProblem]:
    """A service that requires isolation, on a machine that cannot seal instances."""
    if not reason:
        return []
    found = []
    for name, service in sorted(loaded.spec.services.items()):
        if service.isolation == "required":
            key_path = f"services.{name}.isolation"
            found.append(
                SpecProblem(
                    str(loaded.path),
                    loaded.line_of(key_path),
                    key_path,
                    f"required, but instances cannot be sealed on this machine ({reason}):"
                    " they will not start here",
                )
            )
    return found


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


@click.command()
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


@click.command()
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
