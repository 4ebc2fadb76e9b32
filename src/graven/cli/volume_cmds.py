"""``graven volume ls`` and ``graven volume rm``: the named volumes that keep services'
data across instances, rollbacks and ``graven down``.

Listed in ``graven.cli.main.VERBS``, which registers the group on the root group.
"""

from __future__ import annotations

import click

from graven.cli import render_volumes
from graven.cli.context import actor, app_context
from graven.cli.options import output_option
from graven.cli.output import Output


@click.group("volume")
def volume_group() -> None:
    """Named volumes: data that outlives instances, kept until 'graven volume rm'."""


@volume_group.command("ls")
@output_option
@click.pass_context
def ls(ctx: click.Context, output: str) -> None:
    """List the named volumes, their size, the release that made each and the releases
    that use it now."""
    from graven.controller.paths import require_access, state_db
    from graven.volumes import list_volumes, volumes_in_use

    app = app_context(ctx)
    require_access(app.state_dir)
    records = list_volumes(app.state_dir)
    users: dict[str, list[str]] = {}
    if records and state_db(app.state_dir).exists():
        state = app.state()
        try:
            users = volumes_in_use(state)
        finally:
            state.close()
    data = {"volumes": [{**r.to_dict(), "used_by": users.get(r.name, [])} for r in records]}
    Output(output).show(data, render_volumes.volumes(records, users))


@volume_group.command("rm")
@click.argument("name")
@click.option("-m", "--message", default="volume rm", help="Why: recorded in the ledger.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete it even while a running or desired release uses it.",
)
@output_option
@click.pass_context
def rm(ctx: click.Context, name: str, message: str, force: bool, output: str) -> None:
    """Delete the named volume NAME and all its data (refused while a release that runs
    or is meant to run uses it). The next instance that needs it starts it empty."""
    from graven.controller.paths import require_access
    from graven.controller.results import to_json
    from graven.volumes import find_volume

    app = app_context(ctx)
    require_access(app.state_dir)
    find_volume(app.state_dir, name)  # a typo starts no controller
    result = app.controller().remove_volume(name, force=force, actor=actor(), message=message)
    Output(output).show(to_json(result), render_volumes.volume_removed(result))
