"""``graven image``: images in and out as OCI image layouts and archives.

Listed in ``graven.cli.main.VERBS``, which registers it on the root group. Heavy
modules (the OCI writer, compression) load only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from graven.cli.context import app_context
from graven.cli.import_cmds import import_command
from graven.cli.options import output_option
from graven.cli.output import Output, short
from graven.errors import UsageError

if TYPE_CHECKING:
    from graven.store.oci_export.documents import LayerProgress
    from graven.store.oci_export.layout import ExportResult


@click.group("image")
def image() -> None:
    """Images in and out as OCI image layouts (skopeo, podman, umoci, registries)."""


image.add_command(import_command, "import")


@image.command("export")
@click.argument("image_ref", metavar="IMAGE")
@click.option(
    "--layout",
    type=click.Path(path_type=Path, file_okay=False),
    help="OCI image layout directory to write (created, or an existing layout to add to).",
)
@click.option(
    "--archive",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also (or instead) write an OCI archive, e.g. image.tar (oci-archive:).",
)
@click.option(
    "--ref",
    "ref_name",
    metavar="NAME",
    help="Ref name in the layout's index (default: the image name, else 'latest').",
)
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd", "none"]),
    default="gzip",
    show_default=True,
    help="Layer compression (umoci reads gzip and none only).",
)
@output_option
@click.pass_context
def export(
    ctx: click.Context,
    image_ref: str,
    layout: Path | None,
    archive: Path | None,
    ref_name: str | None,
    compression: str,
    output: str,
) -> None:
    """Export IMAGE (name, name@digest, digest or short digest) as an OCI image.

    \b
    The result is byte-for-byte reproducible (set SOURCE_DATE_EPOCH to date it):
      graven image export web --layout out/
      skopeo inspect oci:out:web
      podman run --rm oci:out:web
    """
    from graven.cli import render_local
    from graven.store.oci_export.compress import check_compression
    from graven.store.oci_export.layout import (
        ImageExport,
        check_ref_name,
        export_archive,
        export_layout,
    )

    if layout is None and archive is None:
        raise UsageError(
            "nothing to write: give --layout DIR, --archive FILE.tar, or both",
            hint="For example: graven image export web --layout out/",
        )
    out = Output(output)
    store = app_context(ctx).store()
    img = store.resolve(image_ref)
    ref = check_ref_name(ref_name or img.name or "latest")
    kind = check_compression(compression)
    label = img.name or short(img.digest)
    out.progress(render_local.exporting(label, str(img.digest), ref))
    written: ExportResult | None = None
    archived: ExportResult | None = None
    with out.bar(f"export {label}") as bar:

        def on_layer(p: LayerProgress) -> None:
            bar.update(completed=p.index + 1, total=p.count)
            bar.line(render_local.layer_exported(p, kind))

        if layout is not None:
            written = export_layout(store, img, layout, ref, kind, progress=on_layer)
        if archive is not None:
            # Layers are cached by now when a layout was written too: no second compression.
            archived = export_archive(
                store, img, archive, ref, kind, progress=None if written else on_layer
            )
    documents = written or archived
    assert documents is not None  # the usage check above asks for one or both
    result = ImageExport(
        img.digest,
        img.name,
        ref,
        kind,
        documents.oci,
        layout=_resolved(written),
        archive=_resolved(archived),
    )
    out.show(result.to_dict(), render_local.exported(result))


def _resolved(result: ExportResult | None) -> ExportResult | None:
    """``result`` with its path absolute, as the verb reports it."""
    from dataclasses import replace

    return None if result is None else replace(result, path=result.path.resolve())
