"""The process runtime around its spawn: an instance joins its groups before it runs,
its exit names the limit that ended it, and a limit the machine cannot enforce is said
in its log while it starts anyway. A temp dir stands in for /sys/fs/cgroup (the real
hierarchy is in tests/e2e/test_resource_limits.py)."""

from __future__ import annotations

from pathlib import Path

from graven import detached
from graven.model import MIB, ImageConfig, Resources
from graven.runtime.base import LaunchSpec
from graven.runtime.cgroups import CgroupLayout, Hierarchy
from graven.runtime.isolation import IsolationSupport
from graven.runtime.limits import CgroupLimits, support
from graven.runtime.process import ProcessRuntime
from graven.store.cas import ContentStore
from graven.store.tree_model import SYMLINK_MODE, Tree, TreeEntry
from tests.requires import need_tool


def launch(
    tmp_path: Path, script: str, resources: Resources, layout: CgroupLayout
) -> tuple[ProcessRuntime, LaunchSpec]:
    store = ContentStore(tmp_path / "store")
    root = store.place(
        store.put_tree(Tree.of([])), "/bin/busybox", store.ingest(Path(need_tool("busybox")))
    )
    for applet in ("sh", "sleep", "cat"):
        link = TreeEntry(applet, "symlink", SYMLINK_MODE, 7, target="busybox")
        root = store.place(root, f"/bin/{applet}", link)
    image = store.put_image(root, ImageConfig(entrypoint=("sh", "-c", script)))
    # Unsealed: these tests are about the groups, the same either way (the sealed
    # runtime on real groups is in tests/e2e/test_resource_limits.py).
    runtime = ProcessRuntime(tmp_path / "state", store, IsolationSupport(False, reason="test"))
    runtime.limits = CgroupLimits(tmp_path / "state", layout)
    runtime.limits.supported = support(layout, root=True)
    spec = LaunchSpec("web-r1-0001", "web", 1, image, (), 1, resources=resources)
    return runtime, spec


def fake_v1(root: Path) -> CgroupLayout:
    return CgroupLayout(tuple(Hierarchy(c, root / c, 1) for c in ("memory", "pids", "cpu")))


def test_the_instance_is_in_its_groups_before_its_own_code_runs(tmp_path: Path) -> None:
    layout = fake_v1(tmp_path / "cg")
    # The entrypoint reads the groups' member lists: they already name it.
    runtime, spec = launch(
        tmp_path,
        'cat "$CG"/memory/graven/*/web-r1-0001/cgroup.procs; sleep 30',
        Resources(memory=32 * MIB),
        layout,
    )
    spec = LaunchSpec(**{**spec.__dict__, "env": (("CG", str(tmp_path / "cg")),)})
    handle = runtime.start(spec)
    try:
        (group,) = runtime.limits.groups("web-r1-0001", ["memory"])
        assert (group / "memory.limit_in_bytes").read_text() == str(32 * MIB)
        log = runtime.log_path("web-r1-0001")
        assert detached.wait_until(lambda: log.read_text().strip() != "", 10)
        assert log.read_text().split() == [str(handle.pid)]
    finally:
        runtime.stop(handle, grace=5)


def test_the_exit_names_the_limit_that_ended_the_instance(tmp_path: Path) -> None:
    layout = fake_v1(tmp_path / "cg")
    runtime, spec = launch(tmp_path, "kill -9 $$", Resources(memory=32 * MIB), layout)
    (group,) = runtime.limits.groups("web-r1-0001", ["memory"])
    group.mkdir(parents=True)
    (group / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    handle = runtime.start(spec)
    assert detached.wait_until(lambda: not runtime.alive(handle), 10)
    assert runtime.exit_reason(handle) == "killed: out of memory (limit 32 MiB)"
    runtime.forget(handle)


def test_a_limit_that_cannot_be_enforced_is_said_in_the_log(tmp_path: Path) -> None:
    layout = CgroupLayout(missing=(("pids", "no pids cgroup is mounted (neither v1 nor v2)"),))
    runtime, spec = launch(tmp_path, "echo started; sleep 30", Resources(pids=16), layout)
    handle = runtime.start(spec)
    try:
        log = runtime.log_path("web-r1-0001")
        assert detached.wait_until(lambda: "started" in log.read_text(), 10)
        first, second = log.read_text().splitlines()[:2]
        assert first == (
            "graven: pids limit not enforced: no pids cgroup is mounted (neither v1 nor v2)"
        )
        assert second == "started"
    finally:
        runtime.stop(handle, grace=5)
