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


# --- numbers: never a boolean, never above their ceiling ---------------------------------

BASE = (
    "images:\n  web:\n    steps:\n      - copy: app\n      - entrypoint: x\n"
    "services:\n  web:\n    image: web\n"
)
# Where a service holds a number, with what else the place needs to be valid.
NUMBER_FIELDS: dict[tuple[str, ...], str] = {
    ("port",): "",
    ("replicas",): "",
    ("drain_timeout",): "",
    ("stop_grace",): "",
    ("progress_deadline",): "",
    ("health", "interval"): "",
    ("health", "timeout"): "",
    ("health", "start_timeout"): "",
    ("health", "healthy_threshold"): "",
    ("health", "unhealthy_threshold"): "",
    ("strategy", "max_surge"): "      max_unavailable: 1\n",
    ("strategy", "max_unavailable"): "",
    ("strategy", "rollback_window"): "",
    ("strategy", "preview_port"): "      type: blue-green\n",
    ("strategy", "analysis", "window"): "",
    ("strategy", "analysis", "max_error_rate"): "",
    ("strategy", "analysis", "max_p99"): "",
    ("strategy", "analysis", "min_requests"): "",
}
# The ceiling of each duration field, in seconds.
DURATION_CEILINGS: dict[tuple[str, ...], float] = {
    ("drain_timeout",): 3600,
    ("stop_grace",): 3600,
    ("progress_deadline",): 86400,
    ("health", "interval"): 3600,
    ("health", "timeout"): 3600,
    ("health", "start_timeout"): 86400,
    ("strategy", "rollback_window"): 86400,
    ("strategy", "analysis", "window"): 86400,
    ("strategy", "analysis", "max_p99"): 3600,
}
# Every spelling YAML 1.1 reads as a boolean.
BOOLEAN_SPELLINGS = [
    s
    for word in ("yes", "no", "true", "false", "on", "off")
    for s in (word, word.capitalize(), word.upper())
]


def service_with(path: tuple[str, ...], value: str) -> str:
    """The base spec with ``services.web.<path>`` set to the raw YAML ``value``."""
    text = BASE
    for depth, key in enumerate(path[:-1]):
        text += "  " * (depth + 2) + f"{key}:\n"
    text += NUMBER_FIELDS.get(path, "")
    port = "" if path == ("port",) else "    port: 8080\n"
    return text + "  " * (len(path) + 1) + f"{path[-1]}: {value}\n" + port


def refused_at(path: Path, text: str, key_path: str) -> str:
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    messages = [p.message for p in info.value.problems if p.key_path == key_path]
    assert messages, [str(p) for p in info.value.problems]
    return messages[0]


@FUZZ
@given(field=st.sampled_from(sorted(NUMBER_FIELDS)), spelling=st.sampled_from(BOOLEAN_SPELLINGS))
def test_no_boolean_is_read_as_a_number(
    spec_path: Path, field: tuple[str, ...], spelling: str
) -> None:
    key_path = "services.web." + ".".join(field)
    message = refused_at(spec_path, service_with(field, spelling), key_path)
    assert message.startswith("expected ")
    assert message.endswith(f"got {spelling} (a YAML boolean)") or message.endswith(
        f"got {spelling.lower()}"
    )


@FUZZ
@given(
    field=st.sampled_from(sorted(DURATION_CEILINGS)),
    over=st.floats(min_value=0.001, max_value=1e300, allow_nan=False, allow_infinity=False),
    unit=st.sampled_from(["", "s", "ms", "m", "h"]),
)
def test_no_duration_above_its_ceiling_loads(
    spec_path: Path, field: tuple[str, ...], over: float, unit: str
) -> None:
    ceiling = DURATION_CEILINGS[field]
    per_unit = {"": 1, "s": 1, "ms": 0.001, "m": 60, "h": 3600}[unit]
    # Written as a decimal the duration syntax takes: no exponent, at least 1 ms over.
    amount = f"{(ceiling + max(over, 0.001)) / per_unit + 1:.3f}"
    key_path = "services.web." + ".".join(field)
    message = refused_at(spec_path, service_with(field, f"'{amount}{unit}'"), key_path)
    assert "at most" in message
