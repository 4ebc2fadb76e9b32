"""``HAProxyRouter``: the Router port on a real HAProxy (2.6+), one process per service.

It starts each haproxy detached (and its latency collector beside it), adopts a
running one, turns ``set_backends`` into runtime-API commands (``plan``), keeps the
set in ``backends.json`` and ``haproxy.cfg`` (``config``) so a restart serves it, and
reads ``show stat`` for ``stats``. The package docstring tells the whole design.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from graven import detached
from graven.atomic import write_atomic
from graven.errors import RouterError
from graven.model import is_valid_name
from graven.router.base import (
    LATENCY_BOUNDS,
    Backend,
    BackendState,
    BackendStats,
    check_backends,
    split_address,
)
from graven.router.embedded import (
    check_router_port,
    check_service_name,
    no_router,
    not_allowed_to_stop,
    start_failure,
)
from graven.router.haproxy.config import listen_address, render_config
from graven.router.haproxy.plan import (
    Desired,
    ServerRow,
    Step,
    backend_id,
    parse_show_stat,
    plan_changes,
    removal_steps,
    server_name,
)

_API_TIMEOUT: Final = 10.0
_PING_TIMEOUT: Final = 2.0
_INSTALL_HINT: Final = "Install it with 'apt-get install haproxy' (HAProxy 2.6 or newer)."


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
        check_router_port(port)
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
            elif record is not None and detached.is_running(record.pid, record.start_time):
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
            elif record is not None and detached.is_running(record.pid, record.start_time):
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
            if record is not None and detached.is_running(record.pid, record.start_time):
                out[service] = record.port
            elif (live := self._info(files)) is not None:
                out[service] = live[1]  # reloaded by someone else; ensure adopts it
        return out

    # ------------------------------------------------------------------ extras

    def pid(self, service: str) -> int | None:
        """The pid of the service's live haproxy, or None."""
        check_service_name(service)
        record = self._read_record(self._files(service))
        if record is not None and detached.is_running(record.pid, record.start_time):
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
            and detached.is_running(record.collector_pid, record.collector_start_time)
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
        if not detached.fits_socket_address(home / "latency.sock"):
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
        key = detached.short_name(self.state_dir.resolve(), service)
        return detached.temp_dir() / f"graven-haproxy-{key}"

    def _make_dirs(self, files: _Files) -> None:
        try:
            files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise RouterError(
                f"cannot create router directory {files.dir}: {exc}",
                hint="Check that the state directory exists and is writable.",
            ) from None
        if files.short_dir is not None:
            detached.private_dir(files.short_dir, what="socket directory", error=RouterError)

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
            raise no_router(files.service, files.log) from None
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
            listen=listen_address(self.listen_host, port),
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
        start = detached.start_time(pid)
        if start is None:
            return
        collector_start = detached.start_time(collector_pid) if collector_pid is not None else None
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
            how = detached.describe_failed_start(proc, files.admin, self.start_timeout)
            if proc.poll() is None:  # a pid reaped already may be reused
                self._terminate(files, proc.pid, signal.SIGKILL, 5.0)
            with contextlib.suppress(FileNotFoundError):
                files.record.unlink()
            raise start_failure(
                f"haproxy for service {files.service!r}", port, how, files.log, offset
            )
        collector = self._spawn_collector(files, proc.pid)
        self._write_record(files, proc.pid, port, collector)
        # The config served the set from the first request; now make states and
        # weights exact (drained backends were only weighted 0 in the config).
        self._reconcile(files)

    def _spawn_collector(self, files: _Files, haproxy_pid: int) -> int | None:
        """Start the latency collector for ``haproxy_pid``; None (and a log line) if it
        fails: latency is worth having, not worth refusing to route for."""
        start = detached.start_time(haproxy_pid)
        if start is None:
            return None
        argv = [
            sys.executable,
            "-m",
            "graven.router.haproxy.collector",
            "--log-socket",
            str(files.log_socket),
            "--query-socket",
            str(files.latency),
            "--watch",
            f"{haproxy_pid}:{start}",
        ]
        _, proc = self._popen(files, argv)

        def answers() -> bool:
            return self._ping_collector(files, haproxy_pid) == proc.pid

        if detached.wait_until(answers, self.start_timeout, unless_exited=proc):
            return proc.pid
        if proc.poll() is None:
            self._terminate(files, proc.pid, signal.SIGKILL, 5.0)
        with contextlib.suppress(OSError), files.log.open("ab") as log:
            log.write(b"graven: the latency collector did not start; no latency histogram\n")
        return None

    def _popen(self, files: _Files, argv: list[str]) -> tuple[int, subprocess.Popen[bytes]]:
        try:
            offset, proc = detached.spawn_logged(argv, files.log, cwd=files.dir)
        except OSError as exc:
            hint = _INSTALL_HINT if exc.errno == errno.ENOENT else None
            raise RouterError(
                f"cannot start {Path(argv[0]).name} for service {files.service!r}: {exc}",
                hint=hint,
            ) from None
        return offset, proc

    def _wait_ready(self, files: _Files, pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
        def answers() -> bool:
            live = self._info(files)
            return live is not None and live[0] == pid

        return detached.wait_until(answers, self.start_timeout, unless_exited=proc)

    def _stop_collector(self, record: _Record) -> None:
        if record.collector_pid is not None and record.collector_start_time is not None:
            collector = detached.ProcessStamp(record.collector_pid, record.collector_start_time)
            detached.stop(collector, grace=5.0)

    def _terminate(self, files: _Files, pid: int, first: signal.Signals, wait: float) -> None:
        """Send ``first`` (SIGUSR1: haproxy's soft stop) to ``pid``, wait, then SIGKILL.
        The start time is read once and re-checked, so a reused pid is left alone."""
        with not_allowed_to_stop(f"haproxy of service {files.service!r}", pid):
            detached.stop_pid(pid, grace=wait, first=first)

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
