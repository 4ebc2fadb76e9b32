"""A sealed instance cannot change its image, its host or its neighbours.

A hostile probe (a small Python program, deployed as a service from ``base:
host-python``) tries, from inside a running instance, everything DESIGN invariant 10
forbids: write its root and its app dir, remount them read-write, reach the state dir
and the ledger, write the host's /etc, touch another instance's files, signal the
controller and another instance, raise a capability. Every attempt must fail. The very
same probe run unsealed on the host, against stand-ins it may touch, succeeds at each:
the attempts are real, so their failures inside mean something. The recipe's ``user:``
is the uid the host sees in /proc/PID/status. The sealed cases run on both runtimes:
the process runtime (bubblewrap) and runc.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graven.runtime.runc import find_init
from graven.testing.specs import render
from graven.volumes import volume_data
from tests.e2e.conftest import Project, _project, eventually
from tests.requires import missing, need_root, need_tool

pytestmark = pytest.mark.e2e

PROBE_UID = 4242

# Serves /healthz, and /probe?targets=JSON: runs every attempt, answers what each did
# ("ok", or the error's name). Run with --once JSON it prints the same for a control.
PROBE = r"""
import ctypes, ctypes.util, errno, json, os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MS_REMOUNT, MS_BIND = 32, 4096
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def remount_rw(path):
    if libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def raise_capability():
    # capset: CAP_SYS_ADMIN (21) effective and permitted, besides what is permitted now.
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    status = open("/proc/self/status").read().split("CapPrm:")[1].split()[0]
    wanted = int(status, 16) | (1 << 21)
    low, high = wanted & 0xFFFFFFFF, wanted >> 32
    header = Header(0x20080522, 0)
    data = (Data * 2)(Data(low, low, 0), Data(high, high, 0))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def write(path):
    with open(path, "a") as f:
        f.write("probe was here\n")


def write_bytes(directory, size):
    with open(os.path.join(directory, "filler"), "wb") as f:
        f.write(b"x" * size)


def attempts(t):
    return {
        "write_root": lambda: write(os.path.join(t["root"], "probe-was-here")),
        "write_app": lambda: write(os.path.join(t["app"], "app.py")),
        "remount_root_rw": lambda: remount_rw(t["root"]),
        "remount_app_rw": lambda: remount_rw(t["app"]),
        "see_state_dir": lambda: os.listdir(t["state_dir"]),
        "write_state_dir": lambda: write(os.path.join(t["state_dir"], "probe-was-here")),
        "write_ledger": lambda: write(t["ledger"]),
        "write_host_etc": lambda: write(os.path.join(t["host_etc"], "probe-was-here")),
        "write_other_instance": lambda: write(t["other_file"]),
        "signal_controller": lambda: os.kill(t["controller_pid"], signal.SIGTERM),
        "signal_other_instance": lambda: os.kill(t["other_pid"], signal.SIGTERM),
        "raise_capability": raise_capability,
        "become_root": lambda: os.setuid(0),
        # Writable paths the service declares (when the targets name them).
        "write_volume": lambda: write(os.path.join(t.get("volume", "/nonexistent"), "kept")),
        "overfill_tmpfs": lambda: write_bytes(t.get("tmpfs", "/nonexistent"), 2 << 20),
        # Controls inside: what an instance may do.
        "write_tmp": lambda: write("/tmp/probe"),
        "read_app": lambda: open(os.path.join(t["app"], "probe.py")).read(),
        "signal_itself": lambda: os.kill(os.getpid(), 0),
    }


def run_all(targets):
    out = {}
    for name, attempt in attempts(targets).items():
        try:
            attempt()
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
    return out


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/healthz":
            body = b"ok"
        else:
            body = json.dumps(run_all(json.loads(parse_qs(url.query)["targets"][0]))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["--once"]:
        print(json.dumps(run_all(json.loads(sys.argv[2]))))
        sys.exit(0)
    server = ThreadingHTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()
"""

FORBIDDEN = (
    "write_root",
    "write_app",
    "remount_root_rw",
    "remount_app_rw",
    "see_state_dir",
    "write_state_dir",
    "write_ledger",
    "write_host_etc",
    "write_other_instance",
    "signal_controller",
    "signal_other_instance",
    "raise_capability",
    "become_root",
)
ALLOWED = ("write_tmp", "read_app", "signal_itself")


def probe_spec(port: int, *, user: str | None, **sealing: Any) -> str:
    steps: list[dict[str, Any]] = [{"copy": "probe", "to": "/app"}, {"workdir": "/app"}]
    if user is not None:
        steps.append({"user": user})
    steps.append({"entrypoint": "python3 probe.py"})
    service = {
        "image": "probe",
        "replicas": 2,
        "port": port,
        "health": {"path": "/healthz", "interval": "0.5s", "start_timeout": "20s"},
        "drain_timeout": "2s",
        "stop_grace": "2s",
        "isolation": "required",
        **sealing,
    }
    return render(
        {
            "images": {"probe": {"base": "host-python", "steps": steps}},
            "services": {"probe": service},
        }
    )


@pytest.fixture(params=["process", "runc"])
def sealed(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    host_python_store: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Project]:
    """The hostile probe deployed on each runtime: bubblewrap-sealed processes, and
    runc containers (the controller reads GRAVEN_RUNTIME from its environment)."""
    need_root("sealing as another uid is shown as root, as CI runs")
    if request.param == "runc":
        need_tool("runc")
        if find_init() is None:
            missing("tini-static is not installed (scripts/setup installs it)")
        monkeypatch.setenv("GRAVEN_RUNTIME", "runc")
    else:
        need_tool("bwrap")
    gen = _project(tmp_path / "proj", "embedded", seed=host_python_store)
    project = next(gen)
    try:
        (project.root / "probe").mkdir()
        (project.root / "probe" / "probe.py").write_text(PROBE)
        (project.root / "graven.yaml").write_text(probe_spec(project.port, user=str(PROBE_UID)))
        project.graven("deploy", "-m", "hostile probe", timeout=180)
        yield project
    finally:
        next(gen, None)


def instances(project: Project) -> list[dict[str, Any]]:
    data = project.graven("status", "probe", "-o", "json").json()
    found: list[dict[str, Any]] = data["services"][0]["instances"]
    return found


def ask(address: str, targets: dict[str, Any]) -> dict[str, str]:
    query = urllib.parse.urlencode({"targets": json.dumps(targets)})
    with urllib.request.urlopen(f"http://{address}/probe?{query}", timeout=30) as reply:
        answer: dict[str, str] = json.loads(reply.read())
    return answer


def app_pid(handle_pid: int) -> int:
    """The app inside: the child of the instance's init (bubblewrap's, or runc's
    tini), which is the instance's handle."""
    children = Path(f"/proc/{handle_pid}/task/{handle_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def uid_of(pid: int) -> int:
    line = next(
        x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:")
    )
    real, effective, saved, fs = (int(v) for v in line.split()[1:])
    assert real == effective == saved == fs, line
    return real


def test_every_escape_attempt_fails_and_the_probe_works(sealed: Project, tmp_path: Path) -> None:
    project = sealed
    first, second = instances(project)
    controller = project.controller_pid()
    assert controller is not None
    checkout = next(p for p in (project.state_dir / "checkouts").iterdir() if p.is_dir())
    ledger = project.state_dir / "state.db"
    checkout_before = sorted(p.name for p in (checkout / "app").iterdir())
    inside = {
        "root": "/",
        "app": "/app",
        "state_dir": str(project.state_dir),
        "ledger": str(ledger),
        "host_etc": "/etc",
        "other_file": f"/proc/{second['pid']}/root/tmp/from-a-neighbour",
        "controller_pid": controller,
        "other_pid": second["pid"],
    }

    answer = ask(first["address"], inside)

    assert {k: answer[k] for k in ALLOWED} == dict.fromkeys(ALLOWED, "ok"), answer
    failed = {k: answer[k] for k in FORBIDDEN}
    assert "ok" not in failed.values(), failed
    # Each fails for the reason sealing gives, not by accident.
    assert failed["write_root"] == failed["write_app"] == "EROFS", failed
    assert failed["remount_root_rw"] == failed["remount_app_rw"] == "EPERM", failed
    assert failed["see_state_dir"] == failed["write_state_dir"] == "ENOENT", failed
    assert failed["write_ledger"] == "ENOENT", failed
    assert failed["signal_controller"] == failed["signal_other_instance"] == "ESRCH", failed
    assert failed["raise_capability"] == "EPERM", failed
    assert failed["become_root"] in ("EPERM", "EINVAL"), failed  # uid 0 is not even mapped
    assert failed["write_other_instance"] == "ENOENT", failed  # no such pid in its /proc

    # Nothing changed on the host: the controller and the neighbour run on, the
    # ledger and the checkout are as they were, the host's /etc has no new file.
    assert project.controller_pid() == controller and Path(f"/proc/{controller}").exists()
    assert [i["id"] for i in instances(project)] == [first["id"], second["id"]]
    assert sorted(p.name for p in (checkout / "app").iterdir()) == checkout_before
    assert not Path("/etc/probe-was-here").exists()
    assert not (checkout / "probe-was-here").exists()


def test_the_same_probe_unsealed_succeeds_at_every_attempt(tmp_path: Path) -> None:
    """The control: run as root on the host, in a private mount namespace, against
    stand-ins it may touch, every attempt of the probe works."""
    need_root("the control raises capabilities and remounts, as root")
    probe = tmp_path / "app" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(PROBE)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.db").write_bytes(b"")
    (tmp_path / "app" / "app.py").write_text("")
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        targets = {
            "root": str(root),
            "app": str(probe.parent),
            "state_dir": str(state_dir),
            "ledger": str(state_dir / "state.db"),
            "host_etc": str(root / "etc"),
            "other_file": str(tmp_path / "neighbour"),
            "controller_pid": sleepers[0].pid,
            "other_pid": sleepers[1].pid,
        }
        # Bind mounts of the stand-ins, in a mount namespace of its own: what the
        # remount attempts act on.
        script = (
            f"mount --bind {root} {root} && mount --bind {probe.parent} {probe.parent} && "
            'exec "$0" "$@"'
        )
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                script,
                sys.executable,
                str(probe),
                "--once",
                json.dumps(targets),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        answer = json.loads(done.stdout)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    tried = {k: answer[k] for k in [*FORBIDDEN, *ALLOWED]}
    assert tried == dict.fromkeys([*FORBIDDEN, *ALLOWED], "ok"), answer


def test_the_recipe_user_is_the_uid_the_host_sees(sealed: Project) -> None:
    for instance in instances(sealed):
        assert uid_of(instance["pid"]) == PROBE_UID
        assert uid_of(app_pid(instance["pid"])) == PROBE_UID


def test_an_image_naming_no_user_runs_as_nobody(project: Project) -> None:
    need_root("graven as root runs instances as nobody")
    project.write_spec(replicas=1)
    project.graven("deploy", "-m", "first", timeout=180)
    (instance,) = project.status()["instances"]
    assert uid_of(instance["pid"]) == 65534
    assert uid_of(app_pid(instance["pid"])) == 65534
    assert project.graven("status", "hello").stdout.count("isolation: sealed") == 1
    check = project.graven("check", "-o", "json").json()
    assert check["isolation"] == {"mode": "sealed"}


def test_where_nothing_can_seal_status_and_check_say_so_and_required_refuses(
    tmp_path: Path, host_python_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAVEN_BWRAP", "none")
    gen = _project(tmp_path / "proj", "embedded", seed=host_python_store)
    project = next(gen)
    try:
        project.write_spec(replicas=1)
        project.graven("deploy", "-m", "unsealed", timeout=180)
        assert eventually(lambda: project.status()["instances"][0]["state"] == "healthy", 30)
        human = project.graven("status", "hello").stdout
        assert "isolation: none (turned off by GRAVEN_BWRAP=none)" in human
        check = project.graven("check", "-o", "json").json()
        assert check["isolation"] == {"mode": "none", "reason": "turned off by GRAVEN_BWRAP=none"}

        spec = (project.root / "graven.yaml").read_text()
        (project.root / "graven.yaml").write_text(
            spec.replace(
                "  hello:\n    image: hello\n",
                "  hello:\n    image: hello\n    isolation: required\n",
            )
        )
        warned = project.graven("check").stderr
        assert "isolation: required, but instances cannot be sealed" in warned, warned
        refused = project.graven("deploy", "-m", "must be sealed", check=False, timeout=180)
        assert refused.code == 1, refused
        assert "requires isolation" in refused.stdout + refused.stderr
        # The release before it serves on.
        assert [i["release"] for i in project.status()["instances"]] == ["hello@r1"]
    finally:
        next(gen, None)


def test_a_program_the_image_lacks_fails_at_start_naming_the_fix(project: Project) -> None:
    spec = (project.root / "graven.yaml").read_text()
    (project.root / "graven.yaml").write_text(spec.replace("    base: host-python\n", ""))
    warned = project.graven("check").stderr
    assert "'python3' is not in an image that starts from scratch" in warned, warned
    result = project.graven("deploy", "-m", "no python", check=False, timeout=180)
    assert result.code == 1
    said = result.stdout + result.stderr
    assert "entrypoint program 'python3' is not in the image" in said, said
    assert "base: host-python" in said


def test_declared_volumes_and_tmpfs_are_the_writable_paths(sealed: Project) -> None:
    project = sealed
    spec = probe_spec(
        project.port,
        user=str(PROBE_UID),
        volumes=[{"path": "/data", "name": "probe-data"}],
        tmpfs=[{"path": "/scratch", "size": "1Mi"}],
    )
    (project.root / "graven.yaml").write_text(spec)
    project.graven("deploy", "-m", "with a volume and a tmpfs", timeout=180)
    first = instances(project)[0]
    answer = ask(first["address"], {"root": "/", "app": "/app", "volume": "/data",
                                    "tmpfs": "/scratch", "state_dir": "/x", "ledger": "/x",
                                    "host_etc": "/etc", "other_file": "/x",
                                    # no such pid: pid 1 is the instance's own init,
                                    # and runc's (tini) passes a SIGTERM on to the app
                                    "controller_pid": 2**30, "other_pid": 2**30})  # fmt: skip
    assert answer["write_volume"] == "ok", answer
    assert answer["overfill_tmpfs"] == "ENOSPC", answer  # 2 MiB into a 1 MiB tmpfs
    assert answer["write_root"] == "EROFS", answer  # the rest stays read-only
    kept = volume_data(project.state_dir, "probe-data") / "kept"
    assert kept.read_text().startswith("probe was here")
    assert (kept.parent.stat().st_uid, kept.stat().st_uid) == (PROBE_UID, PROBE_UID)
