"""Building a spec's images as one run: the no-op check first, then bases before the
images on them, each image's inputs fingerprinted before it is built, the run
remembered for the next no-op check, and results in the order they were asked for.

Front ends (``graven build``, ``graven deploy``, the lean entry point) call
:func:`build_images` and say how progress is shown through :class:`BuildProgress`;
nothing here writes to a terminal.

The result types are NamedTuples, not dataclasses: the no-op answer comes from here
before anything heavy is imported, and ``dataclasses`` (with ``inspect``) would be a
large share of that start-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from graven.build import fingerprint
from graven.errors import UsageError

if TYPE_CHECKING:
    from pathlib import Path

    from graven.build.builder import StepOutcome
    from graven.spec.loader import LoadedSpec
    from graven.spec.recipe import Recipe
    from graven.store.base import ImageStore


class StepRun(NamedTuple):
    """What one recipe step did in a build (``position``: its index in the recipe)."""

    position: int
    kind: str
    cached: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.position,
            "kind": self.kind,
            "cached": self.cached,
            "seconds": self.seconds,
        }


class BuiltImage(NamedTuple):
    """One image a build run asked for: its digest and how many steps ran or were
    cached (``steps`` is empty when the no-op check answered)."""

    name: str
    digest: str
    steps_run: int
    steps_cached: int
    steps: tuple[StepRun, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "steps_run": self.steps_run,
            "steps_cached": self.steps_cached,
            "steps": [s.to_dict() for s in self.steps],
        }


class Project(Protocol):
    """Where a build's inputs are: the spec (its path without parsing it, and parsed),
    the state dir and the content store."""

    @property
    def state_dir(self) -> Path: ...

    def spec_path(self) -> Path: ...

    def spec(self) -> LoadedSpec: ...

    def store(self) -> ImageStore: ...


class ImageProgress(Protocol):
    """Progress of one image's build."""

    def step(self, step: StepOutcome) -> None:
        """A step finished (ran or was answered by the cache)."""

    def line(self, text: str) -> None:
        """A line of detail from inside a step (e.g. an import's progress)."""


class BuildProgress(Protocol):
    """How a front end shows a build run."""

    def unchanged(self, name: str) -> None:
        """The no-op check answered for image ``name``: nothing was built."""

    def image(self, name: str, *, base: bool, steps: int) -> AbstractContextManager[ImageProgress]:
        """Image ``name`` (``base``: only built because an asked-for image starts from
        it) is built inside the returned context; it has ``steps`` steps."""


def unchanged_images(
    state_dir: Path, spec_path: Path, names: Sequence[str]
) -> list[BuiltImage] | None:
    """The last build's results when nothing the images in ``names`` (default: all)
    depend on changed since, else None. Reads no more than the fingerprint record,
    the spec's bytes and the watched files' metadata."""
    fast = fingerprint.unchanged_images(state_dir, spec_path, list(names))
    if fast is None:
        return None
    return [BuiltImage(i["name"], i["digest"], 0, i["steps"]) for i in fast]


def build_images(
    project: Project, names: Sequence[str], progress: BuildProgress, *, no_cache: bool = False
) -> list[BuiltImage]:
    """Build ``names`` (default: every image of the spec), and the spec images they
    start from first; the results of the images asked for, in the order asked for."""
    spec_path = project.spec_path()
    if not no_cache:
        fast = unchanged_images(project.state_dir, spec_path, names)
        if fast is not None:
            for img in fast:
                progress.unchanged(img.name)
            return fast

    from graven.build.builder import build_image, build_order
    from graven.model import Image
    from graven.spec.inputs import MAX_SPEC_BYTES, read_regular_file

    # Read before the spec is parsed, so the bytes remembered are never newer than the
    # build; a FIFO or an oversized file is refused here at once, and reported below.
    try:
        spec_bytes = read_regular_file(spec_path, MAX_SPEC_BYTES)
    except OSError:
        spec_bytes = b""  # load_spec says what is wrong; b"" never matches a record
    loaded = project.spec()
    unknown = [n for n in names if n not in loaded.spec.images]
    if unknown:
        raise UsageError(
            f"no image named {unknown[0]!r} in {loaded.path}",
            hint="Images: " + (", ".join(sorted(loaded.spec.images)) or "(none)"),
        )
    store = project.store()
    state_dir = project.state_dir
    requested = list(dict.fromkeys(names)) or sorted(loaded.spec.images)
    images: dict[str, Image] = {}  # built in this run, for the images based on them
    results: dict[str, BuiltImage] = {}
    built: dict[str, tuple[str, int, list[str], str, float]] = {}
    # Bases first: 'graven build web' builds the spec images web starts from, too.
    for name in build_order(loaded.spec.images, list(names)):
        recipe = loaded.spec.images[name]
        sources = read_paths(loaded.spec.images, name)
        # Taken before the build reads anything: a file edited meanwhile mismatches later.
        sig, newest = fingerprint.signature(loaded.root, sources, state_dir.resolve())
        with progress.image(name, base=name not in requested, steps=len(recipe.steps)) as shown:
            r = build_image(
                name,
                recipe,
                loaded.root,
                store,
                no_cache=no_cache,
                on_step=shown.step,
                built=images,
                on_progress=shown.line,
            )
        images[name] = r.image
        built[name] = (str(r.image.digest), len(r.steps), sources, sig, newest)
        if name in requested:
            results[name] = BuiltImage(
                name,
                str(r.image.digest),
                sum(not s.cached for s in r.steps),
                sum(s.cached for s in r.steps),
                tuple(StepRun(s.index, s.kind, s.cached, s.seconds) for s in r.steps),
            )
    fingerprint.remember(state_dir, spec_path, spec_bytes, built)
    return [results[name] for name in requested]  # in the order asked for, as the no-op answer


def read_paths(recipes: Mapping[str, Recipe], name: str) -> list[str]:
    """Paths image ``name`` depends on: the copy sources and base layouts of its recipe
    and of the spec images it starts from (project-relative), and for ``host-python``
    the host's interpreter and package database (absolute). The no-op check watches
    them."""
    from graven.build.builder import spec_bases
    from graven.spec.recipe import HOST_PYTHON, CopyStep, LayoutBase

    paths: list[str] = []
    for image in [name, *spec_bases(recipes, name)]:
        recipe = recipes[image]
        if isinstance(recipe.base, LayoutBase):
            paths.append(recipe.base.layout)
        elif recipe.base == HOST_PYTHON:
            from graven.build.bases.host_python import host_python_inputs

            paths.extend(host_python_inputs())  # absolute: a Python upgrade is a change
        paths.extend(s.source for s in recipe.steps if isinstance(s, CopyStep))
    return list(dict.fromkeys(paths))
