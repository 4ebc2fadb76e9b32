"""Router benchmark: graven's embedded proxy against HAProxy and a direct connection,
same backends, same load, one run, reporting ratios.

    .venv/bin/python bench/proxy_bench.py [--duration 10] [--repeat 1] [--json]

Backends: two HTTP/1.1 servers on 127.0.0.1, both served by one HAProxy process
answering ``http-request return`` (a fixed 200 with a Content-Length, keep-alive):
C speed, so the backends are not what is measured.

Targets, each loaded by ``wrk -t2 -c32 -dNs --latency``:

- ``direct``: wrk against the first backend itself (the ceiling);
- ``embedded``: ``graven.router.proxy`` started through ``EmbeddedRouter`` with
  ``--workers`` worker processes (default: graven's own default, at least 2), both
  backends ready at equal weight;
- ``haproxy``: a second HAProxy process with as many threads (``nbthread``) as the
  embedded router has workers, roundrobin over the same two backends, http mode,
  keep-alive to clients and servers (``http-reuse always``);
- ``embedded-1`` and ``haproxy-1``: the same with one worker and one thread, the
  single-core comparison (graven's default on a 2-core machine).

With ``--repeat N`` the targets run round-robin N times and the median of each is
reported. Every process is ours, on loopback, and stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from graven.router.base import Backend
from graven.router.embedded import EmbeddedRouter, default_workers
from graven.testing.net import free_port

SERVICE = "bench"
THREADS = 2
CONNECTIONS = 32

ORIGIN_CONFIG = """\
global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 3s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend b1
    bind 127.0.0.1:{b1}
    http-request return status 200 content-type text/plain string "b1"
frontend b2
    bind 127.0.0.1:{b2}
    http-request return status 200 content-type text/plain string "b2"
"""

PEER_CONFIG = """\
global
    maxconn 4096
    nbthread {threads}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 3s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
    server b1 127.0.0.1:{b1}
    server b2 127.0.0.1:{b2}
"""


@dataclass
class Result:
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors and non-2xx answers


def wait_http(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
                resp.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_haproxy(config: str, path: Path) -> subprocess.Popen[bytes]:
    path.write_text(config)
    # -db: stay in the foreground, so the pid we hold is the one serving.
    return subprocess.Popen(
        ["haproxy", "-db", "-f", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _field(pattern: str, out: str) -> str:
    m = re.search(pattern, out, re.MULTILINE)
    if m is None:
        raise SystemExit(f"wrk's report has no match for {pattern!r}:\n{out}")
    return m.group(1)


def parse_wrk(target: str, out: str) -> Result:
    """The numbers wrk's ``--latency`` report holds."""
    rps = float(_field(r"Requests/sec:\s+([0-9.]+)", out))
    p50 = _ms(_field(r"^\s+50%\s+(\S+)", out))
    p99 = _ms(_field(r"^\s+99%\s+(\S+)", out))
    requests = int(_field(r"(\d+) requests in", out))
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    return Result(target, rps, p50, p99, requests, errors)


def run_wrk(target: str, port: int, duration: int) -> Result:
    cmd = [
        "wrk",
        f"-t{THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{duration}s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 30)
    return parse_wrk(target, proc.stdout)


def median_result(runs: list[Result]) -> Result:
    return Result(
        target=runs[0].target,
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
    )


def table(results: dict[str, Result], workers: int) -> str:
    d = results["direct"]
    rows = [
        "| target | req/s | p50 | p99 | errors |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results.values():
        rows.append(
            f"| {r.target} | {r.rps:,.0f} | {r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.errors} |"
        )
    rows += ["", "| ratio | req/s | p99 |", "| --- | ---: | ---: |"]
    pairs = [("embedded", "haproxy", f"{workers} worker(s) / {workers} thread(s)")]
    if "embedded-1" in results:
        pairs.append(("embedded-1", "haproxy-1", "1 worker / 1 thread"))
    for e_name, h_name, _ in pairs:
        e, h = results[e_name], results[h_name]
        rows += [
            f"| {e_name} / direct | {e.rps / d.rps:.2f} | {e.p99_ms / d.p99_ms:.2f} |",
            f"| {h_name} / direct | {h.rps / d.rps:.2f} | {h.p99_ms / d.p99_ms:.2f} |",
        ]
    for e_name, h_name, what in pairs:
        e, h = results[e_name], results[h_name]
        rows.append(
            f"| {e_name} / {h_name} ({what}) | **{e.rps / h.rps:.2f}** (goal ≥ 0.5) "
            f"| **{e.p99_ms / h.p99_ms:.2f}** (goal ≤ 2) |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the targets (median)")
    ap.add_argument(
        "--workers",
        type=int,
        default=max(2, default_workers()),
        help="embedded router workers, and the peer HAProxy's nbthread, for the "
        "multi-core pair (default: graven's default, at least 2); the single-core pair "
        "(embedded-1, haproxy-1) always runs too",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/setup (as root) first")

    work = Path(tempfile.mkdtemp(prefix="graven-proxy-bench-"))
    b1, b2 = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    routers: list[EmbeddedRouter] = []
    backends = [Backend("b1", f"127.0.0.1:{b1}"), Backend("b2", f"127.0.0.1:{b2}")]
    targets = {"direct": b1}
    try:
        procs.append(start_haproxy(ORIGIN_CONFIG.format(b1=b1, b2=b2), work / "origin.cfg"))
        counts = [("", args.workers)] + ([("-1", 1)] if args.workers > 1 else [])
        for suffix, n in counts:
            router = EmbeddedRouter(work / f"state{suffix}", workers=n)
            routers.append(router)
            targets["embedded" + suffix] = port = free_port()
            router.ensure(SERVICE, port)
            router.set_backends(SERVICE, backends)
            targets["haproxy" + suffix] = port = free_port()
            peer = PEER_CONFIG.format(threads=n, port=port, b1=b1, b2=b2)
            procs.append(start_haproxy(peer, work / f"peer{suffix}.cfg"))
        for port in targets.values():
            wait_http(port)
        runs: dict[str, list[Result]] = {name: [] for name in targets}
        for _ in range(args.repeat):
            for name, port in targets.items():
                run_wrk(name, port, 1)  # warm-up: connections, pools, caches
                runs[name].append(run_wrk(name, port, args.duration))
        results = {name: median_result(r) for name, r in runs.items()}
        stats = routers[0].stats(SERVICE)
    finally:
        for router in routers:
            router.stop(SERVICE)
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{args.duration}s"])
        + " --latency",
        "workers": args.workers,
        "results": {name: asdict(r) for name, r in results.items()},
        "embedded_stats": {
            s.id: {"requests": s.requests, "errors": s.errors, "responses_5xx": s.responses_5xx}
            for s in stats
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['machine']}, {report['date']}, {report['command']}")
        print(table(results, args.workers))


if __name__ == "__main__":
    main()
