"""``graven image import``: an OCI image layout or oci-archive in, validated.

Registered on the ``image`` group by ``graven.cli.image_cmds``; the importer
itself loads only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output

if TYPE_CHECKING:
    from graven.store.oci_import.policy import LayerImported


@click.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--ref",
    metavar="REF",
    help="The image's ref name in the layout (org.opencontainers.image.ref.name); needed "
    "when it holds several images.",
)
@click.option("--name", metavar="NAME", help="Name the imported image NAME in the store.")
@click.option(
    "--allow-devices",
    is_flag=True,
    help="Leave device nodes and fifos out of the image instead of refusing it.",
)
@click.option(
    "--allow-setuid",
    is_flag=True,
    help="Import setuid/setgid files without the bit (and files with capabilities without "
    "them) instead of refusing the image.",
)
@output_option
@click.pass_context
def import_command(
    ctx: click.Context,
    source: Path,
    ref: str | None,
    name: str | None,
    allow_devices: bool,
    allow_setuid: bool,
    output: str,
) -> None:
    """Import the OCI image layout directory or oci-archive file SOURCE.

    Every byte is checked before the image is recorded: digests and sizes, the tar of
    each layer (no path traversal, no writing through symlinks, no device nodes or
    setuid files unless allowed), limits against compression bombs. A refused image
    leaves nothing behind but unreferenced blobs for 'graven gc'.

    \b
      graven image import out/ --ref web --name web
      graven image import image.tar -o json
    """
    from graven.cli import render_local
    from graven.store.oci_import.layouts import import_layout
    from graven.store.oci_import.policy import ImportPolicy

    obj = app_context(ctx)
    out = Output(output)
    store = obj.store()
    out.progress(render_local.importing(source, ref))

    policy = ImportPolicy(allow_devices=allow_devices, allow_setuid=allow_setuid)
    with out.bar(f"import {source.name}") as bar:

        def on_layer(p: LayerImported) -> None:
            bar.update(completed=p.index + 1, total=p.count)
            bar.line(render_local.layer_imported(p))

        img = import_layout(store, source, ref, name=name, policy=policy, progress=on_layer)
    data: dict[str, Any] = {
        "digest": str(img.digest),
        "name": img.name or None,
        "layers": len(img.layers),
        "rootfs": str(img.rootfs),
        "source": str(source.resolve()),
        "ref": ref,
    }
    out.show(data, render_local.imported(img))
