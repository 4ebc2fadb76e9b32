"""``graven init`` writes a project that loads, and never clobbers one."""

from __future__ import annotations

from pathlib import Path

import pytest

from graven.errors import UsageError
from graven.spec import load_spec, scaffold


def test_scaffold_writes_a_project_that_loads(tmp_path: Path) -> None:
    written = scaffold(tmp_path / "new")

    assert written == [tmp_path / "new" / "graven.yaml", tmp_path / "new" / "app" / "app.py"]
    spec = load_spec(tmp_path / "new" / "graven.yaml").spec
    hello = spec.services["hello"]
    assert (hello.image, hello.replicas, hello.port) == ("hello", 2, 8080)
    assert hello.health.path == "/healthz"
    assert hello.env == {"VERSION": "v1"}
    steps = [s.model_dump(by_alias=True) for s in spec.images["hello"].steps]
    assert steps == [
        {"copy": "app", "to": "/app"},
        {"workdir": "/app"},
        {"entrypoint": ["python3", "app.py"]},
    ]
    compile((tmp_path / "new" / "app" / "app.py").read_text(), "app.py", "exec")


def test_scaffold_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.py").write_text("mine\n")

    with pytest.raises(UsageError, match=r"app\.py already exists") as info:
        scaffold(tmp_path)

    assert info.value.hint is not None
    assert "--force" in info.value.hint
    # Checked before writing anything: no graven.yaml either.
    assert not (tmp_path / "graven.yaml").exists()
    assert (tmp_path / "app" / "app.py").read_text() == "mine\n"


def test_scaffold_force_overwrites(tmp_path: Path) -> None:
    (tmp_path / "graven.yaml").write_text("old\n")

    scaffold(tmp_path, force=True)

    assert load_spec(tmp_path / "graven.yaml").spec.services["hello"].port == 8080
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_scaffold_into_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "occupied").write_text("a file\n")
    with pytest.raises(UsageError, match="cannot write"):
        scaffold(tmp_path / "occupied", force=True)


def test_scaffolded_spec_promises_only_what_is_built(tmp_path: Path) -> None:
    # Signing and attestations are not built yet: the first file a user reads must not
    # say their images are signed.
    scaffold(tmp_path)
    text = (tmp_path / "graven.yaml").read_text().lower()
    for unbuilt in ("sign", "attest", "provenance", "kubernetes", "ssh"):
        assert unbuilt not in text, unbuilt
