"""What the controller answers: one frozen dataclass per reply, and their JSON.

The engine's commands return these types, the API encodes them with ``to_json`` (the
one encoder: field names are the JSON keys, tuples become lists, a field marked
``omit_if_none`` is left out when None), and the client decodes the JSON back with
``from_json``, which checks every key and type and names the one that is wrong. So
``graven ... -o json`` stays what it was, and a malformed reply is a ControllerError,
never a KeyError in a verb.

Decoding ignores keys it does not know (a newer controller may say more) but insists
on every key a type needs.

Imported by the CLI's lean paths: nothing heavy here.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from graven.errors import ControllerError

if TYPE_CHECKING:
    from graven.ledger.state import RolloutRecord as Rollout
    from graven.plan.steps import Plan

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]
JSONObject = dict[str, JSONValue]

T = TypeVar("T")

# Field metadata: left out of the JSON when None; the JSON key, when not the name.
_OMIT = "omit_if_none"
_KEY = "json_key"
_OMIT_IF_NONE = {_OMIT: True}


# --- commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseChange:
    """A deploy or a rollback: the release now desired, and the rollout toward it
    (``rollout`` None: nothing changed and none runs). ``ledger`` is the entry's
    sequence number, only when something changed."""

    changed: bool
    release: str
    rollout: int | None
    ledger: int | None = dataclasses.field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class DeployResult(ReleaseChange):
    """What ``POST /v1/deploy`` answers."""


@dataclass(frozen=True)
class RollbackResult(ReleaseChange):
    """What ``POST /v1/rollback`` answers."""


@dataclass(frozen=True)
class DownResult:
    """One service taken down (``changed`` False: it was down already)."""

    changed: bool
    service: str
    rollout: int | None
    ledger: int | None = dataclasses.field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class DownResults:
    """What ``POST /v1/down`` answers: one result per service."""

    results: tuple[DownResult, ...]


@dataclass(frozen=True)
class VolumeRemoval:
    """What ``POST /v1/volume/rm`` answers: the named volume is deleted. ``used_by``
    lists the releases that still used it (only with ``forced``)."""

    name: str
    path: str
    size: int
    forced: bool
    used_by: tuple[str, ...]
    ledger: int


@dataclass(frozen=True)
class PromoteResult:
    """What ``POST /v1/promote`` answers."""

    service: str
    rollout: int
    release: str


@dataclass(frozen=True)
class AbortResult:
    """What ``POST /v1/abort`` answers; ``reason`` is the one the rollout records."""

    service: str
    rollout: int
    reason: str


@dataclass(frozen=True)
class StepView:
    kind: str
    description: str


@dataclass(frozen=True)
class PlanView:
    """A plan as people read it: each step's kind and description."""

    service: str
    release: int | None
    steps: tuple[StepView, ...]

    @classmethod
    def of(cls, plan: Plan) -> PlanView:
        return cls(
            plan.service,
            plan.release,
            tuple(StepView(s.kind, s.describe(plan.service)) for s in plan.steps),
        )


@dataclass(frozen=True)
class PreviewResult:
    """What ``POST /v1/plan`` answers: what a deploy would do now. Unchanged, it
    names the release that stays (``from``) and the steps still left, if any."""

    changed: bool
    from_release: str | None = dataclasses.field(metadata={_KEY: "from"})
    to: str | None = dataclasses.field(default=None, kw_only=True, metadata=_OMIT_IF_NONE)
    changes: tuple[str, ...] | None = dataclasses.field(
        default=None, kw_only=True, metadata=_OMIT_IF_NONE
    )
    steps: PlanView


# --- rollouts and status -----------------------------------------------------------------


@dataclass(frozen=True)
class RolloutView:
    """A rollout as status and ``GET /v1/rollout`` show it."""

    id: int
    service: str
    kind: str
    from_release: int | None
    to_release: int | None
    state: str
    reason: str
    progress: str
    started_at: float
    finished_at: float | None
    step_index: int = 0
    promoted: int = 0
    switched_at: float | None = None
    paused_until: float | None = None
    progressed_at: float | None = None

    @classmethod
    def of(cls, ro: Rollout) -> RolloutView:
        return cls(
            id=ro.id,
            service=ro.service,
            kind=ro.kind,
            from_release=ro.from_release,
            to_release=ro.to_release,
            state=ro.state,
            reason=ro.reason,
            progress=ro.progress,
            started_at=ro.started_at,
            finished_at=ro.finished_at,
            step_index=ro.step_index,
            promoted=int(ro.promoted),  # 0 or 1 on the wire, as it always was
            switched_at=ro.switched_at,
            paused_until=ro.paused_until,
            progressed_at=ro.progressed_at,
        )


@dataclass(frozen=True)
class RolloutInstance:
    id: str
    release: int
    state: str


@dataclass(frozen=True)
class RolloutReply:
    """What ``GET /v1/rollout`` answers: the rollout and the service's live instances."""

    rollout: RolloutView
    instances: tuple[RolloutInstance, ...]


@dataclass(frozen=True)
class InstanceStatus:
    """One live instance in ``graven status``."""

    id: str
    release: str
    image: str
    address: str
    pid: int
    state: str  # "degraded": still routed, but its last probe failed
    started_at: float
    health: str  # passing | failing (n in a row) | the state while not routed
    probe: str
    failed_probes: int
    weight: int
    traffic_percent: float
    preview: bool
    restarts: int
    last_exit: str


@dataclass(frozen=True)
class ReleaseShare:
    """One release's instances and share of live traffic in ``graven status``."""

    release: str
    traffic_percent: float
    instances: int
    healthy: int
    preview: bool
    role: str  # live | preview | warm | starting


@dataclass(frozen=True)
class VolumeView:
    """A writable path of a service's instances in ``graven status``: a named volume
    (``name``) or a host directory (``host``)."""

    path: str
    name: str
    host: str
    read_only: bool


@dataclass(frozen=True)
class ServiceStatus:
    """One service in ``graven status``."""

    service: str
    desired_release: str | None
    image: str | None
    image_name: str | None
    replicas: int
    url: str | None
    preview_url: str | None
    rollout: RolloutView | None
    releases: tuple[ReleaseShare, ...]
    restarts: int
    last_exit: str
    crash_looping: bool
    next_start_in: float | None
    problem: str | None
    instances: tuple[InstanceStatus, ...]
    volumes: tuple[VolumeView, ...] = ()
    # What the release asks that this machine cannot do (a limit it cannot enforce).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateDirView:
    """The state dir's free space and, when there is one, its problem."""

    path: str
    free_bytes: int | None
    min_free_bytes: int
    problem: str | None
    hint: str | None


@dataclass(frozen=True)
class StatusView:
    """What ``GET /v1/status`` answers; ``controller`` is "stopped" when the status
    was read from the records with no controller running."""

    services: tuple[ServiceStatus, ...]
    controller: str | None = dataclasses.field(default=None, metadata=_OMIT_IF_NONE)
    state_dir: StateDirView | None = dataclasses.field(default=None, metadata=_OMIT_IF_NONE)
    # How the runtime runs instances here: "sealed", or "none (why not)".
    isolation: str | None = dataclasses.field(default=None, metadata=_OMIT_IF_NONE)


@dataclass(frozen=True)
class HealthReply:
    """What ``GET /v1/health`` answers."""

    ok: bool
    pid: int


@dataclass(frozen=True)
class ShutdownReply:
    """What ``POST /v1/shutdown`` answers."""

    ok: bool


Reply = (
    DeployResult
    | RollbackResult
    | DownResults
    | PromoteResult
    | AbortResult
    | VolumeRemoval
    | PreviewResult
    | RolloutReply
    | StatusView
    | HealthReply
    | ShutdownReply
)


# --- the codec ---------------------------------------------------------------------------


def to_json(value: object) -> JSONObject:
    """``value`` (one of this module's dataclasses) as the API sends it."""
    out = _encode(value)
    if not isinstance(out, dict):
        raise TypeError(f"{type(value).__name__} is not a reply type")
    return out


def _encode(value: object) -> JSONValue:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: JSONObject = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get(_OMIT):
                continue
            out[f.metadata.get(_KEY, f.name)] = _encode(item)
        return out
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def from_json(cls: type[T], data: object, what: str = "reply") -> T:
    """``data`` (parsed JSON) as ``cls``, checked key by key; a ControllerError names
    ``what`` was decoded and the first key that is missing or of the wrong type."""
    try:
        return typing.cast(T, _decode(cls, data, ""))
    except _Malformed as exc:
        raise ControllerError(
            f"the controller sent a malformed {what}: {exc.where or 'the reply'}: {exc.problem}",
            hint="Is an older controller still running? 'graven down' stops it; "
            "the next verb starts the current one.",
        ) from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Malformed(Exception):
    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def _malformed(where: str, expected: str, got: object) -> _Malformed:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:60] + "..."
    return _Malformed(where, f"expected {expected}, got {shown}")


def _child(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _decode(hint: Any, data: object, where: str) -> object:
    origin = typing.get_origin(hint)
    if origin is types.UnionType:
        args = typing.get_args(hint)
        if data is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        if data is None:
            raise _malformed(where, _name(inner), data)
        return _decode(inner, data, where)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(data, list):
            raise _malformed(where, "a list", data)
        return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(data))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_object(hint, data, where)
    if hint is bool:
        if not isinstance(data, bool):
            raise _malformed(where, "true or false", data)
        return data
    if hint is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise _malformed(where, "an integer", data)
        return data
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise _malformed(where, "a number", data)
        return float(data)
    if hint is str:
        if not isinstance(data, str):
            raise _malformed(where, "a string", data)
        return data
    raise TypeError(f"{where}: no decoder for {hint!r}")  # a new field type: add one


def _decode_object(cls: type, data: object, where: str) -> object:
    if not isinstance(data, dict):
        raise _malformed(where, f"an object ({cls.__name__})", data)
    hints = _hints(cls)
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        key = f.metadata.get(_KEY, f.name)
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Malformed(where, f"missing key {key!r}")
            continue
        values[f.name] = _decode(hints[f.name], data[key], _child(where, key))
    return cls(**values)


def _name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a value"
    )
