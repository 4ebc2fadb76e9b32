"""A write the filesystem refuses (full, over quota, read-only) ends any verb with a
message, a hint and exit 1: on the click path and on the lean paths, text and JSON."""

from __future__ import annotations

import errno
import json
import sys
from typing import NoReturn

import pytest

from graven.cli import entry
from graven.cli import main as cli_main
from graven.cli.context import AppContext


def refuse(*args: object, **kwargs: object) -> NoReturn:
    raise OSError(errno.ENOSPC, "No space left on device", "/srv/state/store/blob")


def test_the_click_path_shows_a_message_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(AppContext, "spec", refuse)
    with pytest.raises(SystemExit) as info:
        cli_main.main(["check"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write /srv/state/store/blob: no space left on device\n")
    assert "hint: Free space" in err
    assert "Traceback" not in err


def test_json_output_gets_the_error_as_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(AppContext, "spec", refuse)
    with pytest.raises(SystemExit) as info:
        cli_main.main(["check", "-o", "json"])
    assert info.value.code == 1
    data = json.loads(capsys.readouterr().out)
    assert data["error"] == "DiskError"
    assert data["message"].endswith("no space left on device")


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AppContext, "spec", refuse)
    with pytest.raises(OSError, match="No space left"):
        cli_main.main(["--debug", "check"])


def test_other_errors_are_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> NoReturn:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(AppContext, "spec", broken)
    with pytest.raises(OSError, match="Input/output"):
        cli_main.main(["check"])


@pytest.mark.parametrize("argv", [["build", "-o", "json"], ["rollback", "web", "-o", "json"]])
def test_the_lean_paths_show_a_message_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setattr(AppContext, "spec_path", refuse)
    monkeypatch.setattr(AppContext, "state_dir", property(refuse))
    monkeypatch.setattr(cli_main, "main", lambda argv: pytest.fail("took the full CLI"))
    monkeypatch.setattr(sys, "argv", ["graven", *argv])
    with pytest.raises(SystemExit) as info:
        entry.main()
    assert info.value.code == 1
    data = json.loads(capsys.readouterr().out)
    assert data["error"] == "DiskError"
    assert data["hint"].startswith("Free space")
