"""The example service deployed with GRAVEN_RUNTIME=runc: real runc containers from an
image whose interpreter is inside it (the host-python base), sealed.

The instance itself tries to break out as it starts (``seal_probe.py`` runs before the
example app and prints what each attempt got): write its root and /etc, remount its
root read-write, and, as the control that shows the probe works, write its /tmp.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graven import detached
from graven.testing.net import eventually
from graven.testing.specs import hello_service, render
from tests import requires
from tests.e2e.conftest import Project, _project

pytestmark = [pytest.mark.e2e, pytest.mark.needs_root("runc containers need root")]

UID, GID = 1000, 1001
PROBE = r'''
"""Tries what a sealed instance must not manage, prints the results, then serves."""
import json, os, runpy, subprocess

def attempt(action):
    try:
        action()
    except OSError as exc:
        return "refused: " + (exc.strerror or str(exc))
    return "allowed"

def write(path):
    with open(path, "w") as f:
        f.write("x")

def run(*argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    return "allowed" if done.returncode == 0 else "refused: " + done.stderr.strip()

with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
results = {
    "uid": os.getuid(),
    "gid": os.getgid(),
    "cap_eff": status["CapEff"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "write_root": attempt(lambda: write("/app/written")),
    "write_etc": attempt(lambda: os.mkdir("/etc")),
    "write_tmp": attempt(lambda: write("/tmp/written")),
    "remount_root": run("/bin/busybox", "mount", "-o", "remount,rw", "/"),
    "remount_bind": run("/bin/busybox", "mount", "-o", "remount,bind,rw", "/app", "/app"),
    # The controller's state dir, by its host path: the ledger and the checkouts.
    "read_state": attempt(lambda: os.listdir(os.environ["PROBE_STATE"])),
    "write_ledger": attempt(lambda: write(os.environ["PROBE_STATE"] + "/state.db")),
}
print("SEAL-PROBE " + json.dumps(results), flush=True)

# HOG=memory|pids: go past the service's limit before serving (the control is the
# same image and limits without HOG, which serves).
hog = os.environ.get("HOG")
if hog == "memory":
    held = []
    while len(held) < 256:  # 2 GiB at most: far past any limit these tests set
        held.append(b"x" * (8 << 20))
    print("memory: never stopped", flush=True)
elif hog == "pids":
    import threading, time
    started = 0
    try:
        while started < 4096:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
            started += 1
    except RuntimeError as exc:
        print(f"pids: refused after {started} threads: {exc}", flush=True)
        raise SystemExit(1)
runpy.run_path("app.py", run_name="__main__")
'''


def runc_spec(
    project: Project,
    base: dict[str, Any],
    *,
    replicas: int = 2,
    version: str = "v1",
    env: dict[str, str] | None = None,
    resources: dict[str, Any] | None = None,
) -> str:
    probe_env = {"PROBE_STATE": str(project.state_dir), **(env or {})}
    service = hello_service(port=project.port, version=version, replicas=replicas, env=probe_env)
    service["health"]["start_timeout"] = "30s"
    if resources:
        service["resources"] = resources
    steps = [
        {"copy": "app", "to": "/app"},
        {"copy": "tools", "to": "/bin"},
        {"workdir": "/app"},
        {"user": f"{UID}:{GID}"},
        {"entrypoint": [base["entrypoint"][0], "seal_probe.py"]},
    ]
    return render(
        {
            "images": {
                "hello": {"base": {"image": f"host-python@{base['digest']}"}, "steps": steps}
            },
            "services": {"hello": service},
        }
    )


@dataclass
class RuncProject:
    """The example service's project, and the host-python base its image starts from."""

    project: Project
    base: dict[str, Any]


@pytest.fixture
def runc_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RuncProject]:
    requires.need_tool("runc")
    busybox = requires.need_tool("busybox")
    if not Path("/usr/bin/tini-static").exists():
        requires.missing("tini-static is not installed (scripts/setup installs it)")
    monkeypatch.setenv("GRAVEN_RUNTIME", "runc")
    for project in _project(tmp_path / "proj", "embedded"):
        base = project.graven("base", "host-python", "-o", "json").json()
        (project.root / "app" / "seal_probe.py").write_text(PROBE)
        (project.root / "tools").mkdir()
        shutil.copy(busybox, project.root / "tools" / "busybox")
        (project.root / "graven.yaml").write_text(runc_spec(project, base))
        yield RuncProject(project, base)


def instances(project: Project) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = project.status()["instances"]
    return found


def probe_results(project: Project, instance_id: str) -> dict[str, Any]:
    log = project.state_dir / "instances" / instance_id / "log"
    for line in log.read_text().splitlines():
        if line.startswith("SEAL-PROBE "):
            found: dict[str, Any] = json.loads(line.removeprefix("SEAL-PROBE "))
            return found
    raise AssertionError(f"{instance_id} printed no probe results:\n{log.read_text()}")


def status_ids(pid: int, key: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def get(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def runc_containers(project: Project) -> list[str]:
    return sorted(p.name for p in (project.state_dir / "runc").glob("*"))


def test_runc_instances_are_sealed_and_serve(runc_project: RuncProject) -> None:
    project = runc_project.project
    project.graven("deploy", "-m", "sealed")
    live = instances(project)
    assert len(live) == 2
    assert get(project.port)["version"] == "v1"
    assert runc_containers(project) == sorted(i["id"] for i in live)
    for inst in live:
        init = inst["pid"]
        # The recipe's user, from the kernel: the container's init and the app it runs.
        (app,) = children(init)
        for pid in (init, app):
            assert status_ids(pid, "Uid") == [UID] * 4
            assert status_ids(pid, "Gid") == [GID] * 4
        results = probe_results(project, inst["id"])
        assert results["uid"] == UID and results["gid"] == GID
        assert results["cap_eff"] == "0000000000000000"
        assert results["no_new_privs"] == "1"
        assert results["write_tmp"] == "allowed"  # the control: the probe can write
        assert results["write_root"] == "refused: Read-only file system"
        assert results["write_etc"] == "refused: Read-only file system"
        assert results["remount_root"].startswith("refused:")
        assert results["remount_bind"].startswith("refused:")
        assert results["read_state"] == "refused: No such file or directory"
        assert results["write_ledger"].startswith("refused:")
        assert (project.state_dir / "state.db").is_file()  # it is there, on the host
        # Seen from the host too: the instance's root mount is read-only.
        root_mount = next(
            line.split()
            for line in Path(f"/proc/{init}/mountinfo").read_text().splitlines()
            if line.split()[4] == "/"
        )
        assert "ro" in root_mount[5].split(",")
    checkout = project.state_dir / "checkouts"
    assert not any(checkout.glob("*/app/written"))
    project.down_leaves_nothing()
    assert runc_containers(project) == []


def test_a_restarted_controller_adopts_runc_instances(runc_project: RuncProject) -> None:
    project = runc_project.project
    project.graven("deploy", "-m", "v1")
    before = sorted((i["id"], i["pid"]) for i in instances(project))
    controller = project.controller_pid()
    assert controller is not None
    started = detached.start_time(controller)
    os.kill(controller, signal.SIGKILL)
    eventually(lambda: detached.start_time(controller) != started, 10)
    assert get(project.port)["version"] == "v1"  # the instances run on alone
    # The same deploy again records nothing; the new controller adopts what runs.
    project.graven("deploy", "-m", "v1")
    assert project.controller_pid() not in (None, controller)
    after = instances(project)
    assert sorted((i["id"], i["pid"]) for i in after) == before
    assert {i["state"] for i in after} == {"healthy"}
    assert get(project.port)["version"] == "v1"
    project.down_leaves_nothing()
    assert runc_containers(project) == []


LIMITS = {"memory": "48Mi", "pids": 24}


def cgroup_file(pid: int, controller: str, name: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name
    raise AssertionError(f"{pid} is in no {controller} cgroup")


@pytest.mark.parametrize(
    ("hog", "reported"),
    [
        ("memory", "killed by SIGKILL (out of memory)"),
        ("pids", "exited with code 1 (pids limit)"),
    ],
)
def test_an_instance_past_its_limit_is_stopped_and_the_limit_named(
    runc_project: RuncProject, hog: str, reported: str
) -> None:
    project, base = runc_project.project, runc_project.base
    # The control: the same image under the same limits serves.
    (project.root / "graven.yaml").write_text(
        runc_spec(project, base, replicas=1, resources=LIMITS)
    )
    project.graven("deploy", "-m", "limited")
    (inst,) = instances(project)
    assert int(cgroup_file(inst["pid"], "memory", "memory.limit_in_bytes").read_text()) == 48 << 20
    assert cgroup_file(inst["pid"], "pids", "pids.max").read_text().strip() == "24"
    assert get(project.port)["version"] == "v1"
    # The hog: the next release goes past the limit as it starts, and is stopped.
    (project.root / "graven.yaml").write_text(
        runc_spec(project, base, replicas=1, version="v2", env={"HOG": hog}, resources=LIMITS)
    )
    failed = project.graven("deploy", "-m", "hog", check=False)
    assert failed.code != 0
    assert reported in failed.stderr + failed.stdout
    assert get(project.port)["version"] == "v1"  # the control serves on
    project.down_leaves_nothing()
    assert runc_containers(project) == []
