"""``graven build`` without click: the verb's body, which both entry paths run, and
the build ``deploy`` and ``plan`` start with. The run itself is
:func:`graven.build.orchestrate.build_images`; this module shows its progress."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from graven.build.orchestrate import BuiltImage, build_images
from graven.cli import render

if TYPE_CHECKING:
    from graven.build.builder import StepOutcome
    from graven.cli.context import AppContext
    from graven.cli.output import Output, ProgressBar


class _ImageShown:
    """One image's build on a progress bar (or as plain lines where none is shown)."""

    def __init__(self, bar: ProgressBar) -> None:
        self._bar = bar

    def step(self, step: StepOutcome) -> None:
        self._bar.line(render.step_done(step))
        self._bar.update(completed=step.index + 1)

    def line(self, text: str) -> None:
        self._bar.line((f"  {text}",))


class _BuildShown:
    """A build run's progress through an :class:`~graven.cli.output.Output`."""

    def __init__(self, out: Output) -> None:
        self._out = out

    def unchanged(self, name: str) -> None:
        self._out.progress(render.nothing_changed(name))

    @contextlib.contextmanager
    def image(self, name: str, *, base: bool, steps: int) -> Iterator[_ImageShown]:
        self._out.progress(render.building(name, base=base))
        with self._out.bar(f"build {name}", total=steps) as bar:
            yield _ImageShown(bar)


def build(
    app: AppContext, names: Sequence[str], out: Output, *, no_cache: bool = False
) -> list[BuiltImage]:
    """Build ``names`` (default: all), progress shown on ``out``."""
    return build_images(app, names, _BuildShown(out), no_cache=no_cache)


def build_verb(app: AppContext, names: Sequence[str], out: Output, *, no_cache: bool) -> int:
    """``graven build``: build, then show the results. The exit code."""
    images = build(app, names, out, no_cache=no_cache)
    out.show({"images": [i.to_dict() for i in images]}, render.built(images))
    return 0
