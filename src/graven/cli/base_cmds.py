"""``graven base debian`` and ``graven base host-python``: base images made once,
offline, for recipes to start from (``base: {image: NAME}``).

Listed in ``graven.cli.main.VERBS``, which registers it on the root group.
"""

from __future__ import annotations

from typing import Any

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output, human_size
from graven.model import Image
from graven.store.cas import ContentStore


def _summary(store: ContentStore, image: Image, **extra: Any) -> dict[str, Any]:
    labels = dict(image.config.labels)
    return {
        "name": image.name,
        "digest": str(image.digest),
        "rootfs": str(image.rootfs),
        "size": store.read_tree(image.rootfs).size,
        "layers": len(image.layers),
        "entrypoint": list(image.config.entrypoint),
        "labels": labels,
        "interpreter": {
            key.removeprefix("dev.graven.interpreter."): value
            for key, value in labels.items()
            if key.startswith("dev.graven.interpreter.")
        },
        **extra,
    }


def _render(con: Any, d: Any) -> None:
    how = " (reused: made earlier with the same parameters)" if d.get("cached") else ""
    con.print(f"[green]base[/] {d['name']} {d['digest']}  {human_size(d['size'])}{how}")
    interp = d["interpreter"]
    if interp:
        con.print(f"  interpreter: {interp.get('path')} ({interp.get('source')})")
    con.print(f"  use it in a recipe: base: {{image: {d['name']}}}")


def _progress(out: Output) -> Any:
    """Lines from tools (debootstrap) as progress, never read as rich markup."""
    from rich.markup import escape

    return lambda text: out.progress(escape(text))


def _packages(values: tuple[str, ...]) -> list[str]:
    return [p.strip() for value in values for p in value.split(",") if p.strip()]


@click.group("base")
def base_group() -> None:
    """Base images made once, offline: a Debian root file system or the host's Python."""


@base_group.command("debian")
@click.option("--suite", default="bookworm", show_default=True, help="Debian codename.")
@click.option(
    "--variant",
    type=click.Choice(["minbase", "buildd", "default"]),
    default="minbase",
    show_default=True,
    help="debootstrap's package selection.",
)
@click.option(
    "--include",
    "include",
    multiple=True,
    metavar="PKG,...",
    help="Extra packages, comma-separated (repeatable).",
)
@click.option("--mirror", help="Debian mirror URL (default: the one apt on this host uses).")
@click.option("--name", help="Image name to tag (default: debian-SUITE).")
@click.option("--refresh", is_flag=True, help="Make it again even if made before.")
@output_option
@click.pass_context
def debian(
    ctx: click.Context,
    suite: str,
    variant: str,
    include: tuple[str, ...],
    mirror: str | None,
    name: str | None,
    refresh: bool,
    output: str,
) -> None:
    """Make a Debian root file system with debootstrap (needs root); made once per
    parameters, then reused."""
    from graven.build.bases import find_debian_base, make_debian_base

    out = Output(output)
    store = app_context(ctx).store()
    packages = _packages(include)
    params: dict[str, Any] = {
        "suite": suite,
        "variant": variant,
        "include": packages,
        "mirror": mirror,
    }
    cached = not refresh and find_debian_base(store, **params) is not None
    out.progress(f"[bold]base debian[/] {suite} ({variant})")
    image = make_debian_base(
        store, name=name, refresh=refresh, on_progress=_progress(out), **params
    )
    out.emit(_summary(store, image, cached=cached), _render)


@base_group.command("host-python")
@click.option(
    "--python",
    "python",
    metavar="PATH",
    help="The interpreter (default: the one running graven; a virtualenv's gives its base).",
)
@click.option("--name", default="host-python", show_default=True, help="Image name to tag.")
@click.option(
    "--bytecode/--no-bytecode",
    default=False,
    show_default=True,
    help="Keep __pycache__ (stale in checkouts: the store keeps no mtimes).",
)
@output_option
@click.pass_context
def host_python(
    ctx: click.Context, python: str | None, name: str, bytecode: bool, output: str
) -> None:
    """Make an image of this host's Python: interpreter, standard library and the shared
    libraries they load, at their host paths."""
    from graven.build.bases import make_host_python_base

    out = Output(output)
    store = app_context(ctx).store()
    out.progress("[bold]base host-python[/]")
    image = make_host_python_base(
        store, python=python, name=name, include_bytecode=bytecode, on_progress=_progress(out)
    )
    out.emit(_summary(store, image), _render)
