"""``graven push`` and ``graven pull``: images to and from an OCI registry.

Registered on the main group when ``graven.cli.main`` is imported; the registry
client is imported only when one of these verbs runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from graven.cli.context import AppContext
from graven.cli.main import cli, output_option
from graven.cli.output import Output
from graven.errors import UsageError

if TYPE_CHECKING:
    from graven.store.registry import BlobTransfer, RegistryClient, RegistryRef

F = TypeVar("F", bound=Callable[..., Any])


def _registry_options(f: F) -> F:
    f = click.option(
        "--password-stdin",
        is_flag=True,
        help="Read the password from stdin (with --username or GRAVEN_REGISTRY_USER).",
    )(f)
    f = click.option(
        "-u",
        "--username",
        metavar="USER",
        help="Registry user (default: GRAVEN_REGISTRY_USER, then ~/.docker/config.json).",
    )(f)
    return click.option(
        "--insecure",
        is_flag=True,
        help="Speak plain HTTP to the registry (loopback registries always do).",
    )(f)


def _app(ctx: click.Context) -> AppContext:
    obj = ctx.find_root().obj
    assert isinstance(obj, AppContext)
    return obj


def _client(
    ref: RegistryRef, *, insecure: bool, username: str | None, password_stdin: bool
) -> RegistryClient:
    from graven.store.registry import RegistryClient, find_credentials

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError(
                "--password-stdin read an empty password",
                hint='Pipe the password in: printf %s "$PASSWORD" | graven push ...',
            )
    credentials = find_credentials(ref.registry, username=username, password=password)
    return RegistryClient(ref.registry, insecure=insecure, credentials=credentials)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = n / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _blob_line(t: BlobTransfer) -> str:
    from graven.store.oci_types import DOCKER_CONFIG, OCI_CONFIG

    kind = "config" if t.media_type in (OCI_CONFIG, DOCKER_CONFIG) else "layer"
    color = {"uploaded": "cyan", "downloaded": "cyan", "mounted": "green"}.get(t.action, "dim")
    line = f"  [{color}]{t.action:<10}[/] {t.digest.short}  {kind:<6} {_size(t.size):>9}"
    if t.action == "mounted" and t.source:
        line += f"  from {t.source}"
    return line


@cli.command()
@click.argument("image")
@click.argument("reference")
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd"]),
    default="gzip",
    show_default=True,
    help="Layer compression (zstd needs readers that support it).",
)
@_registry_options
@output_option
@click.pass_context
def push(
    ctx: click.Context,
    image: str,
    reference: str,
    compression: str,
    insecure: bool,
    username: str | None,
    password_stdin: bool,
    output: str,
) -> None:
    """Push IMAGE to REFERENCE (HOST[:PORT]/REPOSITORY[:TAG]); only missing blobs travel.

    IMAGE is a local name, NAME@sha256:..., or a (short) digest. The tag defaults
    to 'latest'.
    """
    from graven.store.registry import parse_reference, push_image

    out = Output(output)
    ref = parse_reference(reference)
    store = _app(ctx).store()
    img = store.resolve(image)
    out.progress(f"[bold]push[/] {img.name or img.digest.short} -> {ref}")
    with _client(ref, insecure=insecure, username=username, password_stdin=password_stdin) as c:
        result = push_image(
            store,
            img,
            ref,
            c,
            compression=compression,
            progress=lambda t: out.progress(_blob_line(t)),
        )
    data = {"name": img.name, **result.to_dict()}

    def render(con: Any, d: Any) -> None:
        con.print(
            f"[green]pushed[/] {d['reference']}  ({d['uploaded']} uploaded, "
            f"{d['mounted']} mounted, {d['skipped']} already there; "
            f"{_size(d['bytes_sent'])} sent)"
        )
        con.print(f"pull with: graven pull {d['pinned']}")

    out.emit(data, render)


@cli.command()
@click.argument("reference")
@click.option(
    "--name",
    metavar="NAME",
    help="Local name for the image (default: the repository's last component).",
)
@_registry_options
@output_option
@click.pass_context
def pull(
    ctx: click.Context,
    reference: str,
    name: str | None,
    insecure: bool,
    username: str | None,
    password_stdin: bool,
    output: str,
) -> None:
    """Pull REFERENCE (HOST[:PORT]/REPOSITORY[:TAG|@sha256:...]) into the local store.

    Every blob is verified as it arrives; the local name moves only once the whole
    image is in.
    """
    from graven.store.registry import parse_reference, pull_image

    out = Output(output)
    ref = parse_reference(reference)
    store = _app(ctx).store()
    out.progress(f"[bold]pull[/] {ref}")
    with _client(ref, insecure=insecure, username=username, password_stdin=password_stdin) as c:
        result = pull_image(
            store, ref, c, name=name, progress=lambda t: out.progress(_blob_line(t))
        )
    data = result.to_dict()

    def render(con: Any, d: Any) -> None:
        con.print(
            f"[green]pulled[/] {d['reference']} as {d['name']}  image {d['image']}  "
            f"({_size(d['bytes_received'])} received)"
        )

    out.emit(data, render)
