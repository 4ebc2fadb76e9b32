"""What the local verbs print with ``-o json``, pinned key for key: scripts read it, so a
change to how the verbs render for people must leave it as it is.

Each verb runs in-process on a temp state dir; ``<tmp>`` stands for that dir.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from graven.cli.main import cli
from graven.controller.paths import store_root
from graven.model import Image, ImageConfig
from graven.store.cas import ContentStore
from graven.testing.specs import hello_spec


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def graven(tmp: Path, *args: str, code: int = 0) -> Any:
    """``graven --state-dir <tmp>/state ARGS -o json``, its stdout as JSON."""
    result = CliRunner().invoke(cli, ["--state-dir", str(tmp / "state"), *args, "-o", "json"])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout.replace(str(tmp), "<tmp>"))


def store_of(tmp: Path) -> ContentStore:
    return ContentStore(store_root(tmp / "state"))


def web_image(tmp: Path) -> Image:
    """An image of two files, named ``web``."""
    store = store_of(tmp)
    src = tmp / "src"
    (src / "app").mkdir(parents=True)
    (src / "app" / "run").write_text("#!/bin/sh\necho hi\n")
    (src / "app" / "run").chmod(0o755)
    (src / "app" / "data").write_bytes(b"d" * 100)
    tree = store.ingest_tree(src)
    image = store.put_image(tree, ImageConfig(entrypoint=("/app/run", "--port", "8080")), (tree,))
    store.tag("web", image.digest)
    return image


def test_init(tmp_path: Path) -> None:
    data = graven(tmp_path, "init", str(tmp_path / "fresh"))
    assert data == {
        "directory": "<tmp>/fresh",
        "written": ["<tmp>/fresh/graven.yaml", "<tmp>/fresh/app/app.py"],
    }


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_check(tmp_path: Path, held_port: int) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "graven.yaml").write_text(hello_spec(port=held_port, version="v1"))
    spec = str(tmp_path / "graven.yaml")
    result = CliRunner().invoke(
        cli, ["-f", spec, "--state-dir", str(tmp_path / "s"), "check", "-o", "json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.replace(str(tmp_path), "<tmp>"))
    [warning] = data.pop("warnings")
    # How instances run here: sealed, or none with the reason (the machine decides).
    assert data.pop("isolation")["mode"] in ("sealed", "none")
    assert data == {
        "file": "<tmp>/graven.yaml",
        "valid": True,
        "images": ["hello"],
        "services": ["hello"],
        "targets": ["local"],
    }
    assert warning.keys() == {"file", "line", "key_path", "message"}
    assert warning["file"] == "<tmp>/graven.yaml"
    assert warning["key_path"] == "services.hello.port"
    assert isinstance(warning["line"], int)


def test_images(tmp_path: Path) -> None:
    assert graven(tmp_path, "images") == {"images": []}
    image = web_image(tmp_path)
    assert graven(tmp_path, "images") == {
        "images": [
            {"name": "web", "digest": image.digest, "entrypoint": ["/app/run", "--port", "8080"]}
        ]
    }


def test_fsck_of_no_store_and_a_sound_one(tmp_path: Path) -> None:
    sound = {
        "store": "<tmp>/state/store",
        "ok": True,
        "problems": [],
        "damaged": [],
        "images": [],
        "names": [],
        "repaired": False,
        "quarantine": None,
        "next": "",
    }
    assert graven(tmp_path, "store", "fsck") == sound
    web_image(tmp_path)
    assert graven(tmp_path, "store", "fsck") == sound


def test_fsck_of_a_damaged_store_then_its_repair(tmp_path: Path) -> None:
    image = web_image(tmp_path)
    store = store_of(tmp_path)
    entry = store.lookup(image.rootfs, "app/data")
    assert entry is not None and entry.digest is not None
    blob = store.blob_path(entry.digest)
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    found = graven(tmp_path, "store", "fsck", code=1)
    blob_problem, tree_problem = found.pop("problems")
    damaged = found.pop("damaged")
    assert found == {
        "store": "<tmp>/state/store",
        "ok": False,
        "images": ["web"],
        "names": ["web"],
        "repaired": False,
        "quarantine": None,
        "next": "Run 'graven store fsck --repair' to quarantine what is damaged, then rebuild"
        " the images built here ('graven build web') and pull again the ones pulled"
        " ('graven pull REF --name IMAGE'); 'graven gc' never deletes damaged data.",
    }
    assert blob_problem.startswith(f"blob {entry.digest}: ")
    assert (
        tree_problem.startswith("tree sha256:") and f"file 'data' {entry.digest} " in tree_problem
    )
    assert {"digest": entry.digest, "kind": "corrupt", "images": ["web"]} in damaged
    assert {"digest": image.rootfs, "kind": "incomplete", "images": ["web"]} in damaged
    assert {"digest": image.digest, "kind": "incomplete", "images": ["web"]} in damaged
    repaired = graven(tmp_path, "store", "fsck", "--repair", code=1)
    quarantine = repaired.pop("quarantine")
    assert quarantine.startswith("<tmp>/state/store/quarantine/")
    assert repaired.pop("repaired") is True
    assert repaired.pop("names") == ["web"]
    assert repaired.pop("next") == (
        "Now rebuild the images built here ('graven build web') and pull again the ones"
        " pulled ('graven pull REF --name IMAGE')."
        f" Delete {quarantine} once you no longer need it."
    )
    assert repaired.keys() == {"store", "ok", "problems", "damaged", "images"}


def test_gc_of_no_store(tmp_path: Path) -> None:
    assert graven(tmp_path, "gc", "--dry-run") == {
        "dry_run": True,
        "ok": True,
        "store": "<tmp>/state/store",
    }


def test_gc(tmp_path: Path) -> None:
    image = web_image(tmp_path)
    data = graven(tmp_path, "gc", "--dry-run", "--grace", "0s")
    counts = {k: data.pop(k) for k in list(data) if k.startswith(("objects_", "bytes_"))}
    assert counts.keys() == {
        "objects_total",
        "objects_kept",
        "bytes_kept",
        "objects_young",
        "objects_deleted",
        "bytes_freed",
        "objects_restored",
    }
    assert all(isinstance(n, int) for n in counts.values())
    assert counts["objects_deleted"] == 0
    [kept] = data.pop("kept")
    assert kept["digest"] == image.digest and kept["reasons"] == ["ref web"]
    assert data == {
        "store": "<tmp>/state/store",
        "dry_run": True,
        "ok": True,
        "cache_entries_deleted": 0,
        "tmp_removed": 0,
        "checkouts_removed": [],
        "checkout_bytes_freed": 0,
        "missing": [{"digest": data["missing"][0]["digest"], "reasons": ["the empty tree"]}],
        "problems": [],
    }


def test_image_export_and_import(tmp_path: Path) -> None:
    image = web_image(tmp_path)
    layout = graven(tmp_path, "image", "export", "web", "--layout", str(tmp_path / "out"))
    documents = {k: layout.pop(k) for k in ("manifest", "config", "layers")}
    assert documents["manifest"].keys() == {"digest", "size"}
    assert documents["config"].keys() == {"digest", "size"}
    [layer] = documents["layers"]
    assert layer.keys() == {"digest", "diff_id", "media_type", "size"}
    assert layout == {
        "image": image.digest,
        "name": "web",
        "ref": "web",
        "layout": "<tmp>/out",
        "blobs_written": 3,
        "blobs_reused": 0,
        "compression": "gzip",
    }
    both = graven(
        tmp_path,
        "image",
        "export",
        image.digest[7:19],
        "--layout",
        str(tmp_path / "out"),
        "--archive",
        str(tmp_path / "web.tar"),
        "--ref",
        "v1",
        "--compression",
        "none",
    )
    assert both.pop("layers")[0]["media_type"].endswith(".tar")
    assert {k: both.pop(k) for k in ("manifest", "config")}.keys() == {"manifest", "config"}
    assert both == {
        "image": image.digest,
        "name": "",
        "ref": "v1",
        "layout": "<tmp>/out",
        "archive": "<tmp>/web.tar",
        "blobs_written": 2,
        "blobs_reused": 1,
        "compression": "none",
    }
    archived = graven(tmp_path, "image", "export", "web", "--archive", str(tmp_path / "a.tar"))
    assert {k: archived.pop(k) for k in ("manifest", "config", "layers")} == documents
    assert archived == {
        "image": image.digest,
        "name": "web",
        "ref": "web",
        "archive": "<tmp>/a.tar",
        "compression": "gzip",
    }
    imported = graven(tmp_path, "image", "import", str(tmp_path / "web.tar"), "--name", "copy")
    assert imported == {
        "digest": imported["digest"],
        "name": "copy",
        "layers": 1,
        "rootfs": image.rootfs,
        "source": "<tmp>/web.tar",
        "ref": None,
    }
    unnamed = graven(tmp_path, "image", "import", str(tmp_path / "out"), "--ref", "v1")
    assert unnamed["name"] is None and unnamed["ref"] == "v1"
    assert unnamed["source"] == "<tmp>/out"


def test_base_host_python(tmp_path: Path) -> None:
    data = graven(tmp_path, "base", "host-python")
    image = store_of(tmp_path).resolve("host-python")
    labels = data.pop("labels")
    interpreter = data.pop("interpreter")
    assert data == {
        "name": "host-python",
        "digest": image.digest,
        "rootfs": image.rootfs,
        "size": store_of(tmp_path).read_tree(image.rootfs).size,
        "layers": len(image.layers),
        "entrypoint": list(image.config.entrypoint),
    }
    assert labels == dict(image.config.labels)
    assert interpreter == {
        "path": labels["dev.graven.interpreter.path"],
        "sha256": labels["dev.graven.interpreter.sha256"],
        "source": "image",
        "version": labels["dev.graven.interpreter.version"],
    }
