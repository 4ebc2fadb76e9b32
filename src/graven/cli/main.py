"""The ``graven`` command line: parse, call the library, render.

Exit codes scripts can trust: 0 success, 1 failure, 2 usage or invalid input.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from graven.cli.context import AppContext
from graven.cli.exits import exit_code, wants_json, write_json
from graven.errors import InternalError

# Every verb, as "module:command", in the order help lists them (the order teaches
# the workflow; the image engine's verbs follow). A module is imported only when one
# of its verbs runs: a 'graven rollback' must not pay for the image engine's imports.
VERBS: dict[str, str] = {
    "init": "graven.cli.project_cmds:init",
    "check": "graven.cli.project_cmds:check",
    "schema": "graven.cli.project_cmds:schema",
    "build": "graven.cli.build_cmds:build",
    "images": "graven.cli.build_cmds:images",
    "plan": "graven.cli.deploy_cmds:plan",
    "deploy": "graven.cli.deploy_cmds:deploy",
    "rollback": "graven.cli.deploy_cmds:rollback",
    "promote": "graven.cli.deploy_cmds:promote",
    "abort": "graven.cli.deploy_cmds:abort",
    "status": "graven.cli.status_cmds:status",
    "releases": "graven.cli.status_cmds:releases",
    "logs": "graven.cli.logs_cmds:logs",
    "down": "graven.cli.deploy_cmds:down",
    "volume": "graven.cli.volume_cmds:volume_group",
    "audit": "graven.cli.ledger_cmds:audit",
    "serve": "graven.cli.controller_cmds:serve",
    "runtime": "graven.cli.runtime_cmds:runtime",
    "demo": "graven.cli.project_cmds:demo",
    "image": "graven.cli.image_cmds:image",
    "push": "graven.cli.registry_cmds:push",
    "pull": "graven.cli.registry_cmds:pull",
    "base": "graven.cli.base_cmds:base_group",
    "store": "graven.cli.store_cmds:store_group",
    "gc": "graven.cli.store_cmds:gc",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(dict.fromkeys([*VERBS, *self.commands]))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in VERBS:
            module, attr = VERBS[name].split(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise InternalError(f"{VERBS[name]} is not a click command")
            self.add_command(command, name)
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps every error to a message and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    as_json = wants_json(args)
    code = exit_code(lambda: _run(args, as_json=as_json), debug="--debug" in args, as_json=as_json)
    if code:
        sys.exit(code)


def _run(args: list[str], *, as_json: bool) -> int:
    """The click group on ``args``; click's own exceptions as exit codes."""
    try:
        cli.main(args=args, prog_name="graven", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            click.echo("interrupted", err=True)  # Ctrl-C outside a rollout wait
            return 130
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        if as_json:
            write_json({"error": "UsageError", "message": exc.format_message()}, sort_keys=False)
        else:
            exc.show()
        return 2
    return 0
