"""The validated shape of ``graven.yaml``.

Pure data: no I/O here. ``graven.spec.loader`` turns YAML into these models and maps
validation errors back to file:line and key path; ``graven.spec.schema`` publishes
them as JSON Schema, so every constraint written here reaches editors too.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from graven.model import (
    AnalysisConfig,
    BlueGreenConfig,
    CanaryConfig,
    CanaryStep,
    HealthCheck,
    RollingConfig,
    ServiceConfig,
    StrategyConfig,
    is_valid_name,
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h)?$"
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)


def parse_duration(value: Any) -> float:
    """Seconds from ``2``, ``2.5``, ``"500ms"``, ``"2s"``, ``"1m"``."""
    # pydantic reports ValueError as a validation error (TypeError would escape it),
    # and YAML's true/false are not durations.
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 2s or 500ms, got {_shown(value)}")
    # YAML spells infinity '.inf'; a timeout that never fires is a hang, not a setting.
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration such as 2s or 500ms, got {_shown(value)}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {_shown(value)}")
    return seconds


def _shown(value: Any) -> str:
    # As YAML spells it: true, not True.
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# Upper bounds of durations, in seconds. Nothing in a rollout waits longer than a day
# (a canary that must hold longer pauses for 'manual'); a probe, a drain or a grace
# period of more than an hour is a typo, and unbounded values overflow the clocks.
MINUTE = 60.0
HOUR = 3600.0
DAY = 24 * HOUR


def _duration_schema(most: float) -> dict[str, Any]:
    return {
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": most, "description": "Seconds."},
            {
                "type": "string",
                "pattern": DURATION_PATTERN,
                "description": "A number with an optional unit: ms, s, m or h"
                f" (at most {duration_text(most)}).",
            },
        ]
    }


def duration_text(seconds: float) -> str:
    """``3600`` -> ``1h``, ``90`` -> ``90s``: a bound as a user would write it."""
    for unit, size in (("h", HOUR), ("m", MINUTE)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# A duration of at most a day.
Duration = Annotated[
    float, BeforeValidator(parse_duration), Field(le=DAY), WithJsonSchema(_duration_schema(DAY))
]
# A duration of at most an hour: probes, drains, grace periods.
ShortDuration = Annotated[
    float, BeforeValidator(parse_duration), Field(le=HOUR), WithJsonSchema(_duration_schema(HOUR))
]
MANUAL: Literal["manual"] = "manual"


def parse_pause(value: Any) -> float | str:
    """A canary step's pause: 'manual', or a duration of at most a day."""
    if value == MANUAL:
        return MANUAL
    seconds = parse_duration(value)
    if seconds > DAY:
        raise ValueError(
            f"expected a duration of at most {duration_text(DAY)}, or 'manual' to wait for"
            f" 'graven promote', got {value!r}"
        )
    return seconds


Pause = Annotated[
    float | Literal["manual"],
    BeforeValidator(parse_pause),
    WithJsonSchema({"anyOf": [_duration_schema(DAY), {"const": MANUAL}]}),
]


def _check_name(name: str) -> str:
    if not is_valid_name(name):
        raise ValueError(
            "expected a name of lowercase letters, digits and '-' starting with a letter"
            f" (at most 63 characters), got {name!r}"
        )
    return name


# Image, service and target names end up in instance ids and DNS labels.
Name = Annotated[
    str, AfterValidator(_check_name), WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})
]


def _check_env_name(name: str) -> str:
    if not _ENV_NAME_RE.fullmatch(name):
        raise ValueError(
            "expected an environment variable name of letters, digits and '_'"
            f" not starting with a digit, got {name!r}"
        )
    return name


def _env_values(v: Any) -> Any:
    # Programs read the environment as text; accept the numbers and booleans YAML
    # produces for unquoted values rather than make users quote every one.
    if isinstance(v, dict):
        out: dict[Any, Any] = {}
        for k, val in v.items():
            if isinstance(val, bool):
                out[k] = "true" if val else "false"
            elif isinstance(val, int | float):
                out[k] = str(val)
            else:
                out[k] = val
        return out
    return v


def _check_env_value(value: str) -> str:
    # The kernel passes the environment as NUL-terminated strings: the value would be cut.
    if "\x00" in value:
        raise ValueError(
            "an environment value cannot contain a NUL character"
            f" (at character {value.index(chr(0)) + 1} of {value!r})"
        )
    return value


EnvName = Annotated[
    str,
    AfterValidator(_check_env_name),
    WithJsonSchema({"type": "string", "pattern": ENV_NAME_PATTERN}),
]
EnvValue = Annotated[str, AfterValidator(_check_env_value)]
EnvMap = Annotated[
    dict[EnvName, EnvValue],
    BeforeValidator(_env_values),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": ENV_NAME_PATTERN},
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        }
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


# --- recipe steps ---------------------------------------------------------------------


def _image_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"expected an absolute path inside the image, got {v!r}")
    if ".." in v.split("/"):
        raise ValueError(f"path must not contain '..', got {v!r}")
    if "\x00" in v:
        raise ValueError(f"path must not contain a NUL character, got {v!r}")
    return v


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
        if "\x00" in v:
            raise ValueError(f"copy source must not contain a NUL character, got {v!r}")
        return v

    @field_validator("to")
    @classmethod
    def _absolute_dest(cls, v: str) -> str:
        return _image_path(v)


class RunStep(_Strict):
    """Run a shell command in a sandbox whose root is the image tree."""

    run: str = Field(
        min_length=1,
        description="Shell command (/bin/sh -c), run in the working directory set by 'workdir'.",
    )
    network: bool = Field(
        default=False,
        description="Give the command the host's network (default: no network at all).",
    )


class EnvStep(_Strict):
    """Set environment variables for later steps and for instances."""

    env: EnvMap = Field(description="Variables to set.")


class WorkdirStep(_Strict):
    """Set the working directory for later steps and for instances."""

    workdir: str = Field(description="Absolute path inside the image.")

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return _image_path(v)


def _split_command(v: Any) -> Any:
    # Shell-style quoting, so `python3 -c "print(1)"` stays three arguments.
    if isinstance(v, str):
        try:
            return shlex.split(v)
        except ValueError as exc:
            raise ValueError(f"expected a command line, got {v!r}: {exc}") from None
    return v


Command = Annotated[
    list[str],
    BeforeValidator(_split_command),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "description": "Split like a shell would."},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ]
        }
    ),
]


class EntrypointStep(_Strict):
    """The command an instance runs."""

    entrypoint: Command = Field(
        min_length=1, description="Program and arguments, as a list or one command line."
    )


def _split_arguments(v: Any) -> Any:
    # Arguments are often numbers ('--port', 8080): a whole number becomes its decimal text.
    v = _split_command(v)
    if isinstance(v, list):
        return [str(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in v]
    return v


Arguments = Annotated[
    list[str],
    BeforeValidator(_split_arguments),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "description": "Split like a shell would."},
                {"type": "array", "items": {"type": ["string", "integer"]}, "minItems": 1},
            ]
        }
    ),
]


class CmdStep(_Strict):
    """Default arguments an instance passes to the entrypoint (OCI ``Cmd``)."""

    cmd: Arguments = Field(
        min_length=1, description="Arguments, as a list or one command line split like a shell."
    )


_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?\Z")
USER_PATTERN = _USER_RE.pattern


def _user_text(v: Any) -> Any:
    # 'user: 1000' reads as a number in YAML; a uid is meant.
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return v


def _check_user(v: str) -> str:
    if not _USER_RE.match(v):
        raise ValueError(
            "expected a user name or uid, optionally ':' and a group name or gid"
            f" (such as app, 1000 or 1000:1000), got {v!r}"
        )
    return v


class UserStep(_Strict):
    """The user instances run as (OCI ``User``)."""

    user: Annotated[
        str,
        BeforeValidator(_user_text),
        AfterValidator(_check_user),
        WithJsonSchema({"type": ["string", "integer"], "pattern": USER_PATTERN}),
    ] = Field(description="User name or uid, optionally with ':group' (such as 1000:1000).")


MIN_PORT, MAX_PORT = 1, 65535


def _port_list(v: Any) -> Any:
    # One port or a list of them; checked here so an error names 'expose' itself and
    # shows the offending port, rather than a union member the user never wrote.
    ports = v if isinstance(v, list) else [v]
    for position, port in enumerate(ports, start=1):
        if isinstance(port, bool) or not isinstance(port, int) or not MIN_PORT <= port <= MAX_PORT:
            which = f" (item {position})" if isinstance(v, list) else ""
            shown = repr(port) if isinstance(port, str) else str(port).lower()
            raise ValueError(
                f"expected a port number from {MIN_PORT} to {MAX_PORT}, got {shown}{which}"
            )
    return ports


_PORT_SCHEMA = {"type": "integer", "minimum": MIN_PORT, "maximum": MAX_PORT}
Ports = Annotated[
    list[int],
    BeforeValidator(_port_list),
    WithJsonSchema(
        {"anyOf": [_PORT_SCHEMA, {"type": "array", "items": _PORT_SCHEMA, "minItems": 1}]}
    ),
]


class ExposeStep(_Strict):
    """Ports instances listen on, recorded in the image (OCI ``ExposedPorts``)."""

    expose: Ports = Field(min_length=1, description="A port number or a list of them (TCP).")


def _check_label_key(key: str) -> str:
    if not key or "\x00" in key:
        raise ValueError(f"expected a non-empty label name, got {key!r}")
    return key


LabelKey = Annotated[
    str, AfterValidator(_check_label_key), WithJsonSchema({"type": "string", "minLength": 1})
]
LabelMap = Annotated[
    dict[LabelKey, str],
    BeforeValidator(_env_values),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"minLength": 1},
            "additionalProperties": {"type": ["string", "number", "boolean"]},
            "minProperties": 1,
        }
    ),
]


class LabelStep(_Strict):
    """Metadata recorded in the image (OCI ``Labels``), such as its source or version."""

    label: LabelMap = Field(
        min_length=1,
        description="Labels to set, e.g. org.opencontainers.image.source: https://...",
    )


Step = (
    CopyStep
    | RunStep
    | EnvStep
    | WorkdirStep
    | EntrypointStep
    | CmdStep
    | UserStep
    | ExposeStep
    | LabelStep
)
STEP_KINDS: dict[str, type[_Strict]] = {
    "copy": CopyStep,
    "run": RunStep,
    "env": EnvStep,
    "workdir": WorkdirStep,
    "entrypoint": EntrypointStep,
    "cmd": CmdStep,
    "user": UserStep,
    "expose": ExposeStep,
    "label": LabelStep,
}
STEP_KIND_ERROR = "step_kind"


def step_kind(value: Any) -> str | None:
    """The kind of a step (its one key out of ``STEP_KINDS``), or None if not exactly one."""
    if isinstance(value, dict):
        kinds = [k for k in value if k in STEP_KINDS]
        return kinds[0] if len(kinds) == 1 else None
    for kind, cls in STEP_KINDS.items():
        if isinstance(value, cls):
            return kind
    return None


# A tagged union rather than trying each step model in turn: errors then come from
# the one model the user meant, located under that step, never from all of them.
_TaggedStep = Annotated[
    Annotated[CopyStep, Tag("copy")]
    | Annotated[RunStep, Tag("run")]
    | Annotated[EnvStep, Tag("env")]
    | Annotated[WorkdirStep, Tag("workdir")]
    | Annotated[EntrypointStep, Tag("entrypoint")]
    | Annotated[CmdStep, Tag("cmd")]
    | Annotated[UserStep, Tag("user")]
    | Annotated[ExposeStep, Tag("expose")]
    | Annotated[LabelStep, Tag("label")],
    Discriminator(
        step_kind,
        custom_error_type=STEP_KIND_ERROR,
        custom_error_message="each step needs exactly one of " + ", ".join(STEP_KINDS),
    ),
]


# --- recipe bases ----------------------------------------------------------------------

SCRATCH: Literal["scratch"] = "scratch"
_DIGEST_TEXT = r"sha256:[0-9a-f]{64}"
_DIGEST_RE = re.compile(rf"^{_DIGEST_TEXT}$")
IMAGE_BASE_PATTERN = (
    rf"^([a-z][a-z0-9-]{{0,62}}|{_DIGEST_TEXT}|[a-z][a-z0-9-]{{0,62}}@{_DIGEST_TEXT})$"
)
REGISTRY_BASE_PATTERN = rf"^[^@\s]+/[^@\s]+@{_DIGEST_TEXT}$"
PIN_HINT = "pin it: graven pull prints the digest"


def _check_image_base(v: str) -> str:
    name, at, digest = v.partition("@")
    if not at and v.startswith("sha256:"):
        digest = v  # a digest alone
    elif not is_valid_name(name):
        raise ValueError(
            "expected the name of an image under 'images', sha256:<64 hex> or"
            f" NAME@sha256:<64 hex>, got {v!r}"
        )
    elif not at:
        return v  # a name alone: an image of the spec
    if not _DIGEST_RE.match(digest):
        where = "after '@'" if at else "as the digest"
        raise ValueError(f"expected sha256:<64 hex> {where}, got {digest!r}")
    return v


class ImageBase(_Strict):
    """Start from another graven image: one of this spec's images (built first), or an
    image already in the store, pinned by its digest."""

    image: Annotated[
        str,
        AfterValidator(_check_image_base),
        WithJsonSchema({"type": "string", "pattern": IMAGE_BASE_PATTERN}),
    ] = Field(
        description="NAME of an image under 'images' (built before this one), or"
        " sha256:<64 hex> or NAME@sha256:<64 hex> of an image in the store."
    )

    @property
    def spec_image(self) -> str | None:
        """The name of the spec image this base is, or None when it is pinned by digest."""
        return None if "@" in self.image or self.image.startswith("sha256:") else self.image


def _check_relative_path(v: str) -> str:
    if not v or v.startswith("/"):
        raise ValueError(f"expected a relative path inside the project, got {v!r}")
    if ".." in v.replace("\\", "/").split("/"):
        raise ValueError(f"path must not leave the project with '..', got {v!r}")
    if "\x00" in v:
        raise ValueError(f"path must not contain a NUL character, got {v!r}")
    return v


class LayoutBase(_Strict):
    """Start from an image in an OCI image layout directory (such as one written by
    'graven image export' or 'skopeo copy ... oci:DIR:REF'). It is imported once: later
    builds find it in the store by its manifest digest."""

    layout: Annotated[str, AfterValidator(_check_relative_path)] = Field(
        description="The layout directory, relative to the spec file's directory."
    )
    ref: str | None = Field(
        default=None,
        min_length=1,
        description="Which image of the layout (its org.opencontainers.image.ref.name);"
        " may be left out when the layout holds one image.",
    )


def _check_pinned(v: str) -> str:
    if "@" not in v:
        raise ValueError(f"a registry base must be pinned by digest, got {v!r}; {PIN_HINT}")
    digest = v.rpartition("@")[2]
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"expected sha256:<64 hex> after '@', got {digest!r}; {PIN_HINT}")
    return v


class RegistryBase(_Strict):
    """Start from an image on an OCI registry, pinned by digest. It is pulled once
    (credentials as for 'graven pull'); later builds find it in the store by digest,
    without the network."""

    registry: Annotated[
        str,
        AfterValidator(_check_pinned),
        WithJsonSchema({"type": "string", "pattern": REGISTRY_BASE_PATTERN}),
    ] = Field(
        description="HOST[:PORT]/REPOSITORY@sha256:<64 hex> (a tag alone is not enough:"
        " 'graven pull' prints the digest)."
    )


BASE_KINDS: dict[str, type[_Strict]] = {
    "image": ImageBase,
    "layout": LayoutBase,
    "registry": RegistryBase,
}
BASE_KIND_ERROR = "base_kind"
Base = Literal["scratch"] | ImageBase | LayoutBase | RegistryBase


def base_kind(value: Any) -> str | None:
    """``scratch``, or the one key of ``BASE_KINDS`` a base has; None if neither."""
    if value == SCRATCH:
        return SCRATCH
    if isinstance(value, dict):
        kinds = [k for k in value if k in BASE_KINDS]
        return kinds[0] if len(kinds) == 1 else None
    for kind, cls in BASE_KINDS.items():
        if isinstance(value, cls):
            return kind
    return None


_TaggedBase = Annotated[
    Annotated[Literal["scratch"], Tag(SCRATCH)]
    | Annotated[ImageBase, Tag("image")]
    | Annotated[LayoutBase, Tag("layout")]
    | Annotated[RegistryBase, Tag("registry")],
    Discriminator(
        base_kind,
        custom_error_type=BASE_KIND_ERROR,
        custom_error_message="expected 'scratch' or a mapping with one of " + ", ".join(BASE_KINDS),
    ),
]


class Recipe(_Strict):
    """How to bake one image."""

    base: _TaggedBase = Field(
        default=SCRATCH,
        description="What the image starts from: 'scratch' (the empty tree, the default);"
        " {image: NAME} another image of this spec, or {image: sha256:...} /"
        " {image: NAME@sha256:...} one in the store; {layout: DIR, ref: NAME} an OCI image"
        " layout; {registry: HOST/REPO@sha256:...} a registry image pinned by digest."
        " Its files, layers and config (env, workdir, entrypoint, cmd, user, ports, labels)"
        " are inherited; steps add to them.",
    )
    steps: list[_TaggedStep] = Field(
        min_length=1, description="Applied in order; each has exactly one kind."
    )

    @model_validator(mode="after")
    def _has_entrypoint(self) -> Recipe:
        # A base may bring its entrypoint; the build checks the image has one in the end.
        if self.base == SCRATCH and not any(isinstance(s, EntrypointStep) for s in self.steps):
            raise ValueError("a recipe needs an 'entrypoint' step so instances know what to run")
        return self


# --- services ----------------------------------------------------------------------------


class HealthSpec(_Strict):
    """How graven decides an instance may receive traffic."""

    path: str = Field(default="/healthz", pattern=r"^/", description="HTTP path probed with GET.")
    interval: ShortDuration = Field(default=1.0, gt=0, description="Time between probes.")
    timeout: ShortDuration = Field(default=1.0, gt=0, description="Budget of one probe.")
    healthy_threshold: int = Field(
        default=1, ge=1, le=100, description="Successes in a row to become healthy."
    )
    unhealthy_threshold: int = Field(
        default=3, ge=1, le=100, description="Failures in a row to become unhealthy."
    )
    start_timeout: Duration = Field(default=30.0, gt=0, description="Budget to become healthy.")
    type: Literal["http", "tcp", "command"] = Field(
        default="http",
        description="Probe: 'http' GETs 'path' (2xx/3xx is healthy), 'tcp' connects to the "
        "instance's port, 'command' runs 'command' (exit 0 is healthy; HOST and PORT set).",
    )
    command: list[str] = Field(
        default_factory=list,
        description="For type 'command': the program and its arguments (a string is split "
        "like a shell would).",
    )

    @field_validator("command", mode="before")
    @classmethod
    def _split_command(cls, v: Any) -> Any:
        return shlex.split(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _command_matches_type(self) -> HealthSpec:
        if self.type == "command" and not self.command:
            raise ValueError("a 'command' probe needs 'command': the program to run")
        if self.type != "command" and self.command:
            raise ValueError(f"'command' is only for type 'command' (this probe is {self.type!r})")
        return self


class CanaryStepSpec(_Strict):
    """One canary step: shift ``weight`` percent of live traffic, then wait and judge."""

    weight: int = Field(ge=1, le=100, description="Percent of live traffic to the canary.")
    pause: Pause = Field(
        default=0.0,
        description="How long to hold this step, or 'manual' to wait for 'graven promote'.",
    )
    analysis: bool = Field(
        default=True,
        description="Judge the canary against the stable release before going on.",
    )


# More requests than one analysis window of a busy service could see.
MAX_REQUESTS = 1_000_000


class AnalysisSpec(_Strict):
    """When a canary passes, fails (abort and roll back) or is inconclusive (pause)."""

    window: Duration = Field(default=30.0, gt=0, description="Traffic watched per analysis.")
    max_error_rate: float = Field(
        default=0.01, ge=0, le=1, description="Largest canary 5xx/failure rate (0.01 = 1%)."
    )
    max_p99: ShortDuration | None = Field(
        default=1.0, description="Largest canary p99 latency; null for no limit."
    )
    min_requests: int = Field(
        default=50, ge=1, le=MAX_REQUESTS, description="Canary requests needed before any verdict."
    )


class StrategySpec(_Strict):
    """How a rollout replaces instances."""

    type: Literal["rolling", "blue-green", "canary"] = Field(
        default="rolling",
        description="rolling: replace a few at a time; blue-green: a full new set beside the "
        "old, one traffic switch, old kept warm for the rollback window; canary: traffic "
        "shifted in steps, each judged by analysis.",
    )
    max_surge: int = Field(
        default=1, ge=0, le=100, description="Instances allowed above 'replicas' during a rollout."
    )
    max_unavailable: int = Field(
        default=0, ge=0, le=100, description="Instances allowed below 'replicas' during a rollout."
    )
    preview_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="blue-green: port of the preview route to the new set before the switch.",
    )
    auto_promote: bool = Field(
        default=True,
        description="blue-green: switch once healthy (and, with a preview, analyzed); false "
        "waits for 'graven promote'.",
    )
    rollback_window: Duration = Field(
        default=300.0,
        ge=0,
        description="blue-green/canary: how long the previous release stays warm; a rollback "
        "inside it is only a traffic switch.",
    )
    steps: list[CanaryStepSpec] = Field(
        default_factory=list, description="canary: the traffic steps, in order."
    )
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)

    @model_validator(mode="after")
    def _consistent(self) -> StrategySpec:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: nothing could move")
        if self.type == "canary" and not self.steps:
            raise ValueError("a canary strategy needs 'steps', e.g. [{weight: 10}, {weight: 50}]")
        if self.type != "canary" and self.steps:
            raise ValueError(f"'steps' are for type canary (this strategy is {self.type!r})")
        if self.type != "blue-green" and self.preview_port is not None:
            raise ValueError("'preview_port' is for type blue-green")
        weights = [s.weight for s in self.steps]
        if weights != sorted(weights):
            raise ValueError(f"canary step weights must not decrease, got {weights}")
        return self

    def to_config(self) -> StrategyConfig:
        """The config of this strategy's type: the settings it uses (the others the spec
        accepts for every type are left out)."""
        a = self.analysis
        analysis = AnalysisConfig(
            window=a.window,
            max_error_rate=a.max_error_rate,
            max_p99=a.max_p99,
            min_requests=a.min_requests,
        )
        if self.type == "blue-green":
            return BlueGreenConfig(
                preview_port=self.preview_port,
                auto_promote=self.auto_promote,
                rollback_window=self.rollback_window,
                analysis=analysis,
            )
        if self.type == "canary":
            return CanaryConfig(
                steps=tuple(
                    CanaryStep(s.weight, None if s.pause == MANUAL else float(s.pause), s.analysis)
                    for s in self.steps
                ),
                analysis=analysis,
            )
        return RollingConfig(max_surge=self.max_surge, max_unavailable=self.max_unavailable)


class SecretFileSpec(_Strict):
    """An env value read from a file at deploy time and kept out of every record."""

    secret_file: str = Field(
        min_length=1,
        description="File holding the value, relative to graven.yaml (one trailing newline "
        "is dropped).",
    )


def _service_env_value(v: Any) -> str | SecretFileSpec:
    if isinstance(v, str):
        return _check_env_value(v)
    if isinstance(v, SecretFileSpec):
        return v
    if not isinstance(v, dict):
        raise PydanticKnownError("string_type")  # the loader words this one already
    if set(v) == {"secret_file"}:
        path = v["secret_file"]
        if isinstance(path, str) and path:
            return SecretFileSpec(secret_file=path)
    raise ValueError(f"expected text or {{secret_file: PATH}}, got {v!r}")


# Service env values may also be secrets: ${VAR} (text) or {secret_file: PATH}.
ServiceEnvMap = Annotated[
    dict[EnvName, Annotated[str | SecretFileSpec, PlainValidator(_service_env_value)]],
    BeforeValidator(_env_values),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": ENV_NAME_PATTERN},
            "additionalProperties": {
                "anyOf": [
                    {"type": ["string", "number", "boolean"]},
                    {
                        "type": "object",
                        "properties": {"secret_file": {"type": "string", "minLength": 1}},
                        "required": ["secret_file"],
                        "additionalProperties": False,
                    },
                ]
            },
        }
    ),
]


def _env_file_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class ServiceSpec(_Strict):
    """Desired state of one service."""

    image: str = Field(description="Name of an image under 'images'.")
    replicas: int = Field(default=1, ge=1, le=100, description="Instances to run.")
    port: int = Field(ge=1, le=65535, description="Port the router listens on (loopback).")
    health: HealthSpec = Field(default_factory=HealthSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    env: ServiceEnvMap = Field(
        default_factory=dict,
        description="Environment of every instance. '${VAR}' in a value takes VAR from the "
        "deploying command's environment; {secret_file: PATH} reads a file. Both are secrets: "
        "recorded and shown only as '<secret sha256:…>'.",
    )
    env_file: Annotated[
        list[str],
        BeforeValidator(_env_file_list),
        WithJsonSchema(
            {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
        ),
    ] = Field(
        default_factory=list,
        description="Dotenv files (KEY=VALUE lines) relative to graven.yaml; every key they "
        "set is a secret.",
    )
    drain_timeout: ShortDuration = Field(
        default=10.0, ge=0, description="How long in-flight requests may finish after removal."
    )
    stop_grace: ShortDuration = Field(
        default=10.0, ge=0, description="Time between SIGTERM and SIGKILL."
    )
    target: str = Field(default="local", description="Name of a target under 'targets'.")
    progress_deadline: Duration = Field(
        default=600.0,
        gt=0,
        description="A rollout that completes no step for this long fails and goes back "
        "(manual gates, pauses and analysis windows do not count).",
    )

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
                kind=h.type,
                command=tuple(h.command),
            ),
            # Secrets (env_file, ${VAR}, secret_file) are resolved at deploy time, apart.
            env=tuple(
                sorted((k, v) for k, v in self.env.items() if isinstance(v, str) and "${" not in v)
            ),
            strategy=self.strategy.to_config(),
            drain_timeout=self.drain_timeout,
            stop_grace=self.stop_grace,
            target=self.target,
            progress_deadline=self.progress_deadline,
        )


class TargetSpec(_Strict):
    """Where instances run."""

    type: Literal["local"] = Field(default="local", description="Kind of target.")


EXTENSION_PREFIX = "x-"


class Spec(_Strict):
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
