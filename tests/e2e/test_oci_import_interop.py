"""OCI import against the real peers: what umoci and skopeo write, graven reads exactly.

umoci builds a two-layer image from real file systems (its own diff decides the
whiteouts: a deleted file, a directory that became a file, a file that became a
directory, a directory that became a symlink, a directory emptied and refilled), and
the imported snapshots must equal the very directories umoci packed. skopeo then
re-encodes the image (oci-archive, zstd) and the graven image digest must not move.
scripts/setup installs the peers; in CI a missing one fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from graven.model import ImageConfig
from graven.store.cas import ContentStore
from graven.store.oci_import.layouts import import_layout
from graven.store.oci_import.policy import ImportPolicy, ImportRejected
from tests.requires import need_tool

pytestmark = pytest.mark.e2e

TIMEOUT = 120


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class UmociImage:
    layout: Path
    first: Path  # the rootfs packed as layer 1
    second: Path  # the rootfs packed as layer 2 (over the first)


def _unpack(umoci: str, layout: Path, ref: str, bundle: Path) -> Path:
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    run(umoci, "unpack", *rootless, "--image", f"{layout}:{ref}", str(bundle))
    return bundle / "rootfs"


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory: pytest.TempPathFactory) -> UmociImage:
    umoci = need_tool("umoci")
    base = tmp_path_factory.mktemp("umoci")
    layout = base / "layout"
    run(umoci, "init", "--layout", str(layout))
    run(umoci, "new", "--image", f"{layout}:empty")

    root = _unpack(umoci, layout, "empty", base / "one")
    for rel, text in {
        "app/hello.txt": "hello\n",
        "app/old/a": "a\n",
        "app/old/b": "b\n",
        "app/d2f/child": "dir to file\n",
        "app/d2s/child": "dir to symlink\n",
        "app/f2d": "file to dir\n",
        "app/refill/x": "x\n",
        "app/refill/y": "y\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "app" / "run").write_text("#!/bin/sh\necho run\n")
    (root / "app" / "run").chmod(0o750)
    os.link(root / "app" / "hello.txt", root / "app" / "hardlink")
    (root / "app" / "link").symlink_to("hello.txt")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    run(umoci, "repack", "--image", f"{layout}:v1", str(base / "one"))

    root = _unpack(umoci, layout, "v1", base / "two")
    app = root / "app"
    (app / "old" / "a").unlink()
    shutil.rmtree(app / "d2f")
    (app / "d2f").write_text("now a file\n")
    shutil.rmtree(app / "d2s")
    (app / "d2s").symlink_to("/etc")
    (app / "f2d").unlink()
    (app / "f2d").mkdir()
    (app / "f2d" / "inner").write_text("inner\n")
    shutil.rmtree(app / "refill")
    (app / "refill").mkdir()
    (app / "refill" / "z").write_text("z\n")
    run(umoci, "repack", "--image", f"{layout}:v2", str(base / "two"))
    run(
        umoci,
        "config",
        "--image",
        f"{layout}:v2",
        "--config.entrypoint",
        "/app/run",
        "--config.env",
        "MODE=test",
        "--config.workingdir",
        "/app",
        "--config.exposedports",
        "8080/tcp",
    )
    return UmociImage(layout, base / "one" / "rootfs", base / "two" / "rootfs")


def test_umoci_layers_import_as_the_trees_umoci_packed(
    umoci_image: UmociImage, tmp_path: Path
) -> None:
    store = ContentStore(tmp_path / "store")
    image = import_layout(store, umoci_image.layout, "v2", name="umoci")
    assert len(image.layers) == 2
    assert image.layers[0] == store.ingest_tree(umoci_image.first)
    assert image.rootfs == store.ingest_tree(umoci_image.second)
    assert image.config == ImageConfig(
        entrypoint=("/app/run",), env=(("MODE", "test"),), workdir="/app", ports=(8080,)
    )
    assert store.resolve("umoci").digest == image.digest


def test_skopeo_reencodings_keep_the_graven_digest(umoci_image: UmociImage, tmp_path: Path) -> None:
    skopeo = need_tool("skopeo")
    store = ContentStore(tmp_path / "store")
    expected = import_layout(store, umoci_image.layout, "v2").digest
    source = f"oci:{umoci_image.layout}:v2"
    archive = tmp_path / "image.tar"
    run(skopeo, "--insecure-policy", "copy", "--quiet", source, f"oci-archive:{archive}:v2")
    zstd = tmp_path / "zstd"
    run(
        skopeo,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-compress-format",
        "zstd",
        source,
        f"oci:{zstd}:v2",
    )
    manifest = json.loads(run(skopeo, "inspect", "--raw", f"oci:{zstd}:v2").stdout)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    for path in (archive, zstd):
        fresh = ContentStore(tmp_path / f"store-{path.name}")
        assert import_layout(fresh, path, "v2").digest == expected


def test_setuid_from_a_real_tool_is_refused_unless_allowed(tmp_path: Path) -> None:
    umoci = need_tool("umoci")
    layout = tmp_path / "layout"
    run(umoci, "init", "--layout", str(layout))
    run(umoci, "new", "--image", f"{layout}:empty")
    root = _unpack(umoci, layout, "empty", tmp_path / "bundle")
    (root / "bin").mkdir()
    (root / "bin" / "su").write_text("#!/bin/sh\n")
    (root / "bin" / "su").chmod(0o4755)
    run(umoci, "repack", "--image", f"{layout}:suid", str(tmp_path / "bundle"))
    store = ContentStore(tmp_path / "store")
    with pytest.raises(ImportRejected, match="member 'bin/su': a setuid file"):
        import_layout(store, layout, "suid")
    image = import_layout(store, layout, "suid", policy=ImportPolicy(allow_setuid=True))
    found = store.lookup(image.rootfs, "/bin/su")
    assert found is not None and found.mode == 0o755


def test_the_cli_imports_an_umoci_layout(umoci_image: UmociImage, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "graven",
            "--state-dir",
            str(tmp_path / "state"),
            "image",
            "import",
            str(umoci_image.layout),
            "--ref",
            "v2",
            "--name",
            "umoci",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["name"], data["layers"]) == ("umoci", 2)
    store = ContentStore(tmp_path / "state" / "store")
    assert store.resolve("umoci").rootfs == store.ingest_tree(umoci_image.second)
