"""``graven store fsck`` and ``graven gc``: check the content store, and reclaim what
nothing needs any more.

Listed in ``graven.cli.main.VERBS``, which registers them on the root group.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output


class _Duration(click.ParamType[float]):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        from graven.spec.fields import parse_duration

        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.group("store")
def store_group() -> None:
    """The content store: check its integrity."""


@store_group.command("fsck")
@click.option(
    "--repair",
    is_flag=True,
    help="Move damaged objects, and the names of images holding them, to the store's "
    "quarantine/ so the next build or pull writes them afresh.",
)
@output_option
@click.pass_context
def fsck(ctx: click.Context, repair: bool, output: str) -> None:
    """Hash every object in the store: exit 1 listing each problem found and the images
    it damages. With --repair, also quarantine what is damaged (nothing is deleted)."""
    from graven.cli import render_local
    from graven.controller.paths import store_root
    from graven.store.cas.fsck import FsckReport

    app = app_context(ctx)
    root = store_root(app.state_dir)
    # No store yet: sound.
    report = app.store().check(repair=repair) if root.is_dir() else FsckReport(problems=())
    Output(output).show({"store": str(root), **report.to_dict()}, render_local.fsck(root, report))
    if not report.ok:
        sys.exit(1)


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; delete nothing.")
@click.option(
    "--keep-releases",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    metavar="N",
    help="Keep the images of each service's last N releases (besides the current one).",
)
@click.option(
    "--keep-history",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    metavar="N",
    help="Keep the newest N images each image name pointed at (besides its current one).",
)
@click.option(
    "--grace",
    type=_Duration(),
    default="10m",
    show_default=True,
    help="Never delete objects younger than this: a build running now may need them.",
)
@click.option(
    "--prune-cache",
    is_flag=True,
    help="Also let go of derived objects only caches hold (compressed OCI layers); "
    "they are recomputed when needed.",
)
@output_option
@click.pass_context
def gc(
    ctx: click.Context,
    dry_run: bool,
    keep_releases: int,
    keep_history: int,
    grace: float,
    prune_cache: bool,
    output: str,
) -> None:
    """Delete images, files and checkouts nothing needs: not a name, a kept release
    nor a live instance. Reports what was freed and why the rest was kept."""
    from graven.cli import render_local
    from graven.controller.paths import state_db, store_root
    from graven.store.gc import run_gc

    app = app_context(ctx)
    out = Output(output)
    root = store_root(app.state_dir)
    if not root.is_dir():
        data: dict[str, Any] = {"dry_run": dry_run, "ok": True, "store": str(root)}
        out.show(data, render_local.nothing_to_collect())
        return
    out.progress(render_local.collecting(root, dry_run=dry_run))
    report = run_gc(
        app.store(),
        state_db=state_db(app.state_dir),
        checkouts=app.state_dir / "checkouts",
        keep_releases=keep_releases,
        keep_history=keep_history,
        prune_cache=prune_cache,
        dry_run=dry_run,
        grace=grace,
    )
    out.show({"store": str(root), **report.to_dict()}, render_local.collected(report))
    if not report.ok:
        sys.exit(1)
