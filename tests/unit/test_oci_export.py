"""OCI export: normalized layer tars, fixed compression, reproducible layouts, caching."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graven.errors import StoreError, UsageError
from graven.model import Digest, Image, ImageConfig
from graven.store.cas import ContentStore
from graven.store.oci_export import layers
from graven.store.oci_export.documents import LayerProgress, oci_documents
from graven.store.oci_export.layers import layer_blob
from graven.store.oci_export.layout import export_archive, export_layout
from graven.store.oci_export.tar import write_entries, write_layer_tar
from graven.store.oci_types import (
    GRAVEN_IMAGE,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    REF_NAME,
    host_platform,
)
from graven.store.tree_model import EMPTY_TREE, Tree

EMPTY_TAR_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
LONG = "d" * 60 + "/" + "e" * 60 + "/" + "f" * 90  # fits USTAR's prefix + name fields
LONGER = "d" * 60 + "/" + "g" * 120  # a last component over 100 bytes: needs PAX
TARGET = "t" * 120  # a link target over 100 bytes: needs PAX


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


# A spec value per path: bytes (file), ("x", bytes) executable, ("l", target) symlink,
# ("d",) empty directory.
Spec = dict[str, Any]


def make_tree(store: ContentStore, root: Path, files: Spec) -> Digest:
    root.mkdir(parents=True, exist_ok=True)
    for rel, value in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, bytes):
            p.write_bytes(value)
        elif value[0] == "x":
            p.write_bytes(value[1])
            p.chmod(0o755)
        elif value[0] == "l":
            p.symlink_to(value[1])
        else:
            p.mkdir()
    return store.ingest_tree(root)


def layer_tar(store: ContentStore, old: Digest | None, new: Digest, **kw: Any) -> bytes:
    buf = io.BytesIO()
    write_layer_tar(store, old, new, buf, **kw)
    return buf.getvalue()


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def names(data: bytes) -> list[str]:
    return [m.name + ("/" if m.isdir() else "") for m in members(data)]


def image_of(store: ContentStore, *snapshots: Digest, config: ImageConfig | None = None) -> Image:
    cfg = config or ImageConfig(entrypoint=("/app/run",))
    return store.put_image(snapshots[-1] if snapshots else EMPTY_TREE, cfg, tuple(snapshots))


def read_dir(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- the normalized tar ----------------------------------------------------------------------


def test_layer_tar_is_normalized(store: ContentStore, tmp_path: Path) -> None:
    tree = make_tree(
        store,
        tmp_path / "t",
        {
            "b/z": b"z",
            "b/a": ("x", b"#!/bin/sh\n"),
            "a-c": b"dash sorts before slash",
            "a/b": b"nested",
            "link": ("l", "b/z"),
            "empty": ("d",),
            LONG: b"long",
            LONGER: b"longer",
            "far": ("l", TARGET),
            "ünï/cödé": b"utf-8",
        },
    )
    data = layer_tar(store, None, tree)
    assert names(data) == [
        "a/",
        "a/b",
        "a-c",
        "b/",
        "b/a",
        "b/z",
        "d" * 60 + "/",
        "d" * 60 + "/" + "e" * 60 + "/",
        LONG,
        LONGER,
        "empty/",
        "far",
        "link",
        "ünï/",
        "ünï/cödé",
    ]
    by_name = {m.name: m for m in members(data)}
    for m in by_name.values():
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0)
        assert set(m.pax_headers) <= {"path", "linkpath"}  # never atime/ctime/mtime
    assert by_name["b/a"].mode == 0o755
    assert by_name["b/z"].mode == 0o644
    assert by_name["a"].mode == 0o755 and by_name["a"].isdir()
    assert by_name["link"].issym() and by_name["link"].linkname == "b/z"
    # USTAR for what fits, a PAX record only for what does not (too long, not ASCII).
    assert not by_name["b/a"].pax_headers
    assert not by_name[LONG].pax_headers
    assert by_name[LONGER].pax_headers == {"path": LONGER}
    assert by_name["far"].pax_headers == {"linkpath": TARGET}
    assert by_name["ünï/cödé"].pax_headers == {"path": "ünï/cödé"}
    assert data[257:263] == b"ustar\x00"  # the first header is plain POSIX ustar
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile(LONGER)
        assert f is not None and f.read() == b"longer"
    assert data.endswith(b"\0" * 1024)
    assert len(data) % 512 == 0


def test_mtime_comes_from_source_date_epoch(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(store, tmp_path / "t", {"a": b"1"})
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert {m.mtime for m in members(layer_tar(store, None, tree))} == {1700000000}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        layer_tar(store, None, tree)


def test_deletions_are_whiteouts_before_their_siblings(store: ContentStore, tmp_path: Path) -> None:
    old = make_tree(
        store,
        tmp_path / "old",
        {"keep": b"k", "d/x": b"x", "d/y": b"y", "gone/sub/f": b"f", "zz": b"z"},
    )
    new = make_tree(store, tmp_path / "new", {"keep": b"k", "d/x": b"x2", "zz": b"z"})
    data = layer_tar(store, old, new)
    # .wh.gone only: nothing under a deleted directory needs its own whiteout.
    assert names(data) == [".wh.gone", "d/", "d/.wh.y", "d/x"]
    wh = {m.name: m for m in members(data)}["d/.wh.y"]
    assert wh.isfile() and wh.size == 0


def test_type_changes_need_no_whiteout(store: ContentStore, tmp_path: Path) -> None:
    old = make_tree(
        store,
        tmp_path / "old",
        {"f2d": b"file", "d2f/child": b"c", "d2l/child": b"c", "l2f": ("l", "x")},
    )
    new = make_tree(
        store,
        tmp_path / "new",
        {"f2d/inner": b"i", "d2f": b"now a file", "d2l": ("l", "f2d"), "l2f": b"f"},
    )
    data = layer_tar(store, old, new)
    assert names(data) == ["d2f", "d2l", "f2d/", "f2d/inner", "l2f"]


def test_unchanged_snapshots_give_the_empty_tar(store: ContentStore, tmp_path: Path) -> None:
    tree = make_tree(store, tmp_path / "t", {"a": b"1"})
    data = layer_tar(store, tree, tree)
    assert data == b"\0" * 1024
    assert Digest.of_bytes(data) == EMPTY_TAR_DIFF_ID


def test_a_corrupt_blob_is_refused(store: ContentStore, tmp_path: Path) -> None:
    tree = make_tree(store, tmp_path / "t", {"a": b"original"})
    path = store.blob_path(Digest.of_bytes(b"original"))
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    with pytest.raises(StoreError, match="corrupt"):
        layer_tar(store, None, tree)


def _apply_layer(root: Path, data: bytes) -> None:
    """A strict reference applier of the image-spec rules: a parent must already be a
    directory, a whiteout removes what lower layers had, any other entry replaces a
    path of another type (directory and all)."""
    for m in members(data):
        path = root / m.name
        assert path.parent.is_dir() and not path.parent.is_symlink(), f"no parent for {m.name}"
        if path.name.startswith(".wh."):
            victim = path.parent / path.name[4:]
            assert os.path.lexists(victim), f"whiteout for a missing path: {m.name}"
            _remove(victim)
            continue
        if os.path.lexists(path) and not (m.isdir() and path.is_dir() and not path.is_symlink()):
            _remove(path)
        if m.isdir():
            path.mkdir(exist_ok=True)
        elif m.issym():
            path.symlink_to(m.linkname)
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                f = tf.extractfile(m)
                assert f is not None
                path.write_bytes(f.read())
            path.chmod(m.mode)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


paths = st.sampled_from(["a", "b", "c/d", "c/e", "c/f/g", "h/i", "a/j", "b/k/l"])
values = st.one_of(
    st.binary(max_size=4),
    st.tuples(st.just("x"), st.binary(max_size=4)),
    st.tuples(st.just("l"), st.sampled_from(["a", "../b", "/abs"])),
    st.tuples(st.just("d")),
)
specs = st.dictionaries(paths, values, max_size=6).filter(
    # a path cannot be a file and a directory at once, nor sit under a non-directory
    lambda d: not any(k != o and o.startswith(k + "/") for k in d for o in d)
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(old=specs, new=specs)
def test_applying_the_layer_gives_the_new_tree(
    tmp_path_factory: pytest.TempPathFactory, old: Spec, new: Spec
) -> None:
    base = tmp_path_factory.mktemp("apply")
    store = ContentStore(base / "store")
    a = make_tree(store, base / "old", old)
    b = make_tree(store, base / "new", new)
    root = base / "applied"
    _apply_layer(root_mk(root), layer_tar(store, None, a))
    assert store.ingest_tree(root) == a
    _apply_layer(root, layer_tar(store, a, b))
    assert store.ingest_tree(root) == b


def root_mk(root: Path) -> Path:
    root.mkdir()
    return root


# --- compression and caching -----------------------------------------------------------------


def test_gzip_has_a_fixed_header_and_identical_bytes(store: ContentStore, tmp_path: Path) -> None:
    tree = make_tree(store, tmp_path / "t", {"a": b"1" * 100_000, "b/c": b"2"})
    blob = layer_blob(store, None, tree, "gzip")
    data = store.blob_path(blob.digest).read_bytes()
    assert data[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no mtime, no name
    tar = gzip.decompress(data)
    assert Digest.of_bytes(tar) == blob.diff_id == Digest.of_bytes(layer_tar(store, None, tree))
    assert (blob.media_type, blob.size, blob.digest) == (
        OCI_LAYER_GZIP,
        len(data),
        Digest.of_bytes(data),
    )
    other = ContentStore(tmp_path / "other-store")
    again = layer_blob(
        other, None, make_tree(other, tmp_path / "t2", {"a": b"1" * 100_000, "b/c": b"2"}), "gzip"
    )
    assert again == blob
    assert other.blob_path(again.digest).read_bytes() == data


def test_zstd_round_trip(store: ContentStore, tmp_path: Path) -> None:
    import zstandard

    tree = make_tree(store, tmp_path / "t", {"a": b"hello " * 10_000, "l": ("l", "a")})
    z = layer_blob(store, None, tree, "zstd")
    g = layer_blob(store, None, tree, "gzip")
    plain = layer_blob(store, None, tree, "none")
    assert z.media_type == OCI_LAYER_ZSTD
    assert z.diff_id == g.diff_id == plain.diff_id == plain.digest
    data = store.blob_path(z.digest).read_bytes()
    tar = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert Digest.of_bytes(tar) == z.diff_id
    assert layer_blob(store, None, tree, "zstd") == z


def test_second_export_recompresses_nothing(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t1 = make_tree(store, tmp_path / "t1", {"a": b"1"})
    t2 = make_tree(store, tmp_path / "t2", {"a": b"1", "b": b"2"})
    image = image_of(store, t1, t2)
    calls: list[list[str]] = []
    real = write_entries

    def spy(s: ContentStore, entries: Any, out: Any, mtime: Any) -> None:
        calls.append([e.path for e in entries])
        real(s, entries, out, mtime)

    monkeypatch.setattr(layers, "write_entries", spy)  # the layer cache's writer
    seen: list[LayerProgress] = []
    first = export_layout(store, image, tmp_path / "l1", "web", progress=seen.append)
    assert calls == [["a"], ["b"]]
    assert [(p.index, p.count, p.cached) for p in seen] == [(0, 2, False), (1, 2, False)]
    seen.clear()
    second = export_layout(store, image, tmp_path / "l2", "web", progress=seen.append)
    assert len(calls) == 2  # nothing written again
    assert [p.cached for p in seen] == [True, True]
    assert second.oci == first.oci
    # Another compression or another mtime is another blob.
    export_layout(store, image, tmp_path / "l3", "web", compression="none")
    assert len(calls) == 4
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    export_layout(store, image, tmp_path / "l4", "web")
    assert len(calls) == 6
    # A cache entry whose blob is gone (gc) is recomputed, not trusted.
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    blob_path = store.blob_path(first.oci.layers[0].digest)
    blob_path.chmod(0o644)
    blob_path.unlink()
    export_layout(store, image, tmp_path / "l5", "web")
    assert calls[6:] == [["a"]]


# --- documents ------------------------------------------------------------------------------


def test_documents_describe_the_image(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t1 = make_tree(store, tmp_path / "t1", {"app/run": ("x", b"#!/bin/sh\n")})
    t2 = make_tree(store, tmp_path / "t2", {"app/run": ("x", b"#!/bin/sh\n"), "app/v": b"2"})
    config = ImageConfig(
        entrypoint=("/app/run", "--serve"),
        env=(("PATH", "/bin"), ("GREETING", "a=b c")),
        workdir="/app",
        cmd=("--port", "8080"),
        user="1000:1000",
        ports=(8080, 53),
        labels=(("org.example.team", "infra"),),
    )
    image = image_of(store, t1, t2, config=config)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    docs = oci_documents(store, image)
    manifest = json.loads(docs.manifest)
    cfg = json.loads(docs.config)
    assert docs.manifest_digest == Digest.of_bytes(docs.manifest)
    assert docs.config_digest == Digest.of_bytes(docs.config)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"] == {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": docs.config_digest,
        "size": len(docs.config),
    }
    assert [layer["digest"] for layer in manifest["layers"]] == [b.digest for b in docs.layers]
    assert manifest["annotations"] == {GRAVEN_IMAGE: image.digest}
    assert cfg == {
        "architecture": "arm64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": ["/app/run", "--serve"],
            "Cmd": ["--port", "8080"],
            "Env": ["PATH=/bin", "GREETING=a=b c"],
            "WorkingDir": "/app",
            "User": "1000:1000",
            "ExposedPorts": {"53/tcp": {}, "8080/tcp": {}},
            "Labels": {"org.example.team": "infra"},
        },
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in docs.layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "graven"}] * 2,
    }
    # Canonical JSON: sorted keys, no spaces.
    assert docs.config == json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = json.loads(oci_documents(store, image).config)
    assert dated["created"] == "2023-11-14T22:13:20Z"
    assert dated["history"][0]["created"] == "2023-11-14T22:13:20Z"


def test_host_architecture_is_goarch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert host_platform() == ("amd64", None)
    monkeypatch.setattr(platform, "machine", lambda: "armv7l")
    assert host_platform() == ("arm", "v7")


def test_an_image_without_layers_exports_the_empty_tar(store: ContentStore) -> None:
    image = store.put_image(store.put_tree(Tree()), ImageConfig(entrypoint=("/x",)), ())
    assert image.layers == ()
    docs = oci_documents(store, image)
    assert [b.diff_id for b in docs.layers] == [EMPTY_TAR_DIFF_ID]
    assert json.loads(docs.config)["rootfs"]["diff_ids"] == [EMPTY_TAR_DIFF_ID]


# --- layouts and archives -------------------------------------------------------------------


def _two_layer_image(store: ContentStore, tmp_path: Path) -> Image:
    t1 = make_tree(
        store, tmp_path / "s1", {"app/run": ("x", b"#!/bin/sh\necho hi\n"), "app/old": b"o"}
    )
    t2 = make_tree(
        store, tmp_path / "s2", {"app/run": ("x", b"#!/bin/sh\necho hi\n"), "app/new": b"n"}
    )
    return image_of(store, t1, t2)


def layout_files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


def test_layout_structure(store: ContentStore, tmp_path: Path) -> None:
    image = _two_layer_image(store, tmp_path)
    dest = tmp_path / "layout"
    result = export_layout(store, image, dest, "web")
    assert (dest / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'
    index = json.loads((dest / "index.json").read_bytes())
    assert index == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": result.oci.manifest_digest,
                "size": len(result.oci.manifest),
                "annotations": {REF_NAME: "web"},
            }
        ],
    }
    blobs = sorted(p.name for p in (dest / "blobs" / "sha256").iterdir())
    expected = {result.oci.manifest_digest, result.oci.config_digest}
    expected |= {b.digest for b in result.oci.layers}
    assert blobs == sorted(d.hex for d in expected)
    for name in blobs:
        assert hashlib.sha256((dest / "blobs/sha256" / name).read_bytes()).hexdigest() == name
    assert (result.blobs_written, result.blobs_reused) == (4, 0)
    assert not list(dest.rglob(".*"))  # no temp files left behind


def test_a_layout_keeps_other_refs_and_replaces_its_own(
    store: ContentStore, tmp_path: Path
) -> None:
    image = _two_layer_image(store, tmp_path)
    other = image_of(store, make_tree(store, tmp_path / "o", {"x": b"x"}))
    dest = tmp_path / "layout"
    export_layout(store, image, dest, "web")
    export_layout(store, other, dest, "other")
    again = export_layout(store, other, dest, "web")
    assert again.blobs_written == 0 and again.blobs_reused == 3
    index = json.loads((dest / "index.json").read_bytes())
    refs = {m["annotations"][REF_NAME]: m["digest"] for m in index["manifests"]}
    assert refs == {"other": again.oci.manifest_digest, "web": again.oci.manifest_digest}


def test_byte_identical_layouts_whatever_the_umask_or_cwd(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _two_layer_image(store, tmp_path)
    old_umask = os.umask(0o022)
    try:
        export_layout(store, image, tmp_path / "a", "web")
        os.umask(0o077)
        monkeypatch.chdir(tmp_path / "s1")
        fresh = ContentStore(tmp_path / "fresh-store")  # nothing cached there
        export_layout(fresh, _two_layer_image(fresh, tmp_path / "again"), tmp_path / "b", "web")
    finally:
        os.umask(old_umask)
    assert layout_files(tmp_path / "a") == layout_files(tmp_path / "b")
    assert {m & 0o777 for _, m in layout_files(tmp_path / "b").values()} == {0o644, 0o755}


def test_source_date_epoch_changes_only_the_dates(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _two_layer_image(store, tmp_path)
    plain = export_layout(store, image, tmp_path / "a", "web")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = export_layout(store, image, tmp_path / "b", "web")
    assert dated.oci.manifest_digest != plain.oci.manifest_digest
    # The same files, dated differently.
    for p, d in zip(plain.oci.layers, dated.oci.layers, strict=True):
        a = gzip.decompress(store.blob_path(p.digest).read_bytes())
        b = gzip.decompress(store.blob_path(d.digest).read_bytes())
        assert [(m.name, m.mode, m.size) for m in members(a)] == [
            (m.name, m.mode, m.size) for m in members(b)
        ]
        assert {m.mtime for m in members(b)} == {1700000000}
    cfg_a, cfg_b = json.loads(plain.oci.config), json.loads(dated.oci.config)
    assert {k for k in cfg_a if cfg_a[k] != cfg_b[k]} == {"created", "history", "rootfs"}
    export_layout(store, image, tmp_path / "c", "web")
    assert layout_files(tmp_path / "b") == layout_files(tmp_path / "c")


def test_refuses_what_is_not_a_layout(store: ContentStore, tmp_path: Path) -> None:
    image = _two_layer_image(store, tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an OCI image layout"):
        export_layout(store, image, busy, "web")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    for bad in ("", "-web", "web//x", "a b", "web:", "web\n", "a" * 513):
        with pytest.raises(UsageError, match="invalid OCI ref name"):
            export_layout(store, image, tmp_path / "x", bad)
    with pytest.raises(UsageError, match="unknown compression"):
        layer_blob(store, None, image.rootfs, "brotli")  # type: ignore[arg-type]
    broken = tmp_path / "broken"
    export_layout(store, image, broken, "web")
    (broken / "index.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"index\.json"):
        export_layout(store, image, broken, "web")


def test_a_layout_with_a_broken_marker_or_index_is_refused_with_a_message(
    store: ContentStore, tmp_path: Path
) -> None:
    # Each once escaped as a bare IsADirectoryError or RecursionError.
    image = _two_layer_image(store, tmp_path)
    marker_dir = tmp_path / "marker-dir"
    export_layout(store, image, marker_dir, "web")
    (marker_dir / "oci-layout").unlink()
    (marker_dir / "oci-layout").mkdir()
    with pytest.raises(UsageError, match="unsupported or unreadable OCI layout"):
        export_layout(store, image, marker_dir, "web")
    deep = tmp_path / "deep"
    export_layout(store, image, deep, "web")
    (deep / "index.json").write_text("[" * 100_000)
    with pytest.raises(UsageError, match=r"index\.json is not valid JSON"):
        export_layout(store, image, deep, "web")


def test_archive_is_a_deterministic_tar_of_a_layout(store: ContentStore, tmp_path: Path) -> None:
    image = _two_layer_image(store, tmp_path)
    a = export_archive(store, image, tmp_path / "a.tar", "web")
    export_archive(store, image, tmp_path / "b.tar", "web")
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    listed = members(data)
    blob_names = sorted(
        f"blobs/sha256/{d.hex}"
        for d in {a.oci.manifest_digest, a.oci.config_digest, *(b.digest for b in a.oci.layers)}
    )
    assert [m.name for m in listed] == [
        "blobs",
        "blobs/sha256",
        *blob_names,
        "index.json",
        "oci-layout",
    ]
    assert {(m.uid, m.gid, m.mtime) for m in listed} == {(0, 0, 0)}
    # Unpacked, it is the same layout export_layout writes.
    unpacked = tmp_path / "unpacked"
    with tarfile.open(tmp_path / "a.tar") as tf:
        tf.extractall(unpacked, filter="data")
    export_layout(store, image, tmp_path / "layout", "web")
    assert read_dir(unpacked).keys() == read_dir(tmp_path / "layout").keys()
    for k, (content, _) in read_dir(unpacked).items():
        assert read_dir(tmp_path / "layout")[k][0] == content


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_export_prints_digests_as_json(tmp_path: Path) -> None:
    from graven.cli.main import cli
    from graven.controller.paths import store_root

    state = tmp_path / "state"
    store = ContentStore(store_root(state))
    image = _two_layer_image(store, tmp_path)
    store.tag("web", image.digest)
    runner = CliRunner()
    args = ["--state-dir", str(state), "image", "export", "web", "--layout", str(tmp_path / "out")]
    result = runner.invoke(cli, [*args, "--archive", str(tmp_path / "web.tar"), "-o", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    index = json.loads((tmp_path / "out" / "index.json").read_bytes())
    assert data["ref"] == "web"
    assert data["image"] == image.digest
    assert data["manifest"]["digest"] == index["manifests"][0]["digest"]
    assert data["compression"] == "gzip"
    assert len(data["layers"]) == 2 and all(layer["size"] > 0 for layer in data["layers"])
    assert (tmp_path / "web.tar").is_file()
    short = runner.invoke(
        cli,
        [
            "--state-dir",
            str(state),
            "image",
            "export",
            image.digest[7:19],
            "--layout",
            str(tmp_path / "out"),
            "--ref",
            "v1",
        ],
    )
    assert short.exit_code == 0, short.output
    refs = [
        m["annotations"][REF_NAME]
        for m in json.loads((tmp_path / "out" / "index.json").read_bytes())["manifests"]
    ]
    assert refs == ["v1", "web"]
    nothing = runner.invoke(cli, ["--state-dir", str(state), "image", "export", "web"])
    assert nothing.exit_code != 0
    assert isinstance(nothing.exception, UsageError)


def test_a_layer_whose_content_is_unchanged_is_not_recompressed(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Editing the first layer changes every later snapshot, not the later layers' content.
    t1 = make_tree(store, tmp_path / "t1", {"a": b"1"})
    t2 = make_tree(store, tmp_path / "t2", {"a": b"1", "b": b"2"})
    u1 = make_tree(store, tmp_path / "u1", {"a": b"edited"})
    u2 = make_tree(store, tmp_path / "u2", {"a": b"edited", "b": b"2"})
    export_layout(store, image_of(store, t1, t2), tmp_path / "l1", "web")
    calls: list[list[str]] = []
    real = write_entries

    def spy(s: ContentStore, entries: Any, out: Any, mtime: Any) -> None:
        calls.append([e.path for e in entries])
        real(s, entries, out, mtime)

    monkeypatch.setattr(layers, "write_entries", spy)  # the layer cache's writer
    export_layout(store, image_of(store, u1, u2), tmp_path / "l2", "web")
    assert calls == [["a"]]
