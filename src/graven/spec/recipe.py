"""The ``images`` section of ``graven.yaml``: how to bake one image, its base and its
steps (copy, run, env, workdir, entrypoint, cmd, user, expose, label).

Steps and bases are tagged unions: an error then comes from the one model the user
meant, located under that step, never from every model in turn.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from graven.model import is_valid_name
from graven.spec.fields import EnvMap, StrictModel, env_values


def _image_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"expected an absolute path inside the image, got {v!r}")
    if ".." in v.split("/"):
        raise ValueError(f"path must not contain '..', got {v!r}")
    if "\x00" in v:
        raise ValueError(f"path must not contain a NUL character, got {v!r}")
    return v


class CopyStep(StrictModel):
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


class RunStep(StrictModel):
    """Run a shell command in a sandbox whose root is the image tree."""

    run: str = Field(
        min_length=1,
        description="Shell command (/bin/sh -c), run in the working directory set by 'workdir'.",
    )
    network: bool = Field(
        default=False,
        description="Give the command the host's network (default: no network at all).",
    )


class EnvStep(StrictModel):
    """Set environment variables for later steps and for instances."""

    env: EnvMap = Field(description="Variables to set.")


class WorkdirStep(StrictModel):
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


class EntrypointStep(StrictModel):
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


class CmdStep(StrictModel):
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


class UserStep(StrictModel):
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


class ExposeStep(StrictModel):
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
    BeforeValidator(env_values),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"minLength": 1},
            "additionalProperties": {"type": ["string", "number", "boolean"]},
            "minProperties": 1,
        }
    ),
]


class LabelStep(StrictModel):
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
STEP_KINDS: dict[str, type[StrictModel]] = {
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
# This host's Python runtime closure, made once per store (graven.build.bases.host_python).
HOST_PYTHON: Literal["host-python"] = "host-python"
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


class ImageBase(StrictModel):
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


class LayoutBase(StrictModel):
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


class RegistryBase(StrictModel):
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


BASE_KINDS: dict[str, type[StrictModel]] = {
    "image": ImageBase,
    "layout": LayoutBase,
    "registry": RegistryBase,
}
BASE_KIND_ERROR = "base_kind"
Base = Literal["scratch", "host-python"] | ImageBase | LayoutBase | RegistryBase


def base_kind(value: Any) -> str | None:
    """``scratch``, ``host-python``, or the one key of ``BASE_KINDS`` a base has; None
    if neither."""
    if value in (SCRATCH, HOST_PYTHON):
        return str(value)
    if isinstance(value, dict):
        kinds = [k for k in value if k in BASE_KINDS]
        return kinds[0] if len(kinds) == 1 else None
    for kind, cls in BASE_KINDS.items():
        if isinstance(value, cls):
            return kind
    return None


_TaggedBase = Annotated[
    Annotated[Literal["scratch"], Tag(SCRATCH)]
    | Annotated[Literal["host-python"], Tag(HOST_PYTHON)]
    | Annotated[ImageBase, Tag("image")]
    | Annotated[LayoutBase, Tag("layout")]
    | Annotated[RegistryBase, Tag("registry")],
    Discriminator(
        base_kind,
        custom_error_type=BASE_KIND_ERROR,
        custom_error_message="expected 'scratch', 'host-python' or a mapping with one of "
        + ", ".join(BASE_KINDS),
    ),
]


class Recipe(StrictModel):
    """How to bake one image."""

    base: _TaggedBase = Field(
        default=SCRATCH,
        description="What the image starts from: 'scratch' (the empty tree, the default);"
        " 'host-python' (this host's Python interpreter and standard library, so an"
        " entrypoint such as 'python3 app.py' runs inside the image);"
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
