"""``graven gc`` and ``graven store fsck`` through the CLI, on a real project."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Project

pytestmark = pytest.mark.e2e


def test_gc_collects_the_old_version_and_fsck_stays_clean(project: Project) -> None:
    v1 = project.graven("build", "-o", "json").json()["images"][0]["digest"]
    project.write_spec("v2")
    v2 = project.graven("build", "-o", "json").json()["images"][0]["digest"]
    assert v1 != v2

    # Just built: everything is younger than the default grace period.
    spared = project.graven("gc", "--dry-run", "-o", "json").json()
    assert spared["objects_deleted"] == 0
    assert spared["objects_young"] > 0

    dry = project.graven("gc", "--dry-run", "--grace", "0", "--keep-history", "0", "-o", "json")
    planned = dry.json()
    assert planned["dry_run"] is True
    # v1's image document, its root tree, its /app tree and its VERSION file
    assert planned["objects_deleted"] == 4
    assert planned["bytes_freed"] > 0
    kept = {k["digest"]: k["reasons"] for k in planned["kept"]}
    assert kept[v2] == ["ref hello"]
    assert project.graven("images", "-o", "json").json()["images"][0]["digest"] == v2

    done = project.graven("gc", "--grace", "0", "--keep-history", "0", "-o", "json").json()
    assert done["dry_run"] is False
    assert (done["objects_deleted"], done["bytes_freed"]) == (
        planned["objects_deleted"],
        planned["bytes_freed"],
    )
    again = project.graven("gc", "--grace", "0", "--keep-history", "0", "-o", "json").json()
    assert again["objects_deleted"] == 0

    fsck = project.graven("store", "fsck", "-o", "json").json()
    assert fsck == {
        "store": str(project.state_dir / "store"),
        "ok": True,
        "problems": [],
        "damaged": [],
        "images": [],
        "names": [],
        "repaired": False,
        "quarantine": None,
        "next": "",
    }
    # The kept version still builds from the cache and still resolves.
    rebuilt = project.graven("build", "-o", "json").json()["images"][0]
    assert (rebuilt["digest"], rebuilt["steps_run"]) == (v2, 0)

    text = project.graven("gc", "--grace", "0").stderr + project.graven("gc", "--grace", "0").stdout
    assert "deleted 0 object(s)" in text
    assert "ref hello" in text


def test_fsck_exits_1_naming_a_corrupt_blob(project: Project) -> None:
    project.graven("build", "-o", "json")
    blobs = sorted((project.state_dir / "store" / "blobs" / "sha256").rglob("*"))
    # One of this store's own: the base's blobs are hard links shared with other tests.
    victim = next(p for p in blobs if p.is_file() and p.stat().st_nlink == 1)
    victim.chmod(0o644)
    victim.write_bytes(b"flipped bits")

    result = project.graven("store", "fsck", "-o", "json", check=False)

    assert result.code == 1
    report = result.json()
    assert report["ok"] is False
    assert any("corrupt" in p for p in report["problems"])
    human = project.graven("store", "fsck", check=False)
    assert human.code == 1
    assert "problem(s)" in human.stdout
