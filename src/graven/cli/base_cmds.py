"""``graven base debian`` and ``graven base host-python``: base images made once,
offline, for recipes to start from (``base: {image: NAME}``).

Listed in ``graven.cli.main.VERBS``, which registers it on the root group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output

if TYPE_CHECKING:
    from graven.build.bases.common import MadeBase


def _progress(out: Output) -> Callable[[str], None]:
    """Lines from tools (debootstrap) as progress, never read as rich markup."""
    from graven.cli import render_local

    return lambda text: out.progress(render_local.tool_output(text))


def _show(out: Output, base: MadeBase) -> None:
    from graven.cli import render_local

    out.show(base.to_dict(), render_local.base_made(base))


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
    from graven.build.bases.common import MadeBase
    from graven.build.bases.debian import find_debian_base, make_debian_base
    from graven.cli import render_local

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
    out.progress(render_local.making_base("debian", f"{suite} ({variant})"))
    image = make_debian_base(
        store, name=name, refresh=refresh, on_progress=_progress(out), **params
    )
    _show(out, MadeBase.of(store, image, cached=cached))


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
    from graven.build.bases.common import MadeBase
    from graven.build.bases.host_python import make_host_python_base
    from graven.cli import render_local

    out = Output(output)
    store = app_context(ctx).store()
    out.progress(render_local.making_base("host-python"))
    image = make_host_python_base(
        store, python=python, name=name, include_bytecode=bytecode, on_progress=_progress(out)
    )
    _show(out, MadeBase.of(store, image))
