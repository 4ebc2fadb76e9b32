"""``graven rollback --to`` takes a release as status and the ledger spell it
(``web@r3``), or its number alone (``r3``, ``3``); graven.model parses all three."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import pytest

from graven.cli import main as cli_main
from graven.cli.context import AppContext
from graven.controller.client import ControllerClient
from graven.errors import ControllerError


class Recorder(ControllerClient):
    """A controller client that records the request and refuses it (no controller)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def request(self, method: str, path: str, body: Any = None, **query: Any) -> NoReturn:
        self.bodies.append(body)
        raise ControllerError("recorded")


@pytest.mark.parametrize("to", ["web@r2", "r2", "2"])
def test_each_spelling_asks_for_the_same_release(
    to: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Recorder()
    monkeypatch.setattr(AppContext, "controller", lambda self: client)
    with pytest.raises(SystemExit) as info:
        cli_main.main(["--state-dir", str(tmp_path), "rollback", "web", "--to", to])
    assert info.value.code == 1  # the recorder's refusal
    assert [b["to"] for b in client.bodies] == [2]


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("api@r2", "error: api@r2 is a release of 'api', not of 'web'"),
        ("two", "error: not a release: 'two' (expected web@r3, r3 or 3)"),
        ("r0", "error: not a release: 'r0'"),
    ],
)
def test_a_release_that_is_not_one_of_the_service_is_a_usage_error(
    to: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = Recorder()
    monkeypatch.setattr(AppContext, "controller", lambda self: client)
    with pytest.raises(SystemExit) as info:
        cli_main.main(["--state-dir", str(tmp_path), "rollback", "web", "--to", to])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert "hint: Run 'graven releases web'" in err
    assert client.bodies == []
