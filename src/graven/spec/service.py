"""The ``services`` section of ``graven.yaml``: the desired state of one service, its
health probe and its environment (secrets included, kept apart until deploy time)."""

from __future__ import annotations

import shlex
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticKnownError

from graven.errors import UsageError
from graven.model import (
    DEFAULT_TMPFS_SIZE,
    HealthCheck,
    Resources,
    ServiceConfig,
    Tmpfs,
    Volume,
    check_mounts,
)
from graven.spec.fields import (
    ENV_NAME_PATTERN,
    Duration,
    EnvName,
    Name,
    ShortDuration,
    Size,
    StrictModel,
    check_env_value,
    env_values,
)
from graven.spec.strategy import StrategySpec


class HealthSpec(StrictModel):
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


class SecretFileSpec(StrictModel):
    """An env value read from a file at deploy time and kept out of every record."""

    secret_file: str = Field(
        min_length=1,
        description="File holding the value, relative to graven.yaml (one trailing newline "
        "is dropped).",
    )


def _service_env_value(v: Any) -> str | SecretFileSpec:
    if isinstance(v, str):
        return check_env_value(v)
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
    BeforeValidator(env_values),
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


class ResourcesSpec(StrictModel):
    """Limits the runtime enforces on each instance (where the kernel lets it; 'graven
    check' and 'graven status' say when it cannot)."""

    memory: Size | None = Field(
        default=None, description="Memory the instance may use (256Mi, 1Gi); killed above it."
    )
    pids: int | None = Field(
        default=None, ge=1, le=4_194_304, description="Processes and threads, together."
    )
    cpu: float | None = Field(
        default=None, ge=0.01, le=1024, description="Cores of CPU time: 0.5 is half a core."
    )

    def to_resources(self) -> Resources:
        return Resources(memory=self.memory, pids=self.pids, cpu=self.cpu)

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        _checked(self.to_resources)
        return self


class VolumeSpec(StrictModel):
    """A writable path whose data outlives the instance."""

    path: str = Field(description="Absolute path inside the instance.")
    name: Name | None = Field(
        default=None,
        description="A named volume, kept under the state dir across replacements, rollbacks "
        "and 'graven down' until 'graven volume rm NAME'.",
    )
    host: str | None = Field(default=None, description="Or a host directory, used as it is.")
    read_only: bool = Field(default=False, description="Mount it read-only.")

    def to_volume(self) -> Volume:
        return Volume(
            path=self.path,
            name=self.name or "",
            host_path=self.host or "",
            read_only=self.read_only,
        )

    @model_validator(mode="after")
    def _check(self) -> VolumeSpec:
        _checked(self.to_volume)
        return self


def _tmpfs_item(v: Any) -> Any:
    return {"path": v} if isinstance(v, str) else v


class TmpfsSpec(StrictModel):
    """A writable, size-bounded path that starts empty in every instance."""

    path: str = Field(description="Absolute path inside the instance.")
    size: Size = Field(default=DEFAULT_TMPFS_SIZE, description="At most this much (64Mi).")

    def to_tmpfs(self) -> Tmpfs:
        return Tmpfs(path=self.path, size=self.size)

    @model_validator(mode="after")
    def _check(self) -> TmpfsSpec:
        _checked(self.to_tmpfs)
        return self


def _checked(make: Any) -> Any:
    # The model's own checks, worded for the spec (pydantic locates a ValueError).
    try:
        return make()
    except UsageError as exc:
        raise ValueError(exc.message) from None


def _env_file_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class ServiceSpec(StrictModel):
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
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    volumes: list[VolumeSpec] = Field(
        default_factory=list,
        description="Writable paths whose data outlives instances; everything else in an "
        "instance is read-only.",
    )
    tmpfs: list[Annotated[TmpfsSpec, BeforeValidator(_tmpfs_item)]] = Field(
        default_factory=list,
        description="Writable paths that start empty in each instance: a path, or "
        "{path, size}. /tmp is always one.",
    )
    isolation: Literal["auto", "required"] = Field(
        default="auto",
        description="'required': refuse to start an instance the runtime cannot seal (own "
        "namespaces, read-only image root, no capabilities); 'auto' seals where the machine "
        "can and says so in 'graven check' and 'graven status' where it cannot.",
    )

    @model_validator(mode="after")
    def _mounts_apart(self) -> ServiceSpec:
        _checked(
            lambda: check_mounts(
                tuple(v.to_volume() for v in self.volumes), tuple(t.to_tmpfs() for t in self.tmpfs)
            )
        )
        return self

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
            resources=self.resources.to_resources(),
            volumes=tuple(v.to_volume() for v in self.volumes),
            tmpfs=tuple(t.to_tmpfs() for t in self.tmpfs),
            isolation=self.isolation,
        )
