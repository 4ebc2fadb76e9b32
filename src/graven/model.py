"""Frozen value types that cross module boundaries.

Plain strings never travel between modules where a value type exists: a ``Digest`` is
validated once, at the edge, and trusted afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class ServiceConfig:
    """Everything about a service a release freezes, besides the image digest."""

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
    # A rollout that completes no step for this long fails (waits at gates excepted).
    progress_deadline: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["env"] = [list(kv) for kv in self.env]
        d["canary_steps"] = [list(s) for s in self.canary_steps]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceConfig:
        data = dict(data)
        health = dict(data["health"])
        health["command"] = tuple(health.get("command", ()))
        data["health"] = HealthCheck(**health)
        data["env"] = tuple((str(k), str(v)) for k, v in data.get("env", ()))
        data["canary_steps"] = tuple(
            (int(w), None if p is None else float(p), bool(a))
            for w, p, a in data.get("canary_steps", ())
        )
        return cls(**data)


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
        return f"{self.service}@r{self.number}"

    @staticmethod
    def hash_of(service: str, image: Digest, config: ServiceConfig) -> str:
        doc = {"service": service, "image": str(image), "config": config.to_dict()}
        return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


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
    state: str = "starting"  # starting | healthy | unhealthy | draining | stopped
    # Crash loops: how many instances of the service died unexpectedly, one after the
    # other, before this one started, and how the last of them ended.
    restarts: int = 0
    last_exit: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
