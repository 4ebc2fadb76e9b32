"""Where a recipe starts: ``resolve_base`` finds the image a recipe's ``base`` names
(scratch, a spec image built earlier, a stored image, an OCI layout, a registry image)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from graven.build.bases.common import located
from graven.build.bases.host_python import host_python_base
from graven.build.bases.layout import layout_base
from graven.build.bases.registry import registry_base
from graven.errors import BuildError, GravenError
from graven.model import Image
from graven.spec.recipe import HOST_PYTHON, ImageBase, LayoutBase, Recipe, RegistryBase
from graven.store.base import ImageStore


def resolve_base(
    name: str,
    recipe: Recipe,
    context_dir: Path,
    store: ImageStore,
    *,
    built: Mapping[str, Image] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Image | None:
    """The image ``recipe`` (of image ``name``) starts from; None for ``scratch``.

    - ``host-python``: this host's Python closure, made once per store
      (``host_python_base``);
    - ``{image: NAME}``: the image ``built[NAME]``, built earlier in this run;
    - ``{image: sha256:...}`` or ``{image: NAME@sha256:...}``: that image in ``store``;
    - ``{layout: DIR, ref: REF}``: imported from the OCI layout ``context_dir/DIR``, or
      found in the store when its manifest digest was imported before;
    - ``{registry: HOST/REPO@sha256:...}``: found in the store by that digest, else
      pulled (credentials as ``find_credentials`` finds them; plain HTTP to loopback)
      and tagged ``REPO-<12 hex of the digest>`` so ``graven images`` shows it.

    Errors name the key path (``images.NAME.base...``) and keep their class: an
    unknown image or a broken layout is a usage error (exit 2), an unreachable registry
    or a digest that does not match a failure (exit 1)."""
    base = recipe.base
    where = f"images.{name}.base"
    if base == HOST_PYTHON:
        try:
            return host_python_base(store, on_progress=on_progress)
        except GravenError as e:
            raise located(where, e) from None
    if isinstance(base, ImageBase):
        return _image_base(base, store, built or {}, f"{where}.image")
    if isinstance(base, LayoutBase):
        return layout_base(base, Path(context_dir), store, f"{where}.layout", on_progress)
    if isinstance(base, RegistryBase):
        return registry_base(base, store, f"{where}.registry", on_progress)
    return None


def _image_base(
    base: ImageBase, store: ImageStore, built: Mapping[str, Image], where: str
) -> Image:
    if base.spec_image is not None:
        image = built.get(base.spec_image)
        if image is None:
            raise BuildError(
                f"{where}: image {base.spec_image!r} has not been built yet",
                hint="Build the base first ('graven build' builds bases before the images"
                " on them).",
            )
        return image
    try:
        return store.resolve(base.image)
    except GravenError as e:
        raise located(where, e) from None
