"""Frozen value types that cross module boundaries.

Plain strings never travel between modules where a value type exists: a ``Digest`` is
validated once, at the edge, and trusted afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

from graven.errors import UsageError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")


class Digest(str):
    """A content digest, ``sha256:<64 hex>``."""

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if not _DIGEST_RE.match(value):
            raise ValueError(f"not a sha256 digest: {value!r} (expected 'sha256:' + 64 hex)")
        return super().__new__(cls, value)

    @classmethod
    def of_bytes(cls, data: bytes) -> Digest:
        return cls("sha256:" + hashlib.sha256(data).hexdigest())

    @property
    def hex(self) -> str:
        return self[7:]

    @property
    def short(self) -> str:
        return self[7:19]


def canonical_json(value: Any) -> bytes:
    """The one byte form every hashed document uses: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def is_valid_name(name: str) -> bool:
    """Service and image names: lowercase DNS labels (they end up in instance ids)."""
    return bool(_NAME_RE.match(name))


@dataclass(frozen=True)
class ImageConfig:
    """What an instance needs besides files: how to start it."""

    entrypoint: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    cmd: tuple[str, ...] = ()  # default arguments after the entrypoint
    user: str = ""  # "" runs as the runtime's default user
    ports: tuple[int, ...] = ()  # documented listening ports (OCI ExposedPorts)
    labels: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "entrypoint": list(self.entrypoint),
            "env": [list(kv) for kv in self.env],
            "workdir": self.workdir,
            "cmd": list(self.cmd),
            "user": self.user,
            "ports": list(self.ports),
            "labels": [list(kv) for kv in self.labels],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(
            entrypoint=tuple(data["entrypoint"]),
            env=tuple((str(k), str(v)) for k, v in data["env"]),
            workdir=str(data["workdir"]),
            cmd=tuple(str(a) for a in data.get("cmd", ())),
            user=str(data.get("user", "")),
            ports=tuple(int(p) for p in data.get("ports", ())),
            labels=tuple((str(k), str(v)) for k, v in data.get("labels", ())),
        )


@dataclass(frozen=True)
class Image:
    """An immutable image: a root file tree and its config. Identity: ``digest``."""

    digest: Digest
    rootfs: Digest
    config: ImageConfig
    name: str = ""
    # Layer snapshots: each the root tree after one more layer; the last is ``rootfs``.
    layers: tuple[Digest, ...] = ()

    def document(self) -> dict[str, Any]:
        """The canonical document the digest is computed over."""
        return {
            "schema": "graven.image/v1",
            "rootfs": str(self.rootfs),
            "layers": [str(d) for d in self.layers],
            "config": self.config.to_dict(),
        }


@dataclass(frozen=True)
class HealthCheck:
    """How to tell a healthy instance: an HTTP GET, a TCP connect or a command.

    The same probe gates start-up (polled eagerly, within ``start_timeout``) and
    readiness afterwards (every ``interval``, out after ``unhealthy_threshold`` misses)."""

    path: str = "/healthz"
    interval: float = 1.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3
    start_timeout: float = 30.0
    kind: str = "http"  # http | tcp | command
    command: tuple[str, ...] = ()


StrategyName = Literal["rolling", "blue-green", "canary"]
STRATEGY_NAMES: tuple[StrategyName, ...] = ("rolling", "blue-green", "canary")


@dataclass(frozen=True)
class AnalysisConfig:
    """When a canary (or a blue-green preview) passes, fails or is inconclusive."""

    window: float = 30.0  # seconds of traffic watched per analysis
    max_error_rate: float = 0.01
    max_p99: float | None = 1.0  # seconds; None: no latency limit
    min_requests: int = 50


@dataclass(frozen=True)
class RollingConfig:
    """Replace a few instances at a time, within the surge and unavailability bounds."""

    name: ClassVar[StrategyName] = "rolling"
    weighted: ClassVar[bool] = False

    max_surge: int = 1
    max_unavailable: int = 0

    def __post_init__(self) -> None:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise UsageError(
                "max_surge and max_unavailable cannot both be 0: nothing could move",
                hint="Allow one instance above the replica count (max_surge: 1).",
            )


@dataclass(frozen=True)
class BlueGreenConfig:
    """A full new set beside the old one, one traffic switch, the old set kept warm."""

    name: ClassVar[StrategyName] = "blue-green"
    # Traffic moves by router weights, so going back is a switch of weights too.
    weighted: ClassVar[bool] = True

    preview_port: int | None = None  # the preview route to the new set before the switch
    auto_promote: bool = True  # False: the switch waits for 'graven promote'
    rollback_window: float = 300.0  # seconds the previous set stays warm after the switch
    analysis: AnalysisConfig = AnalysisConfig()  # judges the preview traffic


@dataclass(frozen=True)
class CanaryStep:
    """One canary step: ``weight`` percent of live traffic to the new release, then a
    pause (seconds; 0 for none; None until ``graven promote``), then an analysis."""

    weight: int
    pause: float | None = 0.0
    analysis: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, int):
            raise UsageError(f"canary step weight: expected an integer (got {self.weight!r})")
        if not 1 <= self.weight <= 100:
            raise UsageError(f"canary step weight must be 1-100 (got {self.weight})")
        if self.pause is not None and not (math.isfinite(self.pause) and self.pause >= 0):
            raise UsageError(f"canary step pause must be 0 or more seconds (got {self.pause})")


@dataclass(frozen=True)
class CanaryConfig:
    """Traffic shifted to the new release in steps, each paused and judged."""

    name: ClassVar[StrategyName] = "canary"
    weighted: ClassVar[bool] = True

    steps: tuple[CanaryStep, ...] = ()
    analysis: AnalysisConfig = AnalysisConfig()


StrategyConfig = RollingConfig | BlueGreenConfig | CanaryConfig


# Whether an instance must run sealed (its own namespaces, a read-only image root, no
# capabilities). 'auto' seals where the machine can and says so where it cannot;
# 'required' refuses to start an instance the runtime cannot seal.
Isolation = Literal["auto", "required"]
ISOLATION_MODES: tuple[Isolation, ...] = ("auto", "required")
MIB = 1024 * 1024
DEFAULT_TMPFS_SIZE = 64 * MIB
# Paths an instance may not mount over: the runtime owns them.
_RESERVED_MOUNT_PATHS = ("/", "/proc", "/sys", "/dev")


def _check_mount_path(path: str, what: str) -> None:
    parts = path.split("/")
    if (
        not path.startswith("/")
        or "\x00" in path
        or any(part in (".", "..") for part in parts)
        or "//" in path
        or (len(path) > 1 and path.endswith("/"))
        or len(path) > 4096
    ):
        raise UsageError(
            f"{what}: expected an absolute path without '.', '..' or a trailing '/' (got {path!r})"
        )
    if path == "/" or any(path == r or path.startswith(r + "/") for r in _RESERVED_MOUNT_PATHS):
        raise UsageError(
            f"{what}: {path} belongs to the runtime (/, /proc, /sys and /dev cannot be"
            " mounted over)"
        )


@dataclass(frozen=True)
class Resources:
    """Limits of one instance, enforced by the runtime; None leaves one unlimited."""

    memory: int | None = None  # bytes the instance's cgroup may charge (RSS + page cache)
    pids: int | None = None  # processes and threads together
    cpu: float | None = None  # cores: 0.5 is half of one core's time

    def __post_init__(self) -> None:
        if self.memory is not None and not 4 * MIB <= self.memory <= 2**50:
            raise UsageError(f"resources.memory must be 4Mi or more (got {self.memory} bytes)")
        if self.pids is not None and not 1 <= self.pids <= 4_194_304:
            raise UsageError(f"resources.pids must be 1 or more (got {self.pids})")
        if self.cpu is not None and not (math.isfinite(self.cpu) and 0.01 <= self.cpu <= 1024):
            raise UsageError(f"resources.cpu must be 0.01 cores or more (got {self.cpu})")

    @property
    def limited(self) -> bool:
        return (self.memory, self.pids, self.cpu) != (None, None, None)


@dataclass(frozen=True)
class Volume:
    """A writable path of an instance whose data outlives it: a named volume (a
    directory under the state dir that survives replacement, rollback and 'down' until
    'graven volume rm'), or a host directory used as it is."""

    path: str  # absolute, inside the instance
    name: str = ""  # a named volume ...
    host_path: str = ""  # ... or a host directory (exactly one of the two)
    read_only: bool = False

    def __post_init__(self) -> None:
        _check_mount_path(self.path, "volumes.path")
        if bool(self.name) == bool(self.host_path):
            raise UsageError(
                f"volume {self.path}: give exactly one of 'name' (a named volume) or 'host'"
                " (a host directory)"
            )
        if self.name and not is_valid_name(self.name):
            raise UsageError(
                f"volume {self.path}: name {self.name!r} must be lowercase letters, digits and"
                " '-', starting with a letter"
            )
        if self.host_path:
            _check_mount_path(self.host_path, f"volume {self.path}: host")


@dataclass(frozen=True)
class Tmpfs:
    """A writable, size-bounded path of an instance that starts empty and dies with it."""

    path: str
    size: int = DEFAULT_TMPFS_SIZE  # bytes

    def __post_init__(self) -> None:
        _check_mount_path(self.path, "tmpfs.path")
        if not 4096 <= self.size <= 2**40:
            raise UsageError(f"tmpfs {self.path}: size must be 4Ki to 1Ti (got {self.size} bytes)")


def check_mounts(volumes: tuple[Volume, ...], tmpfs: tuple[Tmpfs, ...]) -> None:
    """No two writable paths of one instance at the same place."""
    seen: set[str] = set()
    for path in [v.path for v in volumes] + [t.path for t in tmpfs]:
        if path in seen:
            raise UsageError(f"{path} is mounted twice (in 'volumes' or 'tmpfs')")
        seen.add(path)


@dataclass(frozen=True)
class ServiceConfig:
    """Everything about a service a release freezes, besides the image digest."""

    replicas: int
    port: int
    health: HealthCheck
    env: tuple[tuple[str, str], ...] = ()
    strategy: StrategyConfig = RollingConfig()
    drain_timeout: float = 10.0
    stop_grace: float = 10.0
    target: str = "local"
    # A rollout that completes no step for this long fails (waits at gates excepted).
    progress_deadline: float = 600.0
    resources: Resources = Resources()
    volumes: tuple[Volume, ...] = ()
    tmpfs: tuple[Tmpfs, ...] = ()
    isolation: Isolation = "auto"

    def __post_init__(self) -> None:
        check_mounts(self.volumes, self.tmpfs)

    @property
    def preview_port(self) -> int | None:
        """The port of the strategy's preview route, if it has one."""
        return self.strategy.preview_port if isinstance(self.strategy, BlueGreenConfig) else None

    @property
    def analysis(self) -> AnalysisConfig:
        """The strategy's analysis settings (the defaults for one that analyzes nothing)."""
        if isinstance(self.strategy, BlueGreenConfig | CanaryConfig):
            return self.strategy.analysis
        return AnalysisConfig()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: releases are stored and hashed in it, requests carry it."""
        return ConfigRecord.of(self).to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceConfig:
        """From the JSON form, as any graven version stored it (settings the strategy
        does not use are dropped; see ``ConfigRecord.to_config`` for a strict read)."""
        return ConfigRecord.from_dict(data).to_config(strict=False)


@dataclass(frozen=True)
class ConfigRecord:
    """The JSON form of a ``ServiceConfig``: one flat record, every strategy's settings
    side by side (those a strategy does not use at their defaults).

    This is a stored format: release rows hold it and content hashes are computed over
    it, so a field never changes meaning or default, and a new one needs a default (rows
    written before it must still load, and hash as they did)."""

    replicas: int
    port: int
    health: HealthCheck
    env: tuple[tuple[str, str], ...] = ()
    strategy: str = "rolling"
    max_surge: int = 1
    max_unavailable: int = 0
    drain_timeout: float = 10.0
    stop_grace: float = 10.0
    target: str = "local"
    # blue-green
    preview_port: int = 0  # 0: no preview route
    auto_promote: bool = True
    rollback_window: float = 300.0
    # canary: (weight percent, pause seconds or None = until promote, analyze?)
    canary_steps: tuple[tuple[int, float | None, bool], ...] = ()
    # analysis gates (canary steps, and blue-green auto-promotion with a preview)
    analysis_window: float = 30.0
    max_error_rate: float = 0.01
    max_p99: float | None = 1.0
    min_requests: int = 50
    progress_deadline: float = 600.0
    # sealing (0: unlimited); left out of the JSON form at their defaults, so releases
    # recorded before these existed hash as they did
    memory_limit: int = 0
    pids_limit: int = 0
    cpu_limit: float = 0.0
    # (path in the instance, volume name, host path, read-only)
    volumes: tuple[tuple[str, str, str, bool], ...] = ()
    # (path in the instance, size in bytes)
    tmpfs: tuple[tuple[str, int], ...] = ()
    isolation: str = "auto"

    @classmethod
    def of(cls, config: ServiceConfig) -> ConfigRecord:
        s = config.strategy
        analysis = config.analysis
        return cls(
            replicas=config.replicas,
            port=config.port,
            health=config.health,
            env=config.env,
            strategy=s.name,
            max_surge=s.max_surge if isinstance(s, RollingConfig) else 1,
            max_unavailable=s.max_unavailable if isinstance(s, RollingConfig) else 0,
            drain_timeout=config.drain_timeout,
            stop_grace=config.stop_grace,
            target=config.target,
            preview_port=(s.preview_port or 0) if isinstance(s, BlueGreenConfig) else 0,
            auto_promote=s.auto_promote if isinstance(s, BlueGreenConfig) else True,
            rollback_window=s.rollback_window if isinstance(s, BlueGreenConfig) else 300.0,
            canary_steps=tuple(
                (step.weight, step.pause, step.analysis)
                for step in (s.steps if isinstance(s, CanaryConfig) else ())
            ),
            analysis_window=analysis.window,
            max_error_rate=analysis.max_error_rate,
            max_p99=analysis.max_p99,
            min_requests=analysis.min_requests,
            progress_deadline=config.progress_deadline,
            memory_limit=config.resources.memory or 0,
            pids_limit=config.resources.pids or 0,
            cpu_limit=config.resources.cpu or 0.0,
            volumes=tuple((v.path, v.name, v.host_path, v.read_only) for v in config.volumes),
            tmpfs=tuple((t.path, t.size) for t in config.tmpfs),
            isolation=config.isolation,
        )

    def to_config(self, *, strict: bool = True) -> ServiceConfig:
        """The typed config. ``strict`` refuses a setting the strategy does not use
        (a request); otherwise it is dropped (a row stored before strategies had types).

        Raises ``UsageError`` naming the field for an unknown strategy or a bad value."""
        if self.strategy not in STRATEGY_NAMES:
            raise UsageError(
                f"strategy: expected one of {', '.join(STRATEGY_NAMES)} (got {self.strategy!r})"
            )
        analysis = AnalysisConfig(
            window=self.analysis_window,
            max_error_rate=self.max_error_rate,
            max_p99=self.max_p99,
            min_requests=self.min_requests,
        )
        strategy: StrategyConfig
        if self.strategy == "blue-green":
            strategy = BlueGreenConfig(
                preview_port=self.preview_port or None,
                auto_promote=self.auto_promote,
                rollback_window=self.rollback_window,
                analysis=analysis,
            )
        elif self.strategy == "canary":
            steps: list[CanaryStep] = []
            for n, (weight, pause, analyze) in enumerate(self.canary_steps):
                try:
                    steps.append(CanaryStep(weight, pause, analyze))
                except UsageError as exc:
                    raise UsageError(f"canary_steps[{n}]: {exc.message}") from None
            strategy = CanaryConfig(steps=tuple(steps), analysis=analysis)
        else:
            strategy = RollingConfig(max_surge=self.max_surge, max_unavailable=self.max_unavailable)
        if self.isolation not in ISOLATION_MODES:
            raise UsageError(
                f"isolation: expected one of {', '.join(ISOLATION_MODES)} (got {self.isolation!r})"
            )
        config = ServiceConfig(
            replicas=self.replicas,
            port=self.port,
            health=self.health,
            env=self.env,
            strategy=strategy,
            drain_timeout=self.drain_timeout,
            stop_grace=self.stop_grace,
            target=self.target,
            progress_deadline=self.progress_deadline,
            resources=Resources(
                memory=self.memory_limit or None,
                pids=self.pids_limit or None,
                cpu=self.cpu_limit or None,
            ),
            volumes=tuple(
                Volume(path=p, name=n, host_path=h, read_only=ro) for p, n, h, ro in self.volumes
            ),
            tmpfs=tuple(Tmpfs(path=p, size=size) for p, size in self.tmpfs),
            isolation=self.isolation,
        )
        if strict:
            kept = ConfigRecord.of(config)
            for f in fields(self):
                if getattr(self, f.name) != getattr(kept, f.name):
                    raise UsageError(
                        f"{f.name}: strategy {self.strategy!r} does not use it"
                        f" (got {getattr(self, f.name)!r})",
                        hint=f"Leave {f.name} out, or at its default, for this strategy.",
                    )
        return config

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["env"] = [list(kv) for kv in self.env]
        d["canary_steps"] = [list(s) for s in self.canary_steps]
        d["volumes"] = [list(v) for v in self.volumes]
        d["tmpfs"] = [list(t) for t in self.tmpfs]
        for name, default in _SEALING_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfigRecord:
        data = dict(data)
        health = dict(data["health"])
        health["command"] = tuple(health.get("command", ()))
        data["health"] = HealthCheck(**health)
        data["env"] = tuple((str(k), str(v)) for k, v in data.get("env", ()))
        data["canary_steps"] = tuple(
            (int(w), None if p is None else float(p), bool(a))
            for w, p, a in data.get("canary_steps", ())
        )
        data["volumes"] = tuple(
            (str(p), str(n), str(h), bool(ro)) for p, n, h, ro in data.get("volumes", ())
        )
        data["tmpfs"] = tuple((str(p), int(size)) for p, size in data.get("tmpfs", ()))
        return cls(**data)


# Fields added with sealed instances, and the values that mean "not set".
_SEALING_DEFAULTS: dict[str, Any] = {
    "memory_limit": 0,
    "pids_limit": 0,
    "cpu_limit": 0.0,
    "volumes": [],
    "tmpfs": [],
    "isolation": "auto",
}


_RELEASE_ID_RE = re.compile(r"^(?:([a-z][a-z0-9-]{0,62})@)?r?([0-9]{1,18})\Z")


def release_id(service: str, number: int) -> str:
    """How a release is named everywhere (ledger, status, logs): ``web@r7``."""
    return f"{service}@r{number}"


@dataclass(frozen=True)
class ReleaseId:
    """A release named by its service and number; ``str()`` spells it ``web@r7``."""

    service: str
    number: int

    def __str__(self) -> str:
        return release_id(self.service, self.number)

    @classmethod
    def parse(cls, text: str, *, service: str) -> ReleaseId:
        """``web@r7``, ``r7`` or ``7``, of ``service``; raises ``UsageError`` otherwise
        (another service's release, a number below 1, anything else)."""
        m = _RELEASE_ID_RE.match(text)
        if m is None or int(m.group(2)) < 1:
            raise UsageError(
                f"not a release: {text!r} (expected {release_id(service, 3)}, r3 or 3)",
                hint=f"Run 'graven releases {service}' to list its releases.",
            )
        if m.group(1) is not None and m.group(1) != service:
            raise UsageError(
                f"{text} is a release of {m.group(1)!r}, not of {service!r}",
                hint=f"Run 'graven releases {service}' to list its releases.",
            )
        return cls(service, int(m.group(2)))


@dataclass(frozen=True)
class Release:
    """One immutable revision of a service: ``web@r7``."""

    service: str
    number: int
    image: Digest
    config: ServiceConfig
    content_hash: str = field(default="")

    @property
    def id(self) -> str:
        return release_id(self.service, self.number)

    @staticmethod
    def hash_of(service: str, image: Digest, config: ServiceConfig) -> str:
        doc = {"service": service, "image": str(image), "config": config.to_dict()}
        return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


# The life of an instance: starting -> healthy <-> unhealthy; draining; stopped (final).
InstanceState = Literal["starting", "healthy", "unhealthy", "draining", "stopped"]
LIVE_STATES: tuple[InstanceState, ...] = ("starting", "healthy", "unhealthy", "draining")
# How a rollout ended ('running' until it does); 'superseded': a newer rollout took over.
RolloutState = Literal["running", "succeeded", "failed", "aborted", "superseded"]
RolloutKind = Literal["deploy", "rollback", "down"]


@dataclass(frozen=True)
class Instance:
    """One running copy of a release, as observed: ``web-r7-3f2a``."""

    id: str
    service: str
    release: int
    image: Digest
    host: str
    port: int
    pid: int
    started_at: float
    state: InstanceState = "starting"
    # Crash loops: how many instances of the service died unexpectedly, one after the
    # other, before this one started, and how the last of them ended.
    restarts: int = 0
    last_exit: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @staticmethod
    def new_id(service: str, release: int, token: str) -> str:
        """``web-r7-3f2a``: the service, its release, and a random ``token``."""
        return f"{service}-r{release}-{token}"
