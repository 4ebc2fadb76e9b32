"""Fixtures that drive the real ``graven`` CLI against real processes.

Each test gets its own project and state dir; teardown stops everything the test
started, by PID, even when the test failed half-way.

The example service starts from ``base: host-python``, which costs seconds to make
in each new state dir: ``host_python_store`` makes it once per test session, and each
project's store starts as a hard-link copy of that store's blobs (immutable and
read-only) with its small records copied, so a build finds the base made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graven import detached
from graven.build.bases.host_python import host_python_base
from graven.spec import scaffold
from graven.store.cas import ContentStore
from graven.store.gc import run_gc
from graven.testing.cli import Result, clean_env, run_graven
from graven.testing.net import eventually, free_port
from graven.testing.registry import Registry, running_registry
from graven.testing.specs import hello_spec


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@dataclass
class Project:
    root: Path
    port: int
    router: str = "embedded"
    router_workers: int = 1  # embedded router: proxy processes per service

    @property
    def state_dir(self) -> Path:
        return self.root / ".graven"

    def write_spec(
        self,
        version: str = "v1",
        *,
        replicas: int = 3,
        health_path: str = "/healthz",
        start_timeout: str | None = "20s",
        strategy: Mapping[str, Any] | None = None,
        env: dict[str, str] | None = None,
        volumes: list[dict[str, Any]] | None = None,
    ) -> None:
        """The example service's spec; ``env``: variables beside ``VERSION``."""
        (self.root / "graven.yaml").write_text(
            hello_spec(
                port=self.port,
                version=version,
                replicas=replicas,
                health_path=health_path,
                start_timeout=start_timeout,
                strategy=strategy,
                env=env,
                volumes=volumes or (),
            )
        )
        # A new version is a new image, not only new config.
        (self.root / "app" / "VERSION").write_text(version + "\n")

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GRAVEN_ACTOR": "tester@ci",
            "PYTHONUNBUFFERED": "1",
            "GRAVEN_ROUTER": self.router,
            "GRAVEN_ROUTER_WORKERS": str(self.router_workers),
        }

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """``graven ARGS`` running in the background, stdout and stderr piped."""
        return subprocess.Popen(
            [sys.executable, "-m", "graven", *args],
            cwd=self.root,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def graven(self, *args: str, timeout: float = 120, check: bool = True) -> Result:
        return run_graven(args, cwd=self.root, env=self.env(), timeout=timeout, check=check)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.graven("status", "hello", "-o", "json").json()["services"][0]
        return data

    def controller_pid(self) -> int | None:
        try:
            return int((self.state_dir / "controller.lock").read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def known_pids(self) -> list[tuple[int, int | None]]:
        """Processes graven recorded for this project, with the start time recorded for
        each, so teardown never signals a recycled pid."""
        found: list[tuple[int, int | None]] = []
        db = self.state_dir / "state.db"
        if db.exists():
            with contextlib.closing(sqlite3.connect(db)) as conn:
                found += [
                    (r[0], r[1]) for r in conn.execute("SELECT pid, pid_start FROM instances")
                ]
        for pidfile in (self.state_dir / "routers").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                rec = json.loads(pidfile.read_text())
                found.append((int(rec["pid"]), rec.get("start_time")))
        for record in (self.state_dir / "haproxy").glob("*/router.json"):
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                rec = json.loads(record.read_text())
                found.append((int(rec["pid"]), rec.get("start_time")))
                if rec.get("collector_pid"):
                    found.append((int(rec["collector_pid"]), rec.get("collector_start_time")))
        if (pid := self.controller_pid()) is not None:
            found.append((pid, detached.start_time(pid)))
        return found

    def graven_processes(self) -> set[tuple[int, int]]:
        """Every live process graven started for this project, as (pid, start time):
        those it recorded (instances, routers, HAProxy and its collector, the
        controller) and all their descendants (router workers, instance children)."""
        found = {
            (pid, started)
            for pid, started in self.known_pids()
            if started is not None and detached.start_time(pid) == started
        }
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = stat.read_text()
                ppid = int(text[text.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(stat.parent.name))
        todo = [pid for pid, _ in found]
        while todo:
            for child in children.get(todo.pop(), []):
                started = detached.start_time(child)
                if started is not None and (child, started) not in found:
                    found.add((child, started))
                    todo.append(child)
        return found

    def down_leaves_nothing(self, timeout: float = 20.0) -> None:
        """``graven down``, then assert that no process graven started survives it,
        checked by pid (and start time, so a recycled pid is not mistaken for one)."""
        before = self.graven_processes()
        assert before, "nothing recorded as started: the check would prove nothing"
        self.graven("down", timeout=120)
        before |= self.graven_processes()  # anything down itself started

        def survivors() -> list[int]:
            return sorted(pid for pid, started in before if detached.start_time(pid) == started)

        eventually(lambda: not survivors(), timeout)
        left = survivors()
        assert not left, "still running after 'graven down': " + ", ".join(
            f"{pid} ({_cmdline(pid)})" for pid in left
        )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "gone"


def _kill_recorded(recorded: list[tuple[int, int | None]]) -> None:
    for pid, started in recorded:
        if started is None or detached.start_time(pid) != started:
            continue  # gone, or the pid now belongs to someone else
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def seed_store(state_dir: Path, template: Path) -> None:
    """Start ``state_dir``'s content store as a copy of the store ``template``: blobs
    hard-linked (content-addressed, read-only, never written in place) where both are
    on one filesystem, the rest copied.
    """
    store = state_dir / "store"
    for path in sorted(template.rglob("*")):
        relative = path.relative_to(template)
        if relative.parts[0] in ("tmp", "locks"):
            continue
        dest = store / relative
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif relative.parts[0] == "blobs":
            try:
                os.link(path, dest)
            except OSError:  # another filesystem
                shutil.copy2(path, dest)
        else:
            shutil.copy2(path, dest)


@pytest.fixture(scope="session")
def host_python_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A content store holding the host-python base, made once per session."""
    store = tmp_path_factory.mktemp("host-python") / "store"
    made = ContentStore(store)
    host_python_base(made)
    # Making it leaves intermediate trees behind, which a gc (grace 0) takes now: copied
    # old into a test's store, they would count as garbage past any grace period.
    run_gc(made, grace=0)
    return store


def _project(
    root: Path, router: str, workers: int = 1, seed: Path | None = None
) -> Iterator[Project]:
    scaffold(root)
    if seed is not None:
        seed_store(root / ".graven", seed)
    proj = Project(root, free_port(), router, workers)
    proj.write_spec()
    try:
        yield proj
    finally:
        pids = proj.known_pids()
        with contextlib.suppress(Exception):
            proj.graven("down", timeout=60, check=False)
        time.sleep(0.2)
        _kill_recorded(pids)


@pytest.fixture
def project(tmp_path: Path, host_python_store: Path) -> Iterator[Project]:
    yield from _project(tmp_path / "proj", "embedded", seed=host_python_store)


@pytest.fixture(params=["embedded", "embedded-2-workers", "haproxy"])
def routed_project(
    request: pytest.FixtureRequest, tmp_path: Path, host_python_store: Path
) -> Iterator[Project]:
    """A project whose controller drives the embedded proxy (one process, then a
    supervisor with two workers), then HAProxy."""
    router, _, workers = request.param.partition("-")
    yield from _project(tmp_path / "proj", router, 2 if workers else 1, seed=host_python_store)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as reg:
        yield reg


__all__ = ["Project", "Result", "clean_env", "eventually", "free_port", "pid_alive"]
