"""The validated shape of ``graven.yaml``.

Pure data: no I/O here. ``graven.spec.loader`` turns YAML into these models and maps
validation errors back to file:line and key path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from graven.model import HealthCheck, ServiceConfig, is_valid_name

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``2``, ``2.5``, ``"500ms"``, ``"2s"``, ``"1m"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 2s or 500ms, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 2s or 500ms, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- recipe steps ---------------------------------------------------------------------


class CopyStep(_Strict):
    """Copy a file or directory from the project into the image."""

    source: str = Field(
        alias="copy", description="Source path, relative to the spec file's directory."
    )
    to: str = Field(default="/", description="Absolute destination path inside the image.")

    @field_validator("source")
    @classmethod
    def _relative_source(cls, v: str) -> str:
        if not v or v.startswith("/"):
            raise ValueError(f"copy source must be a relative path inside the project, got {v!r}")
        if ".." in v.replace("\\", "/").split("/"):
            raise ValueError(f"copy source must not leave the project with '..', got {v!r}")
        return v

    @field_validator("to")
    @classmethod
    def _absolute_dest(cls, v: str) -> str:
        return _image_path(v)


class RunStep(_Strict):
    """Run a shell command inside the image tree."""

    run: str = Field(min_length=1, description="Shell command; runs with the image root as cwd.")


class EnvStep(_Strict):
    """Set environment variables for later steps and for instances."""

    env: dict[str, str] = Field(description="Variables to set.")

    @field_validator("env", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        return _env_values(v)


class WorkdirStep(_Strict):
    """Set the working directory for later steps and for instances."""

    workdir: str

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return _image_path(v)


class EntrypointStep(_Strict):
    """The command an instance runs."""

    entrypoint: list[str] = Field(min_length=1)

    @field_validator("entrypoint", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v.split()
        return v


Step = CopyStep | RunStep | EnvStep | WorkdirStep | EntrypointStep
STEP_KINDS: dict[str, type[_Strict]] = {
    "copy": CopyStep,
    "run": RunStep,
    "env": EnvStep,
    "workdir": WorkdirStep,
    "entrypoint": EntrypointStep,
}


def _image_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"expected an absolute path inside the image, got {v!r}")
    if ".." in v.split("/"):
        raise ValueError(f"path must not contain '..', got {v!r}")
    return v


def _env_values(v: Any) -> Any:
    if isinstance(v, dict):
        out: dict[str, Any] = {}
        for k, val in v.items():
            if isinstance(val, bool):
                out[k] = "true" if val else "false"
            elif isinstance(val, int | float):
                out[k] = str(val)
            else:
                out[k] = val
        return out
    return v


class Recipe(_Strict):
    """How to bake one image."""

    base: Literal["scratch"] = Field(default="scratch", description="Base image.")
    steps: list[Step] = Field(min_length=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _pick_step_kind(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out: list[Any] = []
        for item in v:
            if isinstance(item, dict):
                kinds = [k for k in item if k in STEP_KINDS]
                if len(kinds) != 1:
                    raise ValueError(
                        "each step needs exactly one of "
                        + ", ".join(STEP_KINDS)
                        + f"; got keys {sorted(map(str, item))}"
                    )
                out.append(STEP_KINDS[kinds[0]].model_validate(item))
            else:
                out.append(item)
        return out

    @model_validator(mode="after")
    def _has_entrypoint(self) -> Recipe:
        if not any(isinstance(s, EntrypointStep) for s in self.steps):
            raise ValueError("a recipe needs an 'entrypoint' step so instances know what to run")
        return self


# --- services ----------------------------------------------------------------------------


class HealthSpec(_Strict):
    path: str = Field(default="/healthz", pattern=r"^/")
    interval: Duration = Field(default=1.0, gt=0)
    timeout: Duration = Field(default=1.0, gt=0)
    healthy_threshold: int = Field(default=1, ge=1, le=100)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)
    start_timeout: Duration = Field(default=30.0, gt=0, description="Budget to become healthy.")


class StrategySpec(_Strict):
    type: Literal["rolling"] = "rolling"
    max_surge: int = Field(default=1, ge=0)
    max_unavailable: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _progress_possible(self) -> StrategySpec:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: nothing could move")
        return self


class ServiceSpec(_Strict):
    """Desired state of one service."""

    image: str = Field(description="Name of an image under 'images'.")
    replicas: int = Field(default=1, ge=1, le=100)
    port: int = Field(ge=1, le=65535, description="Port the router listens on (loopback).")
    health: HealthSpec = Field(default_factory=HealthSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    env: dict[str, str] = Field(default_factory=dict)
    drain_timeout: Duration = Field(default=10.0, ge=0)
    stop_grace: Duration = Field(default=10.0, ge=0)
    target: str = "local"

    @field_validator("env", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        return _env_values(v)

    def to_config(self) -> ServiceConfig:
        h = self.health
        return ServiceConfig(
            replicas=self.replicas,
            port=self.port,
            health=HealthCheck(
                path=h.path,
                interval=h.interval,
                timeout=h.timeout,
                healthy_threshold=h.healthy_threshold,
                unhealthy_threshold=h.unhealthy_threshold,
                start_timeout=h.start_timeout,
            ),
            env=tuple(sorted(self.env.items())),
            strategy=self.strategy.type,
            max_surge=self.strategy.max_surge,
            max_unavailable=self.strategy.max_unavailable,
            drain_timeout=self.drain_timeout,
            stop_grace=self.stop_grace,
            target=self.target,
        )


class TargetSpec(_Strict):
    type: Literal["local"] = "local"


class Spec(_Strict):
    """The whole ``graven.yaml``."""

    version: Literal[1] = 1
    images: dict[str, Recipe] = Field(default_factory=dict)
    services: dict[str, ServiceSpec] = Field(default_factory=dict)
    targets: dict[str, TargetSpec] = Field(default_factory=lambda: {"local": TargetSpec()})

    @field_validator("images", "services", "targets")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not is_valid_name(name):
                raise ValueError(
                    f"name {name!r} must be lowercase letters, digits and '-', starting with a letter"
                )
        return v
