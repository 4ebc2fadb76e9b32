"""The registry base: ``{registry: HOST/REPO@sha256:...}`` pulled once, then found in
the store by that digest without touching the network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from graven.build.bases.common import imported, located, remember_import
from graven.errors import GravenError, UsageError
from graven.model import Image
from graven.spec.recipe import RegistryBase
from graven.store.base import ImageStore


def registry_base(
    base: RegistryBase,
    store: ImageStore,
    where: str,
    on_progress: Callable[[str], None] | None,
) -> Image:
    from graven.reference import local_name_for, parse_reference
    from graven.store.registry.auth import find_credentials
    from graven.store.registry.client import RegistryClient
    from graven.store.registry.transfer import pull_image

    try:
        ref = parse_reference(base.registry)
    except GravenError as e:
        raise located(where, e) from None
    if ref.digest is None:  # the spec model rejects this; a library caller may not
        raise UsageError(
            f"{where}: {base.registry!r} is not pinned by digest",
            hint="Pin it: 'graven pull' prints the digest (HOST/REPO@sha256:...).",
        )
    if (image := imported(store, ref.digest)) is not None:
        return image
    if on_progress is not None:
        on_progress(f"base: pulling {ref}")
    # A name of its own, never the repository's bare name: that could be a spec image.
    local = f"{local_name_for(ref.repository)[:50].rstrip('-')}-{ref.digest.hex[:12]}"
    try:
        credentials = find_credentials(ref.registry)
        with RegistryClient(ref.registry, credentials=credentials) as client:
            pulled = pull_image(store, ref, client, name=local)
        image = store.get_image(pulled.image)
    except GravenError as e:
        raise located(where, e) from None
    remember_import(store, ref.digest, image)
    if pulled.manifest_digest != ref.digest:  # an index: remember its platform's manifest too
        remember_import(store, pulled.manifest_digest, image)
    return replace(image, name=local)
