"""``graven build`` and ``graven images``: bake images, list the store."""

from __future__ import annotations

import sys

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output


@click.command()
@click.argument("images", nargs=-1)
@click.option("--no-cache", is_flag=True, help="Run every step even when its result is cached.")
@output_option
@click.pass_context
def build(ctx: click.Context, images: tuple[str, ...], no_cache: bool, output: str) -> None:
    """Bake IMAGES (default: all): cached, content-addressed -> digests.

    A step whose inputs are unchanged never runs again; when nothing at all changed
    since the last build, not even the spec is parsed."""
    from graven.cli.build_flow import build_verb

    if code := build_verb(app_context(ctx), images, Output(output), no_cache=no_cache):
        sys.exit(code)


@click.command()
@output_option
@click.pass_context
def images(ctx: click.Context, output: str) -> None:
    """List images in the store."""
    from graven.cli import render_local

    listing = app_context(ctx).store().list_images()
    data = {
        "images": [
            {"name": name, "digest": str(img.digest), "entrypoint": list(img.config.entrypoint)}
            for name, img in listing
        ]
    }
    Output(output).show(data, render_local.images(listing))
