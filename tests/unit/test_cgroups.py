"""Control groups as data: layouts, the files a limit writes, and reading back what the
kernel did; the effects on a temp dir standing in for /sys/fs/cgroup."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from graven.errors import RuntimeFailure
from graven.model import MIB, Resources
from graven.runtime.cgroups import (
    CgroupLayout,
    Hierarchy,
    LimitEvents,
    LimitWrite,
    cpu_quota_us,
    explain_exit,
    layout_of,
    limit_writes,
    parse_keyed,
    parse_limit,
    parse_mounts,
)
from graven.runtime.limits import JOIN_SHIM, CgroupLimits, support, sweep_cgroups, unenforced

HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
LIMITS = Resources(memory=64 * MIB, pids=32, cpu=0.5)


def test_hybrid_mounts_take_each_controller_from_its_v1_mount() -> None:
    v1, unified = parse_mounts(HYBRID_MOUNTS)
    layout = layout_of(v1, unified, ["hugetlb"])
    assert layout.of("memory") == Hierarchy("memory", Path("/sys/fs/cgroup/memory"), 1)
    assert layout.of("cpu") == Hierarchy("cpu", Path("/sys/fs/cgroup/cpu"), 1)
    assert layout.version == "v1"
    assert layout.missing == ()


def test_co_mounted_v1_controllers_share_one_mount() -> None:
    v1, _ = parse_mounts("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n")
    assert v1 == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct")}


def test_v2_controllers_come_from_cgroup_controllers() -> None:
    v1, unified = parse_mounts(V2_MOUNTS)
    layout = layout_of(v1, unified, ["cpuset", "cpu", "io", "memory"])
    assert layout.of("memory") == Hierarchy("memory", Path("/sys/fs/cgroup"), 2)
    assert layout.of("pids") is None
    assert layout.why_not("pids") == "the pids controller is not enabled in /sys/fs/cgroup"
    assert layout.version == "v2"


def test_no_cgroups_at_all_says_so() -> None:
    layout = layout_of({}, None, [])
    assert layout.version == "none"
    assert layout.why_not("memory") == "no memory cgroup is mounted (neither v1 nor v2)"


def test_a_mount_path_with_a_space_is_unescaped() -> None:
    v1, _ = parse_mounts("cgroup /sys/fs/my\\040cg cgroup rw,pids 0 0\n")
    assert v1 == {"pids": Path("/sys/fs/my cg")}


def v1_layout(root: Path) -> CgroupLayout:
    return CgroupLayout(tuple(Hierarchy(c, root / c, 1) for c in ("memory", "pids", "cpu")))


def v2_layout(root: Path) -> CgroupLayout:
    return CgroupLayout(tuple(Hierarchy(c, root, 2) for c in ("memory", "pids", "cpu")))


def test_v1_limit_files() -> None:
    assert limit_writes(LIMITS, v1_layout(Path("/cg"))) == [
        LimitWrite("memory", "memory.limit_in_bytes", str(64 * MIB)),
        LimitWrite("memory", "memory.memsw.limit_in_bytes", str(64 * MIB), optional=True),
        LimitWrite("pids", "pids.max", "32"),
        LimitWrite("cpu", "cpu.cfs_period_us", "100000"),
        LimitWrite("cpu", "cpu.cfs_quota_us", "50000"),
    ]


def test_v2_limit_files() -> None:
    assert limit_writes(LIMITS, v2_layout(Path("/cg"))) == [
        LimitWrite("memory", "memory.max", str(64 * MIB)),
        LimitWrite("memory", "memory.swap.max", "0", optional=True),
        LimitWrite("pids", "pids.max", "32"),
        LimitWrite("cpu", "cpu.max", "50000 100000"),
    ]


def test_only_asked_limits_are_written() -> None:
    assert limit_writes(Resources(pids=8), v1_layout(Path("/cg"))) == [
        LimitWrite("pids", "pids.max", "8")
    ]
    assert limit_writes(Resources(), v2_layout(Path("/cg"))) == []


def test_cpu_quota_never_goes_below_what_the_kernel_accepts() -> None:
    assert cpu_quota_us(2.0) == 200_000
    assert cpu_quota_us(0.01) == 1_000
    assert cpu_quota_us(0.001) == 1_000


def test_event_files_parse() -> None:
    assert parse_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n") == {
        "oom_kill_disable": 0,
        "under_oom": 0,
        "oom_kill": 2,
    }
    assert parse_keyed("max 7\n")["max"] == 7
    assert parse_keyed("garbage\n") == {}
    assert parse_limit("max\n") is None
    assert parse_limit("9223372036854771712\n") is None  # v1's "unlimited"
    assert parse_limit("33554432\n") == 32 * MIB
    assert parse_limit("") is None


@pytest.mark.parametrize(
    ("how", "events", "said"),
    [
        ("killed by SIGKILL", LimitEvents(oom_kills=1, memory_limit=64 * MIB),
         "killed: out of memory (limit 64 MiB)"),
        ("", LimitEvents(oom_kills=1, memory_limit=32 * MIB), "killed: out of memory (limit 32 MiB)"),
        ("exited with code 1", LimitEvents(oom_kills=2, memory_limit=32 * MIB),
         "exited with code 1; out of memory: 2 processes killed (limit 32 MiB)"),
        ("exited with code 1", LimitEvents(forks_refused=5, pids_limit=32),
         "exited with code 1; fork refused: pids limit 32 reached"),
        ("exited with code 0", LimitEvents(), "exited with code 0"),
        ("", LimitEvents(), ""),
    ],
)  # fmt: skip
def test_exit_reasons_name_the_limit(how: str, events: LimitEvents, said: str) -> None:
    assert explain_exit(how, events) == said


def test_support_says_what_is_missing_and_what_needs_root(tmp_path: Path) -> None:
    layout = CgroupLayout(
        (Hierarchy("memory", tmp_path, 1),), (("pids", "no pids cgroup is mounted"),)
    )
    found = {s.controller: s for s in support(layout, root=True)}
    assert found["memory"].enforced
    assert not found["pids"].enforced and found["pids"].reason == "no pids cgroup is mounted"
    assert [
        s.controller for s in unenforced(Resources(memory=8 * MIB, pids=4), list(found.values()))
    ] == ["pids", "cpu"][:1]


def test_prepare_writes_limits_and_wraps_the_command(tmp_path: Path) -> None:
    limits = CgroupLimits(tmp_path / "state", v1_layout(tmp_path))
    limits.supported = support(limits.layout, root=True)
    argv = limits.prepare("web-r1-0001", LIMITS, ["/app/run", "--flag"])
    groups = limits.groups("web-r1-0001")
    assert [g.parent.parent.parent for g in groups] == [
        tmp_path / c for c in ("memory", "pids", "cpu")
    ]
    memory, pids, cpu = groups
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    assert not (memory / "memory.memsw.limit_in_bytes").exists()  # optional: kernel lacks it
    assert (pids / "pids.max").read_text() == "32"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert argv == [
        "/bin/sh", "-c", JOIN_SHIM, "graven-limits",
        *(str(g / "cgroup.procs") for g in groups), "--", "/app/run", "--flag",
    ]  # fmt: skip


def test_nothing_asked_means_no_groups(tmp_path: Path) -> None:
    limits = CgroupLimits(tmp_path / "state", v1_layout(tmp_path))
    assert limits.prepare("web-r1-0001", Resources(), ["/app/run"]) == ["/app/run"]
    assert not (tmp_path / "memory").exists()


def test_the_shim_joins_every_group_before_the_command_runs(tmp_path: Path) -> None:
    procs = [tmp_path / "a.procs", tmp_path / "b.procs"]
    out = tmp_path / "seen"
    script = f"cat {procs[0]} {procs[1]} > {out}; echo $$ >> {out}"
    argv = ["/bin/sh", "-c", JOIN_SHIM, "x", *map(str, procs), "--", "/bin/sh", "-c", script]
    assert subprocess.run(argv, timeout=10, check=False).returncode == 0
    first, second, own = out.read_text().split()
    assert first == second == own  # the same pid: the shim became the command


def test_the_shim_refuses_to_run_the_command_outside_its_group(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv = ["/bin/sh", "-c", JOIN_SHIM, "x", str(tmp_path / "gone" / "cgroup.procs"), "--",
            "/bin/touch", str(marker)]  # fmt: skip
    assert subprocess.run(argv, timeout=10, check=False, capture_output=True).returncode == 125
    assert not marker.exists()


def test_events_and_explain_read_the_groups_counters(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "instances" / "web-r1-0001").mkdir(parents=True)
    (state / "instances" / "web-r1-0001" / "pid").write_text("4242\n")
    limits = CgroupLimits(state, v1_layout(tmp_path))
    limits.supported = support(limits.layout, root=True)
    limits.prepare("web-r1-0001", Resources(memory=32 * MIB, pids=16), ["/app/run"])
    memory, pids, _ = limits.groups("web-r1-0001")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (pids / "pids.events").write_text("max 3\n")
    assert limits.explain(4242, "killed by SIGKILL") == (
        "killed: out of memory (limit 32 MiB); fork refused: pids limit 16 reached"
    )
    assert limits.explain(999_999, "exited with code 2") == "exited with code 2"  # not ours


def test_release_and_sweep_remove_empty_groups_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    limits = CgroupLimits(state, v1_layout(tmp_path))
    limits.supported = support(limits.layout, root=True)
    limits.prepare("web-r1-0001", Resources(pids=4), ["/app/run"])
    limits.prepare("web-r1-0002", Resources(pids=4), ["/app/run"])
    busy, idle = (limits.groups(i, ["pids"])[0] for i in ("web-r1-0001", "web-r1-0002"))
    for d in (busy, idle):  # a real group's files vanish with it; a temp dir's do not
        (d / "pids.max").unlink()
    (busy / "cgroup.procs").write_text(f"{os.getpid()}\n")  # this very test: must survive
    assert sweep_cgroups(state, limits.layout) == [idle]
    assert busy.exists() and not idle.exists()
    other = CgroupLimits(tmp_path / "other-state", limits.layout)
    assert other.groups("web-r1-0001") != limits.groups("web-r1-0001")  # keyed by state dir


def test_a_group_that_cannot_be_written_is_a_runtime_failure(tmp_path: Path) -> None:
    (tmp_path / "memory").write_text("not a directory")
    limits = CgroupLimits(tmp_path / "state", v1_layout(tmp_path))
    limits.supported = support(limits.layout, root=True)
    with pytest.raises(RuntimeFailure, match="cannot set its resource limits") as err:
        limits.prepare("web-r1-0001", Resources(memory=8 * MIB), ["/app/run"])
    assert err.value.hint and "graven runtime" in err.value.hint


def test_prepare_on_cgroup_v2_enables_the_controllers_down_to_the_group(tmp_path: Path) -> None:
    limits = CgroupLimits(tmp_path / "state", v2_layout(tmp_path))
    limits.supported = support(limits.layout, root=True)
    argv = limits.prepare("web-r1-0001", LIMITS, ["/app/run"])
    (group,) = limits.groups("web-r1-0001")  # one unified group for every controller
    assert group == tmp_path / "graven" / limits.key / "web-r1-0001"
    for level in (tmp_path, tmp_path / "graven", tmp_path / "graven" / limits.key):
        assert (level / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (group / "memory.max").read_text() == str(64 * MIB)
    assert (group / "pids.max").read_text() == "32"
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert argv[4:6] == [str(group / "cgroup.procs"), "--"]
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert limits.events("web-r1-0001").oom_kills == 1


def test_pid_files_of_both_shapes_name_their_pid() -> None:
    from graven.runtime.limits import pids_named

    assert pids_named("4242\n") == {4242}
    assert pids_named('{"child-pid": 77}\n{"exit-code": 1}\n') == {77}
    assert pids_named("garbage\n{not json\n") == set()
