"""Rollback latency: from the rollback command to 100% of requests answered by the
previous release — inside a blue-green rollback window (a traffic switch) against a
rolling rollback (a full re-roll), in one run, same service, same machine.

    .venv/bin/python bench/rollback_bench.py [--repeat 5] [--json]

A probe client sends requests back to back over one keep-alive connection and notes
(time, version) for each; the latency is the time from the start of the rollback
until the first response after which every response comes from the previous
release. Two starting points are reported: the `graven rollback` command (its
interpreter start included) and the controller API request it makes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from graven.testing.net import free_port
from graven.testing.specs import hello_spec

GRAVEN = [sys.executable, "-m", "graven"]

STRATEGIES: dict[str, dict[str, str]] = {
    "blue-green (inside window)": {"type": "blue-green", "rollback_window": "30m"},
    "rolling (full re-roll)": {"type": "rolling"},
}


class Probe(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        deadline = time.monotonic() + 300
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                version = json.loads(body)["version"] if resp.status == 200 else "error"
            except (OSError, http.client.HTTPException, ValueError):
                version = "error"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.samples.append((time.monotonic(), version))


def graven(project: Path, *args: str) -> None:
    subprocess.run([*GRAVEN, *args], cwd=project, check=True, capture_output=True, timeout=600)


def write(project: Path, port: int, strategy: dict[str, str], version: str) -> None:
    (project / "graven.yaml").write_text(hello_spec(port=port, strategy=strategy, version=version))
    (project / "app" / "VERSION").write_text(version + "\n")


def all_back_at(samples: list[tuple[float, str]], start: float, version: str) -> float | None:
    """Time of the first response after ``start`` from which every response is ``version``."""
    after = [(t, v) for t, v in samples if t >= start]
    last_other = max((i for i, (_, v) in enumerate(after) if v != version), default=-1)
    if last_other + 1 >= len(after):
        return None
    return after[last_other + 1][0]


def measure(strategy: str, repeat: int, via_api: bool) -> list[float]:
    from graven.spec import scaffold

    out = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="graven-rb-") as tmp:
            project = Path(tmp) / "p"
            scaffold(project)
            port = free_port()
            write(project, port, strategy, "v1")
            graven(project, "deploy", "-m", "v1")
            write(project, port, strategy, "v2")
            graven(project, "deploy", "-m", "v2")
            probe = Probe(port)
            probe.start()
            time.sleep(0.5)
            if via_api:
                from graven.controller.client import ControllerClient

                client = ControllerClient(project / ".graven")
                start = time.monotonic()
                client.request(
                    "POST",
                    "/v1/rollback",
                    {"service": "hello", "to": None, "actor": "bench", "message": "bench"},
                )
            else:
                start = time.monotonic()
                subprocess.Popen(
                    [*GRAVEN, "rollback", "hello", "-m", "bench", "--no-wait"],
                    cwd=project,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + 120
            done = None
            while done is None and time.monotonic() < deadline:
                time.sleep(0.2)
                done = all_back_at(probe.samples, start, "v1")
                if done is not None and time.monotonic() - done < 1.0:
                    done = None  # wait until it has stayed on v1 for a second
            probe.stop.set()
            probe.join()
            graven(project, "down")
            if done is None:
                raise SystemExit(f"{strategy}: traffic never settled on v1")
            out.append(done - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name, strategy in STRATEGIES.items():
        cmd = measure(strategy, args.repeat, via_api=False)
        api = measure(strategy, args.repeat, via_api=True)
        results[name] = {
            "from_command_median_s": statistics.median(cmd),
            "from_command_max_s": max(cmd),
            "from_api_median_s": statistics.median(api),
            "from_api_max_s": max(api),
        }
    bg, rr = results["blue-green (inside window)"], results["rolling (full re-roll)"]
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "repeat": args.repeat,
        "results": results,
        "switch_over_reroll": bg["from_command_median_s"] / rr["from_command_median_s"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['machine']}, {report['date']}, median of {args.repeat}")
    for name, r in results.items():
        print(
            f"{name:<28} command {r['from_command_median_s'] * 1000:8.1f} ms "
            f"(max {r['from_command_max_s'] * 1000:.1f})   "
            f"api {r['from_api_median_s'] * 1000:8.1f} ms"
        )


if __name__ == "__main__":
    main()
