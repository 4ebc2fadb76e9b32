"""The renderers of build, deploy and rollback results, and the writer of their
styled lines: rendered into a StringIO (plain) and into a fake terminal (rich)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from graven.build.builder import StepOutcome
from graven.build.orchestrate import BuiltImage, StepRun
from graven.cli import render
from graven.cli.lines import Line, LineWriter, Span, unstyled
from graven.controller.results import RollbackResult, RolloutView

COLOR_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_color_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in COLOR_ENV:
        monkeypatch.delenv(name, raising=False)


def written(lines: list[Line], file: io.StringIO | None = None) -> str:
    out = file if file is not None else io.StringIO()
    LineWriter(file=out).write_all(lines)
    return out.getvalue()


def rich_prints(markup: str, file: io.StringIO) -> str:
    Console(file=file, highlight=False, soft_wrap=True).print(markup)
    return file.getvalue()


# --- build ---------------------------------------------------------------------------


def test_built_images_one_line_each() -> None:
    images = [
        BuiltImage("web", "sha256:ab", 2, 3, (StepRun(0, "copy", False, 0.5),)),
        BuiltImage("base", "sha256:cd", 0, 4),
    ]
    assert written(render.built(images)) == (
        "built web sha256:ab  (2 step(s) ran, 3 cached)\n"
        "built base sha256:cd  (0 step(s) ran, 4 cached)\n"
    )


def test_build_progress_lines() -> None:
    ran = StepOutcome(1, "run", "pip install [extras]", False, 1.234, "k")
    cached = StepOutcome(0, "copy", "app -> /app", True, 0.0, "k")
    assert written(
        [
            render.building("web", base=False),
            render.building("py", base=True),
            render.step_done(cached),
            render.step_done(ran),
            render.nothing_changed("web"),
        ]
    ) == (
        "build web\n"
        "build py (a base)\n"
        "  step 1 copy       cached  app -> /app\n"
        "  step 2 run        ran 1.23s  pip install [extras]\n"
        "build web: nothing changed since the last build\n"
    )


def test_built_image_json_is_the_build_result_shape() -> None:
    image = BuiltImage("web", "sha256:ab", 1, 0, (StepRun(0, "copy", False, 0.25),))
    assert image.to_dict() == {
        "name": "web",
        "digest": "sha256:ab",
        "steps_run": 1,
        "steps_cached": 0,
        "steps": [{"index": 0, "kind": "copy", "cached": False, "seconds": 0.25}],
    }


# --- rollouts --------------------------------------------------------------------------


def rollout_view(state: str, progress: str = "", reason: str = "") -> RolloutView:
    return RolloutView(
        id=4,
        service="hello",
        kind="rollback",
        from_release=2,
        to_release=1,
        state=state,
        reason=reason,
        progress=progress,
        started_at=1700000000.0,
        finished_at=None if state == "running" else 1700000001.0,
    )


def outcome(ended: RolloutView | None = None, *, changed: bool = True) -> render.ServiceOutcome:
    change = RollbackResult(changed, "hello@r1", 4 if changed else None)
    return render.ServiceOutcome.of("hello", change, ended)


def test_how_each_rollout_ended() -> None:
    results = [
        outcome(changed=False),
        outcome(),
        outcome(rollout_view("running", "paused: awaiting promote")),
        outcome(rollout_view("succeeded")),
        outcome(rollout_view("aborted", reason="health check failed")),
    ]
    assert written(render.outcomes(results, "rollback", "http://127.0.0.1:8080/")) == (
        "hello: already at hello@r1; nothing to do\n"
        "rollback hello: hello@r1 recorded; rolling out (not waiting)\n"
        "rollback hello: paused: awaiting promote\n"
        "rollback hello: hello@r1 serving\n"
        "rollback hello aborted: health check failed\n"
        "url: http://127.0.0.1:8080/\n"
    )
    assert render.any_failed(results)
    assert not render.any_failed(results[:4])


def test_changes_recorded_and_rollout_progress() -> None:
    assert written(
        [
            render.change_recorded("rollback", "hello", "hello@r1"),
            render.change_recorded("deploy", "hello", "hello@r2", changed=False),
            render.change_recorded("promote", "hello", "hello@r2"),
            render.rollout_step("hello", "step 2/5: switch traffic"),
            render.following("hello", 7),
            render.followed("hello", "failed", "no healthy instance"),
            render.followed("hello", "succeeded", None),
        ]
    ) == (
        "rollback hello -> hello@r1\n"
        "deploy hello: hello@r2 (unchanged)\n"
        "promote hello: hello@r2\n"
        "  hello: step 2/5: switch traffic\n"
        "following hello: rollout #7\n"
        "  hello: failed — no healthy instance\n"
        "  hello: succeeded\n"
    )


# --- the writer ------------------------------------------------------------------------


def test_text_is_never_read_as_markup() -> None:
    """A reason with brackets, backslashes or emoji codes prints as it is."""
    odd = outcome(rollout_view("failed", reason=r"[red]x[/] :smile: \[y]"))
    assert written(render.outcomes([odd], "rollback", None)) == (
        "rollback hello failed: [red]x[/] :smile: \\[y]\n"
    )


def test_a_terminal_gets_the_styles_rich_gives_the_same_markup() -> None:
    line = render.outcomes([outcome(rollout_view("succeeded"))], "rollback", None)
    drawn = Tty()
    LineWriter(file=drawn).write(line[0])
    assert "\033[" in drawn.getvalue()
    assert drawn.getvalue() == rich_prints("[green]rollback hello[/]: hello@r1 serving", Tty())


def test_a_given_console_draws_every_line() -> None:
    file = io.StringIO()
    LineWriter(through=Console(file=file, force_terminal=True)).write((Span("ok", "bold"), " x"))
    assert file.getvalue() == "\033[1mok\033[0m x\n"


def test_what_counts_as_unstyled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert unstyled(io.StringIO())
    assert not unstyled(Tty())
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not unstyled(io.StringIO())
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    assert unstyled(Tty())
