"""The lean entry path (``graven.cli.entry``): it recognises ``build`` and ``rollback``
and runs the very functions the click verbs run, with the same error mapping
(``graven.cli.exits``); everything else goes to the full CLI."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from graven.cli import entry
from graven.cli.exits import StoppedWatching, exit_code, report_error
from graven.cli.rollouts import wait_rollouts
from graven.errors import ControllerNotRunning, NotFoundError, SpecError, SpecProblem

COLOR_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_color_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in COLOR_ENV:
        monkeypatch.delenv(name, raising=False)


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
    assert entry.recognised(argv) is None
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


@pytest.mark.parametrize(
    ("rest", "expected"),
    [
        ([], ([], False, "text")),
        (["web", "api", "-o", "json"], (["web", "api"], False, "json")),
        (["--no-cache", "web", "--output", "text"], (["web"], True, "text")),
    ],
)
def test_build_arguments_it_handles(rest: list[str], expected: tuple[object, ...]) -> None:
    assert entry._build_args(rest) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["build", "--bogus"],
        ["build", "-o", "yaml"],
        ["build", "-ojson"],
        ["build", "--no-cache", "--no-cache"],
        ["build", "-o", "json", "-o", "text"],
        ["build", "--help"],
        ["--debug", "build"],
    ],
)
def test_build_arguments_it_leaves_to_the_full_cli(argv: list[str]) -> None:
    assert entry.recognised(argv) is None


def test_both_paths_give_the_same_answer_without_a_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No spec and no state dir: the lean call and the click verb fail alike."""
    import graven.cli.main as full

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRAVEN_STATE_DIR", raising=False)
    for argv in (["rollback", "web"], ["build", "-o", "json"]):
        run = entry.recognised(argv)
        assert run is not None
        lean_code = exit_code(run, debug=False, as_json="json" in argv)
        lean = capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            full.main(argv)
        assert (lean_code, lean.out, lean.err) == (info.value.code, *capsys.readouterr())
        assert lean_code == 2
        assert "no graven.yaml" in lean.out + lean.err


def test_a_missing_socket_is_controller_not_running(tmp_path: Path) -> None:
    from graven.controller.client import ControllerClient

    with pytest.raises(ControllerNotRunning, match="cannot reach the controller"):
        ControllerClient(tmp_path).request("GET", "/v1/health")


# --- Ctrl-C while waiting ----------------------------------------------------------------


class _InterruptedClient:
    """A controller client whose user presses Ctrl-C during the first poll."""

    def rollout(self, rollout_id: int) -> object:
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


# --- the recogniser and the click verbs agree --------------------------------------------


def _option_names(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts}


def test_the_recogniser_knows_the_click_verbs_options() -> None:
    """Every option of the click verb is recognised (its help option, added by click,
    goes to the full CLI): the lean path cannot fall behind a new option unnoticed."""
    from graven.cli.build_cmds import build
    from graven.cli.deploy_cmds import rollback

    assert _option_names(build) == {*entry.BUILD_FLAGS, *entry.BUILD_VALUES}
    assert _option_names(rollback) == {*entry.ROLLBACK_FLAGS, *entry.ROLLBACK_VALUES}
