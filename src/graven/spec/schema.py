"""JSON Schema of ``graven.yaml``, for editors (yaml-language-server) and other tools.

Generated from ``graven.spec.models``, so it cannot drift from what ``graven check``
accepts; a few things only the loader checks (references between sections, files on
disk, duplicate keys) are beyond any schema.
"""

from __future__ import annotations

from typing import Any

from graven.spec.models import Spec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``graven.yaml``, keys spelt as in the file."""
    generated = Spec.model_json_schema(by_alias=True, mode="validation")
    _close_name_maps(generated)
    generated.pop("title", None)
    generated.pop("description", None)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "graven.yaml",
        "description": (
            "graven spec: the images to bake and the services to run from them."
            " Validate a file with 'graven check'."
        ),
        **generated,
    }


def _close_name_maps(node: Any) -> None:
    """Reject misspelt names in editors too.

    pydantic renders ``dict[Name, X]`` as ``patternProperties`` alone, which lets
    any key that misses the pattern through unchecked.
    """
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_name_maps(value)
    elif isinstance(node, list):
        for item in node:
            _close_name_maps(item)
