"""The published JSON Schema matches what the loader accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from graven.spec import json_schema, load_spec
from graven.spec.fields import DURATION_PATTERN

GOOD = """\
version: 1
x-shared: {replicas: 2}
images:
  web:
    steps:
      - copy: app
        to: /app
      - run: make
      - env: {MODE: prod, LEVEL: 3}
      - workdir: /app
      - entrypoint: python3 app.py
services:
  web:
    image: web
    replicas: 2
    port: 8080
    health: {path: /healthz, interval: 500ms, timeout: 1, start_timeout: 1m}
    strategy: {max_surge: 1, max_unavailable: 0}
    env: {VERSION: v1, DEBUG: false}
    drain_timeout: 10s
    stop_grace: 2.5
    target: local
targets:
  local: {type: local}
"""


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/$defs/"), ref
        node = schema["$defs"][ref.removeprefix("#/$defs/")]
    return node


def conforms(schema: dict[str, Any], node: dict[str, Any], value: Any) -> bool:
    """A small validator for the JSON Schema subset pydantic emits for the spec."""
    node = resolve(schema, node)
    if "oneOf" in node:
        return sum(conforms(schema, n, value) for n in node["oneOf"]) == 1
    if "anyOf" in node:
        return any(conforms(schema, n, value) for n in node["anyOf"])
    if "const" in node and value != node["const"]:
        return False
    if "enum" in node and value not in node["enum"]:
        return False
    types = node.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(has_type(value, t) for t in types):
            return False
    if isinstance(value, str):
        if "pattern" in node and not re.search(node["pattern"], value):
            return False
        if len(value) < node.get("minLength", 0):
            return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < node.get("minimum", float("-inf")):
            return False
        if value > node.get("maximum", float("inf")):
            return False
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0):
            return False
        if "items" in node and not all(conforms(schema, node["items"], v) for v in value):
            return False
    if isinstance(value, dict):
        if any(key not in value for key in node.get("required", [])):
            return False
        for key, item in value.items():
            if "propertyNames" in node and not conforms(schema, node["propertyNames"], key):
                return False
            if key in node.get("properties", {}):
                sub = node["properties"][key]
            else:
                patterns = [
                    p for pat, p in node.get("patternProperties", {}).items() if re.search(pat, key)
                ]
                if patterns:
                    sub = patterns[0]
                elif node.get("additionalProperties", True) is False:
                    return False
                else:
                    sub = node.get("additionalProperties", {})
                    sub = {} if sub is True else sub
            if not conforms(schema, sub, item):
                return False
    return True


def has_type(value: Any, name: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[name]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json_schema()


def test_schema_is_draft_2020_12_with_a_title(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "graven.yaml"
    assert schema["description"]
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"version", "images", "services", "targets"}
    json.dumps(schema)  # plain JSON, nothing pydantic-specific left in it


def test_every_ref_resolves_and_every_model_is_described(schema: dict[str, Any]) -> None:
    text = json.dumps(schema)
    for name in re.findall(r'"#/\$defs/([^"]+)"', text):
        assert name in schema["$defs"]
    for name, definition in schema["$defs"].items():
        assert definition.get("description"), name
        assert definition.get("additionalProperties") is False, name


def test_keys_are_spelt_as_in_the_file(schema: dict[str, Any]) -> None:
    copy = schema["$defs"]["CopyStep"]
    assert set(copy["properties"]) == {"copy", "to"}
    assert copy["required"] == ["copy"]


def test_steps_are_one_of_the_step_kinds(schema: dict[str, Any]) -> None:
    steps = schema["$defs"]["Recipe"]["properties"]["steps"]
    kinds = [resolve(schema, s) for s in steps["items"]["oneOf"]]

    assert {next(iter(k["required"])) for k in kinds} == {
        "copy",
        "run",
        "env",
        "workdir",
        "entrypoint",
        "cmd",
        "user",
        "expose",
        "label",
    }
    assert steps["minItems"] == 1


def test_durations_accept_numbers_and_strings(schema: dict[str, Any]) -> None:
    interval = schema["$defs"]["HealthSpec"]["properties"]["interval"]
    types = {branch["type"] for branch in interval["anyOf"]}
    assert types == {"number", "string"}
    (string,) = [b for b in interval["anyOf"] if b["type"] == "string"]
    assert string["pattern"] == DURATION_PATTERN

    for good in ("2s", "500ms", "1.5m", "1h", "3", 2, 0.5):
        assert conforms(schema, interval, good), good
    for bad in ("2 weeks", "fast", "-1s", True):
        assert not conforms(schema, interval, bad), bad


def test_service_names_are_checked(schema: dict[str, Any]) -> None:
    services = schema["properties"]["services"]
    assert conforms(schema, services, {})
    assert not conforms(schema, services, {"Web": {"image": "web", "port": 1}})


def test_good_spec_validates_and_loads(schema: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "graven.yaml").write_text(GOOD)

    assert conforms(schema, schema, yaml.safe_load(GOOD))
    load_spec(tmp_path / "graven.yaml")


@pytest.mark.parametrize(
    "change",
    [
        {"services": {"web": {"image": "web"}}},  # port missing
        {"services": {"web": {"image": "web", "port": 70000}}},
        {"services": {"web": {"image": "web", "port": 1, "replica": 2}}},
        {"images": {"web": {"steps": [{"copy": "a", "run": "b"}]}}},
        {"images": {"web": {"steps": []}}},
        {"version": 2},
    ],
)
def test_bad_specs_fail_the_schema(schema: dict[str, Any], change: dict[str, Any]) -> None:
    assert not conforms(schema, schema, change)


def test_schema_is_valid_for_jsonschema_if_installed(schema: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(GOOD))
