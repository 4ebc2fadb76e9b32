"""A build run (``graven.build.orchestrate``): bases first, results in the order asked
for, the run remembered so the next one is answered without parsing the spec."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.build import fingerprint, orchestrate
from graven.build.builder import StepOutcome
from graven.cli.context import AppContext
from graven.errors import UsageError

SPEC = """\
version: 1
images:
  app:
    base: {image: runtime}
    steps:
      - copy: app
        to: /srv/app
  runtime:
    steps:
      - copy: lib
        to: /opt/lib
      - entrypoint: python3 -m app
  other:
    steps:
      - copy: lib
        to: /lib
      - entrypoint: python3 -m util
"""


class Recorded:
    """A BuildProgress that notes what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def unchanged(self, name: str) -> None:
        self.events.append(("unchanged", name))

    @contextlib.contextmanager
    def image(self, name: str, *, base: bool, steps: int) -> Iterator[Recorded]:
        self.events.append(("image", name, "base" if base else "asked", str(steps)))
        yield self
        self.events.append(("done", name))

    def step(self, step: StepOutcome) -> None:
        self.events.append(("step", str(step.index), "cached" if step.cached else "ran"))

    def line(self, text: str) -> None:
        self.events.append(("line", text))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppContext:
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)  # ctime cannot be set back
    root = tmp_path / "p"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "util.py").write_text("X = 1\n")
    (root / "app").mkdir()
    (root / "app" / "main.py").write_text("print('hi')\n")
    (root / "graven.yaml").write_text(SPEC)
    old = time.time() - 60
    for p in root.rglob("*"):
        os.utime(p, (old, old))
    return AppContext(spec_file=root / "graven.yaml", state_dir_option=tmp_path / "state")


def test_bases_first_results_as_asked_then_answered_unchanged(project: AppContext) -> None:
    shown = Recorded()
    results = orchestrate.build_images(project, ["app"], shown)
    assert [e for e in shown.events if e[0] == "image"] == [
        ("image", "runtime", "base", "2"),
        ("image", "app", "asked", "1"),
    ]
    assert [r.name for r in results] == ["app"]
    (app,) = results
    assert (app.steps_run, app.steps_cached) == (1, 0)
    assert [s.position for s in app.steps] == [0]
    assert app.digest.startswith("sha256:")

    again = Recorded()
    answered = orchestrate.build_images(
        AppContext(project.spec_file, project.state_dir), ["app"], again
    )
    assert again.events == [("unchanged", "app")]
    assert answered == [orchestrate.BuiltImage("app", app.digest, 0, 1)]


def test_everything_by_name_and_no_cache_runs_every_step(project: AppContext) -> None:
    first = orchestrate.build_images(project, [], Recorded())
    assert [r.name for r in first] == ["app", "other", "runtime"]
    shown = Recorded()
    rebuilt = orchestrate.build_images(project, ["other", "app"], shown, no_cache=True)
    assert [r.name for r in rebuilt] == ["other", "app"]
    assert all(r.steps_cached == 0 and r.steps_run == len(r.steps) for r in rebuilt)
    assert ("unchanged", "app") not in shown.events
    assert [r.digest for r in rebuilt] == [r.digest for r in (first[1], first[0])]


def test_an_unknown_image_is_a_usage_error(project: AppContext) -> None:
    with pytest.raises(UsageError, match="no image named 'nope'") as caught:
        orchestrate.build_images(project, ["nope"], Recorded())
    assert caught.value.hint == "Images: app, other, runtime"


def test_the_watched_paths_include_the_bases_sources(project: AppContext) -> None:
    images = project.spec().spec.images
    assert orchestrate.read_paths(images, "app") == ["app", "lib"]
    assert orchestrate.read_paths(images, "runtime") == ["lib"]
