"""RuncRuntime itself, on real runc with busybox images: who an instance runs as, what
it can write, what the kernel refuses it, and that its image checkout stays exactly
the image. Each probe runs inside the instance; each refusal has a control beside it
that shows the probe itself works."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.detached import wait_until
from graven.errors import RuntimeFailure
from graven.model import Image, ImageConfig, Resources, Tmpfs, Volume
from graven.runtime.base import Handle, LaunchSpec
from graven.runtime.runc import RuncRuntime, find_init
from graven.store.cas import ContentStore
from graven.testing.busybox import busybox_image
from graven.volumes import volume_data
from tests import requires

pytestmark = [pytest.mark.e2e, pytest.mark.needs_root("runc containers need root")]

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:2345:\nextra:x:3456:app\n"
WAIT = 30.0


class Sealed:
    """A runc runtime on a temp state dir, and a way to run a probe script in it."""

    def __init__(self, tmp_path: Path) -> None:
        requires.need_tool("runc")
        self.busybox = requires.need_tool("busybox")
        if find_init() is None:
            requires.missing("tini-static is not installed (scripts/setup installs it)")
        self.tmp_path = tmp_path
        self.store = ContentStore(tmp_path / "store")
        self.runtime = RuncRuntime(tmp_path / "state", self.store)
        self.handles: list[Handle] = []
        self.count = 0
        self.last_image: Image | None = None

    def image(self, script: str, *, user: str = "") -> Image:
        self.count += 1
        config = ImageConfig(entrypoint=("sh", "-c", script), env=(("PATH", "/bin"),), user=user)
        files = {"/etc/passwd": PASSWD, "/etc/group": GROUP}
        work = self.tmp_path / f"image-{self.count}"
        self.last_image = busybox_image(self.store, work, config, files=files, busybox=self.busybox)
        return self.last_image

    def run(self, script: str, *, user: str = "", **launch: object) -> tuple[Handle, str]:
        """Run ``script`` as an instance until it prints ``DONE``; its handle and log."""
        self.count += 1
        instance_id = f"probe-r1-{self.count:04d}"
        spec = LaunchSpec(
            instance_id,
            "probe",
            1,
            self.image(script + "\necho DONE\nsleep 60", user=user),
            (),
            1,
            **launch,  # type: ignore[arg-type]
        )
        handle = self.runtime.start(spec)
        self.handles.append(handle)
        assert wait_until(lambda: "DONE" in self.runtime.log_tail(instance_id, 200), WAIT), (
            self.runtime.log_tail(instance_id, 200)
        )
        return handle, self.runtime.log_tail(instance_id, 200)

    def close(self) -> None:
        for handle in self.handles:
            with contextlib.suppress(Exception):
                self.runtime.stop(handle, grace=0.0)
                self.runtime.forget(handle)
        leftover = sorted(p.name for p in (self.tmp_path / "state" / "runc").glob("*"))
        assert leftover == [], f"runc still keeps containers {leftover}"


@pytest.fixture
def sealed(tmp_path: Path) -> Iterator[Sealed]:
    box = Sealed(tmp_path)
    try:
        yield box
    finally:
        box.close()


def status_line(pid: int, key: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def results(log: str) -> dict[str, str]:
    """``name: outcome`` lines a probe printed."""
    found = {}
    for line in log.splitlines():
        name, sep, outcome = line.partition(": ")
        if sep and name.isidentifier():
            found[name] = outcome
    return found


# A probe: "name: ok" if the command succeeded, else "name: refused". The group keeps
# the shell's own complaints (a failed '> FILE' is reported before the command's
# '2>' applies) off the log, where they would land in the middle of a result line.
def attempt(name: str, command: str) -> str:
    return (
        f'if {{ {command}; }} 2>/dev/null; then echo "{name}: ok"; else echo "{name}: refused"; fi'
    )


# ---------------------------------------------------------------------- users


def test_an_image_without_a_user_runs_as_nobody_not_root(sealed: Sealed) -> None:
    handle, log = sealed.run("id -u; id -g")
    assert status_line(handle.pid, "Uid") == ["65534"] * 4
    assert status_line(handle.pid, "Gid") == ["65534"] * 4
    assert "65534" in log.split()


def test_a_user_name_resolves_against_the_image_passwd(sealed: Sealed) -> None:
    handle, log = sealed.run('echo "home: $HOME"', user="app")
    assert status_line(handle.pid, "Uid") == ["1234"] * 4
    assert status_line(handle.pid, "Gid") == ["2345"] * 4
    assert status_line(handle.pid, "Groups") == ["3456"]
    assert results(log)["home"] == "/home/app"


def test_a_numeric_user_and_group_are_used_as_given(sealed: Sealed) -> None:
    handle, _ = sealed.run("true", user="4321:4322")
    assert status_line(handle.pid, "Uid") == ["4321"] * 4
    assert status_line(handle.pid, "Gid") == ["4322"] * 4


def test_a_user_the_image_does_not_define_is_a_clear_error(sealed: Sealed) -> None:
    with pytest.raises(RuntimeFailure, match="image user 'ghost' is not defined") as info:
        sealed.run("true", user="ghost")
    assert "numeric uid" in (info.value.hint or "")


# ---------------------------------------------------------------------- writes


def test_only_the_tmpfs_places_are_writable(sealed: Sealed) -> None:
    probes = [
        attempt("tmp", "touch /tmp/x"),  # the control
        attempt("run", "touch /run/x"),
        attempt("shm", "touch /dev/shm/x"),
        attempt("root", "touch /x"),
        attempt("bin", "touch /bin/x"),
        attempt("etc", "touch /etc/passwd"),
        attempt("replace", "echo x > /bin/sh"),
    ]
    _, log = sealed.run("\n".join(probes))
    found = results(log)
    assert (found["tmp"], found["run"], found["shm"]) == ("ok", "ok", "ok")
    for place in ("root", "bin", "etc", "replace"):
        assert found[place] == "refused", place


def test_tmp_is_bounded(sealed: Sealed) -> None:
    small = (Tmpfs("/scratch", size=1 << 20),)
    probes = [
        attempt("small", "dd if=/dev/zero of=/scratch/a bs=64k count=8"),  # the control
        attempt("large", "dd if=/dev/zero of=/scratch/b bs=64k count=32"),
    ]
    _, log = sealed.run("\n".join(probes), tmpfs=small)
    assert results(log) == {"small": "ok", "large": "refused"}


def test_the_checkout_stays_exactly_the_image(sealed: Sealed) -> None:
    sealed.run(attempt("root", "touch /x"))
    assert sealed.last_image is not None
    checkouts = sealed.tmp_path / "state" / "checkouts"
    (checkout,) = [p for p in checkouts.iterdir() if p.is_dir()]
    # The image plus empty mount points, stored as a tree: runc added nothing to it.
    assert sealed.store.ingest_tree(checkout) == sealed.runtime.root_tree(sealed.last_image)
    names = {p.name for p in checkout.iterdir()}
    assert names == {"bin", "etc", "dev", "proc", "run", "sys", "tmp"}


def test_a_named_volume_keeps_data_for_the_next_instance(sealed: Sealed) -> None:
    data = (Volume("/data", name="notes"),)
    _, first = sealed.run(attempt("write", "echo kept > /data/note"), volumes=data)
    assert results(first)["write"] == "ok"
    _, second = sealed.run('echo "read: $(cat /data/note)"', volumes=data)
    assert results(second)["read"] == "kept"
    readonly = (Volume("/data", name="notes", read_only=True),)
    _, third = sealed.run(attempt("write", "echo lost > /data/note"), volumes=readonly)
    assert results(third)["write"] == "refused"
    assert (volume_data(sealed.runtime.state_dir, "notes") / "note").read_text() == "kept\n"


# ---------------------------------------------------------------------- privileges


def test_no_capabilities_no_new_privileges_and_no_way_back_to_root(sealed: Sealed) -> None:
    probes = [
        'echo "caps: $(grep CapEff /proc/self/status | cut -f2)"',
        'echo "nnp: $(grep NoNewPrivs /proc/self/status | cut -f2)"',
        attempt("remount", "mount -o remount,rw /"),
        attempt("remount_bind", "mount -o remount,bind,rw /bin /bin"),
        attempt("tmpfs_mount", "mount -t tmpfs none /tmp"),
        attempt("user_namespace", "unshare -U -r true"),
        attempt("mount_namespace", "unshare -m true"),
        attempt("sysrq", "echo h > /proc/sysrq-trigger"),
        attempt("sysctl", "echo 1 > /proc/sys/kernel/sysrq"),
        attempt("kcore", "dd if=/proc/kcore of=/dev/null bs=1 count=1"),
        attempt("proc_read", "dd if=/proc/self/status of=/dev/null bs=1 count=1"),  # control
        attempt("echo", "echo probe"),  # the control: commands do run
    ]
    handle, log = sealed.run("\n".join(probes), user="app")
    found = results(log)
    assert (found["echo"], found["proc_read"]) == ("ok", "ok")
    refused = ("remount", "remount_bind", "tmpfs_mount", "user_namespace", "mount_namespace")
    for probe in (*refused, "sysrq", "sysctl", "kcore"):
        assert found[probe] == "refused", probe
    assert status_line(handle.pid, "CapEff") == ["0000000000000000"]
    assert status_line(handle.pid, "CapBnd") == ["0000000000000000"]
    assert status_line(handle.pid, "NoNewPrivs") == ["1"]
    assert status_line(handle.pid, "Seccomp") == ["2"]


def test_its_own_pid_namespace_shows_no_host_process(sealed: Sealed) -> None:
    probes = [
        'echo "pids: $(ls /proc | grep -c "^[0-9]")"',
        attempt("signal_init", "kill -0 1"),  # its own init, same user: the control
        attempt("signal_host", f"kill -0 {os.getpid()}"),  # this test's process
    ]
    _, log = sealed.run("\n".join(probes))
    found = results(log)
    assert int(found["pids"]) <= 5  # init, the shell, its subshells: nothing of the host
    assert found["signal_init"] == "ok"
    assert found["signal_host"] == "refused"


def test_limits_are_the_instance_cgroup(sealed: Sealed) -> None:
    limits = Resources(memory=32 << 20, pids=16, cpu=0.5)
    handle, _ = sealed.run("true", resources=limits)
    lines = Path(f"/proc/{handle.pid}/cgroup").read_text().splitlines()
    cgroups = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}
    root = Path("/sys/fs/cgroup")
    memory = root / "memory" / cgroups["memory"].lstrip("/")
    assert int((memory / "memory.limit_in_bytes").read_text()) == 32 << 20
    assert (root / "pids" / cgroups["pids"].lstrip("/") / "pids.max").read_text().strip() == "16"
    cpu = root / "cpu" / cgroups["cpu"].lstrip("/")
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50_000
