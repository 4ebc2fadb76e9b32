"""The lean CLI paths (``graven.cli.entry``, ``graven.cli.plain``): they must print what
the full CLI prints, and hand everything they do not recognise to it."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.errors import MarkupError

from graven.cli import entry
from graven.cli.plain import PlainConsole, plain_text, report_error, unstyled
from graven.cli.rollouts import StoppedWatching, render_results, wait_rollouts
from graven.errors import ControllerNotRunning, NotFoundError, SpecError, SpecProblem

COLOR_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_color_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in COLOR_ENV:
        monkeypatch.delenv(name, raising=False)


def rich_prints(markup: str) -> str:
    out = io.StringIO()
    Console(file=out, highlight=False, soft_wrap=True).print(markup)
    return out.getvalue()


# --- plain text is rich's text, or rich decides --------------------------------------

TEMPLATES = (
    "[bold]rollback[/] {0} -> {1}",
    "[green]{0}[/]: already at {1}; nothing to do",
    "[yellow]rollback {0}[/]: {1}",
    "[green]rollback {0}[/]: {1} serving",
    "[red]rollback {0} {1}[/]: {2}",
    "url: {0}",
    "  {0}: {1}",
)
PIECES = [*"ab:/.-_ []\\\t\n@é+1", "[/]", "[red]", ":smile:", "::"]
TRICKY = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


@given(st.sampled_from(TEMPLATES), st.lists(TRICKY, min_size=3, max_size=3))
def test_plain_text_is_what_rich_prints_or_none(template: str, values: list[str]) -> None:
    markup = template.format(*values)
    text = plain_text(markup)
    try:
        printed = rich_prints(markup)
    except MarkupError:
        assert text is None
        return
    assert text is None or text + "\n" == printed


@pytest.mark.parametrize(
    "markup",
    [
        "[bold]rollback[/] hello -> hello@r1",
        "[red]rollback hello failed[/]: ",
        "url: http://127.0.0.1:8080/",
        "  hello: step 2/5: switch traffic to hello@r1",
        "  hello: paused: awaiting promote; run 'graven promote hello' to go on",
    ],
)
def test_graven_lines_come_out_plain(markup: str) -> None:
    assert plain_text(markup) is not None
    assert plain_text(markup) + "\n" == rich_prints(markup)  # type: ignore[operator]


@pytest.mark.parametrize("markup", ["x :smile: y", "a [link] b", "tab\there", "café", "[/]x"])
def test_lines_rich_might_change_are_left_to_rich(markup: str) -> None:
    assert plain_text(markup) is None


def test_plain_console_writes_plain_lines_and_hands_the_rest_to_rich(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    con = PlainConsole()
    con.print("[green]rollback hello[/]: hello@r1 serving")
    con.print("thumbs :+1: up")
    assert out.getvalue() == "rollback hello: hello@r1 serving\nthumbs 👍 up\n"


def test_a_terminal_is_left_to_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    assert unstyled(io.StringIO())
    assert not unstyled(Tty())
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not unstyled(io.StringIO())
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    assert unstyled(Tty())


# --- errors: as click showed them ------------------------------------------------------


def click_shows(exc: NotFoundError, stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    click.secho(f"error: {exc.message}", fg="red", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)
    return stream.getvalue()


@pytest.mark.parametrize("stream_type", [io.StringIO, Tty])
@pytest.mark.parametrize(
    "exc",
    [
        NotFoundError("service 'nope' was never deployed"),
        NotFoundError("hello@r9 does not exist", hint="Run 'graven releases hello'."),
        NotFoundError("odd \033[1mbold\033[0m input"),
    ],
)
def test_errors_read_as_click_shows_them(
    exc: NotFoundError, stream_type: type[io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = click_shows(exc, stream_type(), monkeypatch)
    mine = stream_type()
    monkeypatch.setattr(sys, "stderr", mine)
    report_error(exc, as_json=False)
    assert mine.getvalue() == expected


def test_json_errors_keep_their_key_order(capsys: pytest.CaptureFixture[str]) -> None:
    report_error(SpecError([SpecProblem("graven.yaml", 3, "services", "bad")]), as_json=True)
    assert capsys.readouterr().out.startswith('{\n  "error": "SpecError",\n  "message"')


# --- the shared renderer ---------------------------------------------------------------


def test_a_rollout_not_waited_for_is_not_called_failed(capsys: pytest.CaptureFixture[str]) -> None:
    data = {
        "results": [{"service": "hello", "changed": True, "release": "hello@r1", "rollout": 4}],
        "url": None,
    }
    render_results(PlainConsole(), data, "rollback")
    assert (
        capsys.readouterr().out == "rollback hello: hello@r1 recorded; rolling out (not waiting)\n"
    )


# --- what the rollback path recognises ---------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["rollback", "web"], ("web", None, "rollback", False, "text")),
        (
            ["rollback", "-m", "bad v2", "web", "--no-wait", "--to", "3", "-o", "json"],
            ("web", 3, "bad v2", True, "json"),
        ),
        (
            ["rollback", "web", "--message", "", "--output", "text"],
            ("web", None, "", False, "text"),
        ),
        (["rollback", "web", "--detach"], ("web", None, "rollback", True, "text")),
    ],
)
def test_rollback_arguments_it_handles(argv: list[str], expected: tuple[object, ...]) -> None:
    split = entry._split_globals(argv, "rollback")
    assert split is not None
    assert entry._rollback_args(split[2]) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["rollback"],
        ["rollback", "a", "b"],
        ["rollback", "web", "--bogus"],
        ["rollback", "web", "-o", "yaml"],
        ["rollback", "web", "-ojson"],
        ["rollback", "web", "--output=json"],
        ["rollback", "web", "--to", "two"],
        ["rollback", "web", "--to", "-1"],
        ["rollback", "web", "--to", "1", "--to", "2"],
        ["rollback", "web", "-m"],
        ["rollback", "web", "-m", "--no-wait"],
        ["rollback", "web", "--", "x"],
        ["rollback", "--help"],
        ["--debug", "rollback", "web"],
        ["--version"],
        ["status", "web"],
        [],
    ],
)
def test_what_it_does_not_recognise_goes_to_the_full_cli(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert entry._fast_rollback(argv) is None
    import graven.cli.main as full

    calls: list[list[str]] = []
    monkeypatch.setattr(full, "main", calls.append)
    monkeypatch.setattr(sys, "argv", ["graven", *argv])
    entry.main()
    assert calls == [argv]


def test_values_click_would_refuse_go_to_the_full_cli(tmp_path: Path) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert entry._split_globals(["-f", str(tmp_path), "rollback", "web"], "rollback") is None
    assert entry._split_globals(["--state-dir", str(a_file), "rollback", "web"], "rollback") is None
    assert entry._split_globals(["-f", "x", "-f", "y", "rollback"], "rollback") is None


def test_no_controller_means_not_handled_and_nothing_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert entry._fast_rollback(["--state-dir", str(state), "rollback", "web"]) is None
    assert not state.exists()


def test_no_spec_means_not_handled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRAVEN_STATE_DIR", raising=False)
    assert entry._fast_rollback(["rollback", "web"]) is None


def test_a_missing_socket_is_controller_not_running(tmp_path: Path) -> None:
    from graven.controller.client import ControllerClient

    with pytest.raises(ControllerNotRunning, match="cannot reach the controller"):
        ControllerClient(tmp_path).request("GET", "/v1/health")


# --- Ctrl-C while waiting ----------------------------------------------------------------


class _InterruptedClient:
    """A controller client whose user presses Ctrl-C during the first poll."""

    def request(self, method: str, path: str, body: object = None, **query: object) -> object:
        raise KeyboardInterrupt


def test_ctrl_c_while_waiting_stops_watching_not_the_rollout() -> None:
    client: Any = _InterruptedClient()
    with pytest.raises(StoppedWatching) as caught:
        wait_rollouts(client, {"hello": 3}, lambda line: None)
    assert caught.value.exit_code == 130
    assert caught.value.message == (
        "stopped watching; the rollout goes on — 'graven status -w' to follow, "
        "'graven abort hello' to stop it"
    )
    with pytest.raises(StoppedWatching) as caught:
        wait_rollouts(client, {"web": 3, "api": 4}, lambda line: None)
    assert "'graven abort SERVICE' to stop it (rolling out: api, web)" in caught.value.message
