"""OCI export against the real peers: skopeo, umoci and podman read what graven writes.

The image is baked by the real builder from a tiny project: a static busybox as
``/bin/sh``, some files, and a second layer that deletes a file and a directory and
swaps a file for a directory and a directory for a file, so whiteouts and type
changes go through every peer's layer applier (umoci's, and containers/storage's
with both the vfs and the overlay driver).

Everything the peers write goes to a temp dir: podman gets its own containers.conf
(runc, the machine's ulimits, no network, no events) and storage.conf. scripts/setup
installs the peers, runc and busybox-static; in CI a missing one fails the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graven.build.builder import build_image
from graven.controller.paths import store_root
from graven.model import Image, ImageConfig
from graven.spec.recipe import Recipe
from graven.store.cas import ContentStore
from graven.store.oci_export.compress import MEDIA_TYPES
from graven.store.oci_export.layout import ExportResult, export_archive, export_layout
from graven.store.oci_types import host_platform
from graven.store.tree_model import Tree
from tests.requires import need_root, need_tool

pytestmark = pytest.mark.e2e

TIMEOUT = 120
REF = "interop"

RUN_CHANGES = (
    "busybox rm app/gone.txt"
    " && busybox rm -r app/old app/d2f app/f2d"
    " && echo 'now a file' > app/d2f"
    " && busybox mkdir app/f2d"
    " && echo inner > app/f2d/inner"
    " && busybox ln -s hello.txt app/link"
)
ENTRYPOINT = [
    "/bin/sh",
    "-c",
    "cd /app && busybox find . | busybox sort && busybox cat hello.txt d2f f2d/inner link",
]


def run(
    *argv: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@dataclass
class Built:
    state_dir: Path
    store: ContentStore
    image: Image


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    busybox = need_tool("busybox")
    base = tmp_path_factory.mktemp("interop")
    root = base / "project" / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    app = root / "app"
    for rel, text in {
        "hello.txt": "hello\n",
        "gone.txt": "deleted in layer 2\n",
        "old/a": "a\n",
        "old/b": "b\n",
        "d2f/child": "a directory that becomes a file\n",
        "f2d": "a file that becomes a directory\n",
        "keep/k": "kept\n",
    }.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    recipe = Recipe.model_validate(
        {
            "steps": [
                {"copy": "rootfs", "to": "/"},
                {"run": RUN_CHANGES},
                {"entrypoint": ENTRYPOINT},
            ]
        }
    )
    state_dir = base / "state"
    store = ContentStore(store_root(state_dir))
    result = build_image("interop", recipe, base / "project", store)
    assert len(result.image.layers) == 2
    return Built(state_dir, store, result.image)


@pytest.fixture(scope="module")
def layout(built: Built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportResult]:
    dest = tmp_path_factory.mktemp("layout") / "oci"
    return dest, export_layout(built.store, built.image, dest, REF)


def tree_listing(store: ContentStore, image: Image) -> dict[str, tuple[Any, ...]]:
    """path -> (type, mode, sha256 or target) for every entry of the image's root tree."""
    out: dict[str, tuple[Any, ...]] = {}

    def walk(digest: Any, prefix: str) -> None:
        for e in store.read_tree(digest).entries:
            path = f"{prefix}/{e.name}"
            if e.type == "dir":
                out[path] = ("dir", 0o755)
                walk(e.digest, path)
            elif e.type == "symlink":
                out[path] = ("symlink", e.target)
            else:
                assert e.digest is not None
                out[path] = ("file", e.mode, e.digest.hex)

    walk(image.rootfs, "")
    return out


def dir_listing(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = "/" + str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = (
                    "file",
                    stat.S_IMODE(st.st_mode),
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
    return out


def expected_output(store: ContentStore, image: Image) -> str:
    listing = tree_listing(store, image)
    under_app = sorted("." + p.removeprefix("/app") for p in listing if p.startswith("/app/"))
    return "\n".join([".", *under_app]) + "\nhello\nnow a file\ninner\nhello\n"


# --- skopeo ---------------------------------------------------------------------------------


def test_skopeo_inspects_and_copies_the_layout(
    layout: tuple[Path, ExportResult], tmp_path: Path
) -> None:
    skopeo = need_tool("skopeo")
    dest, result = layout
    info = json.loads(run(skopeo, "--insecure-policy", "inspect", f"oci:{dest}:{REF}").stdout)
    assert info["Digest"] == result.oci.manifest_digest
    assert info["Layers"] == [layer.digest for layer in result.oci.layers]
    assert (info["Os"], info["Architecture"]) == ("linux", host_platform()[0])
    assert info["Created"] == "1970-01-01T00:00:00Z"
    raw = run(skopeo, "--insecure-policy", "inspect", "--raw", f"oci:{dest}:{REF}").stdout
    assert raw.encode() == result.oci.manifest
    config = run(skopeo, "--insecure-policy", "inspect", "--config", "--raw", f"oci:{dest}:{REF}")
    assert config.stdout.encode() == result.oci.config

    copy = tmp_path / "copy"
    run(skopeo, "--insecure-policy", "copy", "--quiet", f"oci:{dest}:{REF}", f"oci:{copy}:again")
    index = json.loads((copy / "index.json").read_text())
    # Copied verbatim: the same manifest, hence the same digest, in the other layout.
    assert [m["digest"] for m in index["manifests"]] == [result.oci.manifest_digest]
    again = json.loads(run(skopeo, "--insecure-policy", "inspect", f"oci:{copy}:again").stdout)
    assert again["Layers"] == info["Layers"]


def test_skopeo_reads_the_archive(built: Built, tmp_path: Path) -> None:
    skopeo = need_tool("skopeo")
    archive = tmp_path / "image.tar"
    result = export_archive(built.store, built.image, archive, REF)
    info = json.loads(
        run(skopeo, "--insecure-policy", "inspect", f"oci-archive:{archive}:{REF}").stdout
    )
    assert info["Digest"] == result.oci.manifest_digest
    run(
        skopeo,
        "--insecure-policy",
        "copy",
        "--quiet",
        f"oci-archive:{archive}:{REF}",
        f"oci:{tmp_path / 'out'}:{REF}",
    )


# --- umoci ----------------------------------------------------------------------------------


def _umoci_unpack(layout_dir: Path, ref: str, bundle: Path) -> subprocess.CompletedProcess[str]:
    umoci = need_tool("umoci")
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    return run(
        umoci, "unpack", *rootless, "--image", f"{layout_dir}:{ref}", str(bundle), check=False
    )


def test_umoci_unpacks_exactly_the_image_tree(
    built: Built, layout: tuple[Path, ExportResult], tmp_path: Path
) -> None:
    dest, _ = layout
    bundle = tmp_path / "bundle"
    proc = _umoci_unpack(dest, REF, bundle)
    assert proc.returncode == 0, proc.stderr
    # Whiteouts applied and hidden, type changes replaced, modes and contents kept.
    assert dir_listing(bundle / "rootfs") == tree_listing(built.store, built.image)
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["process"]["args"] == ENTRYPOINT
    assert spec["process"]["cwd"] == "/"


def test_umoci_unpacks_an_image_without_files(built: Built, tmp_path: Path) -> None:
    empty = built.store.put_image(built.store.put_tree(Tree()), ImageConfig(entrypoint=("/x",)), ())
    dest = tmp_path / "layout"
    export_layout(built.store, empty, dest, "empty")
    proc = _umoci_unpack(dest, "empty", tmp_path / "bundle")
    assert proc.returncode == 0, proc.stderr
    assert dir_listing(tmp_path / "bundle" / "rootfs") == {}
    skopeo = need_tool("skopeo")
    info = json.loads(run(skopeo, "--insecure-policy", "inspect", f"oci:{dest}:empty").stdout)
    assert len(info["Layers"]) == 1


# --- podman ---------------------------------------------------------------------------------


@pytest.fixture
def podman_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Environment for a podman whose every file lives under a temp dir."""
    need_tool("podman")
    need_tool("runc")
    need_root("podman with runc and cgroupfs needs root here")
    driver = getattr(request, "param", "vfs")
    # A short path: with a long run root, podman waits out a 20 s conmon timeout
    # before it notices that the container exited.
    home = Path(tempfile.mkdtemp(prefix="gpm-", dir="/tmp"))
    (home / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
        'netns = "none"\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "none"\n'
        f'tmp_dir = "{home / "tmp"}"\n'
    )
    (home / "storage.conf").write_text(
        "[storage]\n"
        f'driver = "{driver}"\n'
        f'runroot = "{home / "runroot"}"\n'
        f'graphroot = "{home / "root"}"\n'
    )
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(home / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(home / "storage.conf"),
    }
    try:
        yield env
    finally:
        _unmount_under(home)
        shutil.rmtree(home, ignore_errors=True)


def _unmount_under(directory: Path) -> None:
    """Unmount whatever a failed podman run left mounted below ``directory``."""
    prefix = str(directory.resolve()) + "/"
    with contextlib.suppress(OSError):
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", point], check=False, timeout=TIMEOUT)


@pytest.mark.parametrize("podman_env", ["vfs", "overlay"], indirect=True)
def test_podman_runs_the_entrypoint(
    built: Built, layout: tuple[Path, ExportResult], podman_env: dict[str, str]
) -> None:
    dest, _ = layout
    proc = run("podman", "run", "--rm", "--quiet", f"oci:{dest}:{REF}", env=podman_env)
    assert proc.stdout == expected_output(built.store, built.image)


def test_podman_runs_zstd_layers_and_archives(
    built: Built, tmp_path: Path, podman_env: dict[str, str]
) -> None:
    dest = tmp_path / "zstd"
    result = export_layout(built.store, built.image, dest, REF, compression="zstd")
    assert {layer.media_type for layer in result.oci.layers} == {MEDIA_TYPES["zstd"]}
    proc = run("podman", "run", "--rm", "--quiet", f"oci:{dest}:{REF}", env=podman_env)
    assert proc.stdout == expected_output(built.store, built.image)
    archive = tmp_path / "image.tar"
    export_archive(built.store, built.image, archive, REF)
    proc = run("podman", "run", "--rm", "--quiet", f"oci-archive:{archive}:{REF}", env=podman_env)
    assert proc.stdout == expected_output(built.store, built.image)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_export_is_reproducible_and_readable(built: Built, tmp_path: Path) -> None:
    skopeo = need_tool("skopeo")
    outputs = []
    for n in (1, 2):
        proc = run(
            sys.executable,
            "-m",
            "graven",
            "--state-dir",
            str(built.state_dir),
            "image",
            "export",
            "interop",
            "--layout",
            str(tmp_path / f"layout{n}"),
            "--archive",
            str(tmp_path / f"image{n}.tar"),
            "-o",
            "json",
        )
        outputs.append(json.loads(proc.stdout))
    first, second = outputs
    assert first["manifest"] == second["manifest"]
    assert first["ref"] == "interop"
    assert (tmp_path / "image1.tar").read_bytes() == (tmp_path / "image2.tar").read_bytes()
    info = json.loads(
        run(skopeo, "--insecure-policy", "inspect", f"oci:{tmp_path / 'layout1'}:interop").stdout
    )
    assert info["Digest"] == first["manifest"]["digest"]
    assert info["Layers"] == [layer["digest"] for layer in first["layers"]]
