"""A corrupt blob heals, through the real CLI: ``graven build --no-cache`` or a pull
again replaces it; ``graven store fsck --repair`` quarantines it so a plain rebuild or
pull restores it. Also against a real registry (docker-registry on loopback).

Corruption is the kind a size or mtime check misses: one byte flipped in place, the
size kept and the mtime put back.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graven.build import fingerprint
from graven.testing.cli import Result, clean_env, run_graven
from graven.testing.registry import Registry
from tests.e2e.conftest import Project

pytestmark = pytest.mark.e2e


def blob_of(state_dir: Path, content: bytes) -> Path:
    hex_ = hashlib.sha256(content).hexdigest()
    path = state_dir / "store" / "blobs" / "sha256" / hex_[:2] / hex_[2:]
    assert path.is_file()
    return path


def flip_a_byte(path: Path, at: int = 0) -> None:
    before = path.stat()
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    path.chmod(0o444)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def assert_damaged(result: Result, image: str, blob: Path) -> dict[str, Any]:
    assert result.code == 1, result.stdout + result.stderr
    report: dict[str, Any] = result.json()
    assert report["ok"] is False
    digest = "sha256:" + blob.parent.name + blob.name
    corrupt = [d for d in report["damaged"] if d["kind"] == "corrupt"]
    assert corrupt == [{"digest": digest, "kind": "corrupt", "images": [image]}]
    assert report["images"] == [image]
    return report


# --- built images --------------------------------------------------------------------------


def test_build_no_cache_replaces_a_corrupt_blob(project: Project) -> None:
    image = project.graven("build", "-o", "json").json()["images"][0]["digest"]
    source = (project.root / "app" / "app.py").read_bytes()
    blob = blob_of(project.state_dir, source)
    flip_a_byte(blob)

    rebuilt = project.graven("build", "--no-cache", "-o", "json").json()["images"][0]

    assert rebuilt["digest"] == image
    assert blob.read_bytes() == source
    clean = project.graven("store", "fsck", "-o", "json").json()
    assert clean["ok"] is True and clean["problems"] == [] and clean["damaged"] == []


def test_fsck_names_the_image_and_the_next_step(project: Project) -> None:
    project.graven("build")
    blob = blob_of(project.state_dir, (project.root / "app" / "app.py").read_bytes())
    flip_a_byte(blob)

    found = assert_damaged(
        project.graven("store", "fsck", "-o", "json", check=False), "hello", blob
    )

    assert found["repaired"] is False and found["quarantine"] is None
    assert "graven store fsck --repair" in found["next"]
    assert "graven build hello" in found["next"]
    human = project.graven("store", "fsck", check=False)
    assert human.code == 1
    assert "content does not match its digest (corrupt); in images: hello" in human.stdout
    assert "graven build hello" in human.stdout
    assert blob.exists()  # a check alone moves nothing


def test_fsck_repair_then_a_plain_build_restores(project: Project) -> None:
    # Let the sources age past the racy window, so the build records its no-op fast
    # path: the repair must defeat it, or the plain build below would do nothing.
    time.sleep(fingerprint.RACY_SECONDS + 0.5)
    image = project.graven("build", "-o", "json").json()["images"][0]["digest"]
    noop = project.graven("build")
    assert "nothing changed" in noop.stderr
    blob = blob_of(project.state_dir, (project.root / "app" / "app.py").read_bytes())
    flip_a_byte(blob)

    repaired = project.graven("store", "fsck", "--repair", "-o", "json", check=False)

    report = assert_damaged(repaired, "hello", blob)
    assert report["repaired"] is True
    assert report["names"] == ["hello"]
    quarantine = Path(report["quarantine"])
    assert quarantine.parent == project.state_dir / "store" / "quarantine"
    assert (quarantine / "blobs" / "sha256" / (blob.parent.name + blob.name)).is_file()
    assert "graven build hello" in report["next"]
    assert not blob.exists()
    # The base it starts from is whole; the image on it is gone.
    left = project.graven("images", "-o", "json").json()["images"]
    assert [i["name"] for i in left] == ["host-python"]

    rebuilt = project.graven("build", "-o", "json").json()["images"][0]
    assert rebuilt["digest"] == image
    assert rebuilt["steps_run"] >= 1

    assert project.graven("store", "fsck", "-o", "json").json()["ok"] is True
    images = project.graven("images", "-o", "json").json()["images"]
    assert [i["digest"] for i in images if i["name"] == "hello"] == [image]


def test_fsck_repair_human_output(project: Project) -> None:
    project.graven("build")
    blob = blob_of(project.state_dir, (project.root / "app" / "app.py").read_bytes())
    flip_a_byte(blob)

    human = project.graven("store", "fsck", "--repair", check=False)

    assert human.code == 1
    assert "quarantined 4 object(s) and the name(s) hello in" in human.stdout
    assert "Now rebuild the images built here ('graven build hello')" in human.stdout
    assert "Traceback" not in human.stderr


# --- pulled images ---------------------------------------------------------------------------

SPEC = """\
version: 1
images:
  web:
    steps:
      - copy: app
        to: /app
      - copy: data
        to: /data
      - entrypoint: python3 /app/main.py
"""
BIG = 2 * (1 << 20) + 3  # above the store's 1 MiB chunk: the streamed write path


@dataclass
class Workspace:
    root: Path

    @property
    def project(self) -> Path:
        return self.root / "project"

    def state(self, name: str) -> Path:
        return self.root / f"state-{name}"

    def graven(self, *args: str, state: str, check: bool = True) -> Result:
        return run_graven(
            args,
            cwd=self.project,
            env=clean_env(self.root / "home"),
            state_dir=self.state(state),
            check=check,
        )


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    w = Workspace(tmp_path)
    (w.root / "home").mkdir()
    (w.project / "app").mkdir(parents=True)
    (w.project / "data").mkdir()
    (w.project / "graven.yaml").write_text(SPEC)
    (w.project / "app" / "main.py").write_text("print('healed')\n")
    (w.project / "data" / "big.bin").write_bytes(os.urandom(BIG))
    return w


def pulled_workspace(ws: Workspace, registry: Registry) -> tuple[str, str]:
    """Build web, push it, pull it into state ``pulled``: (image digest, reference)."""
    image = ws.graven("build", "web", "-o", "json", state="build").json()["images"][0]["digest"]
    ref = f"{registry.host}/team/web:v1"
    ws.graven("push", "web", ref, state="build")
    assert ws.graven("pull", ref, "-o", "json", state="pulled").json()["image"] == image
    return image, ref


def test_a_corrupt_pulled_blob_heals_by_pulling_again(ws: Workspace, registry: Registry) -> None:
    image, ref = pulled_workspace(ws, registry)
    for source, at in (
        (ws.project / "app" / "main.py", 0),
        (ws.project / "data" / "big.bin", BIG - 1),
    ):
        content = source.read_bytes()
        blob = blob_of(ws.state("pulled"), content)
        flip_a_byte(blob, at)

        assert ws.graven("pull", ref, "-o", "json", state="pulled").json()["image"] == image

        assert blob.read_bytes() == content
        assert ws.graven("store", "fsck", "-o", "json", state="pulled").json()["ok"] is True


def test_fsck_repair_then_a_plain_pull_restores(ws: Workspace, registry: Registry) -> None:
    image, ref = pulled_workspace(ws, registry)
    content = (ws.project / "data" / "big.bin").read_bytes()
    big = blob_of(ws.state("pulled"), content)
    flip_a_byte(big, 7)

    repaired = ws.graven("store", "fsck", "--repair", "-o", "json", state="pulled", check=False)

    report = assert_damaged(repaired, "web", big)
    assert report["names"] == ["web"]
    assert "graven pull REF --name IMAGE" in report["next"]
    assert ws.graven("images", "-o", "json", state="pulled").json()["images"] == []

    assert ws.graven("pull", ref, "-o", "json", state="pulled").json()["image"] == image

    assert big.read_bytes() == content
    assert ws.graven("store", "fsck", "-o", "json", state="pulled").json()["ok"] is True
    images = ws.graven("images", "-o", "json", state="pulled").json()["images"]
    assert [(i["name"], i["digest"]) for i in images] == [("web", image)]
