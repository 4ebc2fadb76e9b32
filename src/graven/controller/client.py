"""The CLI's side of the controller API: JSON over HTTP on a unix socket.

Verbs that need the controller start it when it is not running, detached, so it
outlives the command that started it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

from graven import detached
from graven.controller.paths import (
    controller_log,
    controller_socket,
    make_private,
    require_access,
)
from graven.errors import (
    ControllerError,
    ControllerNotRunning,
    DiskError,
    GravenError,
    NotFoundError,
    UsageError,
)

if TYPE_CHECKING:
    from graven.controller.results import (
        AbortResult,
        DeployResult,
        DownResult,
        HealthReply,
        PreviewResult,
        PromoteResult,
        RollbackResult,
        RolloutReply,
        ShutdownReply,
        StatusView,
        VolumeRemoval,
    )

T = TypeVar("T")


def _exchange(path: Path, request: bytes, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 request on the unix socket; the controller closes after replying.

    Hand-rolled on purpose: the API speaks one fixed dialect (JSON, Content-Length,
    Connection: close), and http.client's import alone costs a CLI verb ~15 ms."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if not sep or len(status_line) < 2 or not status_line[1].isdigit():
        raise ControllerError(f"the controller sent a malformed reply: {raw[:200]!r}")
    return int(status_line[1]), body


def _raise_if_unwritable(state_dir: Path) -> None:
    """A controller cannot start in a state dir that takes no writes (it could not
    even open its database): say that, rather than what its log says about it."""
    from graven.disk import condition, disk_error, free_bytes, write_refusal

    refused = write_refusal(state_dir)
    found = disk_error(refused, state_dir) if refused is not None else None
    if found is None:
        return
    try:
        free = free_bytes(state_dir)
    except OSError:
        free = 0
    _, problem, hint = condition(state_dir, free, found, 0)
    raise DiskError(f"the controller cannot start: {problem}", hint=hint, errno=found.errno)


def _decoded(reply: type[T], data: object, path: str) -> T:
    from graven.controller.results import from_json

    return from_json(reply, data, f"reply to {path}")


class ControllerClient:
    def __init__(self, state_dir: Path, *, timeout: float = 60.0) -> None:
        self.state_dir = state_dir
        self.socket = controller_socket(state_dir)
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, object] | None = None,
        **query: str | int | None,
    ) -> Any:
        """One request and its JSON reply as parsed, unchecked: the typed methods below
        check it (the CLI uses only those). A refusal raises the error the controller
        named."""
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        payload = json.dumps(body).encode() if body is not None else b""
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: graven\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        try:
            status, raw = _exchange(self.socket, request, self.timeout)
        except OSError as exc:
            if isinstance(exc, PermissionError):
                require_access(self.state_dir)  # another user's state dir: say whose
            # On a unix socket only connect() fails these two ways: nothing was sent.
            kind = (
                ControllerNotRunning
                if isinstance(exc, FileNotFoundError | ConnectionRefusedError)
                else ControllerError
            )
            raise kind(
                f"cannot reach the controller at {self.socket}: {exc}",
                hint=f"See {controller_log(self.state_dir)}; "
                "'graven serve' runs it in the foreground.",
            ) from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ControllerError(
                f"the controller sent a reply that is not JSON: {raw[:200]!r}"
            ) from exc
        if status == 200:
            return data
        if not isinstance(data, dict):
            raise ControllerError(f"the controller answered HTTP {status}: {raw[:200]!r}")
        message = str(data.get("message") or f"HTTP {status}")
        hint = data.get("hint")
        hint = str(hint) if hint is not None else None
        if data.get("error") == "NotFoundError":
            raise NotFoundError(message, hint=hint)
        if status == 400:
            raise UsageError(message, hint=hint)
        raise GravenError(message, hint=hint)

    # --- the API, typed ------------------------------------------------------------------
    # Each method imports its reply type only once its request is out: the reply types
    # (dataclasses and all) cost a CLI verb ~20-40 ms, and a rollback's traffic switch,
    # on the lean path, waits for none of it.

    def health(self) -> HealthReply:
        data = self.request("GET", "/v1/health")
        from graven.controller.results import HealthReply

        return _decoded(HealthReply, data, "/v1/health")

    def status(self, service: str | None = None) -> StatusView:
        """Every service (or ``service`` only): instances, releases, rollout, health."""
        data = self.request("GET", "/v1/status", service=service)
        from graven.controller.results import StatusView

        return _decoded(StatusView, data, "/v1/status")

    def rollout(self, rollout_id: int) -> RolloutReply:
        """One rollout, as ``graven status`` shows it, and its service's live instances."""
        data = self.request("GET", "/v1/rollout", id=rollout_id)
        from graven.controller.results import RolloutReply

        return _decoded(RolloutReply, data, "/v1/rollout")

    def plan(self, candidate: Mapping[str, object]) -> PreviewResult:
        """What deploying ``candidate`` (service, image, image_name, config, secrets)
        would do now."""
        data = self.request("POST", "/v1/plan", candidate)
        from graven.controller.results import PreviewResult

        return _decoded(PreviewResult, data, "/v1/plan")

    def deploy(
        self,
        candidate: Mapping[str, object],
        *,
        actor: str,
        message: str,
        details: Mapping[str, object],
    ) -> DeployResult:
        body = {**candidate, "actor": actor, "message": message, "details": details}
        data = self.request("POST", "/v1/deploy", body)
        from graven.controller.results import DeployResult

        return _decoded(DeployResult, data, "/v1/deploy")

    def rollback(
        self, service: str, *, to: int | None = None, actor: str, message: str
    ) -> RollbackResult:
        body = {"service": service, "to": to, "actor": actor, "message": message}
        data = self.request("POST", "/v1/rollback", body)
        from graven.controller.results import RollbackResult

        return _decoded(RollbackResult, data, "/v1/rollback")

    def promote(self, service: str, *, actor: str, message: str) -> PromoteResult:
        body = {"service": service, "actor": actor, "message": message}
        data = self.request("POST", "/v1/promote", body)
        from graven.controller.results import PromoteResult

        return _decoded(PromoteResult, data, "/v1/promote")

    def abort(self, service: str, *, actor: str, message: str) -> AbortResult:
        body = {"service": service, "actor": actor, "message": message}
        data = self.request("POST", "/v1/abort", body)
        from graven.controller.results import AbortResult

        return _decoded(AbortResult, data, "/v1/abort")

    def down(self, service: str | None, *, actor: str, message: str) -> tuple[DownResult, ...]:
        """Take ``service`` down (None: every service)."""
        body = {"service": service, "actor": actor, "message": message}
        data = self.request("POST", "/v1/down", body)
        from graven.controller.results import DownResults

        return _decoded(DownResults, data, "/v1/down").results

    def remove_volume(self, name: str, *, force: bool, actor: str, message: str) -> VolumeRemoval:
        """Delete the named volume (refused while a release uses it, unless ``force``)."""
        body = {"name": name, "force": force, "actor": actor, "message": message}
        data = self.request("POST", "/v1/volume/rm", body)
        from graven.controller.results import VolumeRemoval

        return _decoded(VolumeRemoval, data, "/v1/volume/rm")

    def shutdown(self) -> ShutdownReply:
        data = self.request("POST", "/v1/shutdown", {})
        from graven.controller.results import ShutdownReply

        return _decoded(ShutdownReply, data, "/v1/shutdown")

    def alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self.request("GET", "/v1/health")
        except ControllerError:
            return False
        return True

    def ensure_running(self, *, wait: float = 15.0) -> None:
        """Start a detached controller for this state dir unless one answers."""
        if self.alive():
            return
        for change in make_private(self.state_dir):
            sys.stderr.write(f"graven: tightened permissions of {change}\n")
        log_path = controller_log(self.state_dir)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(log_fd, "ab") as log:
            proc = detached.spawn(
                [sys.executable, "-m", "graven.controller.daemon", str(self.state_dir.resolve())],
                output=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if detached.wait_until(self.alive, wait, unless_exited=proc):
            return
        if proc.poll() is not None:
            # Lost a race with another starter? Then its controller will answer soon.
            if detached.wait_until(self.alive, 0.2):
                return
            _raise_if_unwritable(self.state_dir)
            tail = log_path.read_text(errors="replace").splitlines()[-10:]
            raise ControllerError(
                "the controller exited while starting:\n" + "\n".join(tail),
                hint=f"Full log: {log_path}",
            )
        raise ControllerError(
            f"the controller did not answer within {wait:g}s", hint=f"See {log_path}."
        )
