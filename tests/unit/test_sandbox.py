"""Run steps under bubblewrap: the image tree is '/', the host stays out of reach."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.build import sandbox
from graven.build.sandbox import Mount, RunMode, SandboxUnavailable, run_step
from graven.errors import BuildError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "rootfs"
    (tree / "app").mkdir(parents=True)
    return tree


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on the host's loopback that accepts connections (backlog only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def run(root: Path, command: str, **kwargs: object) -> sandbox.StepRun:
    return run_step(root, "/app", [("GREETING", "hi")], command, timeout=30, **kwargs)  # type: ignore[arg-type]


def with_own_shell(root: Path) -> Path:
    """Give the tree a /bin/sh of its own (static busybox, from scripts/setup)."""
    busybox = shutil.which("busybox")
    assert busybox is not None, "scripts/setup installs busybox-static"
    (root / "bin").mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for tool in ("sh", "ls", "touch", "cat", "echo", "hostname"):
        (root / "bin" / tool).symlink_to("busybox")
    return root


# --- isolation ---------------------------------------------------------------------------


def test_the_host_is_out_of_sight_and_writes_land_in_the_tree(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host only")
    assert not os.path.lexists("/outside")

    result = run(root, f"test ! -e /root && test ! -e {secret} && touch /outside && pwd > here")

    assert result.returncode == 0, result.output
    assert result.mode is RunMode.HOST_RUNTIME
    assert (root / "outside").is_file()
    assert not os.path.lexists("/outside")
    assert (root / "app" / "here").read_text() == "/app\n"
    # The mount points the sandbox needed are gone again: only what the command made.
    assert sorted(p.name for p in root.iterdir()) == ["app", "outside"]


def test_host_runtime_is_read_only_and_usr_local_is_the_images(root: Path) -> None:
    result = run(
        root,
        "mkdir -p /usr/local/bin && echo tool > /usr/local/bin/t && touch /usr/bin/graven-x",
    )

    assert result.returncode != 0
    assert b"Read-only file system" in result.output
    assert not os.path.lexists("/usr/bin/graven-x")
    assert (root / "usr" / "local" / "bin" / "t").read_text() == "tool\n"
    assert sorted(p.name for p in root.iterdir()) == ["app", "usr"]
    assert sorted(p.name for p in (root / "usr").iterdir()) == ["local"]


def test_a_tree_with_its_own_shell_runs_entirely_inside_it(root: Path) -> None:
    with_own_shell(root)

    result = run(root, "test ! -e /usr && echo $GREETING from $(hostname) > /app/out")

    assert result.returncode == 0, result.output
    assert result.mode is RunMode.ISOLATED
    assert (root / "app" / "out").read_text() == "hi from graven-build\n"
    assert sorted(p.name for p in root.iterdir()) == ["app", "bin"]


def test_tmp_is_scratch_space(root: Path) -> None:
    assert run(root, "echo x > /tmp/scratch && cat /tmp/scratch").returncode == 0
    assert not (root / "tmp").exists()


def test_environment_is_the_images_not_the_hosts(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST_ONLY", "leak")

    result = run(root, "env | sort")

    lines = result.output.decode().splitlines()
    assert "GREETING=hi" in lines
    assert "SOURCE_DATE_EPOCH=0" in lines
    assert f"PATH={sandbox.DEFAULT_PATH}" in lines
    assert not any(line.startswith("HOST_ONLY=") for line in lines)


# --- network -----------------------------------------------------------------------------

CONNECT = "exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"


def test_no_network_unless_asked(root: Path, listener: int) -> None:
    result = run(root, "bash -c " + repr(CONNECT.format(port=listener)))

    assert result.returncode != 0
    assert b"connected" not in result.output


def test_network_true_shares_the_hosts(root: Path, listener: int) -> None:
    result = run(root, "bash -c " + repr(CONNECT.format(port=listener)), network=True)

    assert result.returncode == 0, result.output
    assert b"connected" in result.output
    # resolv.conf and hosts were bound for the command only
    assert not (root / "etc").exists()


# --- output, failure, time ---------------------------------------------------------------


def test_output_and_exit_status_come_back(root: Path) -> None:
    result = run(root, "echo to-stdout; echo to-stderr >&2; exit 3")

    assert result.returncode == 3
    assert b"to-stdout" in result.output
    assert b"to-stderr" in result.output
    assert not result.timed_out


def test_a_command_past_its_timeout_is_killed(root: Path) -> None:
    result = run_step(root, "/app", [], "echo started; sleep 30", timeout=0.5)

    assert result.timed_out
    assert result.returncode < 0
    assert b"started" in result.output


def test_same_command_same_result(tmp_path: Path) -> None:
    command = "hostname; echo $$; ls -a /; env | sort; echo data > /app/f"
    outputs = []
    for name in ("a", "b"):
        tree = tmp_path / name
        (tree / "app").mkdir(parents=True)
        result = run(tree, command)
        assert result.returncode == 0, result.output
        outputs.append((result.output, sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))))
    assert outputs[0] == outputs[1]


# --- no sandbox here ----------------------------------------------------------------------


def fake_bwrap(tmp_path: Path) -> str:
    """A bwrap that cannot create namespaces, as on a locked-down host."""
    path = tmp_path / "bwrap"
    path.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def test_without_bubblewrap_the_step_fails_saying_how_to_install_it(
    root: Path, tmp_path: Path
) -> None:
    with pytest.raises(SandboxUnavailable) as info:
        run(root, "touch /app/x", bwrap=str(tmp_path / "missing" / "bwrap"), allow_host=False)
    assert "bubblewrap" in info.value.message
    assert info.value.hint is not None
    assert "apt-get install bubblewrap" in info.value.hint
    assert sandbox.UNSAFE_HOST_RUN_ENV in info.value.hint

    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        run(root, "touch /app/x", bwrap=fake_bwrap(tmp_path), allow_host=False)
    assert not (root / "app" / "x").exists()


def test_the_unsafe_host_fallback_runs_only_when_allowed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sandbox.BWRAP_ENV, fake_bwrap(tmp_path))
    monkeypatch.setenv(sandbox.UNSAFE_HOST_RUN_ENV, "1")
    assert sandbox.runs_on_host()

    result = run(root, "touch here")

    assert result.mode is RunMode.HOST
    assert str(result.mode) == "on the host, not isolated"
    assert (root / "app" / "here").exists()


# --- pieces ---------------------------------------------------------------------------------


def test_bwrap_command_line() -> None:
    argv = sandbox.bwrap_argv(
        "bwrap",
        Path("/w/rootfs"),
        workdir="/app",
        env=[("A", "1")],
        command="make",
        network=False,
        shell="/usr/bin/dash",
        mounts=[Mount("ro-bind", "/usr/bin", "/usr/bin"), Mount("symlink", "usr/lib", "/lib")],
    )
    assert argv == [
        "bwrap",
        "--bind",
        "/w/rootfs",
        "/",
        "--ro-bind",
        "/usr/bin",
        "/usr/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--unshare-all",
        "--hostname",
        "graven-build",
        "--die-with-parent",
        "--new-session",
        "--chdir",
        "/app",
        "--clearenv",
        "--setenv",
        "A",
        "1",
        "--",
        "/usr/bin/dash",
        "-c",
        "make",
    ]
    with_net = sandbox.bwrap_argv(
        "bwrap", Path("/r"), workdir="/", env=[], command="x", network=True
    )
    assert with_net[with_net.index("--unshare-all") + 1] == "--share-net"


def test_shell_lookup_follows_symlinks_inside_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "bin").symlink_to("usr/bin")
    (tree / "usr" / "bin" / "dash").write_text("#!")
    (tree / "usr" / "bin" / "dash").chmod(0o755)
    (tree / "usr" / "bin" / "sh").symlink_to("/usr/bin/dash")  # absolute: from the tree's root
    assert sandbox.resolves_to_file(tree, "/bin/sh")

    (tree / "usr" / "bin" / "sh").unlink()
    (tree / "usr" / "bin" / "sh").symlink_to("/nowhere/sh")  # would exist on a host, not here
    assert not sandbox.resolves_to_file(tree, "/bin/sh")
    (tree / "usr" / "bin" / "sh").unlink()
    (tree / "usr" / "bin" / "sh").symlink_to("sh")  # a loop
    assert not sandbox.resolves_to_file(tree, "/bin/sh")


def test_a_symlinked_mount_point_is_refused(root: Path) -> None:
    (root / "tmp").symlink_to("/etc")

    with pytest.raises(BuildError, match="/tmp is a symlink in the image"):
        run(root, "true")


def test_host_tools_behind_debian_alternatives_work(root: Path) -> None:
    if not Path("/etc/alternatives/awk").exists():
        pytest.skip("this host has no /etc/alternatives/awk")

    result = run(root, "echo 'a b' | awk '{print $2}' > /app/awked")

    assert result.returncode == 0, result.output
    assert (root / "app" / "awked").read_text() == "b\n"
    assert sorted(p.name for p in root.iterdir()) == ["app"]
