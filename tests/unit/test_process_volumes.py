"""The process runtime mounts exactly the writable paths a service declares: a sealed
busybox instance tries to write each of them and its read-only root, and reports.
Also the argv it builds, and the paths it refuses before starting anything."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from graven.detached import wait_until
from graven.errors import RuntimeFailure
from graven.model import ImageConfig, Tmpfs, Volume
from graven.runtime.base import LaunchSpec
from graven.runtime.image_user import ImageUser
from graven.runtime.isolation import IsolationSupport
from graven.runtime.process import ProcessRuntime
from graven.store.cas import ContentStore
from graven.volumes import check_mount_points
from tests.contract.test_runtime_contract import make_image
from tests.requires import missing

PROBE = """\
for where in /data /conf /scratch /nested/in/root /; do
  if echo "from the instance" > "$where/written" 2>/dev/null; then echo "$where: written"
  else echo "$where: refused"; fi
done
cat /proc/self/mountinfo
echo "probe done"
sleep 30  # until stopped: an instance that ends at once is a failed start
"""


def probe_spec(runtime: ProcessRuntime, host_dir: Path, store: ContentStore) -> LaunchSpec:
    base = make_image(store)
    image = store.put_image(base.rootfs, ImageConfig(entrypoint=("sh", "-c", PROBE)))
    return LaunchSpec(
        "web-r1-probe",
        "web",
        1,
        image,
        (),
        1,
        volumes=(
            Volume(path="/data", name="data"),
            Volume(path="/conf", host_path=str(host_dir), read_only=True),
        ),
        tmpfs=(Tmpfs("/scratch", size=1024 * 1024), Tmpfs("/nested/in/root")),
    )


@pytest.mark.needs_root("sealed instances run as another uid")
def test_an_instance_writes_its_volumes_and_tmpfs_and_nothing_else(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    runtime = ProcessRuntime(tmp_path / "state", store)
    if not runtime.isolation.sealed:
        missing(f"instances cannot be sealed here: {runtime.isolation.reason}")
    host_dir = tmp_path / "conf"
    host_dir.mkdir()
    spec = probe_spec(runtime, host_dir, store)
    handle = runtime.start(spec)
    log_file = runtime.log_path(spec.instance_id)
    try:
        assert wait_until(lambda: "probe done" in log_file.read_text(), 30)
    finally:
        runtime.stop(handle, grace=0)
    log = log_file.read_text()
    assert "probe done" in log, log
    outcomes = [line for line in log.splitlines() if line.endswith(("written", "refused"))]
    assert outcomes == [
        "/data: written",
        "/conf: refused",
        "/scratch: written",
        "/nested/in/root: written",
        "/: refused",
    ]
    data = tmp_path / "state" / "volumes" / "data" / "data"
    written = data / "written"
    assert written.read_text() == "from the instance\n"
    assert written.stat().st_uid == data.stat().st_uid != 0  # the instance's own user
    assert not (host_dir / "written").exists()
    scratch = next(line for line in log.splitlines() if " /scratch " in line)
    assert "size=1024k" in scratch


def test_volume_binds_and_tmpfs_go_outer_first_and_staged_for_another_uid(
    tmp_path: Path,
) -> None:
    store = ContentStore(tmp_path / "store")
    runtime = ProcessRuntime(tmp_path / "state", store, IsolationSupport(True, bwrap="/bwrap"))
    conf = tmp_path / "conf"
    conf.mkdir()
    spec = dataclasses.replace(
        probe_spec(runtime, conf, store),
        tmpfs=(Tmpfs("/data/cache", size=4096), Tmpfs("/b", size=8192)),
    )
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    data = str(tmp_path / "state" / "volumes" / "data" / "data")

    def mounts(argv: list[str]) -> list[str]:
        end = argv.index("--remount-ro")
        return argv[end - 14 : end]

    # As graven's own user: bubblewrap binds the volumes from where they are.
    own = runtime.sealed_argv(spec, root, ["/bin/sh"], ImageUser(os.getuid(), os.getgid()), 3)
    staged = os.geteuid() == 0 and os.getuid() != 0
    assert mounts(own) == [
        *("--size", "8192", "--tmpfs", "/b"),
        *("--ro-bind", "/mnt/v1" if staged else str(conf), "/conf"),
        *("--bind", "/mnt/v0" if staged else data, "/data"),
        *("--size", "4096", "--tmpfs", "/data/cache"),
    ]
    if os.geteuid() != 0:
        return
    # As root for a non-root uid, which cannot walk the private state dir: a private
    # mount namespace first binds each volume at /mnt/vN, in the same order.
    other = ProcessRuntime(tmp_path / "other", store, IsolationSupport(True, bwrap="/bwrap"))
    nobody = other.sealed_argv(spec, root, ["/bin/sh"], ImageUser(65534, 65534), 3)
    after_root = nobody.index(str(root)) + 3
    theirs = str(tmp_path / "other" / "volumes" / "data" / "data")
    assert nobody[after_root : after_root + 3] == ["2", theirs, str(conf)]
    assert mounts(nobody)[4:10] == ["--ro-bind", "/mnt/v1", "/conf", "--bind", "/mnt/v0", "/data"]


def test_mount_paths_the_read_only_image_cannot_take_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "var" / "lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("x")
    (root / "run").symlink_to("/var/run")
    (root / "var" / "run").symlink_to("/run")

    def spec(*paths: str) -> LaunchSpec:
        return LaunchSpec(
            "web-r1-a",
            "web",
            1,
            None,
            (),
            1,
            tmpfs=tuple(Tmpfs(p) for p in paths),  # type: ignore[arg-type]
        )

    # Fine: an existing directory, a new top-level one, under the runtime's own /tmp.
    check_mount_points(root, spec("/var/lib", "/data/x", "/tmp/x"), runtime_dirs=frozenset({"tmp"}))
    with pytest.raises(RuntimeFailure, match="has /var but no 'var/cache'") as err:
        check_mount_points(root, spec("/var/cache"))
    assert err.value.hint and "run: mkdir -p /var/cache" in err.value.hint
    with pytest.raises(RuntimeFailure, match="/var/run is a symlink in the image"):
        check_mount_points(root, spec("/var/run/app"))
    with pytest.raises(RuntimeFailure, match=r"/etc/app\.conf is a file in the image"):
        check_mount_points(root, spec("/etc/app.conf"))
    assert os.path.islink(root / "run")  # nothing was changed in the image


def test_unsealed_an_instance_with_volumes_is_refused_saying_why(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    runtime = ProcessRuntime(
        tmp_path / "state", store, IsolationSupport(False, reason="no bwrap here")
    )
    host_dir = tmp_path / "conf"
    host_dir.mkdir()
    with pytest.raises(RuntimeFailure, match=r"need sealed instances.*no bwrap here") as err:
        runtime.start(probe_spec(runtime, host_dir, store))
    assert err.value.hint and "bubblewrap" in err.value.hint
    assert not (tmp_path / "state" / "volumes").exists()  # nothing made for it
