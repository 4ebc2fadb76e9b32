"""The controller's HTTP API, served on a unix socket in the state dir.

Requests are untrusted: the head and the body must each arrive within a deadline,
numbers are ASCII decimal within the range their column holds, bodies are size- and
depth-capped UTF-8 JSON objects checked key by key, and every refusal is a JSON error
with a message the CLI can show as is. Only a broken invariant logs a traceback.

At most ``max_connections`` connections are open at once. When a new one finds them
all taken, the one that has waited longest for its request is dropped to make room
(with a 503): a real client sends its whole request at once, so it is reading for
microseconds, while a stalled one reads until its deadline. A ``graven status`` is
thus served at once even behind a full house of stalled connections; only when every
slot is busy answering does a newcomer get a 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import re
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from graven.controller.engine import Engine
from graven.controller.health_watch import CRASH_LOOP_AFTER, HealthMemory
from graven.controller.results import (
    AbortResult,
    DeployResult,
    DownResults,
    HealthReply,
    InstanceStatus,
    PreviewResult,
    PromoteResult,
    ReleaseShare,
    Reply,
    RollbackResult,
    RolloutInstance,
    RolloutReply,
    RolloutView,
    ServiceStatus,
    ShutdownReply,
    StateDirView,
    StatusView,
    VolumeRemoval,
    VolumeView,
    from_json,
    to_json,
)
from graven.controller.secret_store import is_secret_ref
from graven.disk import disk_error
from graven.errors import GravenError, NotFoundError, UsageError
from graven.model import (
    ConfigRecord,
    Digest,
    HealthCheck,
    InstanceState,
    ServiceConfig,
    Volume,
    release_id,
)
from graven.runtime.isolation import describe_isolation
from graven.runtime.limits import limit_warnings

log = logging.getLogger("graven.controller.api")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
# A real request nests 4 deep; json.loads itself gives up (RecursionError) near 1000.
MAX_DEPTH = 32
MAX_QUERY_FIELDS = 16
# Numbers end up in SQLite INTEGER columns: signed 64 bits.
MAX_INT = 2**63 - 1
MAX_PORT = 65535
# Seconds a client has to send its request head, then its body, and to take the reply.
HEAD_TIMEOUT = 5.0
BODY_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
MAX_CONNECTIONS = 64

_DIGITS = frozenset("0123456789")
# The spec's Name (graven.spec.fields.NAME_PATTERN, which a test holds this to): not
# imported, as pydantic would roughly double the controller's import time.
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)
_METHOD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Visible ASCII: what a request target may hold once percent-encoded.
_TARGET_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))

Body = Mapping[str, object]  # a request body, as parse_body checked it
Query = dict[str, list[str]]
Handler = Callable[[Body, Query], Awaitable[Reply]]


def _volume_views(volumes: tuple[Volume, ...]) -> tuple[VolumeView, ...]:
    return tuple(VolumeView(v.path, v.name, v.host_path, v.read_only) for v in volumes)


def _health_of(state: InstanceState, mem: HealthMemory | None) -> str:
    """What the probes say of an instance: passing only when the last probe passed."""
    if state != "healthy":
        return state
    if mem is None or mem.passing is None:
        return "passing"  # passed its start-up check; not re-probed since
    return "passing" if mem.passing else f"failing ({mem.failures} in a row)"


@dataclasses.dataclass
class _Share:
    """One release's instances in a status, while they are counted."""

    traffic_percent: float = 0.0
    instances: int = 0
    healthy: int = 0
    preview: bool = False

    def view(self, release: str) -> ReleaseShare:
        percent = round(self.traffic_percent, 1)
        role = (
            "live"
            if percent > 0
            else "preview"
            if self.preview
            else "warm"
            if self.healthy
            else "starting"
        )
        return ReleaseShare(release, percent, self.instances, self.healthy, self.preview, role)


class BadRequest(UsageError):
    """A request the API refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, *, status: int = 400, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


# --- parsing: pure, no I/O -------------------------------------------------------------


def parse_decimal(text: str, where: str, *, low: int = 0, high: int = MAX_INT) -> int:
    """``text`` as an ASCII decimal number within ``low..high``, or a BadRequest.

    ``int()`` alone is too lenient for the wire: it takes '١٢', '1_0', ' 12 ' and '+1'."""
    if not text or not _DIGITS.issuperset(text):
        raise BadRequest(f"{where} must be a decimal number, got {_shown(text)}")
    # More digits than the bound: refuse before int() spends time on (or, past 4300
    # digits, refuses) a huge string.
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)) or not low <= int(digits) <= high:
        raise BadRequest(f"{where} must be from {low} to {high}, got {_shown(text)}")
    return int(digits)


def _shown(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _value(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class RequestHead(typing.NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]
    length: int


def parse_head(head: bytes) -> RequestHead:
    """The request line and the headers the API uses, strictly: HTTP/1.x, an
    origin-form target of visible ASCII, at most one Content-Length of ASCII digits."""
    if len(head) > MAX_HEAD:
        raise BadRequest(f"request head larger than {MAX_HEAD} bytes", status=431)
    lines = head.decode("latin-1").split("\r\n")
    while lines and not lines[-1]:
        lines.pop()
    parts = lines[0].split(" ") if lines else []
    if (
        len(parts) != 3
        or not parts[0]
        or not _METHOD_CHARS.issuperset(parts[0])
        or not parts[1].startswith("/")
        or not _TARGET_CHARS.issuperset(parts[1])
        or parts[2] not in ("HTTP/1.1", "HTTP/1.0")
    ):
        raise BadRequest(f"malformed request line {_shown(lines[0] if lines else '')}")
    method, target, _ = parts
    path, _, raw_query = target.partition("?")
    try:
        query = parse_qs(raw_query, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError as exc:
        raise BadRequest(f"query: more than {MAX_QUERY_FIELDS} fields") from exc
    lengths: set[str] = set()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip(" \t"):
            raise BadRequest(f"malformed header line {_shown(line)}")
        name = name.lower()
        if name == "transfer-encoding":
            raise BadRequest("Transfer-Encoding is not supported: send a Content-Length")
        if name == "content-length":
            lengths.add(value.strip(" \t"))
    if len(lengths) > 1:
        raise BadRequest("conflicting Content-Length headers")
    length = parse_decimal(lengths.pop(), "Content-Length") if lengths else 0
    if length > MAX_BODY:
        raise BadRequest(f"request body larger than {MAX_BODY} bytes", status=413)
    return RequestHead(method, path, query, length)


def parse_body(raw: bytes) -> dict[str, object]:
    """A request body: a UTF-8 JSON object, nested at most MAX_DEPTH deep, with
    integers that fit 64 bits, finite numbers and strings without lone surrogates."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8 (byte {exc.start})") from exc
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError as exc:
        raise BadRequest(f"request body nests deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    _check_tree(body)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _check_tree(body: Body) -> None:
    # Iterative, so a tree json.loads accepted cannot overflow the stack here.
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        where = f"request body: {path}" if path else "request body"
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise BadRequest(f"request body nests deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, f"{where}: a key")
                    child = f"{path}.{key}" if path else key
                else:
                    child = f"{path}[{key}]"
                stack.append((item, child, depth + 1))
        elif isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int) and not -MAX_INT - 1 <= value <= MAX_INT:
            raise BadRequest(
                f"{where}: integer {_value(value)} out of range ({-MAX_INT - 1} to {MAX_INT})"
            )
        elif isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"{where}: number out of range (got {value})")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{where}: lone surrogate \\u{ord(text[exc.start]):04x}") from exc


def field(
    body: Body,
    key: str,
    kind: type,
    *,
    required: bool = True,
    low: int = 0,
    high: int = MAX_INT,
) -> Any:
    """``body[key]`` checked to be of ``kind`` (an int within ``low..high``)."""
    if key not in body or body[key] is None:
        if required:
            raise BadRequest(f"request body: missing key {key!r}")
        return None
    value = body[key]
    if kind is int and isinstance(value, bool):
        raise BadRequest(f"request body: {key!r} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"request body: {key!r} must be {kind.__name__}, got {_value(value)}")
    if isinstance(value, int) and not low <= value <= high:
        raise BadRequest(f"request body: {key!r} must be from {low} to {high}, got {value}")
    return value


def service_name(body: Body, *, required: bool = True) -> Any:
    """``body["service"]``: a name the spec allows, as it becomes file names."""
    name = field(body, "service", str, required=required)
    if name is not None and not _NAME_RE.fullmatch(name):
        raise BadRequest(f"request body: 'service' must match {NAME_PATTERN}, got {_shown(name)}")
    return name


def query_number(query: dict[str, list[str]], key: str, *, low: int = 1) -> int:
    values = query.get(key, [])
    if len(values) != 1:
        raise BadRequest(f"query: {key!r} must be given once (got {len(values)})")
    return parse_decimal(values[0], f"query: {key!r}", low=low)


def service_config(data: object) -> ServiceConfig:
    """A ServiceConfig from its JSON form, every field checked against its type:
    numbers within range, lists for tuples, no unknown keys, no setting the strategy
    does not use."""
    checked = _dataclass_fields(ConfigRecord, data, "request body: config")
    try:
        return ConfigRecord.from_dict(checked).to_config(strict=True)
    except UsageError as exc:
        raise BadRequest(f"request body: config.{exc.message}", hint=exc.hint) from None


def _dataclass_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if missing := sorted(required - data.keys()):
        raise BadRequest(f"{where}: missing key {missing[0]!r}")
    for key, value in data.items():
        if key not in hints:
            raise BadRequest(f"{where}: unknown key {key!r}")
        _check_value(hints[key], value, f"{where}.{key}", port=key.endswith("port"))
    return data


def _check_value(hint: Any, value: Any, where: str, *, port: bool = False) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is types.UnionType:
        if value is None and type(None) in args:
            return
        (hint,) = [a for a in args if a is not type(None)]
        _check_value(hint, value, where, port=port)
    elif origin is tuple:
        if not isinstance(value, list):
            raise BadRequest(f"{where} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            for i, item in enumerate(value):
                _check_value(args[0], item, f"{where}[{i}]")
        elif len(value) != len(args):
            raise BadRequest(f"{where} must have {len(args)} items, got {len(value)}")
        else:
            for i, (arg, item) in enumerate(zip(args, value, strict=True)):
                _check_value(arg, item, f"{where}[{i}]")
    elif hint is HealthCheck:
        _dataclass_fields(HealthCheck, value, where)
    elif hint is bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{where} must be true or false, got {_value(value)}")
    elif hint is int:
        high = MAX_PORT if port else MAX_INT
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise BadRequest(f"{where} must be an integer from 0 to {high}, got {_value(value)}")
    elif hint is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= MAX_INT
        ):
            raise BadRequest(f"{where} must be a number from 0 to {MAX_INT}, got {_value(value)}")
    elif hint is str:
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be a string, got {_value(value)}")
    else:  # pragma: no cover - a new field type: teach _check_value about it
        raise TypeError(f"{where}: no check for {hint!r}")


class Api:
    def __init__(
        self,
        engine: Engine,
        on_shutdown: Callable[[], None],
        *,
        head_timeout: float = HEAD_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.engine = engine
        self.on_shutdown = on_shutdown
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        # Open connections, oldest first (dicts keep insertion order).
        self._open: dict[int, _Connection] = {}
        self._next_id = 0
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/health"): self.health,
            ("GET", "/v1/status"): self.status,
            ("GET", "/v1/rollout"): self.rollout,
            ("POST", "/v1/deploy"): self.deploy,
            ("POST", "/v1/plan"): self.plan,
            ("POST", "/v1/rollback"): self.rollback,
            ("POST", "/v1/down"): self.down,
            ("POST", "/v1/promote"): self.promote,
            ("POST", "/v1/abort"): self.abort,
            ("POST", "/v1/volume/rm"): self.volume_rm,
            ("POST", "/v1/shutdown"): self.shutdown,
        }

    # --- handlers -----------------------------------------------------------------------

    async def health(self, body: Body, query: Query) -> HealthReply:
        return HealthReply(ok=True, pid=os.getpid())

    async def status(self, body: Body, query: Query) -> StatusView:
        wanted = query.get("service", [None])[0]
        return StatusView(
            self.engine_status(wanted),
            state_dir=from_json(StateDirView, self.engine.upkeep.disk.report(), "state dir report"),
            isolation=describe_isolation(self.engine.runtime),
        )

    def engine_status(self, wanted: str | None) -> tuple[ServiceStatus, ...]:
        st = self.engine.state
        services = st.services()
        if wanted is not None and wanted not in services:
            raise NotFoundError(
                f"service {wanted!r} was never deployed",
                hint="Run 'graven status' to list deployed services.",
            )
        running_routers = self.engine.router.running()
        out = []
        for name in sorted(services):
            if wanted is not None and name != wanted:
                continue
            desired = services[name]
            release = st.release(name, desired) if desired is not None else None
            record = st.release_record(name, desired) if desired is not None else None
            rollout = st.last_rollout(name)
            live = st.live_instances(name)
            weights = st.weights(name)
            preview = set(st.preview_instances(name))
            routed = {i.id: weights.get(i.id, 100) for i in live if i.state == "healthy"}
            total = sum(routed.values())
            instances = []
            releases: dict[str, _Share] = {}
            for inst in live:
                mem = self.engine.health_watch.memory.get(inst.id)
                share = 100.0 * routed.get(inst.id, 0) / total if total else 0.0
                rel = release_id(name, inst.release)
                agg = releases.setdefault(rel, _Share())
                agg.traffic_percent += share
                agg.instances += 1
                agg.healthy += inst.state == "healthy"
                agg.preview = agg.preview or inst.id in preview
                instances.append(
                    InstanceStatus(
                        id=inst.id,
                        release=rel,
                        image=str(inst.image),
                        address=inst.address,
                        pid=inst.pid,
                        # Still routed, but its last probe failed: not "healthy".
                        state="degraded"
                        if inst.state == "healthy" and mem is not None and mem.passing is False
                        else inst.state,
                        started_at=inst.started_at,
                        # "passing": the last probe passed; "failing": it did not (the
                        # instance is taken out after unhealthy_threshold misses in a row).
                        health=_health_of(inst.state, mem),
                        probe=mem.last if mem else "",
                        failed_probes=mem.failures if mem else 0,
                        weight=weights.get(inst.id, 100) if inst.id in routed else 0,
                        traffic_percent=round(share, 1),
                        preview=inst.id in preview,
                        restarts=inst.restarts,
                        last_exit=inst.last_exit,
                    )
                )
            port = running_routers.get(name)
            preview_port = running_routers.get(f"{name}-preview")
            crashes = st.crashes(name)
            left = self.engine.health_watch.backoff_left(name)
            out.append(
                ServiceStatus(
                    service=name,
                    desired_release=release.id if release else None,
                    image=str(release.image) if release else None,
                    image_name=record.image_name if record else None,
                    replicas=release.config.replicas if release else 0,
                    url=f"http://127.0.0.1:{port}/" if port else None,
                    preview_url=f"http://127.0.0.1:{preview_port}/" if preview_port else None,
                    rollout=RolloutView.of(rollout) if rollout else None,
                    releases=tuple(agg.view(rel) for rel, agg in sorted(releases.items())),
                    restarts=crashes.restarts,
                    last_exit=crashes.last_exit,
                    crash_looping=crashes.restarts >= CRASH_LOOP_AFTER,
                    next_start_in=round(left, 1) if left > 0 else None,
                    problem=self.engine.problems.get(name),
                    instances=tuple(instances),
                    volumes=_volume_views(release.config.volumes) if release else (),
                    warnings=limit_warnings(release.config.resources) if release else (),
                )
            )
        return tuple(out)

    async def rollout(self, body: Body, query: Query) -> RolloutReply:
        rollout = self.engine.state.rollout(query_number(query, "id"))
        return RolloutReply(
            RolloutView.of(rollout),
            tuple(
                RolloutInstance(i.id, i.release, i.state)
                for i in self.engine.state.live_instances(rollout.service)
            ),
        )

    def _candidate(
        self, body: Body, *, keep_secrets: bool = False
    ) -> tuple[str, Digest, ServiceConfig]:
        service = service_name(body)
        config = service_config(field(body, "config", dict))
        try:
            image = Digest(field(body, "image", str))
        except ValueError as exc:
            raise BadRequest(f"request body: 'image': {exc}") from exc
        secrets = field(body, "secrets", dict, required=False) or {}
        return service, image, self._seal(config, secrets, keep=keep_secrets)

    def _seal(
        self, config: ServiceConfig, secrets: Mapping[str, object], *, keep: bool
    ) -> ServiceConfig:
        """``config`` with each secret env value as a reference; ``keep`` stores the
        values (deploy), else they are only hashed (plan). No value is ever echoed."""
        env = dict(config.env)
        for key, value in env.items():
            if is_secret_ref(value):
                raise BadRequest(
                    f"env {key}: values of the form '<secret sha256:…>' are reserved for secrets",
                    hint="Set a secret with env_file, ${VAR} or {secret_file: PATH} instead.",
                )
        for key, secret in secrets.items():
            if not _ENV_NAME.fullmatch(key) or not isinstance(secret, str) or "\0" in secret:
                raise BadRequest(
                    f"request body: secret {_shown(key)} needs a variable name and a text value"
                )
            if key in env:
                raise BadRequest(f"request body: env {key} is both plain and secret")
            store = self.engine.secrets
            env[key] = store.put(secret) if keep else store.reference(secret)
        return dataclasses.replace(config, env=tuple(sorted(env.items())))

    async def plan(self, body: Body, query: Query) -> PreviewResult:
        return self.engine.commands.preview(*self._candidate(body))

    async def deploy(self, body: Body, query: Query) -> DeployResult:
        service, image, config = self._candidate(body, keep_secrets=True)
        details = field(body, "details", dict, required=False) or {}
        return self.engine.commands.deploy(
            service,
            image,
            field(body, "image_name", str),
            config,
            field(body, "actor", str),
            field(body, "message", str),
            details,
        )

    async def rollback(self, body: Body, query: Query) -> RollbackResult:
        return self.engine.commands.rollback(
            service_name(body),
            field(body, "to", int, required=False, low=1),
            field(body, "actor", str),
            field(body, "message", str),
        )

    async def promote(self, body: Body, query: Query) -> PromoteResult:
        return self.engine.commands.promote(
            service_name(body), field(body, "actor", str), field(body, "message", str)
        )

    async def abort(self, body: Body, query: Query) -> AbortResult:
        return self.engine.commands.abort(
            service_name(body), field(body, "actor", str), field(body, "message", str)
        )

    async def down(self, body: Body, query: Query) -> DownResults:
        service = service_name(body, required=False)
        actor = field(body, "actor", str)
        message = field(body, "message", str)
        names = [service] if service else sorted(self.engine.state.services())
        return DownResults(tuple(self.engine.commands.down(n, actor, message) for n in names))

    async def volume_rm(self, body: Body, query: Query) -> VolumeRemoval:
        from graven.controller.volume_commands import remove_volume

        name = field(body, "name", str)
        if not _NAME_RE.fullmatch(name):
            raise BadRequest(f"request body: 'name' must match {NAME_PATTERN}, got {_shown(name)}")
        return await remove_volume(
            self.engine,
            name,
            force=field(body, "force", bool, required=False) or False,
            actor=field(body, "actor", str),
            message=field(body, "message", str),
        )

    async def shutdown(self, body: Body, query: Query) -> ShutdownReply:
        asyncio.get_running_loop().call_later(0.05, self.on_shutdown)
        return ShutdownReply(ok=True)

    # --- wire ---------------------------------------------------------------------------

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._open) >= self.max_connections and not self._evict_oldest_reader():
            await self._reply(writer, *_busy(self.max_connections))
            return
        conn = _Connection()
        key = self._next_id
        self._next_id += 1
        self._open[key] = conn
        try:
            try:
                status, payload = await self._handle(reader, conn)
            except Exception as exc:
                refused = disk_error(exc, self.engine.state_dir)
                if refused is None:
                    log.exception("API request failed")
                    status, payload = 500, {"error": "InternalError", "message": "controller error"}
                else:
                    # A full or read-only state dir: what to do, and status shows it too.
                    self.engine.upkeep.disk.refused(exc)
                    status, payload = 507, refused.to_dict()
            await self._reply(writer, status, payload)
        finally:
            self._open.pop(key, None)

    def _evict_oldest_reader(self) -> bool:
        for key, conn in self._open.items():
            if conn.deadline is not None:
                # Its slot is free now, not once its task has run: a burst of newcomers
                # in one loop iteration must not take the count past the bound.
                del self._open[key]
                conn.evicted = True
                conn.deadline.reschedule(asyncio.get_running_loop().time())
                conn.deadline = None
                return True
        return False

    async def _reply(self, writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.drain()
        except (OSError, TimeoutError):
            # A client that does not take its reply loses it rather than hold a slot.
            writer.transport.abort()
            return
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, conn: _Connection) -> tuple[int, Any]:
        loop = asyncio.get_running_loop()
        phase = "head"
        try:
            # One deadline per phase: a client that trickles a byte a second is still
            # cut off, as a per-read timeout would not.
            async with asyncio.timeout(self.head_timeout) as deadline:
                conn.deadline = deadline
                try:
                    head = parse_head(await reader.readuntil(b"\r\n\r\n"))
                    phase = "body"
                    deadline.reschedule(loop.time() + self.body_timeout)
                    raw = await reader.readexactly(head.length)
                finally:
                    conn.deadline = None
        except TimeoutError:
            if conn.evicted:
                return _busy(self.max_connections)
            limit = self.head_timeout if phase == "head" else self.body_timeout
            return 408, BadRequest(f"request {phase} not received within {limit:g}s").to_dict()
        except asyncio.LimitOverrunError:
            return 431, BadRequest(f"request head larger than {MAX_HEAD} bytes").to_dict()
        except asyncio.IncompleteReadError:
            return 400, BadRequest(f"connection closed before the request {phase} ended").to_dict()
        except BadRequest as exc:
            return exc.status, exc.to_dict()
        handler = self.routes.get((head.method, head.path))
        if handler is None:
            return 404, {"error": "NotFound", "message": f"no route {head.method} {head.path}"}
        try:
            return 200, to_json(await handler(parse_body(raw), head.query))
        except BadRequest as exc:
            return exc.status, exc.to_dict()
        except GravenError as exc:
            return (400 if exc.exit_code == 2 else 409), exc.to_dict()


class _Connection:
    """One open API connection; ``deadline`` is set while it reads its request."""

    __slots__ = ("deadline", "evicted")

    def __init__(self) -> None:
        self.deadline: asyncio.Timeout | None = None
        self.evicted = False


def _busy(limit: int) -> tuple[int, dict[str, object]]:
    return 503, BadRequest(
        f"the controller has {limit} connections open",
        hint="Retry in a moment; if this persists, something is holding connections open.",
    ).to_dict()
