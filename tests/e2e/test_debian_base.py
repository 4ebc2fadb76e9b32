"""``graven base``: a real Debian minbase from the mirror apt uses, and the host's Python.

The Debian build runs debootstrap for real (tens of seconds, bounded at 10 minutes);
it is the suite's only one, and nothing is cached between tests. It needs root
(debootstrap creates device nodes and chroots) and the mirror apt on this machine uses;
``scripts/setup`` installs debootstrap.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from graven.store.cas import ContentStore
from graven.testing.cli import Result, run_graven

pytestmark = pytest.mark.e2e

BUILD_TIMEOUT = 600
# /etc/debian_version of each suite starts with its release number.
RELEASES = {"bullseye": "11", "bookworm": "12", "trixie": "13"}


def graven(state_dir: Path, *args: str, timeout: float = 120) -> Result:
    return run_graven(args, cwd=Path.cwd(), state_dir=state_dir, timeout=timeout)


def in_bwrap(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    bwrap = shutil.which("bwrap")
    assert bwrap is not None, "scripts/setup installs bubblewrap"
    return subprocess.run(
        [
            bwrap,
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            str(root),
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/sbin:/usr/bin:/sbin:/bin",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def host_codename() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    return "bookworm"


@pytest.mark.slow
@pytest.mark.needs_root("debootstrap needs root")
def test_graven_base_debian_builds_a_minbase_that_runs(tmp_path: Path) -> None:
    suite = host_codename() if host_codename() in RELEASES else "bookworm"
    state = tmp_path / "state"

    built = graven(state, "base", "debian", "--suite", suite, timeout=BUILD_TIMEOUT)

    # Progress streams debootstrap's stages on stderr; the result names the image.
    assert "Base system installed successfully" in built.stderr
    assert f"debian-{suite}" in built.stdout
    again: dict[str, Any] = json.loads(
        graven(state, "base", "debian", "--suite", suite, "-o", "json").stdout
    )
    assert again["cached"] is True
    assert again["name"] == f"debian-{suite}"
    assert again["digest"] in built.stdout
    assert again["size"] > 50 * 1024 * 1024
    assert again["interpreter"]["path"] == "/usr/bin/dash"
    assert again["interpreter"]["source"] == "image"
    assert again["labels"]["dev.graven.base.debian.suite"] == suite

    store = ContentStore(state / "store")
    image = store.resolve(f"debian-{suite}")
    assert str(image.digest) == again["digest"]
    dash = store.lookup(image.rootfs, "/usr/bin/dash")
    assert dash is not None and str(dash.digest) == again["interpreter"]["sha256"]
    assert not list(store.tmp_dir.glob("debootstrap-*"))
    root = store.checkout(image.rootfs, tmp_path / "rootfs", read_only=True)

    version = in_bwrap(root, "/bin/sh", "-c", "cat /etc/debian_version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith(RELEASES[suite] + "."), version.stdout

    # Normalized: no caches, lists, logs, machine id; no password-change dates.
    listing = in_bwrap(
        root,
        "/bin/sh",
        "-c",
        "find /var/cache/apt /var/lib/apt/lists /var/log -type f; "
        "test ! -e /etc/machine-id && test ! -e /etc/hostname && echo clean; "
        "cut -d: -f3 /etc/shadow | sort -u",
    )
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["clean"], listing.stdout  # dates: one empty line
    # /dev under bwrap is bwrap's own; the image's holds no device nodes, only directories.
    dev = store.lookup(image.rootfs, "/dev")
    assert dev is not None and dev.digest is not None
    assert {e.type for e in store.read_tree(dev.digest).entries} <= {"dir", "symlink"}


def test_graven_base_host_python_runs_its_entrypoint(tmp_path: Path) -> None:
    state = tmp_path / "state"

    data: dict[str, Any] = json.loads(graven(state, "base", "host-python", "-o", "json").stdout)

    assert data["name"] == "host-python"
    assert data["interpreter"]["source"] == "image"
    store = ContentStore(state / "store")
    image = store.resolve("host-python")
    root = store.checkout(image.rootfs, tmp_path / "rootfs", read_only=True)
    result = in_bwrap(root, *image.config.entrypoint, "-c", "import ssl, sqlite3; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
