"""``graven serve``: the controller in the foreground."""

from __future__ import annotations

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output


@click.command()
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
