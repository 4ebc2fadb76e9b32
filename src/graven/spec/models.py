"""The validated shape of ``graven.yaml``: the top level, its targets, and the
sections it is made of (``graven.spec.recipe``, ``graven.spec.service``,
``graven.spec.strategy``, with the shared value types of ``graven.spec.fields``).

Pure data: no I/O here. ``graven.spec.loader`` turns YAML into these models and maps
validation errors back to file:line and key path; ``graven.spec.schema`` publishes
them as JSON Schema, so every constraint written here reaches editors too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from graven.spec.fields import Name, StrictModel
from graven.spec.recipe import Recipe
from graven.spec.service import ServiceSpec


class TargetSpec(StrictModel):
    """Where instances run."""

    type: Literal["local"] = Field(default="local", description="Kind of target.")


EXTENSION_PREFIX = "x-"


class Spec(StrictModel):
    """The whole ``graven.yaml``.

    Top-level keys starting with ``x-`` are ignored, so they can hold YAML anchors
    shared by several services (as in Compose files).
    """

    model_config = ConfigDict(
        json_schema_extra={"patternProperties": {"^x-": {}}},
    )

    version: Literal[1] = Field(default=1, description="Spec format version.")
    images: dict[Name, Recipe] = Field(default_factory=dict, description="Images to bake.")
    services: dict[Name, ServiceSpec] = Field(default_factory=dict, description="Services to run.")
    targets: dict[Name, TargetSpec] = Field(
        default_factory=lambda: {"local": TargetSpec()}, description="Where services run."
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_a_number(cls, v: Any) -> Any:
        # Literal[1] takes True (True == 1 in Python); 'version: yes' is not a version.
        if isinstance(v, bool):
            raise PydanticCustomError("literal_error", "Input should be 1", {"expected": "1"})
        return v

    @model_validator(mode="before")
    @classmethod
    def _drop_extensions(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {
                k: v
                for k, v in data.items()
                if not (isinstance(k, str) and k.startswith(EXTENSION_PREFIX))
            }
        return data
