"""``graven store fsck`` and ``graven gc``: check the content store, and reclaim what
nothing needs any more.

Listed in ``graven.cli.main.VERBS``, which registers them on the root group.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output, human_size, short

if TYPE_CHECKING:
    from graven.store.cas.fsck import FsckReport


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
    from graven.controller.paths import store_root
    from graven.store.cas.fsck import FsckReport

    app = app_context(ctx)
    root = store_root(app.state_dir)
    # No store yet: sound.
    report = app.store().check(repair=repair) if root.is_dir() else FsckReport(problems=())
    images = list(report.images)
    data = {
        "store": str(root),
        "ok": report.ok,
        "problems": list(report.problems),
        "damaged": [d.to_dict() for d in report.damaged],
        "images": images,
        "names": list(report.names),
        "repaired": report.quarantine is not None,
        "quarantine": str(report.quarantine) if report.quarantine else None,
        "next": _next_step(report),
    }

    from rich.markup import escape

    def render(con: Any, d: Any) -> None:
        if d["ok"]:
            con.print(f"[green]ok[/] {d['store']}: no problems found")
            return
        con.print(f"[red]{len(d['problems'])} problem(s)[/] in {d['store']}:")
        for p in d["problems"]:
            con.print(f"  - {p}", markup=False)
        if d["images"]:
            con.print("damaged images: " + ", ".join(d["images"]), markup=False)
        if d["repaired"]:
            names = f" and the name(s) {', '.join(d['names'])}" if d["names"] else ""
            con.print(
                f"[yellow]quarantined[/] {len(d['damaged'])} object(s){escape(names)} "
                f"in {escape(d['quarantine'])}"
            )
        con.print(d["next"], markup=False)

    Output(output).emit(data, render)
    if not report.ok:
        sys.exit(1)


def _next_step(report: FsckReport) -> str:
    """What to do about ``report``, in one sentence ("" when the store is sound)."""
    if report.ok:
        return ""
    named = " ".join(report.images) or "IMAGE"
    restore = (
        f"rebuild the images built here ('graven build {named}') and pull again the ones "
        "pulled ('graven pull REF --name IMAGE')"
    )
    if report.quarantine is not None:
        return f"Now {restore}. Delete {report.quarantine} once you no longer need it."
    return (
        f"Run 'graven store fsck --repair' to quarantine what is damaged, then {restore}; "
        "'graven gc' never deletes damaged data."
    )


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
    from graven.controller.paths import state_db, store_root
    from graven.store.gc import run_gc

    app = app_context(ctx)
    out = Output(output)
    root = store_root(app.state_dir)
    if not root.is_dir():
        data: dict[str, Any] = {"dry_run": dry_run, "ok": True, "store": str(root)}
        out.emit(data, lambda con, d: con.print("no store yet: nothing to collect"))
        return
    out.progress("[bold]gc[/] " + ("(dry run) " if dry_run else "") + str(root))
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
    data = {"store": str(root), **report.to_dict()}

    def render(con: Any, d: Any) -> None:
        if d["problems"]:
            con.print("[red]gc stopped: the store is damaged; nothing was deleted[/]")
            for p in d["problems"]:
                con.print(f"  - {p}", markup=False)
            con.print("Run 'graven store fsck' for details; rebuild or pull what is damaged.")
            return
        verb = "would delete" if d["dry_run"] else "deleted"
        con.print(
            f"[green]{verb}[/] {d['objects_deleted']} object(s), {human_size(d['bytes_freed'])}; "
            f"kept {d['objects_kept']} object(s), {human_size(d['bytes_kept'])}"
        )
        if d["objects_young"]:
            con.print(f"  {d['objects_young']} unreferenced object(s) spared: younger than --grace")
        if d["objects_restored"]:
            con.print(f"  {d['objects_restored']} object(s) became needed meanwhile and stayed")
        extras = []
        if d["cache_entries_deleted"]:
            extras.append(f"{d['cache_entries_deleted']} cache entries")
        if d["tmp_removed"]:
            extras.append(f"{d['tmp_removed']} temp file(s)")
        if d["checkouts_removed"]:
            freed = human_size(d["checkout_bytes_freed"])
            extras.append(f"{len(d['checkouts_removed'])} checkout(s) ({freed})")
        if extras:
            con.print(f"  also {verb}: " + ", ".join(extras))
        if d["kept"]:
            from rich.table import Table

            t = Table("KEPT", "WHY", box=None)
            for k in d["kept"]:
                t.add_row(short(k["digest"]), "; ".join(k["reasons"]))
            con.print(t)
        for m in d["missing"]:
            con.print(f"  [dim]already gone: {short(m['digest'])} ({'; '.join(m['reasons'])})[/]")

    out.emit(data, render)
    if not report.ok:
        sys.exit(1)
