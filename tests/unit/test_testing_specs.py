"""The shared spec builder writes specs graven loads as meant."""

from __future__ import annotations

from pathlib import Path

from graven.spec import load_spec
from graven.testing.specs import hello_spec


def test_the_example_spec_loads_with_every_value_as_given(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    path = tmp_path / "graven.yaml"
    path.write_text(
        hello_spec(
            comment="two\nlines",
            port=18080,
            version="1.10",  # a YAML writer must quote it, or it becomes the float 1.1
            replicas=2,
            start_timeout="20s",
            strategy={"type": "blue-green", "rollback_window": "10m", "auto_promote": False},
            env={"ERROR_RATE": "0.5", "EMPTY": ""},
        )
    )
    assert path.read_text().startswith("# two\n# lines\nversion: 1\n")
    svc = load_spec(path).spec.services["hello"]
    assert (svc.port, svc.replicas) == (18080, 2)
    assert dict(svc.env) == {"VERSION": "1.10", "ERROR_RATE": "0.5", "EMPTY": ""}
    assert svc.strategy.type == "blue-green"
    assert svc.strategy.auto_promote is False
