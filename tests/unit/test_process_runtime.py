"""The process runtime names why an instance could not start or how it ended."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graven import detached
from graven.errors import RuntimeFailure
from graven.model import Digest, ImageConfig
from graven.runtime.base import LaunchSpec
from graven.runtime.image_user import ImageUser
from graven.runtime.isolation import IsolationSupport
from graven.runtime.process import ProcessRuntime, read_pid_file
from graven.store.cas import ContentStore
from graven.store.tree_model import SYMLINK_MODE, Tree, TreeEntry
from tests.requires import need_tool

UNSEALED = IsolationSupport(False, reason="as on a machine without bubblewrap")


def launch(
    tmp_path: Path, entrypoint: tuple[str, ...], env: dict[str, str] | None = None
) -> tuple[ProcessRuntime, LaunchSpec]:
    """An image of busybox (``sh`` is its applet), run unsealed: these tests are about
    what the runtime says, the same either way; sealing has its own e2e suite."""
    store = ContentStore(tmp_path / "store")
    root = store.place(
        store.put_tree(Tree.of([])), "/bin/busybox", store.ingest(Path(need_tool("busybox")))
    )
    for applet in ("sh", "sleep"):
        link = TreeEntry(applet, "symlink", SYMLINK_MODE, 7, target="busybox")
        root = store.place(root, f"/bin/{applet}", link)
    image = store.put_image(root, ImageConfig(entrypoint=entrypoint))
    runtime = ProcessRuntime(tmp_path / "state", store, UNSEALED)
    spec = LaunchSpec(
        instance_id="web-r1-0001",
        service="web",
        release=1,
        image=image,
        env=tuple((env or {}).items()),
        port=1,
    )
    return runtime, spec


def test_a_nul_byte_in_the_env_is_a_clear_start_failure(tmp_path: Path) -> None:
    runtime, spec = launch(tmp_path, ("sh", "-c", "sleep 5"), {"TOKEN": "a\0b"})
    with pytest.raises(RuntimeFailure, match="embedded null byte") as err:
        runtime.start(spec)
    assert "graven check" in (err.value.hint or "")


def test_a_missing_program_is_a_clear_start_failure(tmp_path: Path) -> None:
    runtime, spec = launch(tmp_path, ("python3", "app.py"))
    with pytest.raises(RuntimeFailure, match="'python3' is not in the image") as err:
        runtime.start(spec)
    assert "base: host-python" in (err.value.hint or "")


def test_how_an_instance_ended_is_known(tmp_path: Path) -> None:
    runtime, spec = launch(tmp_path, ("sh", "-c", "sleep 0.5; exit 3"))
    handle = runtime.start(spec)
    assert detached.wait_until(lambda: not runtime.alive(handle), 10)
    assert runtime.exit_reason(handle) == "exited with code 3"
    runtime.forget(handle)
    assert runtime.exit_reason(handle) == ""


def test_a_pid_file_is_a_bare_pid_or_bubblewraps_status_lines(tmp_path: Path) -> None:
    path = tmp_path / "pid"
    path.write_text("123\n")
    assert read_pid_file(path) == (123, None)
    path.write_text('{ "child-pid": 77, "pid-namespace": 1 }\n{ "exit-code": 143 }\n')
    assert read_pid_file(path) == (77, 143)
    path.write_text('{ "child-pi')  # being written
    assert read_pid_file(path) == (None, None)
    assert read_pid_file(tmp_path / "missing") == (None, None)


def test_image_users_come_from_the_images_own_passwd_and_group(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/false\n")
    group = tmp_path / "group"
    group.write_text("root:x:0:\nstaff:x:50:\n")
    root = store.place(store.put_tree(Tree.of([])), "/etc/passwd", store.ingest(passwd))
    root = store.place(root, "/etc/group", store.ingest(group))
    runtime = ProcessRuntime(tmp_path / "state", store, UNSEALED)

    def user_of(named: str, tree: Digest = root) -> tuple[int, int]:
        image = store.put_image(tree, ImageConfig(entrypoint=("/bin/sh",), user=named))
        spec = LaunchSpec("web-r1-0001", "web", 1, image, (), 1)
        found = runtime.user(spec, tmp_path)
        assert found is not None
        return found.uid, found.gid

    assert user_of("app") == (1000, 1001)
    assert user_of("app:staff") == (1000, 50)
    assert user_of("1000") == (1000, 1001)
    assert user_of("4242") == (4242, 4242)
    assert user_of("4242:7") == (4242, 7)
    with pytest.raises(RuntimeFailure, match="web-r1-0001: image user 'nobody' is not defined"):
        user_of("nobody")
    with pytest.raises(RuntimeFailure, match="image group 'wheel' is not defined"):
        user_of("app:wheel")
    # Never the host's files, even through a symlink in the image.
    link = TreeEntry("passwd", "symlink", SYMLINK_MODE, 11, target="/etc/passwd")
    linked = store.place(root, "/etc/passwd", link)
    with pytest.raises(RuntimeFailure, match="image user 'root' is not defined"):
        user_of("root", linked)


def test_isolation_is_reported_plainly_when_it_cannot_be_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from graven.runtime import isolation

    try:
        monkeypatch.setenv("GRAVEN_BWRAP", "none")
        isolation.probe.cache_clear()
        off = isolation.probe()
        assert off.describe() == "none (turned off by GRAVEN_BWRAP=none)"
        assert off.to_dict() == {"mode": "none", "reason": "turned off by GRAVEN_BWRAP=none"}
        monkeypatch.setenv("GRAVEN_BWRAP", "/nonexistent/bwrap")
        isolation.probe.cache_clear()
        missing = isolation.probe()
        assert not missing.sealed
        assert "bubblewrap (bwrap) not found on /nonexistent/bwrap" in missing.reason
    finally:
        isolation.probe.cache_clear()


def test_the_sealed_command_line(tmp_path: Path) -> None:
    """What bubblewrap is asked for, as exact arguments (no process is started)."""
    runtime, spec = launch(tmp_path, ("sh", "-c", "true"))
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "app").mkdir()
    (root / "proc").mkdir()  # the runtime's own mount point: never bound from the image
    (root / "bin").symlink_to("usr/bin")
    runtime = ProcessRuntime(tmp_path / "state", runtime.store, IsolationSupport(True, "/bwrap"))
    argv = runtime.sealed_argv(spec, root, ["/bin/sh", "-c", "true"], None, 9)
    as_nobody = runtime.sealed_argv(spec, root, ["/bin/sh"], ImageUser(65534, 65534), 9)

    assert argv[:9] == ["/bwrap", "--tmpfs", "/", "--ro-bind", f"{root}/app", "/app",
                        "--symlink", "usr/bin", "/bin"]  # fmt: skip
    assert argv[9:12] == ["--ro-bind", f"{root}/usr", "/usr"]
    joined = " ".join(argv)
    for part in (
        "--proc /proc --dev /dev --tmpfs /tmp --tmpfs /run --remount-ro /",
        "--unshare-pid --unshare-ipc --unshare-uts --unshare-cgroup-try",
        "--new-session --cap-drop ALL --chdir / --json-status-fd 9 -- /bin/sh -c true",
    ):
        assert part in joined
    assert "--die-with-parent" not in argv  # instances outlive the controller
    assert "--share-net" not in argv and "--unshare-net" not in argv  # the host's network
    if os.geteuid() == 0:
        # As root, bubblewrap runs as the instance's uid, seeing the image under /mnt.
        assert as_nobody[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
        assert as_nobody[8:13] == [str(root), "65534", "65534", "0", "/bwrap"]
        assert "--ro-bind /mnt/root/usr /usr" in " ".join(as_nobody)
        assert "--unshare-user --uid 65534 --gid 65534 --disable-userns" in " ".join(as_nobody)
