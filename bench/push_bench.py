"""Push benchmark: graven against buildah + skopeo, pushing to a real registry in one
run, reporting ratios.

    .venv/bin/python bench/push_bench.py [--repeat 3] [--json]

The project is bench/fixture.py's (3000 vendored files + an app). Version 1 is built
and pushed to an empty repository (cold), then one vendored file is edited, version 2
is built and pushed. Measured for each tool:

- what the v2 push added to the registry: growth of the registry's blob storage
  (``du`` of its ``blobs`` dir, and the bytes of the blob files that appeared) — the
  same yardstick for both tools;
- the bytes that crossed the wire to the registry (request headers and bodies, counted
  by a loopback TCP relay in front of it), and graven's own ``bytes_sent``;
- push wall time for v1 (cold) and v2, median of ``--repeat`` runs of the whole
  command (interpreter start included for graven; skopeo is a Go binary).

The peer builds with ``buildah bud --layers`` (its own root, overlay) and pushes with
``skopeo copy containers-storage:... docker://...``; graven builds with ``graven build``
and pushes with ``graven push``. Every repeat starts from empty stores and a fresh
registry, so every v1 push compresses its layers from scratch for both tools.
Everything listens on 127.0.0.1 and is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture import make_project, touch_vendored

from graven.testing.registry import Registry, running_registry

GRAVEN = [str(Path(sys.executable).parent / "graven")]
BLOBS = Path("docker/registry/v2/blobs")


def run(cmd: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """Run ``cmd``; (seconds, stdout). Exits the benchmark when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, check=False, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout


def du(path: Path) -> int:
    """Bytes of disk used (allocated blocks) under ``path``, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def blob_files(path: Path) -> dict[str, int]:
    """The registry's blobs (``blobs/sha256/xx/<hex>/data``) and their sizes."""
    return {p.parent.name: p.stat().st_size for p in path.glob("sha256/*/*/data")}


# --- a registry on loopback, behind a byte-counting relay ------------------------------------


class CountingRelay:
    """A TCP relay on 127.0.0.1 in front of ``upstream``: counts what clients send."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sent = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for src, dst, counted in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pipe, args=(src, dst, counted), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                if counted:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._accepter.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)


@dataclass
class RelayedRegistry:
    """A loopback registry whose ``host`` is a byte-counting relay in front of it."""

    registry: Registry
    relay: CountingRelay

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.relay.port}"

    @property
    def blobs(self) -> Path:
        return self.registry.data / BLOBS


@contextlib.contextmanager
def registry(root: Path) -> Iterator[RelayedRegistry]:
    with running_registry(root, log_level="error") as reg:
        host, port = reg.host.rsplit(":", 1)
        relay = CountingRelay((host, int(port)))
        try:
            yield RelayedRegistry(reg, relay)
        finally:
            relay.close()


# --- the tools ---------------------------------------------------------------------------------


class Peer:
    name = "buildah+skopeo"

    def __init__(self, work: Path) -> None:
        self.root = work / "buildah-root"
        self.runroot = work / "buildah-runroot"
        self.storage = ["--root", str(self.root), "--runroot", str(self.runroot)]
        self.buildah = ["buildah", *self.storage, "--storage-driver", "overlay"]

    def build(self, project: Path, version: str) -> None:
        run([*self.buildah, "bud", "--layers", "-q", "-t", f"svc:{version}", "."], project)

    def push(self, host: str, version: str) -> tuple[float, int | None]:
        source = f"containers-storage:[overlay@{self.root}+{self.runroot}]localhost/svc:{version}"
        dest = f"docker://{host}/peer/svc:{version}"
        seconds, _ = run(["skopeo", "copy", "-q", "--dest-tls-verify=false", source, dest])
        return seconds, None

    def reset(self) -> None:
        subprocess.run([*self.buildah, "rmi", "--all", "--force"], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


class Graven:
    name = "graven"

    def __init__(self, work: Path) -> None:
        self.state = work / "graven-state"
        self.base = [*GRAVEN, "--state-dir", str(self.state)]

    def build(self, project: Path, version: str) -> None:
        run([*self.base, "build", "-o", "json"], project)

    def push(self, host: str, version: str) -> tuple[float, int | None]:
        seconds, out = run(
            [*self.base, "push", "svc", f"{host}/graven/svc:{version}", "-o", "json"]
        )
        return seconds, int(json.loads(out)["bytes_sent"])

    def reset(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)


def one_round(tool: Graven | Peer, project: Path, work: Path, edit: int) -> dict[str, float]:
    """Build and push v1 (cold) and v2 (one vendored file edited) to a fresh registry."""
    tool.reset()
    touch_vendored(project, edit)  # both tools start from the same v1 in a round
    with registry(work / f"registry-{tool.name}-{edit}") as reg:
        tool.build(project, "v1")
        v1_s, v1_reported = tool.push(reg.host, "v1")
        v1_wire = reg.relay.sent
        touch_vendored(project, edit + 1)
        tool.build(project, "v2")
        du_before, files_before = du(reg.blobs), blob_files(reg.blobs)
        wire_before = reg.relay.sent
        v2_s, v2_reported = tool.push(reg.host, "v2")
        wire = reg.relay.sent - wire_before
        files_after = blob_files(reg.blobs)
        added = {d: n for d, n in files_after.items() if d not in files_before}
        result = {
            "v1_push_s": v1_s,
            "v2_push_s": v2_s,
            "v1_registry_bytes": float(sum(files_before.values())),
            "v2_registry_du_growth_bytes": float(du(reg.blobs) - du_before),
            "v2_registry_blob_bytes_added": float(sum(added.values())),
            "v2_registry_blobs_added": float(len(added)),
            "v1_wire_bytes": float(v1_wire),
            "v2_wire_bytes": float(wire),
        }
        result["v2_over_v1_registry_bytes"] = (
            result["v2_registry_blob_bytes_added"] / result["v1_registry_bytes"]
        )
        if v2_reported is not None and v1_reported is not None:
            result["v1_reported_bytes_sent"] = float(v1_reported)
            result["v2_reported_bytes_sent"] = float(v2_reported)
    tool.reset()
    return result


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (proc.stdout or proc.stderr).strip().splitlines()[0]

    return {
        "buildah": first_line(["buildah", "--version"]),
        "skopeo": first_line(["skopeo", "--version"]),
        "docker-registry": first_line(["docker-registry", "--version"]),
    }


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="graven-push-bench-") as tmp:
        work = Path(tmp)
        project = make_project(work / "project")
        files = sum(1 for _ in (project / "vendor").rglob("*.py"))
        tools: list[Graven | Peer] = [Graven(work), Peer(work)]
        rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in tools}
        for n in range(args.repeat):
            for tool in tools:
                rounds[tool.name].append(one_round(tool, project, work, 1000 + 10 * n))
    results = {name: median_of(r) for name, r in rounds.items()}
    g, p = results["graven"], results["buildah+skopeo"]
    ratios = {k: g[k] / p[k] for k in p if p[k]}
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "project": f"{files} vendored files + app; v2 edits one vendored file",
        "versions": versions(),
        "repeat": args.repeat,
        "results": results,
        "rounds": rounds,
        "graven_over_peer": ratios,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['machine']}, {report['date']}, {report['project']}, median of {args.repeat}")
    print(f"{'measure':<32}{'graven':>14}{'buildah+skopeo':>16}{'ratio':>9}")
    for k, v in g.items():
        peer = p.get(k)
        if k.endswith("_s"):
            cells = f"{v:>13.3f}s{peer:>15.3f}s" if peer is not None else ""
        elif k.endswith("blobs_added"):
            cells = f"{v:>14.0f}{peer:>16.0f}" if peer is not None else ""
        elif k.startswith("v2_over_v1"):
            cells = f"{v:>14.3f}{peer:>16.3f}" if peer is not None else ""
        else:
            cells = f"{mb(v):>14}{mb(peer) if peer is not None else '-':>16}"
        ratio = f"{v / peer:>9.3f}" if peer else ""
        print(f"{k:<32}{cells}{ratio}")


if __name__ == "__main__":
    main()
