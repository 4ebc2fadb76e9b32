"""The process runtime names why an instance could not start or how it ended."""

from __future__ import annotations

from pathlib import Path

import pytest

from graven import detached
from graven.errors import RuntimeFailure
from graven.model import ImageConfig
from graven.runtime.base import LaunchSpec
from graven.runtime.process import ProcessRuntime
from graven.store.cas import ContentStore
from graven.store.tree_model import Tree


def launch(
    tmp_path: Path, entrypoint: tuple[str, ...], env: dict[str, str] | None = None
) -> tuple[ProcessRuntime, LaunchSpec]:
    store = ContentStore(tmp_path / "store")
    image = store.put_image(store.put_tree(Tree.of([])), ImageConfig(entrypoint=entrypoint))
    runtime = ProcessRuntime(tmp_path / "state", store)
    spec = LaunchSpec(
        instance_id="web-r1-0001",
        service="web",
        release=1,
        image=image,
        env=tuple((env or {}).items()),
        port=1,
    )
    return runtime, spec


def test_a_nul_byte_in_the_env_is_a_clear_start_failure(tmp_path: Path) -> None:
    runtime, spec = launch(tmp_path, ("sh", "-c", "sleep 5"), {"TOKEN": "a\0b"})
    with pytest.raises(RuntimeFailure, match="embedded null byte") as err:
        runtime.start(spec)
    assert "graven check" in (err.value.hint or "")


def test_a_missing_program_is_a_clear_start_failure(tmp_path: Path) -> None:
    runtime, spec = launch(tmp_path, ("no-such-program-anywhere",))
    with pytest.raises(RuntimeFailure, match="neither in the image nor on the host PATH"):
        runtime.start(spec)


def test_how_an_instance_ended_is_known(tmp_path: Path) -> None:
    runtime, spec = launch(tmp_path, ("sh", "-c", "exit 3"))
    handle = runtime.start(spec)
    assert detached.wait_until(lambda: not runtime.alive(handle), 10)
    assert runtime.exit_reason(handle) == "exited with code 3"
    runtime.forget(handle)
    assert runtime.exit_reason(handle) == ""
