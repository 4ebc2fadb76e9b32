"""Instance start-to-healthy: graven's ``process`` and ``runc`` runtimes against a bare
``runc run`` of the same root (a minimal config of the kind ``runc spec`` prints, host
network) and ``podman run`` of the same image, in one run, on a busybox image serving
HTTP with ``httpd``.

    sudo .venv/bin/python bench/runtime_bench.py [--repeat 10] [--filler-mb 200] [--json]
                                                 [--no-podman]

Start-to-healthy is the time from the start call until an HTTP GET on the instance's
port answers 200; each instance is then stopped before the next starts. Two images:
busybox alone, and busybox with ``--filler-mb`` of extra files, to show that start
time does not grow with image size once the image is checked out (the checkout is
made once per image and shared by every instance; the first start, which makes it,
is reported apart as "cold").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graven import detached
from graven.model import Image, ImageConfig
from graven.runtime.base import LaunchSpec
from graven.runtime.process import ProcessRuntime
from graven.runtime.runc import RuncRuntime, find_runc
from graven.store.cas import ContentStore
from graven.testing.busybox import busybox_image
from graven.testing.net import free_port

WAIT = 30.0


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/index.html")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def until_healthy(port: int) -> None:
    if not detached.wait_until(lambda: healthy(port), WAIT):
        raise SystemExit(f"nothing answered on port {port} within {WAIT:.0f} s")


def make_image(store: ContentStore, work: Path, filler_mb: int) -> Image:
    script = 'exec busybox httpd -f -p "$HOST:$PORT" -h www'
    config = ImageConfig(entrypoint=("sh", "-c", script), env=(("PATH", "/bin"),))
    files = {"/www/index.html": "ok\n"}
    for i in range(filler_mb):
        files[f"/filler/{i:04d}.txt"] = os.urandom(512 << 10).hex()  # 1 MiB of text
    return busybox_image(store, work, config, files=files)


def time_runtime(runtime: Any, image: Image, repeat: int, tag: str) -> tuple[float, list[float]]:
    """(cold start, warm starts) of ``runtime`` in seconds."""
    times = []
    for i in range(repeat + 1):
        port = free_port()
        spec = LaunchSpec(f"bench-r1-{tag}{i:03d}", "bench", 1, image, (), port)
        began = time.perf_counter()
        handle = runtime.start(spec)
        until_healthy(port)
        times.append(time.perf_counter() - began)
        runtime.stop(handle, grace=5.0)
        runtime.forget(handle)
    return times[0], times[1:]


def bare_runc_config(root: Path, port: int) -> dict[str, Any]:
    """A minimal runc config: ``runc spec``'s shape, not a terminal, host network."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "root": {"path": str(root), "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }


def time_bare_runc(store: ContentStore, image: Image, work: Path, repeat: int) -> list[float]:
    runc = find_runc()
    assert runc is not None
    root = store.checkout(RuncRuntime(work / "probe", store).root_tree(image), work / "root")
    state = work / "runc-state"
    times = []
    for i in range(repeat):
        port = free_port()
        bundle = work / f"bundle-{i}"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(bare_runc_config(root, port)))
        cid = f"bare-{i}"
        began = time.perf_counter()
        subprocess.run(
            [runc, "--root", str(state), "run", "--detach", "--bundle", str(bundle), cid],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        until_healthy(port)
        times.append(time.perf_counter() - began)
        subprocess.run([runc, "--root", str(state), "delete", "--force", cid], check=False)
    return times


def podman_env(home: Path) -> dict[str, str]:
    """A podman whose files all live under ``home`` (runc, cgroupfs, overlay)."""
    (home / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "none"\n'
        f'tmp_dir = "{home / "tmp"}"\n'
    )
    (home / "storage.conf").write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'runroot = "{home / "runroot"}"\n'
        f'graphroot = "{home / "root"}"\n'
    )
    return {
        **os.environ,
        "CONTAINERS_CONF": str(home / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(home / "storage.conf"),
    }


def time_podman(store: ContentStore, image: Image, work: Path, repeat: int) -> list[float]:
    """``podman run -d --network host`` of the same image, pulled into podman's own
    storage once first (from an OCI layout graven exports)."""
    from graven.store.oci_export.layout import export_layout

    export_layout(store, image, work / "layout", "bench")
    home = Path(tempfile.mkdtemp(prefix="gpb-", dir="/tmp"))  # short: conmon's socket path
    env = podman_env(home)

    def podman(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *argv],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
        )

    pulled = podman("pull", "-q", f"oci:{work / 'layout'}:bench")
    if pulled.returncode != 0:
        raise SystemExit(f"podman pull failed: {pulled.stderr.strip()}")
    image_id = pulled.stdout.strip().splitlines()[-1]
    times = []
    try:
        for i in range(repeat):
            port = free_port()
            name = f"graven-bench-{i}"
            began = time.perf_counter()
            started = podman(
                "run", "-d", "--network", "host", "--name", name,
                "-e", f"PORT={port}", "-e", "HOST=127.0.0.1", image_id,
            )  # fmt: skip
            if started.returncode != 0:
                raise SystemExit(f"podman run failed: {started.stderr.strip()}")
            until_healthy(port)
            times.append(time.perf_counter() - began)
            podman("rm", "-f", "-t", "0", name)
    finally:
        podman("system", "reset", "-f")
        shutil.rmtree(home, ignore_errors=True)
    return times


def row(name: str, cold: float | None, warm: list[float], peer: float) -> dict[str, Any]:
    median = statistics.median(warm)
    return {
        "runtime": name,
        "cold_s": cold,
        "median_s": median,
        "min_s": min(warm),
        "vs_bare_runc_ms": (median - peer) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--filler-mb", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-podman", action="store_true", help="skip the podman peer")
    args = parser.parse_args()
    if os.geteuid() != 0 or find_runc() is None or shutil.which("busybox") is None:
        raise SystemExit("needs root, runc and busybox (scripts/setup installs them)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graven-runtime-bench-") as tmp:
        work = Path(tmp)
        store = ContentStore(work / "store")
        images = {
            "busybox": make_image(store, work / "small", 0),
            f"busybox + {args.filler_mb} MiB": make_image(store, work / "big", args.filler_mb),
        }
        for label, image in images.items():
            peer_work = work / f"bare-{len(rows)}"
            peer_work.mkdir()
            bare = time_bare_runc(store, image, peer_work, args.repeat)
            peer = statistics.median(bare)
            rows.append({"image": label, **row("bare runc run -d", None, bare, peer)})
            if shutil.which("podman") and not args.no_podman:
                podman = time_podman(store, image, peer_work, args.repeat)
                rows.append({"image": label, **row("podman run -d", None, podman, peer)})
            runtimes: dict[str, Callable[[Path], Any]] = {
                "graven process": lambda d: ProcessRuntime(d, store),
                "graven runc": lambda d: RuncRuntime(d, store),
            }
            for name, make in runtimes.items():
                state = work / f"state-{len(rows)}"
                cold, warm = time_runtime(make(state), image, args.repeat, str(len(rows)))
                rows.append({"image": label, **row(name, cold, warm, peer)})
    if args.json:
        print(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2))
        return
    print(f"{'image':<22} {'runtime':<18} {'cold':>8} {'median':>8} {'min':>8} {'vs bare':>9}")
    for r in rows:
        shown = f"{r['cold_s'] * 1000:.0f} ms" if r["cold_s"] is not None else "-"
        print(
            f"{r['image']:<22} {r['runtime']:<18} {shown:>8} {r['median_s'] * 1000:>5.0f} ms "
            f"{r['min_s'] * 1000:>5.0f} ms {r['vs_bare_runc_ms']:>+6.0f} ms"
        )


if __name__ == "__main__":
    main()
