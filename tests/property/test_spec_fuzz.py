"""Whatever bytes sit in graven.yaml, loading it ends in a Spec or a SpecError.

Never an internal exception: the spec is untrusted input (DESIGN invariant 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from graven.errors import SpecError
from graven.spec import LoadedSpec, load_spec

FUZZ = settings(max_examples=200, deadline=None)

# Fragments that steer random text towards YAML structure and the spec's own keys.
TOKENS = [
    "services:",
    "images:",
    "targets:",
    "version: 1",
    "web:",
    "image: web",
    "port: 8080",
    "replicas: 2",
    "health:",
    "interval: 2s",
    "strategy:",
    "max_surge: 0",
    "steps:",
    "- copy: app",
    "to: /app",
    "- run: make",
    "- entrypoint: [a, b]",
    "- env:",
    "workdir: /",
    "x-a: &a",
    "<<: *a",
    "*a",
    "&b",
    "!!int",
    "!!str",
    "!!binary",
    "!!set",
    "!foo",
    "? ",
    "\n",
    "\n  ",
    "\n    ",
    "\n      ",
    "- ",
    ": ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'",
    '"',
    "#",
    "|",
    ">",
    "---",
    "...",
    "\t",
    "~",
    "null",
    "yes",
    "NO",
    "1.5",
    "-1",
    "0x1F",
    "1e9",
    ".inf",
    ".nan",
    "2001-12-14",
    "=",
    "%YAML 1.1",
    "\\",
    "\u00e9",
    "\ufeff",
    "app",
    "..",
]
yaml_ish = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)

KEYS = [
    "version",
    "images",
    "services",
    "targets",
    "web",
    "api",
    "Web",
    "image",
    "port",
    "replicas",
    "health",
    "path",
    "interval",
    "timeout",
    "strategy",
    "max_surge",
    "max_unavailable",
    "env",
    "drain_timeout",
    "stop_grace",
    "target",
    "steps",
    "copy",
    "to",
    "run",
    "workdir",
    "entrypoint",
    "base",
    "type",
    "x-a",
    "local",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["2s", "500ms", "/healthz", "app", "web", "/app", "rolling", "local"])
)
data = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS) | st.text(max_size=6) | st.integers(), children, max_size=5
        )
    ),
    max_leaves=30,
)

step = st.dictionaries(st.sampled_from(["copy", "to", "run", "env", "workdir", "entrypoint"]), data)
spec_shaped = st.fixed_dictionaries(
    {},
    optional={
        "version": data,
        "images": st.dictionaries(
            st.sampled_from(["web", "api", "Web"]),
            st.fixed_dictionaries({"steps": st.lists(step, max_size=4)}) | data,
            max_size=2,
        ),
        "services": st.dictionaries(
            st.sampled_from(["web", "api", "db"]),
            st.dictionaries(st.sampled_from(KEYS), data, max_size=6) | data,
            max_size=3,
        ),
        "targets": data,
    },
)


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("fuzz")
    (project / "app").mkdir()
    return project / "graven.yaml"


def check(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    try:
        loaded = load_spec(path)
    except SpecError as exc:
        assert exc.problems
        # YAML also breaks lines at \r, NEL, LS and PS, as str.splitlines() does.
        text = raw.decode("utf-8", "replace")
        last_line = max(raw.count(b"\n"), len(text.splitlines())) + 1
        for problem in exc.problems:
            assert problem.message
            assert problem.line is None or 1 <= problem.line <= last_line, problem
    else:
        assert isinstance(loaded, LoadedSpec)


def dump(value: Any) -> bytes:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True).encode()


@FUZZ
@given(text=yaml_ish)
@example(text="services:\n  !!int")  # PyYAML's int constructor fails on empty input
def test_yaml_ish_text(spec_path: Path, text: str) -> None:
    check(spec_path, text.encode())


@FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_text(spec_path: Path, text: str) -> None:
    check(spec_path, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes(spec_path: Path, raw: bytes) -> None:
    check(spec_path, raw)


@FUZZ
@given(value=data)
def test_arbitrary_data(spec_path: Path, value: Any) -> None:
    check(spec_path, dump(value))


@FUZZ
@given(value=spec_shaped)
def test_spec_shaped_data(spec_path: Path, value: Any) -> None:
    check(spec_path, dump(value))
