"""Image engine benchmark: graven against buildah (``bud --layers``) on the same
project, in one run, reporting ratios.

    .venv/bin/python bench/build_bench.py [--repeat 5] [--versions 20] [--json]

Measures cold build, no-op rebuild, rebuild after an app edit and after one vendored
file edit, and the disk used by N versions that each change one vendored file.
Each timing is the median of ``--repeat`` runs of the whole command (interpreter
start included for graven; buildah is a Go binary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture import make_project, touch_app, touch_vendored

GRAVEN = [str(Path(sys.executable).parent / "graven")]


def run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stdout.decode()}\n{proc.stderr.decode()}")
    return elapsed


def du(path: Path) -> int:
    """Bytes of disk used (allocated blocks), hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


class Buildah:
    name = "buildah"

    def __init__(self, work: Path) -> None:
        self.root = work / "buildah-root"
        self.runroot = work / "buildah-runroot"
        self.base = [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
        ]

    def build(self, project: Path, tag: str = "svc:latest") -> float:
        return run([*self.base, "bud", "--layers", "-q", "-t", tag, "."], project)

    def reset(self) -> None:
        subprocess.run([*self.base, "rm", "--all"], capture_output=True, check=False)
        subprocess.run([*self.base, "rmi", "--all", "--force"], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)

    def disk(self) -> int:
        return du(self.root)


class Graven:
    name = "graven"

    def __init__(self, work: Path) -> None:
        self.state = work / "graven-state"

    def build(self, project: Path, tag: str = "") -> float:
        return run([*GRAVEN, "--state-dir", str(self.state), "build", "-o", "json"], project)

    def reset(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)

    def disk(self) -> int:
        return du(self.state / "store")


# graven's no-op fast path vouches only for files older than this (see fingerprint.py).
SETTLE_SECONDS = 2.5


def measure(tool: Graven | Buildah, project: Path, repeat: int) -> dict[str, float]:
    cold, fresh, noop, app, vendored = [], [], [], [], []
    for n in range(repeat):
        tool.reset()
        time.sleep(SETTLE_SECONDS)
        cold.append(tool.build(project))
        noop.append(tool.build(project))
        touch_app(project, 1000 + n)
        tool.build(project)
        fresh.append(tool.build(project))  # no change, but files edited a moment ago
        touch_app(project, 2000 + n)
        app.append(tool.build(project))
        touch_vendored(project, 1000 + n)
        vendored.append(tool.build(project))
    return {
        "cold_build_s": statistics.median(cold),
        "noop_rebuild_s": statistics.median(noop),
        "noop_rebuild_just_edited_s": statistics.median(fresh),
        "app_change_rebuild_s": statistics.median(app),
        "vendored_change_rebuild_s": statistics.median(vendored),
    }


def disk_for_versions(tool: Graven | Buildah, project: Path, versions: int) -> dict[str, float]:
    tool.reset()
    tool.build(project, "svc:v0")
    one = tool.disk()
    for v in range(1, versions):
        touch_vendored(project, v)
        tool.build(project, f"svc:v{v}")
    many = tool.disk()
    return {
        "disk_one_version_bytes": one,
        f"disk_{versions}_versions_bytes": many,
        "disk_growth_ratio": many / one,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="graven-bench-") as tmp:
        work = Path(tmp)
        project = make_project(work / "project")
        files = sum(1 for _ in (project / "vendor").rglob("*.py"))
        tools = [Graven(work), Buildah(work)]
        results: dict[str, dict[str, float]] = {}
        for tool in tools:
            results[tool.name] = measure(tool, project, args.repeat)
        for tool in tools:
            results[tool.name].update(disk_for_versions(tool, project, args.versions))
            tool.reset()
    g, b = results["graven"], results["buildah"]
    ratios = {k: g[k] / b[k] for k in g if k.endswith("_s") or k == "disk_growth_ratio"}
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "project": f"{files} vendored files + app",
        "repeat": args.repeat,
        "results": results,
        "graven_over_buildah": ratios,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['machine']}, {report['date']}, {report['project']}, median of {args.repeat}")
    print(f"{'measure':<30}{'graven':>12}{'buildah':>12}{'ratio':>9}")
    for k in g:
        print(f"{k:<30}{g[k]:>12.3f}{b[k]:>12.3f}{g[k] / b[k]:>9.2f}")


if __name__ == "__main__":
    main()
