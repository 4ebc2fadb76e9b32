"""When a controller may exit by itself: only with nothing to look after."""

from __future__ import annotations

from pathlib import Path

import pytest

from graven.controller.daemon import DEFAULT_IDLE, has_work, idle_limit
from graven.errors import ControllerError
from tests.unit.test_engine import World, config


def test_idle_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAVEN_CONTROLLER_IDLE", raising=False)
    assert idle_limit(DEFAULT_IDLE) == DEFAULT_IDLE
    assert idle_limit(None) is None  # 'graven serve' stays unless told otherwise
    monkeypatch.setenv("GRAVEN_CONTROLLER_IDLE", "2.5")
    assert idle_limit(None) == 2.5
    monkeypatch.setenv("GRAVEN_CONTROLLER_IDLE", "0")
    assert idle_limit(DEFAULT_IDLE) is None


@pytest.mark.parametrize("raw", ["soon", "-1", "inf", "nan"])
def test_a_bad_idle_limit_says_what_is_wrong(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("GRAVEN_CONTROLLER_IDLE", raw)
    with pytest.raises(ControllerError) as caught:
        idle_limit(DEFAULT_IDLE)
    assert "GRAVEN_CONTROLLER_IDLE" in caught.value.message and repr(raw) in caught.value.message
    assert caught.value.hint


def test_work_is_anything_running_or_wanted(tmp_path: Path) -> None:
    world = World(tmp_path)
    assert not has_work(world.engine)
    world.deploy(world.v1, config(replicas=1))
    assert has_work(world.engine)  # wanted, nothing started yet
    world.converge()
    assert has_work(world.engine)  # serving: the health loop must stay
    world.engine.commands.down("web", "ana@host", "done")
    assert has_work(world.engine)  # taking down, instances still running
    world.converge()
    assert world.router.running() == {}
    assert not has_work(world.engine)
    world.router.ensure("stray", 19090)  # a router left running is still work
    assert has_work(world.engine)
