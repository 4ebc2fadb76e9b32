"""``graven build`` and ``graven images``: bake images, list the store."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from graven.cli.context import AppContext, app_context
from graven.cli.options import output_option
from graven.cli.output import Output
from graven.errors import UsageError

if TYPE_CHECKING:
    from graven.spec.models import Recipe


def build_images(
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


@click.command()
@click.argument("images", nargs=-1)
@click.option("--no-cache", is_flag=True, help="Run every step even when its result is cached.")
@output_option
@click.pass_context
def build(ctx: click.Context, images: tuple[str, ...], no_cache: bool, output: str) -> None:
    """Bake IMAGES (default: all): cached, content-addressed -> digests.

    A step whose inputs are unchanged never runs again; when nothing at all changed
    since the last build, not even the spec is parsed."""
    out = Output(output)
    data = {"images": build_images(app_context(ctx), list(images), out, no_cache=no_cache)}

    def render(con: Any, d: Any) -> None:
        for img in d["images"]:
            con.print(
                f"[green]built[/] {img['name']} {img['digest']}  "
                f"({img['steps_run']} step(s) ran, {img['steps_cached']} cached)"
            )

    out.emit(data, render)


@click.command()
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
