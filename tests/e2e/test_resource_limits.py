"""``resources:`` enforced on real cgroups: an instance that allocates past its memory
limit is killed and status says it ran out of memory; a fork bomb stops at its pids
limit, the host keeps forking, and the exit names the limit; the CPU quota file holds
the quota; a child that leaves the process group still dies with its instance."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from graven.testing.specs import render
from tests.e2e.conftest import Project, eventually, pid_alive
from tests.requires import need_root

pytestmark = pytest.mark.e2e

CGROUP = Path("/sys/fs/cgroup")

# The hostile part of the image: waits for $HOG_FILE, removes it (so a replacement
# instance serves normally), then does what $HOG says.
HOG = """
import os, sys, threading, time

def _hog():
    trigger = os.environ["HOG_FILE"]
    while not os.path.exists(trigger):
        time.sleep(0.05)
    os.unlink(trigger)
    kind = os.environ["HOG"]
    if kind == "memory":
        hoard = []
        while True:
            hoard.append(b"x" * (1 << 20))
    if kind == "fork":
        read, write = os.pipe()
        children = refused = 0
        while refused < 20:
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                os.close(write)
                os.read(read, 1)  # returns when the parent is gone
                os._exit(0)
            children += 1
        print(f"fork bomb stopped after {children} children", flush=True)
        with open(trigger + ".tmp", "w") as f:
            f.write(str(children))
        os.replace(trigger + ".tmp", trigger + ".bombed")
        while not os.path.exists(trigger + ".done"):
            time.sleep(0.05)
        os._exit(1)
    if kind == "escape":
        if os.fork() == 0:
            os.setsid()  # out of the instance's process group
            with open(trigger + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(trigger + ".tmp", trigger + ".escaped")
            while True:
                time.sleep(1)

def start():
    threading.Thread(target=_hog, daemon=True).start()
"""


def hostile(project: Project, hog: str, trigger: Path, resources: dict[str, Any]) -> None:
    """The example service with a hog in its image and ``resources`` in its spec."""
    app = project.root / "app"
    (app / "hog.py").write_text(HOG)
    source = (app / "app.py").read_text()
    if "hog.start()" not in source:
        source = source.replace(
            "def main() -> int:\n", "def main() -> int:\n    __import__('hog').start()\n"
        )
        (app / "app.py").write_text(source)
    # A sealed instance sees no host path but its volumes: the signal dir is one.
    trigger.parent.mkdir(exist_ok=True)
    trigger.parent.chmod(0o777)  # the instance may run as another uid
    project.write_spec(replicas=1, env={"HOG": hog, "HOG_FILE": f"/signals/{trigger.name}"})
    doc = yaml.safe_load((project.root / "graven.yaml").read_text())
    doc.pop("version")
    doc["services"]["hello"]["resources"] = resources
    doc["services"]["hello"]["volumes"] = [{"path": "/signals", "host": str(trigger.parent)}]
    (project.root / "graven.yaml").write_text(render(doc))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[3])


def group_of(controller: str, instance_id: str) -> Path:
    (found,) = (CGROUP / controller / "graven").glob(f"*/{instance_id}")
    return found


def only_instance(project: Project) -> dict[str, Any]:
    (inst,) = project.status()["instances"]
    return dict(inst)


def test_an_instance_past_its_memory_limit_is_killed_and_status_says_why(
    project: Project, tmp_path: Path
) -> None:
    need_root("memory cgroups need root")
    trigger = tmp_path / "signals" / "hog-now"
    hostile(project, "memory", trigger, {"memory": "32Mi"})
    project.graven("deploy", "-m", "memory-limited")
    first = only_instance(project)
    group = group_of("memory", first["id"])
    assert (group / "memory.limit_in_bytes").read_text().strip() == str(32 * 1024 * 1024)
    assert str(first["pid"]) in (group / "cgroup.procs").read_text().split()
    trigger.touch()
    assert eventually(lambda: project.status()["last_exit"], 60), project.status()
    st = project.status()
    assert st["last_exit"] == "killed: out of memory (limit 32 MiB)", st
    human = project.graven("status", "hello").stdout
    assert "out of memory (limit 32 MiB)" in human, human
    audit = project.graven("audit", "-o", "json").json()
    died = [e for e in audit["entries"] if e["action"] == "instance-died"]
    assert died[0]["details"]["exit"] == "killed: out of memory (limit 32 MiB)"
    # The dead instance's groups are gone; its replacement has its own.
    assert eventually(lambda: not group.exists(), 20)
    assert eventually(
        lambda: (
            [i["id"] for i in project.status()["instances"] if i["state"] == "healthy"]
            not in ([], [first["id"]])
        ),
        60,
    ), project.status()


def test_a_fork_bomb_stops_at_the_pids_limit_and_the_exit_names_it(
    project: Project, tmp_path: Path
) -> None:
    need_root("pids cgroups need root")
    trigger = tmp_path / "signals" / "bomb-now"
    hostile(project, "fork", trigger, {"pids": 16})
    project.graven("deploy", "-m", "pids-limited")
    first = only_instance(project)
    group = group_of("pids", first["id"])
    assert (group / "pids.max").read_text().strip() == "16"
    trigger.touch()
    bombed = Path(f"{trigger}.bombed")
    assert eventually(bombed.exists, 60)
    assert int((group / "pids.current").read_text()) <= 16
    assert int(bombed.read_text()) < 16
    assert "max" in (group / "pids.events").read_text()
    assert subprocess.run(["/bin/true"], timeout=10, check=False).returncode == 0  # the host forks
    Path(f"{trigger}.done").touch()
    assert eventually(lambda: project.status()["last_exit"], 60), project.status()
    st = project.status()
    assert st["last_exit"] == "exited with code 1; fork refused: pids limit 16 reached", st


def test_the_cpu_quota_and_a_child_that_leaves_the_process_group(
    project: Project, tmp_path: Path
) -> None:
    need_root("cpu cgroups need root")
    trigger = tmp_path / "signals" / "escape-now"
    hostile(project, "escape", trigger, {"cpu": 0.5, "pids": 64})
    project.graven("deploy", "-m", "cpu-limited")
    inst = only_instance(project)
    cpu = group_of("cpu", inst["id"])
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
    trigger.touch()
    escaped = Path(f"{trigger}.escaped")
    assert eventually(escaped.exists, 30)
    # The child's pid inside the instance's pid namespace is not the host's: find it in
    # the group, as the one process in a session of its own.
    members = [int(p) for p in (cpu / "cgroup.procs").read_text().split()]
    sessions = {pid: session_of(pid) for pid in members}
    found = [p for p in members if p != inst["pid"] and sessions[p] == p]
    found = [p for p in found if _cmdline(p).split(b"\0")[1:2] == [b"app.py"]]
    assert len(found) == 1, [(p, sessions[p], _cmdline(p)[:60]) for p in members] + [inst["pid"]]
    (child,) = found
    project.down_leaves_nothing()
    assert eventually(lambda: not pid_alive(child), 20), f"{child} outlived 'graven down'"
    assert not cpu.exists()


def test_a_new_controller_sweeps_the_groups_of_instances_that_died_without_one(
    project: Project, tmp_path: Path
) -> None:
    need_root("pids cgroups need root")
    hostile(project, "memory", tmp_path / "signals" / "never", {"pids": 64})
    project.graven("deploy", "-m", "pids-limited")
    inst = only_instance(project)
    group = group_of("pids", inst["id"])
    controller = project.controller_pid()
    assert controller is not None
    os.kill(controller, signal.SIGKILL)
    assert eventually(lambda: not pid_alive(controller), 10)
    os.killpg(inst["pid"], signal.SIGKILL)  # the instance dies while no controller runs
    assert eventually(lambda: not (group / "cgroup.procs").read_text().split(), 10)
    assert group.exists()  # nobody was there to remove it
    project.graven("deploy", "-m", "pids-limited")  # starts a controller
    assert not group.exists()
    assert only_instance(project)["id"] != inst["id"]
    assert group_of("pids", only_instance(project)["id"]).exists()
