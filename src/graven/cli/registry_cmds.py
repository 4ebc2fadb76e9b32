"""``graven push`` and ``graven pull``: images to and from an OCI registry.

Listed in ``graven.cli.main.VERBS``, which registers them on the root group; the
registry client is imported only when one of these verbs runs.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

import click

from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output, ProgressBar
from graven.errors import UsageError

if TYPE_CHECKING:
    from graven.cli.lines import Line
    from graven.model import Digest, Image
    from graven.reference import RegistryRef
    from graven.store.cas import ContentStore
    from graven.store.oci_export.documents import OciImage
    from graven.store.registry.client import RegistryClient
    from graven.store.registry.transfer import BlobTransfer
    from graven.store.registry.wire import BlobStream

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


class _Transfers:
    """Feeds a byte bar: a row per blob while its bytes travel, the overall bar, and
    the blob's line once it is done (the only output where no bar is shown)."""

    def __init__(self, bar: ProgressBar) -> None:
        self._bar = bar
        self._rows: dict[str, tuple[ProgressBar, int]] = {}  # digest -> (row, bytes so far)

    def moved(self, digest: Digest, size: int, n: int) -> None:
        row, counted = self._rows.get(digest) or (self._bar.child(f"  {digest.short}", size), 0)
        self._rows[digest] = (row, counted + n)
        row.advance(n)
        # A retried upload sends bytes again: the overall bar counts each byte once.
        self._bar.advance(max(0, min(n, size - counted)))

    def done(self, transfer: BlobTransfer) -> None:
        row, counted = self._rows.pop(transfer.digest, (None, 0))
        if row is not None:
            row.remove()
        # A blob already there or mounted moved no bytes but is done all the same.
        self._bar.advance(max(0, transfer.size - counted))
        self._bar.line(_blob_line(transfer))


class _CountingRaw(io.RawIOBase):
    """A download's raw stream that reports every read, so a bar can follow it."""

    def __init__(self, inner: io.RawIOBase, on_read: Callable[[int], None]) -> None:
        super().__init__()
        self._inner, self._on_read = inner, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any, /) -> int | None:
        n = self._inner.readinto(buffer)
        if n:
            self._on_read(n)
        return n

    @property
    def received(self) -> int:  # what BlobStream.received reads
        return int(getattr(self._inner, "received", 0))

    def close(self) -> None:
        self._inner.close()
        super().close()


def _metered(transfers: _Transfers) -> type[RegistryClient]:
    """The registry client, telling ``transfers`` about bytes as they go up or down.

    push_image and pull_image report whole blobs; the client's own ``on_sent`` hook
    and its download stream see the bytes, so the bar moves while a layer travels.
    """
    from graven.store.registry.client import RegistryClient
    from graven.store.registry.wire import BlobStream

    class MeteredClient(RegistryClient):
        def upload_blob(
            self,
            repository: str,
            digest: Digest,
            size: int,
            open_blob: Callable[[], BinaryIO],
            *,
            location: str | None = None,
            on_sent: Callable[[int], None] | None = None,
        ) -> int:
            def sent(n: int) -> None:
                transfers.moved(digest, size, n)
                if on_sent is not None:
                    on_sent(n)

            return super().upload_blob(
                repository, digest, size, open_blob, location=location, on_sent=sent
            )

        @contextlib.contextmanager
        def open_blob(self, repository: str, digest: Digest, size: int) -> Iterator[BlobStream]:
            with super().open_blob(repository, digest, size) as stream:
                raw = _CountingRaw(
                    cast(io.RawIOBase, stream.raw), lambda n: transfers.moved(digest, size, n)
                )
                with BlobStream(cast(Any, raw)) as counted:
                    yield counted

    return MeteredClient


def _client(
    ref: RegistryRef,
    *,
    insecure: bool,
    username: str | None,
    password_stdin: bool,
    transfers: _Transfers | None = None,
) -> RegistryClient:
    from graven.store.registry.auth import find_credentials
    from graven.store.registry.client import RegistryClient

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError(
                "--password-stdin read an empty password",
                hint='Pipe the password in: printf %s "$PASSWORD" | graven push ...',
            )
    credentials = find_credentials(ref.registry, username=username, password=password)
    client = RegistryClient if transfers is None else _metered(transfers)
    return client(ref.registry, insecure=insecure, credentials=credentials)


def _documents(out: Output, store: ContentStore, image: Image, compression: str) -> OciImage:
    """The image's OCI documents, its layers compressed (or found cached) under a bar;
    push_image then finds every layer cached."""
    from graven.store.oci_export.compress import check_compression
    from graven.store.oci_export.documents import oci_documents

    with out.bar("prepare layers") as bar:
        return oci_documents(
            store,
            image,
            check_compression(compression),
            progress=lambda p: bar.update(completed=p.index + 1, total=p.count),
        )


def _blob_line(t: BlobTransfer) -> Line:
    from graven.cli import render_local
    from graven.store.oci_types import DOCKER_CONFIG, OCI_CONFIG

    return render_local.blob_moved(t, config=t.media_type in (OCI_CONFIG, DOCKER_CONFIG))


@click.command()
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
    from graven.cli import render_local
    from graven.reference import parse_reference
    from graven.store.registry.transfer import push_image

    out = Output(output)
    ref = parse_reference(reference)
    store = app_context(ctx).store()
    img = store.resolve(image)
    label = img.name or img.digest.short
    out.progress(render_local.pushing(label, str(ref)))
    oci = _documents(out, store, img, compression)
    total = sum({layer.digest: layer.size for layer in oci.layers}.values()) + len(oci.config)
    with out.bar(f"push {label}", total=total, unit="bytes") as bar:
        transfers = _Transfers(bar)
        with _client(
            ref,
            insecure=insecure,
            username=username,
            password_stdin=password_stdin,
            transfers=transfers if bar.shown else None,
        ) as c:
            result = push_image(
                store, img, ref, c, compression=compression, progress=transfers.done
            )
    out.show({"name": img.name, **result.to_dict()}, render_local.pushed(result))


@click.command()
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
    from graven.cli import render_local
    from graven.reference import parse_reference
    from graven.store.registry.transfer import pull_image

    out = Output(output)
    ref = parse_reference(reference)
    store = app_context(ctx).store()
    out.progress(render_local.pulling(str(ref)))
    with out.bar(f"pull {ref.repository}", unit="bytes") as bar:
        transfers = _Transfers(bar)
        with _client(
            ref,
            insecure=insecure,
            username=username,
            password_stdin=password_stdin,
            transfers=transfers if bar.shown else None,
        ) as c:
            result = pull_image(store, ref, c, name=name, progress=transfers.done)
    out.show(result.to_dict(), render_local.pulled(result))
