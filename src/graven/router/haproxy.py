"""The HAProxy Router adapter: one ``haproxy`` process per service, driven through its
runtime API.

Each service gets its own haproxy, started detached (its own session) so it outlives
the controller, plus a small latency collector beside it (see below). Backends are
haproxy servers named after their ids; ``set_backends`` turns a backend set into
runtime-API commands (``add server``, ``set weight``, ``set server ... state``,
``del server``), so a change never reloads haproxy and never drops a request.

Persistence. A reload or restart of haproxy forgets runtime-API changes, so after
every change graven also rewrites ``haproxy.cfg`` with the current set as static
``server`` lines (a drained backend gets ``weight 0`` there, the same effect on load
balancing) and keeps the set itself in ``backends.json``. A restarted haproxy thus
serves the same backends from its first request; ``ensure`` then re-applies the exact
states and weights through the runtime API. An operator's own reload of
``haproxy.cfg`` (``haproxy -f haproxy.cfg -x admin.sock -sf PID``) is just as safe:
``ensure`` adopts the new process and re-applies the states the same way.

Traffic. Each request is balanced on its own (round robin, weights scaled to
haproxy's 0-256), answers carry ``X-Graven-Backend`` (the server name), and a server
that refuses, resets or never answers costs a retry on another server instead of a
failed request: always when the connection failed, and for idempotent methods also
after an empty answer. Idle connections to backends are pooled and reused.

Removal. A backend left out of a set is drained; it is deleted (``maint``, then
``del server``) as soon as haproxy reports no request in flight on it. graven has no
process of its own beside haproxy to watch for that moment, so every
``set_backends`` and ``stats`` call deletes the idle leftovers it sees: a caller
that polls ``stats`` while draining (as the rollout does) sees them go.

Latency. haproxy keeps no histogram, but it logs every request: the frontend logs
``<server> <Tc> <Tr>`` (connect and response-header times, in ms) to a unix datagram
socket served by ``python -m graven.router.haproxy collect``, a tiny process that
sums the times into ``LATENCY_BOUNDS`` buckets per server and answers a query
socket. It exits by itself when its haproxy is gone and starts afresh with it, so
its counters reset exactly when haproxy's do. Resolution is haproxy's: 1 ms. Log
datagrams are dropped, not queued, if the collector falls behind, so under extreme
load the histogram may count slightly fewer requests than ``requests``.

Files, per service, under ``STATE/haproxy/SERVICE/``::

    haproxy.cfg    generated; rewritten on every change
    backends.json  the desired set (and the leftovers still draining)
    router.json    {"pid", "start_time", "port", "collector_pid", "collector_start_time"}
    haproxy.log    haproxy's and the collector's stderr: start-up, alerts, never requests
    lock           serialises every call between threads and controller processes
    admin.sock, log.sock, latency.sock
                   the runtime API, the log socket and the collector's query socket
                   (under a private directory in /tmp when the path would not fit a
                   unix socket address)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from graven.atomic import write_atomic
from graven.errors import RouterError, UsageError
from graven.model import is_valid_name
from graven.router.base import (
    LATENCY_BOUNDS,
    Backend,
    BackendState,
    BackendStats,
    check_backends,
    latency_bucket,
    split_address,
)
from graven.router.embedded import check_service_name, router_log_tail

HAPROXY_MAX_WEIGHT: Final = 256  # haproxy's own limit; graven weights go to 1000
_MAX_SOCKET_PATH: Final = 100  # sun_path holds 108 bytes; keep a margin
_API_TIMEOUT: Final = 10.0
_PING_TIMEOUT: Final = 2.0
_POLL: Final = 0.02
_INSTALL_HINT: Final = "Install it with 'apt-get install haproxy' (HAProxy 2.6 or newer)."
# Requests haproxy may send again after a server took them but gave no answer;
# anything else is retried only when the connection itself failed (nothing was sent).
_IDEMPOTENT_METHODS: Final = "GET HEAD OPTIONS PUT DELETE"
_DYNAMIC_POOL: Final = "pool-max-conn -1 pool-purge-delay 5s"  # a static server's defaults

# haproxy and collector processes this process spawned, by pid: polled so that they
# are reaped (no zombies, no ResourceWarning) whichever router object looks next.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- pure parts


def server_name(backend_id: str) -> str:
    """The haproxy server name of a backend id.

    haproxy names allow ``[A-Za-z0-9_.:-]``; ids also allow ``@``. ``:`` escapes:
    ``::`` is a ``:`` and ``:a`` an ``@``, so the mapping is reversible and most ids
    keep their own name (it is what ``X-Graven-Backend`` and haproxy's stats show).
    """
    return backend_id.replace(":", "::").replace("@", ":a")


def backend_id(name: str) -> str:
    """Inverse of ``server_name``."""
    out: list[str] = []
    i = 0
    while i < len(name):
        if name[i] == ":" and i + 1 < len(name):
            out.append("@" if name[i + 1] == "a" else ":")
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def haproxy_weights(backends: Sequence[Backend]) -> dict[str, int]:
    """Each backend's weight on haproxy's 0-256 scale, by id.

    Only ratios matter to round robin, so weights are scaled against the largest one
    in the set: 1:3 stays 85:256 instead of losing precision (or 1, 2 and 3 all
    becoming 1) on a fixed 1000-to-256 scale. A non-zero weight never becomes 0.
    """
    top = max((b.weight for b in backends), default=0)
    if top == 0:
        return {b.id: 0 for b in backends}
    return {
        b.id: max(1, round(b.weight * HAPROXY_MAX_WEIGHT / top)) if b.weight else 0
        for b in backends
    }


@dataclass(frozen=True)
class ServerRow:
    """One server line of haproxy's ``show stat``."""

    name: str
    address: str
    status: str  # "no check"/"UP" (ready), "DRAIN", "MAINT", ...
    weight: int  # user weight on haproxy's scale
    inflight: int  # scur + qcur
    requests: int  # stot: every time the server was picked, retried attempts included
    responses_5xx: int
    errors: int  # hrsp_5xx + econ + eresp + wretr + wredis

    @property
    def state(self) -> str:
        """``ready``, ``drain`` or ``maint``."""
        status = self.status.upper()
        if status.startswith("MAINT"):
            return "maint"
        if status.startswith("DRAIN"):
            return "drain"
        return "ready"


def parse_show_stat(text: str, proxy: str) -> list[ServerRow]:
    """The server rows of ``proxy`` in ``show stat`` CSV output, in haproxy's order."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not 'show stat' output: {text[:200]!r}")
    header = lines[0][2:].split(",")
    col = {name: i for i, name in enumerate(header)}
    for needed in ("pxname", "svname", "qcur", "scur", "stot", "status", "weight"):
        if needed not in col:
            raise ValueError(f"'show stat' lacks the {needed!r} column")

    def num(fields: list[str], name: str) -> int:
        i = col.get(name)
        if i is None or i >= len(fields) or not fields[i]:
            return 0
        return int(fields[i])

    rows: list[ServerRow] = []
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) < len(col) - 1 or fields[col["pxname"]] != proxy:
            continue
        name = fields[col["svname"]]
        if name in ("FRONTEND", "BACKEND"):
            continue
        hrsp_5xx = num(fields, "hrsp_5xx")
        # An attempt that got no answer ends in econ/eresp, or, when haproxy tried
        # again, in wretr (same server) or wredis (another one): the request
        # survived, but this server failed it all the same.
        failed = sum(num(fields, f) for f in ("econ", "eresp", "wretr", "wredis"))
        rows.append(
            ServerRow(
                name=name,
                address=fields[col["addr"]] if "addr" in col else "",
                status=fields[col["status"]],
                weight=num(fields, "uweight") if "uweight" in col else num(fields, "weight"),
                inflight=num(fields, "scur") + num(fields, "qcur"),
                requests=num(fields, "stot"),
                responses_5xx=hrsp_5xx,
                errors=hrsp_5xx + failed,
            )
        )
    return rows


@dataclass(frozen=True)
class Desired:
    """One backend of the desired set as haproxy will get it."""

    backend: Backend
    address: str  # resolved, haproxy syntax: 1.2.3.4:80 or [::1]:80

    @property
    def name(self) -> str:
        return server_name(self.backend.id)


@dataclass(frozen=True)
class Step:
    """One runtime-API command. ``may_fail`` steps (deleting a server that a request
    reached in the meantime) leave the server lingering instead of failing the call."""

    command: str
    may_fail: bool = False


def plan_changes(proxy: str, desired: Sequence[Desired], rows: Sequence[ServerRow]) -> list[Step]:
    """Runtime-API commands that turn haproxy's ``rows`` into the ``desired`` set.

    New ready servers and those gaining weight come first, ready servers losing weight
    next, drained or removed ones last, so capacity never dips during a swap (in a
    blue-green switch no moment has every server at weight 0). Servers no longer
    wanted are drained, and deleted at once when nothing is in flight on them.
    """
    weights = haproxy_weights([d.backend for d in desired])
    current = {r.name: r for r in rows}
    wanted = {d.name for d in desired}
    first: list[Step] = []
    lowered: list[Step] = []
    last: list[Step] = []
    for d in desired:
        ref = f"{proxy}/{d.name}"
        weight = weights[d.backend.id]
        row = current.get(d.name)
        if row is None:
            # haproxy 2.6 gives a dynamic server no pool of idle server connections
            # unless asked (static ones have one): without it, every request would
            # open a new connection to the backend.
            steps = [
                Step(f"add server {ref} {d.address} weight {weight} {_DYNAMIC_POOL}"),
                Step(f"set server {ref} state {d.backend.state}"),
            ]
        else:
            steps = []
            if row.address != d.address:
                host, _, port = d.address.rpartition(":")
                steps.append(Step(f"set server {ref} addr {host.strip('[]')} port {port}"))
            re_weight = [Step(f"set weight {ref} {weight}")] if row.weight != weight else []
            re_state = (
                [Step(f"set server {ref} state {d.backend.state}")]
                if row.state != d.backend.state
                else []
            )
            # Drain before the weight moves, and re-weight before getting ready, so
            # a server never takes traffic in a state nobody asked for.
            if d.backend.state == "drain":
                steps += re_state + re_weight
            else:
                steps += re_weight + re_state
        if d.backend.state == "drain":
            last.extend(steps)
        elif row is not None and weight < row.weight:
            lowered.extend(steps)
        else:
            first.extend(steps)
    for row in rows:
        if row.name in wanted:
            continue
        last.extend(removal_steps(proxy, row))
    return first + lowered + last


def removal_steps(proxy: str, row: ServerRow) -> list[Step]:
    """Drain a server that is no longer wanted; delete it if nothing is in flight."""
    ref = f"{proxy}/{row.name}"
    if row.inflight > 0:
        return [] if row.state != "ready" else [Step(f"set server {ref} state drain")]
    steps = [] if row.state == "maint" else [Step(f"set server {ref} state maint")]
    return [*steps, Step(f"del server {ref}", may_fail=True)]


def render_config(
    *,
    service: str,
    listen: str,
    admin_socket: Path,
    log_socket: Path,
    stop_timeout: float,
    servers: Sequence[Desired],
) -> str:
    """The haproxy.cfg graven runs a service's haproxy with."""
    weights = haproxy_weights([d.backend for d in servers])
    lines = [
        f"# Generated by graven for service {service!r}; rewritten on every change.",
        "# The server lines are the current backend set, so a reload keeps it.",
        "global",
        # ensure() reads this back through 'show info' to adopt the right process.
        f"    description graven:{service}:{listen.rpartition(':')[2]}",
        f"    stats socket {admin_socket} mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
        f"    log {log_socket} len 1024 format raw local0 info",
        f"    hard-stop-after {max(1, int(stop_timeout))}s",
        # Without SO_REUSEPORT a port held by anything else fails the start instead
        # of being shared; a seamless reload takes the listeners over with -x.
        "    noreuseport",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlognull",
        "    option forwardfor",
        # On a soft stop (stop, reload) an idle keep-alive client is not cut off while
        # its next request may be on the way: that request is answered, with close.
        "    option idle-close-on-response",
        # The embedded proxy's limits: connect 3 s, 300 s for a response head, 60 s
        # for an idle keep-alive client.
        "    timeout connect 3s",
        "    timeout client 60s",
        "    timeout server 300s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 60s",
        "    timeout queue 10s",
        # A server that refuses, resets or never answers costs a retry on another
        # server, never a failed request (health itself is the controller's job).
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response response-timeout",
        "",
        f"frontend {service}-in",
        f"    bind {listen}",
        '    log-format "%s %Tc %Tr"',
        f"    default_backend {service}",
        "",
        f"backend {service}",
        "    balance roundrobin",
        f"    acl graven_idempotent method {_IDEMPOTENT_METHODS}",
        "    http-request disable-l7-retry unless graven_idempotent",
        "    http-response set-header X-Graven-Backend %s",
    ]
    for d in servers:
        weight = 0 if d.backend.state == "drain" else weights[d.backend.id]
        note = "  # drain" if d.backend.state == "drain" else ""
        lines.append(f"    server {d.name} {d.address} weight {weight}{note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class _Files:
    service: str
    dir: Path
    config: Path
    state: Path
    record: Path
    log: Path
    lock: Path
    admin: Path
    log_socket: Path
    latency: Path
    short_dir: Path | None


@dataclass(frozen=True)
class _Record:
    pid: int
    start_time: int
    port: int
    collector_pid: int | None
    collector_start_time: int | None


@dataclass(frozen=True)
class _State:
    """``backends.json``: the desired set and the removed backends still draining."""

    backends: list[Backend]
    addresses: dict[str, str]  # id -> resolved haproxy address
    leftovers: dict[str, Backend]  # id -> last known backend (state drain)


class HAProxyRouter:
    """Router port adapter driving a real HAProxy (2.6+), one process per service.

    ``state_dir`` is graven's state directory; files live in ``state_dir/haproxy``.
    haproxy listens on ``listen_host`` (loopback by default). Methods are
    synchronous and may block for up to ``start_timeout`` (ensure) or
    ``stop_timeout`` (stop, ensure on another port): call them from a worker thread
    in async code.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        listen_host: str = "127.0.0.1",
        haproxy: str = "haproxy",
        start_timeout: float = 10.0,
        stop_timeout: float = 12.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "haproxy"
        self.listen_host = listen_host
        self.haproxy = haproxy
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

    # ------------------------------------------------------------------ Router port

    def ensure(self, service: str, port: int) -> None:
        """Make sure haproxy for ``service`` listens on ``port``; adopt a running one."""
        check_service_name(service)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise UsageError(f"router port must be 1-65535 (got {port!r})")
        files = self._files(service)
        with self._locked(files):
            live = self._info(files)
            record = self._read_record(files)
            if live is not None:
                pid, live_port = live
                if live_port == port:
                    self._adopt(files, pid, port, record)
                    return
                self._terminate(files, pid, signal.SIGUSR1, self.stop_timeout)
            elif record is not None and _is_running(record.pid, record.start_time):
                # Alive but not answering: starting, or wedged. Give it the start
                # timeout before replacing it.
                if record.port == port and self._wait_ready(files, record.pid, None):
                    self._adopt(files, record.pid, port, record)
                    return
                self._terminate(files, record.pid, signal.SIGUSR1, self.stop_timeout)
            if record is not None:
                self._stop_collector(record)
            self._spawn(files, port)

    def set_backends(self, service: str, backends: list[Backend]) -> None:
        """Replace the service's backend set (see ``Router.set_backends``)."""
        check_service_name(service)
        check_backends(backends)
        files = self._files(service)
        desired = [Desired(b, _haproxy_address(b)) for b in backends]
        with self._locked(files):
            rows = self._rows(files)
            old = self._read_state(files)
            leftovers = {**old.leftovers}
            for b in old.backends:
                leftovers[b.id] = Backend(b.id, b.address, "drain", b.weight)
            self._apply(files, desired, rows, leftovers)

    def stats(self, service: str) -> list[BackendStats]:
        """Per-backend counters from haproxy's ``show stat``, drained leftovers included.

        Also deletes leftovers that have become idle (see the module docstring).
        """
        check_service_name(service)
        files = self._files(service)
        with self._locked(files):
            rows = self._rows(files)
            state = self._read_state(files)
            wanted = {server_name(b.id) for b in state.backends}
            idle = [r for r in rows if r.name not in wanted and r.inflight == 0]
            if idle:
                self._run(files, [s for r in idle for s in removal_steps(service, r)])
                before, rows = rows, self._rows(files)
                if len(rows) != len(before):
                    self._save(files, state.backends, state.addresses, state.leftovers, rows)
            latency = self._latency(files)
        by_name = {r.name: r for r in rows}
        known = {b.id: b for b in state.backends}
        out: list[BackendStats] = []
        ordered = [by_name[n] for n in (server_name(b.id) for b in state.backends) if n in by_name]
        ordered += [r for r in rows if r.name not in wanted]
        for row in ordered:
            bid = backend_id(row.name)
            backend = known.get(bid) or state.leftovers.get(bid)
            state_now: BackendState = (
                "ready"
                if bid in known and known[bid].state == "ready" and row.state == "ready"
                else "drain"
            )
            buckets: tuple[int, ...] = ()
            if latency is not None:
                buckets = latency.get(row.name, (0,) * (len(LATENCY_BOUNDS) + 1))
            out.append(
                BackendStats(
                    id=bid,
                    address=backend.address if backend is not None else row.address,
                    state=state_now,
                    inflight=row.inflight,
                    requests=row.requests,
                    errors=row.errors,
                    weight=backend.weight if backend is not None else row.weight,
                    responses_5xx=row.responses_5xx,
                    latency_buckets=buckets,
                )
            )
        return out

    def stop(self, service: str) -> None:
        """Stop the service's haproxy (soft stop, then SIGKILL) and forget its backends.

        Requests in flight get up to ``stop_timeout`` to finish. No error if none runs.
        """
        check_service_name(service)
        files = self._files(service)
        with self._locked(files):
            live = self._info(files)
            record = self._read_record(files)
            if live is not None:
                self._terminate(files, live[0], signal.SIGUSR1, self.stop_timeout)
            elif record is not None and _is_running(record.pid, record.start_time):
                self._terminate(files, record.pid, signal.SIGUSR1, self.stop_timeout)
            if record is not None:
                self._stop_collector(record)
            for path in (
                files.record,
                files.state,
                files.config,
                files.admin,
                files.log_socket,
                files.latency,
            ):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if files.short_dir is not None:
                with contextlib.suppress(OSError):
                    files.short_dir.rmdir()

    def running(self) -> dict[str, int]:
        """Services with a live haproxy and the port each listens on."""
        out: dict[str, int] = {}
        if not self.dir.is_dir():
            return out
        for record_file in sorted(self.dir.glob("*/router.json")):
            service = record_file.parent.name
            if not is_valid_name(service):
                continue
            files = self._files(service)
            record = self._read_record(files)
            if record is not None and _is_running(record.pid, record.start_time):
                out[service] = record.port
            elif (live := self._info(files)) is not None:
                out[service] = live[1]  # reloaded by someone else; ensure adopts it
        return out

    # ------------------------------------------------------------------ extras

    def pid(self, service: str) -> int | None:
        """The pid of the service's live haproxy, or None."""
        check_service_name(service)
        record = self._read_record(self._files(service))
        if record is not None and _is_running(record.pid, record.start_time):
            return record.pid
        return None

    def collector_pid(self, service: str) -> int | None:
        """The pid of the service's live latency collector, or None."""
        check_service_name(service)
        record = self._read_record(self._files(service))
        if (
            record is not None
            and record.collector_pid is not None
            and record.collector_start_time is not None
            and _is_running(record.collector_pid, record.collector_start_time)
        ):
            return record.collector_pid
        return None

    def admin_socket(self, service: str) -> Path:
        """haproxy's runtime API socket (``socat - UNIX-CONNECT:PATH`` talks to it)."""
        check_service_name(service)
        return self._files(service).admin

    def config_path(self, service: str) -> Path:
        """The generated haproxy.cfg of the service."""
        check_service_name(service)
        return self._files(service).config

    def log_path(self, service: str) -> Path:
        """Where haproxy and the collector write start-up messages and alerts."""
        check_service_name(service)
        return self._files(service).log

    def command(self, service: str, command: str) -> str:
        """Send one runtime-API command and return haproxy's answer (for operators)."""
        check_service_name(service)
        return self._api(self._files(service), command)

    # ------------------------------------------------------------------ internals

    def _files(self, service: str) -> _Files:
        home = self.dir / service
        sockets = home
        short: Path | None = None
        if len(os.fsencode((home / "latency.sock").absolute())) > _MAX_SOCKET_PATH:
            short = self._short_socket_dir(service)
            sockets = short
        return _Files(
            service=service,
            dir=home,
            config=home / "haproxy.cfg",
            state=home / "backends.json",
            record=home / "router.json",
            log=home / "haproxy.log",
            lock=home / "lock",
            admin=sockets / "admin.sock",
            log_socket=sockets / "log.sock",
            latency=sockets / "latency.sock",
            short_dir=short,
        )

    def _short_socket_dir(self, service: str) -> Path:
        # Same state dir and service, same short dir: a restarted controller finds
        # the sockets without any file of ours.
        key = hashlib.sha256(
            os.fsencode(self.state_dir.resolve()) + b"\0" + service.encode()
        ).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"graven-haproxy-{key}"

    def _make_dirs(self, files: _Files) -> None:
        try:
            files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if files.short_dir is not None:
                files.short_dir.mkdir(mode=0o700, exist_ok=True)
                st = files.short_dir.lstat()
                # /tmp is shared: only a private directory of our own may hold sockets.
                if files.short_dir.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
                    raise RouterError(
                        f"socket directory {files.short_dir} is not a private directory "
                        "of this user",
                        hint=f"Remove {files.short_dir}, or use a shorter state directory.",
                    )
        except OSError as exc:
            raise RouterError(
                f"cannot create router directory {files.dir}: {exc}",
                hint="Check that the state directory exists and is writable.",
            ) from None

    @contextlib.contextmanager
    def _locked(self, files: _Files) -> Iterator[None]:
        self._make_dirs(files)
        try:
            fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RouterError(f"cannot open {files.lock}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- runtime API

    def _api(self, files: _Files, command: str, timeout: float = _API_TIMEOUT) -> str:
        try:
            return _ask(files.admin, command, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise RouterError(
                f"no router is running for service {files.service!r}",
                hint="The controller starts it (Router.ensure) on its next reconcile; "
                f"if it keeps failing, see {files.log}.",
            ) from None
        except OSError as exc:
            raise RouterError(
                f"haproxy of service {files.service!r} did not answer {command!r}: {exc}",
                hint=f"See {files.log}; 'graven down' and deploy again restarts it.",
            ) from None

    def _rows(self, files: _Files) -> list[ServerRow]:
        text = self._api(files, "show stat")
        try:
            return parse_show_stat(text, files.service)
        except ValueError as exc:
            raise RouterError(
                f"haproxy of service {files.service!r} answered 'show stat' badly: {exc}",
                hint=f"See {files.log}.",
            ) from None

    def _run(self, files: _Files, steps: Sequence[Step]) -> None:
        for step in steps:
            answer = self._api(files, step.command).strip()
            if _succeeded(step.command, answer):
                if step.command.startswith("del server "):
                    name = step.command.rpartition("/")[2]
                    self._forget_latency(files, name)
                continue
            if step.may_fail:
                continue
            raise RouterError(
                f"haproxy of service {files.service!r} refused {step.command!r}: {answer}",
                hint=f"The backend set is kept in {files.state}; the next set_backends or "
                f"a restart of the router applies it again. See {files.log}.",
            )

    def _info(self, files: _Files) -> tuple[int, int] | None:
        """``(pid, port)`` of the haproxy answering on the admin socket, or None."""
        try:
            text = _ask(files.admin, "show info", _PING_TIMEOUT)
        except OSError:
            return None
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            fields[key] = value
        parts = fields.get("description", "").split(":")
        if len(parts) != 3 or parts[0] != "graven" or parts[1] != files.service:
            return None
        try:
            return int(fields["Pid"]), int(parts[2])
        except (KeyError, ValueError):
            return None

    # ---- state

    def _apply(
        self,
        files: _Files,
        desired: list[Desired],
        rows: list[ServerRow],
        leftovers: dict[str, Backend],
    ) -> None:
        addresses = {d.backend.id: d.address for d in desired}
        wanted = [d.backend for d in desired]
        # Recorded first: if a command fails half-way, the next call starts from here.
        self._save(files, wanted, addresses, leftovers, rows)
        self._run(files, plan_changes(files.service, desired, rows))
        self._save(files, wanted, addresses, leftovers, self._rows(files))

    def _save(
        self,
        files: _Files,
        backends: list[Backend],
        addresses: dict[str, str],
        leftovers: dict[str, Backend],
        rows: list[ServerRow],
    ) -> None:
        """Write backends.json and regenerate haproxy.cfg for the current set."""
        present = {backend_id(r.name) for r in rows}
        wanted = {b.id for b in backends}
        kept = {k: v for k, v in leftovers.items() if k in present and k not in wanted}
        doc = {
            "service": files.service,
            "backends": [
                {
                    "id": b.id,
                    "address": b.address,
                    "state": b.state,
                    "weight": b.weight,
                    "haproxy_address": addresses[b.id],
                }
                for b in backends
            ],
            "leftovers": [
                {"id": b.id, "address": b.address, "weight": b.weight} for b in kept.values()
            ],
        }
        record = self._read_record(files)
        try:
            write_atomic(files.state, json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)
            if record is not None:
                self._write_config(files, record.port, backends, addresses)
        except OSError as exc:
            raise RouterError(f"cannot write {files.state}: {exc}") from None

    def _write_config(
        self, files: _Files, port: int, backends: list[Backend], addresses: dict[str, str]
    ) -> None:
        text = render_config(
            service=files.service,
            listen=_listen_address(self.listen_host, port),
            admin_socket=files.admin,
            log_socket=files.log_socket,
            stop_timeout=self.stop_timeout,
            servers=[Desired(b, addresses[b.id]) for b in backends],
        )
        write_atomic(files.config, text.encode(), mode=0o600)

    def _read_state(self, files: _Files) -> _State:
        try:
            doc = json.loads(files.state.read_bytes())
        except FileNotFoundError:
            return _State([], {}, {})
        except (OSError, ValueError) as exc:
            raise RouterError(
                f"cannot read {files.state}: {exc}",
                hint="Set the backends again (a deploy does), or 'graven down' the service.",
            ) from None
        try:
            backends = [
                Backend(str(b["id"]), str(b["address"]), b["state"], int(b["weight"]))
                for b in doc["backends"]
            ]
            check_backends(backends)
            addresses = {str(b["id"]): str(b["haproxy_address"]) for b in doc["backends"]}
            leftovers = {
                str(b["id"]): Backend(str(b["id"]), str(b["address"]), "drain", int(b["weight"]))
                for b in doc.get("leftovers", [])
            }
        except (KeyError, TypeError, ValueError, RouterError) as exc:
            raise RouterError(
                f"{files.state} is damaged: {exc}",
                hint="Set the backends again (a deploy does), or 'graven down' the service.",
            ) from None
        return _State(backends, addresses, leftovers)

    def _read_record(self, files: _Files) -> _Record | None:
        try:
            doc = json.loads(files.record.read_bytes())
            collector = doc.get("collector_pid")
            collector_start = doc.get("collector_start_time")
            return _Record(
                pid=int(doc["pid"]),
                start_time=int(doc["start_time"]),
                port=int(doc["port"]),
                collector_pid=int(collector) if collector is not None else None,
                collector_start_time=int(collector_start) if collector_start is not None else None,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # A damaged record proves nothing; the admin socket is the authority.
            return None

    def _write_record(
        self, files: _Files, pid: int, port: int, collector_pid: int | None = None
    ) -> None:
        start = _start_time(pid)
        if start is None:
            return
        collector_start = _start_time(collector_pid) if collector_pid is not None else None
        doc = {
            "pid": pid,
            "start_time": start,
            "port": port,
            "collector_pid": collector_pid if collector_start is not None else None,
            "collector_start_time": collector_start,
        }
        try:
            write_atomic(files.record, json.dumps(doc).encode(), mode=0o600)
        except OSError as exc:
            raise RouterError(f"cannot write {files.record}: {exc}") from None

    # ---- processes

    def _adopt(self, files: _Files, pid: int, port: int, record: _Record | None) -> None:
        # The collector that answers for this very haproxy is adopted too; one that
        # is gone, wedged or watching another haproxy is replaced.
        collector = self._ping_collector(files, pid)
        if collector is None:
            if record is not None:
                self._stop_collector(record)
            collector = self._spawn_collector(files, pid)
        if (
            record is None
            or record.pid != pid
            or record.port != port
            or record.collector_pid != collector
        ):
            self._write_record(files, pid, port, collector)
        if record is None or record.pid != pid:
            # Not the process graven last saw: reloaded or restarted by someone else
            # from the config, which has the set but not the exact states.
            self._reconcile(files)

    def _reconcile(self, files: _Files) -> None:
        """Apply backends.json through the runtime API (states and weights exactly)."""
        state = self._read_state(files)
        desired = [Desired(b, state.addresses[b.id]) for b in state.backends]
        self._apply(files, desired, self._rows(files), state.leftovers)

    def _spawn(self, files: _Files, port: int) -> None:
        binary = shutil.which(self.haproxy)
        if binary is None:
            raise RouterError(
                f"haproxy is not installed (no {self.haproxy!r} on PATH)", hint=_INSTALL_HINT
            )
        state = self._read_state(files)
        try:
            self._write_config(files, port, state.backends, state.addresses)
        except OSError as exc:
            raise RouterError(f"cannot write {files.config}: {exc}") from None
        for path in (files.admin, files.log_socket, files.latency):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        argv = [binary, "-db", "-f", str(files.config)]
        offset, proc = self._popen(files, argv)
        # Recorded before it answers, so a controller that dies right now still finds
        # (and can stop) this process.
        self._write_record(files, proc.pid, port)
        if not self._wait_ready(files, proc.pid, proc):
            if proc.poll() is None:
                self._terminate(files, proc.pid, signal.SIGKILL, 5.0)
                what = f"did not answer on {files.admin} within {self.start_timeout:.0f} s"
            else:
                what = f"exited with code {proc.returncode}"
            with contextlib.suppress(FileNotFoundError):
                files.record.unlink()
            raise RouterError(
                f"haproxy for service {files.service!r} on port {port} {what}: "
                f"{router_log_tail(files.log, offset)}",
                hint=f"If port {port} is in use, stop what holds it or choose another port. "
                f"Full log: {files.log}",
            )
        collector = self._spawn_collector(files, proc.pid)
        self._write_record(files, proc.pid, port, collector)
        # The config served the set from the first request; now make states and
        # weights exact (drained backends were only weighted 0 in the config).
        self._reconcile(files)

    def _spawn_collector(self, files: _Files, haproxy_pid: int) -> int | None:
        """Start the latency collector for ``haproxy_pid``; None (and a log line) if it
        fails: latency is worth having, not worth refusing to route for."""
        start = _start_time(haproxy_pid)
        if start is None:
            return None
        argv = [
            sys.executable,
            "-m",
            "graven.router.haproxy",
            "collect",
            "--log-socket",
            str(files.log_socket),
            "--query-socket",
            str(files.latency),
            "--watch",
            f"{haproxy_pid}:{start}",
        ]
        _, proc = self._popen(files, argv)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if self._ping_collector(files, haproxy_pid) == proc.pid:
                return proc.pid
            time.sleep(_POLL)
        if proc.poll() is None:
            self._terminate(files, proc.pid, signal.SIGKILL, 5.0)
        with contextlib.suppress(OSError), files.log.open("ab") as log:
            log.write(b"graven: the latency collector did not start; no latency histogram\n")
        return None

    def _popen(self, files: _Files, argv: list[str]) -> tuple[int, subprocess.Popen[bytes]]:
        try:
            with files.log.open("ab") as log:
                offset = log.tell()
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                log.write(f"--- {stamp} starting: {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    close_fds=True,
                    start_new_session=True,
                    cwd=files.dir,
                )
        except OSError as exc:
            hint = _INSTALL_HINT if exc.errno == errno.ENOENT else None
            raise RouterError(
                f"cannot start {Path(argv[0]).name} for service {files.service!r}: {exc}",
                hint=hint,
            ) from None
        _CHILDREN[proc.pid] = proc
        return offset, proc

    def _wait_ready(self, files: _Files, pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            live = self._info(files)
            if live is not None and live[0] == pid:
                return True
            time.sleep(_POLL)
        return False

    def _stop_collector(self, record: _Record) -> None:
        if record.collector_pid is not None and record.collector_start_time is not None:
            _signal_and_wait(record.collector_pid, record.collector_start_time, signal.SIGTERM, 5.0)

    def _terminate(self, files: _Files, pid: int, first: signal.Signals, wait: float) -> None:
        """Send ``first`` (SIGUSR1: haproxy's soft stop) to ``pid``, wait, then SIGKILL.
        The start time is read once and re-checked, so a reused pid is left alone."""
        start = _start_time(pid)
        if start is None:
            return
        try:
            _signal_and_wait(pid, start, first, wait)
        except PermissionError:
            raise RouterError(
                f"not allowed to stop haproxy of service {files.service!r} (pid {pid})",
                hint="Run graven as the user that started the router.",
            ) from None

    # ---- latency

    def _ping_collector(self, files: _Files, haproxy_pid: int) -> int | None:
        """The pid of the collector answering for ``haproxy_pid``, or None."""
        try:
            doc = json.loads(_ask(files.latency, "ping", _PING_TIMEOUT))
            if int(doc["watch"]) == haproxy_pid:
                return int(doc["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _latency(self, files: _Files) -> dict[str, tuple[int, ...]] | None:
        try:
            doc = json.loads(_ask(files.latency, "dump", _PING_TIMEOUT))
            servers = doc["servers"]
            return {str(k): tuple(int(n) for n in v) for k, v in servers.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # no collector: latency unknown, the rest of the stats still hold

    def _forget_latency(self, files: _Files, name: str) -> None:
        # A deleted server's counters are gone in haproxy; its histogram goes too, so
        # a backend added again under the same id starts from zero everywhere.
        with contextlib.suppress(OSError):
            _ask(files.latency, f"forget {name}", _PING_TIMEOUT)


# --------------------------------------------------------------------------- helpers


def _ask(path: Path, command: str, timeout: float) -> str:
    """One command over a unix stream socket; the answer is everything until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(command.encode() + b"\n")
        chunks: list[bytes] = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _succeeded(command: str, answer: str) -> bool:
    if command.startswith("add server "):
        return answer == "New server registered."
    if command.startswith("del server "):
        return answer == "Server deleted."
    if " addr " in command:
        return answer.endswith("by 'stats socket command'")
    return answer == ""


def _haproxy_address(backend: Backend) -> str:
    """``backend.address`` as haproxy takes it: an IP and port (names resolved now)."""
    host, port = split_address(backend.address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RouterError(
                f"backend {backend.id!r}: cannot resolve {host!r}: {exc}",
                hint="Use an IP address, or a name this machine resolves.",
            ) from None
        ip = ipaddress.ip_address(str(infos[0][4][0]))
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid``, or None if it is gone (zombies count as gone)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields after the last ')' are
    # plain: state first, start time the 20th.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        if fields[0] in ("Z", "X"):
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _is_running(pid: int, start_time: int) -> bool:
    return _start_time(pid) == start_time


def _signal_and_wait(pid: int, start_time: int, first: signal.Signals, wait: float) -> None:
    for sig, timeout in ((first, wait), (signal.SIGKILL, 5.0)):
        if not _is_running(pid, start_time):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _is_running(pid, start_time):
            time.sleep(_POLL)


# --------------------------------------------------------------------------- collector


class LatencyCollector:
    """Per-server latency histograms from haproxy's request log lines.

    A line is ``<server> <Tc> <Tr>`` (milliseconds; -1 when that phase never ended).
    Requests that got no response headers are not counted: the histogram is of
    completed requests, the way ``BackendStats.latency_buckets`` defines it.
    """

    def __init__(self, watch: int = 0) -> None:
        self.watch = watch  # the haproxy pid these histograms are of
        self.histograms: dict[str, list[int]] = {}

    def add_line(self, line: bytes) -> None:
        parts = line.split()
        if len(parts) != 3 or parts[0] == b"<NOSRV>":
            return
        try:
            connect_ms, response_ms = int(parts[1]), int(parts[2])
        except ValueError:
            return
        if connect_ms < 0 or response_ms < 0:
            return
        name = parts[0].decode(errors="replace")
        counts = self.histograms.get(name)
        if counts is None:
            counts = self.histograms[name] = [0] * (len(LATENCY_BOUNDS) + 1)
        counts[latency_bucket((connect_ms + response_ms) / 1000)] += 1

    def answer(self, request: str) -> dict[str, object]:
        verb, _, arg = request.strip().partition(" ")
        if verb == "dump":
            return {"pid": os.getpid(), "servers": self.histograms}
        if verb == "forget":
            self.histograms.pop(arg, None)
            return {"ok": True}
        if verb == "ping":
            return {"pid": os.getpid(), "watch": self.watch}
        return {"error": f"unknown request {verb!r}"}


def _bind_unix(kind: socket.SocketKind, path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # Bound under a private umask: no window where another user could connect.
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    return sock


def run_collector(log_socket: Path, query_socket: Path, watch: tuple[int, int]) -> int:
    """Serve ``log_socket`` (haproxy's log datagrams) and ``query_socket`` until the
    watched haproxy ``(pid, start time)`` is gone or SIGTERM arrives."""
    collector = LatencyCollector(watch[0])
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logs = _bind_unix(socket.SOCK_DGRAM, log_socket)
    # A deep receive buffer absorbs bursts; beyond it haproxy drops log lines.
    with contextlib.suppress(OSError):
        logs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    logs.setblocking(False)
    queries = _bind_unix(socket.SOCK_STREAM, query_socket)
    queries.listen(16)
    queries.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(logs, selectors.EVENT_READ, "logs")
    selector.register(queries, selectors.EVENT_READ, "queries")
    next_check = 0.0
    try:
        while not stopping:
            now = time.monotonic()
            if now >= next_check:
                if _start_time(watch[0]) != watch[1]:
                    break
                next_check = now + 0.5
            for key, _ in selector.select(timeout=0.5):
                if key.data == "logs":
                    for _ in range(1000):  # bounded: queries get their turn
                        try:
                            collector.add_line(logs.recv(2048))
                        except BlockingIOError:
                            break
                else:
                    _serve_query(queries, collector)
    finally:
        selector.close()
        logs.close()
        queries.close()
        for path in (log_socket, query_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return 0


def _serve_query(listener: socket.socket, collector: LatencyCollector) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(2.0)
        try:
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            reply = collector.answer(data.decode(errors="replace"))
            conn.sendall(json.dumps(reply).encode())
        except OSError:
            pass  # the asker went away; nothing to clean up


def main(argv: list[str] | None = None) -> int:
    """``python -m graven.router.haproxy collect ...``: the latency collector."""
    parser = argparse.ArgumentParser(prog="python -m graven.router.haproxy")
    sub = parser.add_subparsers(dest="command", required=True)
    collect = sub.add_parser("collect", help="collect haproxy request latencies")
    collect.add_argument("--log-socket", type=Path, required=True)
    collect.add_argument("--query-socket", type=Path, required=True)
    collect.add_argument("--watch", required=True, help="PID:START_TIME of the haproxy")
    args = parser.parse_args(argv)
    pid_text, _, start_text = str(args.watch).partition(":")
    try:
        watch = (int(pid_text), int(start_text))
    except ValueError:
        parser.error(f"--watch: expected PID:START_TIME (got {args.watch!r})")
    return run_collector(args.log_socket, args.query_socket, watch)


if __name__ == "__main__":
    sys.exit(main())
