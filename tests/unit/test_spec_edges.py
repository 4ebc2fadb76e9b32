"""The spec's edges: booleans are not numbers, every number has a ceiling, only regular
files are read, and huge input is refused before it is built."""

from __future__ import annotations

import os
import socket
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from graven.errors import SpecError, SpecProblem
from graven.spec import Spec, load_spec, yaml_tree

# Service lines start at 7, under this image.
IMAGE = """\
images:
  web:
    steps:
      - copy: app
        to: /app
      - entrypoint: python3 app.py
"""
SERVICE = IMAGE + "services:\n  web:\n    image: web\n"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.py").write_text("print('hi')\n")
    return tmp_path


def problems_of(project: Path, text: str) -> list[SpecProblem]:
    path = project / "graven.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


def only_problem(project: Path, text: str) -> SpecProblem:
    problems = problems_of(project, text)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


# --- booleans are not numbers -------------------------------------------------------------

BOOLEANS_AS_NUMBERS = [
    (
        "    port: yes\n",
        10,
        "services.web.port",
        "expected an integer from 1 to 65535, got yes (a YAML boolean)",
    ),
    (
        "    port: 8080\n    replicas: on\n",
        11,
        "services.web.replicas",
        "expected an integer from 1 to 100, got on (a YAML boolean)",
    ),
    (
        "    port: 8080\n    replicas: true\n",
        11,
        "services.web.replicas",
        "expected an integer from 1 to 100, got true",
    ),
    (
        "    port: 8080\n    health: {healthy_threshold: yes}\n",
        11,
        "services.web.health.healthy_threshold",
        "expected an integer from 1 to 100, got yes (a YAML boolean)",
    ),
    (
        "    port: 8080\n    health: {interval: yes}\n",
        11,
        "services.web.health.interval",
        "got yes (a YAML boolean)",
    ),
    (
        "    port: 8080\n    strategy: {max_surge: off, max_unavailable: 1}\n",
        11,
        "services.web.strategy.max_surge",
        "expected an integer from 0 to 100, got off (a YAML boolean)",
    ),
    (
        "    port: 8080\n    strategy: {type: blue-green, preview_port: yes}\n",
        11,
        "services.web.strategy.preview_port",
        "expected an integer from 1 to 65535, got yes (a YAML boolean)",
    ),
    (
        "    port: 8080\n    strategy: {type: canary, steps: [{weight: yes}]}\n",
        11,
        "services.web.strategy.steps[0].weight",
        "expected an integer from 1 to 100, got yes (a YAML boolean)",
    ),
    (
        "    port: 8080\n    strategy: {type: canary, steps: [{weight: 5, pause: on}]}\n",
        11,
        "services.web.strategy.steps[0].pause",
        "got on (a YAML boolean)",
    ),
    (
        "    port: 8080\n    strategy:\n      analysis: {min_requests: yes}\n",
        12,
        "services.web.strategy.analysis.min_requests",
        "expected an integer from 1 to 1000000, got yes (a YAML boolean)",
    ),
    (
        "    port: 8080\n    strategy:\n      analysis: {max_error_rate: no}\n",
        12,
        "services.web.strategy.analysis.max_error_rate",
        "expected a number from 0 to 1, got no (a YAML boolean)",
    ),
    # And the other way round: a number is not a boolean.
    (
        "    port: 8080\n    strategy: {type: canary, steps: [{weight: 5, analysis: 1}]}\n",
        11,
        "services.web.strategy.steps[0].analysis",
        "expected true or false, got 1",
    ),
]


@pytest.mark.parametrize(
    ("tail", "line", "key_path", "message"),
    BOOLEANS_AS_NUMBERS,
    ids=[case[2].removeprefix("services.web.") for case in BOOLEANS_AS_NUMBERS],
)
def test_a_boolean_is_not_a_number(
    project: Path, tail: str, line: int, key_path: str, message: str
) -> None:
    problem = only_problem(project, SERVICE + tail)

    assert (problem.line, problem.key_path) == (line, key_path), str(problem)
    assert message in problem.message, str(problem)


def test_a_boolean_is_not_a_version(project: Path) -> None:
    problem = only_problem(project, "version: yes\n" + IMAGE)

    assert (problem.line, problem.key_path) == (1, "version")
    assert problem.message == "expected 1, got yes (a YAML boolean)"


# --- every duration and count has a ceiling -----------------------------------------------

TOO_LARGE = [
    ("    drain_timeout: 2h\n", 11, "services.web.drain_timeout", "at most 1h"),
    ("    stop_grace: 1.0e+300\n", 11, "services.web.stop_grace", "at most 1h"),
    ("    health: {interval: 61m}\n", 11, "services.web.health.interval", "at most 1h"),
    ("    progress_deadline: 86401\n", 11, "services.web.progress_deadline", "at most 24h"),
    ("    health: {timeout: 3601}\n", 11, "services.web.health.timeout", "at most 1h"),
    (
        "    health: {start_timeout: 25h}\n",
        11,
        "services.web.health.start_timeout",
        "expected a duration greater than 0s and at most 24h (such as 2s or 500ms), got '25h'",
    ),
    (
        "    strategy: {type: blue-green, rollback_window: 25h}\n",
        11,
        "services.web.strategy.rollback_window",
        "at most 24h",
    ),
    (
        "    strategy:\n      analysis: {window: 1441m}\n",
        12,
        "services.web.strategy.analysis.window",
        "at most 24h",
    ),
    (
        "    strategy:\n      analysis: {max_p99: 2h}\n",
        12,
        "services.web.strategy.analysis.max_p99",
        "at most 1h",
    ),
    (
        "    strategy: {type: canary, steps: [{weight: 5, pause: 25h}]}\n",
        11,
        "services.web.strategy.steps[0].pause",
        "expected a duration of at most 24h (such as 2s or 500ms), or 'manual', got '25h'",
    ),
    (
        "    strategy:\n      analysis: {min_requests: 1000001}\n",
        12,
        "services.web.strategy.analysis.min_requests",
        "expected an integer from 1 to 1000000, got 1000001",
    ),
]


@pytest.mark.parametrize(
    ("tail", "line", "key_path", "message"),
    TOO_LARGE,
    ids=[case[2].removeprefix("services.web.") for case in TOO_LARGE],
)
def test_durations_and_counts_have_a_ceiling(
    project: Path, tail: str, line: int, key_path: str, message: str
) -> None:
    problem = only_problem(project, SERVICE + "    port: 8080\n" + tail)

    assert (problem.line, problem.key_path) == (line, key_path), str(problem)
    assert message in problem.message, str(problem)


def test_the_largest_allowed_values_load(project: Path) -> None:
    tail = (
        "    port: 65535\n    replicas: 100\n    drain_timeout: 1h\n    stop_grace: 3600\n"
        "    health: {interval: 60m, timeout: 1h, start_timeout: 24h}\n"
        "    strategy:\n      type: canary\n      rollback_window: 24h\n"
        "      steps: [{weight: 100, pause: 86400}]\n"
        "      analysis: {window: 24h, max_p99: 1h, min_requests: 1000000}\n"
    )
    path = project / "graven.yaml"
    path.write_text(SERVICE + tail)

    web = load_spec(path).spec.services["web"]
    assert web.health.start_timeout == 86400.0
    assert web.strategy.steps[0].pause == 86400.0


def _numeric_fields() -> Iterator[tuple[str, FieldInfo]]:
    """Every field of every spec model that holds a number (a duration, a count...)."""
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Spec]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            kinds = _leaf_types(info.annotation)
            todo.extend(k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel))
            if any(k in (int, float) for k in kinds):
                yield f"{model.__name__}.{name}", info


def _leaf_types(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for arg in args for leaf in _leaf_types(arg)]


def _upper_bound(info: FieldInfo) -> Any:
    metadata = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        if typing.get_origin(arg) is typing.Annotated:
            metadata.extend(typing.get_args(arg)[1:])
    metadata += [m for meta in metadata if isinstance(meta, FieldInfo) for m in meta.metadata]
    bounds = [getattr(m, "le", None) or getattr(m, "lt", None) for m in metadata]
    return next((b for b in bounds if b is not None), None)


# Bounded by their own validators, not by a constraint pydantic can show.
BOUNDED_BY_VALIDATOR = {
    "CanaryStepSpec.pause": "at most a day (TOO_LARGE above)",
    "ExposeStep.expose": "each port 1-65535 (test_spec_loader's expose cases)",
}


def test_every_number_in_the_spec_has_an_upper_bound() -> None:
    fields = dict(_numeric_fields())
    assert "ServiceSpec.drain_timeout" in fields  # the walk reaches the services
    assert "CanaryStepSpec.pause" in fields

    unbounded = sorted(
        name
        for name, info in fields.items()
        if _upper_bound(info) is None and name not in BOUNDED_BY_VALIDATOR
    )
    assert unbounded == []


# --- env values ------------------------------------------------------------------------------


def test_env_values_with_a_nul_are_refused_with_their_key_path(project: Path) -> None:
    text = (
        IMAGE
        + '      - env: {STEP: "a\\0b"}\n'
        + "services:\n  web:\n    image: web\n    port: 8080\n"
        + '    env:\n      GOOD: fine\n      BAD: "x\\0"\n      "A=B": 1\n'
    )
    problems = problems_of(project, text)

    assert [(p.line, p.key_path) for p in problems] == [
        (7, "images.web.steps[2].env.STEP"),
        (14, "services.web.env.BAD"),
        (15, 'services.web.env["A=B"]'),
    ]
    assert "cannot contain a NUL character (at character 2 of 'a\\x00b')" in problems[0].message
    assert "cannot contain a NUL character" in problems[1].message
    assert "expected an environment variable name" in problems[2].message


# --- only regular files ---------------------------------------------------------------------


def test_a_character_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(Path(os.devnull))

    (problem,) = info.value.problems
    assert problem.message.startswith("is a character device, not a spec file")
    assert info.value.hint is not None
    assert "-f" in info.value.hint


def test_a_unix_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "graven.yaml"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(SpecError) as info:
            load_spec(path)

    (problem,) = info.value.problems
    assert problem.message.startswith("is a socket, not a spec file")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    from graven.spec.inputs import NotARegularFile, read_regular_file

    path = tmp_path / "graven.yaml"
    os.mkfifo(path)
    # No writer ever opens it: a blocking open would never return.
    with pytest.raises(NotARegularFile) as raw:
        read_regular_file(path, 100)
    assert raw.value.kind == "a named pipe (FIFO)"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems[0].message.startswith("is a named pipe (FIFO), not a spec file")


def test_a_file_is_read_no_further_than_the_limit(tmp_path: Path) -> None:
    from graven.spec.inputs import FileTooLarge, read_regular_file

    path = tmp_path / "graven.yaml"
    path.write_bytes(b"x" * 101)
    with pytest.raises(FileTooLarge):
        read_regular_file(path, 100)
    assert read_regular_file(path, 101) == b"x" * 101


# --- huge input is refused before it is built ---------------------------------------------


class _Counted:
    """yaml.parse, counting the events the loader pulls from it."""

    def __init__(self) -> None:
        self.events = 0
        self._parse = yaml.parse

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[yaml.Event]:
        for event in self._parse(*args, **kwargs):
            self.events += 1
            yield event


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the YAML was composed into nodes")


def test_a_huge_flow_list_is_refused_before_any_node_is_built(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = _Counted()
    monkeypatch.setattr(yaml_tree.yaml, "parse", counted)
    monkeypatch.setattr(yaml_tree.yaml, "compose", _never)
    # One byte over the size limit: refused before the parser sees a byte of it.
    too_big = only_problem(project, "#" * (yaml_tree.MAX_SPEC_BYTES + 1))
    assert too_big.message.startswith("file is larger than 4 MiB")
    assert counted.events == 0

    # Just under the size limit: some two million values in one line.
    count = (yaml_tree.MAX_SPEC_BYTES - 16) // 2
    text = "x-a: [" + "1," * (count - 1) + "1]\n"
    assert len(text) <= yaml_tree.MAX_SPEC_BYTES

    problem = only_problem(project, text)

    assert problem.message.startswith(f"the spec holds more than {yaml_tree.MAX_VALUES} values")
    # The work done is bounded by the budget, not by the size of the file.
    assert counted.events <= yaml_tree.MAX_VALUES + 10


def test_values_under_the_budget_still_load(project: Path) -> None:
    path = project / "graven.yaml"
    path.write_text("x-a: [" + ", ".join(["1"] * 1000) + "]\n" + SERVICE + "    port: 1\n")
    assert load_spec(path).spec.services["web"].port == 1
