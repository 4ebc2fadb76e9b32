"""OCI import: layouts, archives and manifests in, graven images out."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

from graven.model import Digest, ImageConfig
from graven.store.cas import ContentStore
from graven.store.oci_import.images import import_from_manifest
from graven.store.oci_import.layouts import import_layout
from graven.store.oci_import.policy import ImportPolicy, ImportRejected, LayerImported
from graven.store.oci_types import OCI_INDEX, OCI_MANIFEST, Descriptor
from graven.store.tree_model import EXEC_MODE, FILE_MODE, TreeEntry
from tests.unit.oci_build import (
    Member,
    add_manifest,
    archive_of,
    dev,
    dir_,
    link,
    reg,
    sha,
    sym,
    tar_of,
    write_layout,
)


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def entry(store: ContentStore, root: Digest, path: str) -> TreeEntry:
    found = store.lookup(root, path)
    assert found is not None, f"{path} missing"
    return found


def names(store: ContentStore, root: Digest, path: str = "/") -> list[str]:
    found = entry(store, root, path)
    assert found.digest is not None
    return [e.name for e in store.read_tree(found.digest).entries]


def content(store: ContentStore, root: Digest, path: str) -> bytes:
    found = entry(store, root, path)
    assert found.type == "file" and found.digest is not None
    return store.read_blob(found.digest)


def one_layer(tmp_path: Path, store: ContentStore, *members: Member) -> Digest:
    written = write_layout(tmp_path / "layout", [tar_of(*members)])
    return import_layout(store, written.path).rootfs


# --- layer contents ------------------------------------------------------------------------


def test_files_dirs_symlinks_and_modes(tmp_path: Path, store: ContentStore) -> None:
    root = one_layer(
        tmp_path,
        store,
        dir_("./"),
        dir_("./app", 0o700),
        reg("./app/run", b"#!/bin/sh\n", 0o750),
        reg("./app/data.txt", b"hello", 0o600),
        sym("./app/current", "/etc/hostname"),
        reg("deep/implicit/parents/f", b"x"),
    )
    run = entry(store, root, "/app/run")
    assert (run.type, run.mode, run.size) == ("file", EXEC_MODE, 10)
    assert entry(store, root, "/app/data.txt").mode == FILE_MODE
    assert content(store, root, "/app/data.txt") == b"hello"
    link_entry = entry(store, root, "/app/current")
    assert (link_entry.type, link_entry.target) == ("symlink", "/etc/hostname")
    assert entry(store, root, "/deep/implicit/parents").type == "dir"
    assert names(store, root) == ["app", "deep"]


def test_hardlinks_become_copies_of_their_target(tmp_path: Path, store: ContentStore) -> None:
    lower = tar_of(reg("bin/busybox", b"BB", 0o755), sym("bin/sh-link", "busybox"))
    upper = tar_of(
        reg("lib/a.so", b"A"),
        link("lib/b.so", "lib/a.so"),  # same layer
        link("bin/sh", "./bin/busybox"),  # lower layer
        link("bin/sh2", "bin/sh-link"),  # a hardlinked symlink stays a symlink
    )
    written = write_layout(tmp_path / "layout", [lower, upper])
    root = import_layout(store, written.path).rootfs
    a, b = entry(store, root, "/lib/a.so"), entry(store, root, "/lib/b.so")
    assert (b.name, b.type, b.mode, b.size, b.digest) == ("b.so", "file", FILE_MODE, 1, a.digest)
    sh = entry(store, root, "/bin/sh")
    assert (sh.mode, sh.digest) == (EXEC_MODE, entry(store, root, "/bin/busybox").digest)
    assert entry(store, root, "/bin/sh2").target == "busybox"


def test_whiteouts_hide_lower_entries(tmp_path: Path, store: ContentStore) -> None:
    lower = tar_of(reg("a/x", b"1"), reg("a/y", b"2"), reg("b/deep/z", b"3"), reg("c", b"4"))
    upper = tar_of(
        dir_("a"),
        reg("a/.wh.x"),
        reg(".wh.b"),
        reg(".wh.nothing-there"),  # harmless
        reg("gone/.wh.ghost"),  # a whiteout in a missing directory creates nothing
    )
    written = write_layout(tmp_path / "layout", [lower, upper])
    image = import_layout(store, written.path)
    assert names(store, image.rootfs) == ["a", "c"]
    assert names(store, image.rootfs, "/a") == ["y"]
    # the first snapshot still has everything
    assert names(store, image.layers[0]) == ["a", "b", "c"]


def test_whiteouts_apply_to_lower_layers_only_in_any_order(
    tmp_path: Path, store: ContentStore
) -> None:
    lower = tar_of(reg("f", b"old"), reg("d/1"), reg("d/2"))
    upper = tar_of(
        dir_("f"),  # type change file -> directory, its whiteout after it
        reg("f/new", b"n"),
        reg(".wh.f"),
        dir_("d"),
        reg("d/3", b"3"),
        reg("d/.wh..wh..opq"),  # opaque marker after a sibling of the same layer
    )
    written = write_layout(tmp_path / "layout", [lower, upper])
    root = import_layout(store, written.path).rootfs
    assert names(store, root, "/f") == ["new"]
    assert names(store, root, "/d") == ["3"]


def test_whiteouts_below_a_path_this_layer_replaces(tmp_path: Path, store: ContentStore) -> None:
    # umoci writes the new entry, then whiteouts for what the old directory held.
    lower = tar_of(reg("d2f/child"), reg("d2s/child"), reg("keep/x"))
    upper = tar_of(
        reg("d2f", b"now a file"),
        reg("d2f/.wh.child"),
        sym("d2s", "/etc"),
        reg("d2s/.wh.child"),
        reg("keep/.wh.x"),
        reg("new/.wh.x"),  # before its directory, in a directory new to this layer
        dir_("new"),
    )
    written = write_layout(tmp_path / "layout", [lower, upper])
    root = import_layout(store, written.path).rootfs
    assert content(store, root, "/d2f") == b"now a file"
    assert entry(store, root, "/d2s").target == "/etc"
    assert names(store, root, "/keep") == []
    assert names(store, root, "/new") == []


def test_opaque_directories_clear_lower_contents(tmp_path: Path, store: ContentStore) -> None:
    lower = tar_of(reg("etc/a"), reg("etc/sub/b"), reg("keep"))
    upper = tar_of(dir_("etc"), reg("etc/.wh..wh..opq"), reg("etc/c", b"c"))
    written = write_layout(tmp_path / "layout", [lower, upper])
    root = import_layout(store, written.path).rootfs
    assert names(store, root) == ["etc", "keep"]
    assert names(store, root, "/etc") == ["c"]


def test_type_changes_without_whiteouts(tmp_path: Path, store: ContentStore) -> None:
    lower = tar_of(reg("d/x"), reg("f", b"file"), sym("s", "elsewhere"))
    upper = tar_of(reg("d", b"now a file"), dir_("f"), reg("f/in"), dir_("s"), reg("s/in"))
    written = write_layout(tmp_path / "layout", [lower, upper])
    root = import_layout(store, written.path).rootfs
    assert content(store, root, "/d") == b"now a file"
    assert names(store, root, "/f") == ["in"]
    assert names(store, root, "/s") == ["in"]


def test_snapshots_one_per_layer_last_is_rootfs(tmp_path: Path, store: ContentStore) -> None:
    layers = [tar_of(reg("one")), tar_of(reg("two")), tar_of()]  # an empty layer too
    written = write_layout(tmp_path / "layout", layers)
    image = import_layout(store, written.path)
    assert len(image.layers) == 3
    assert image.layers[-1] == image.rootfs
    assert names(store, image.layers[0]) == ["one"]
    assert names(store, image.layers[1]) == ["one", "two"]
    assert image.layers[2] == image.layers[1]
    assert store.get_image(image.digest) == image


def test_setgid_and_sticky_directories_are_fine(tmp_path: Path, store: ContentStore) -> None:
    root = one_layer(tmp_path, store, dir_("tmp", 0o1777), dir_("var/mail", 0o2775))
    assert entry(store, root, "/tmp").type == "dir"


def test_aufs_metadata_is_skipped(tmp_path: Path, store: ContentStore) -> None:
    root = one_layer(
        tmp_path,
        store,
        dir_(".wh..wh.plnk"),
        reg(".wh..wh.plnk/123.456", b"x"),
        reg(".wh..wh.aufs"),
        reg("real"),
    )
    assert names(store, root) == ["real"]


def test_policy_can_allow_setuid_and_devices(tmp_path: Path, store: ContentStore) -> None:
    layer = tar_of(
        reg("usr/bin/passwd", b"pw", 0o4755),
        reg("usr/bin/wall", b"w", 0o2755),
        dev("dev/null"),
        dev("dev/sda", tarfile.BLKTYPE),
        dev("run/fifo", tarfile.FIFOTYPE),
    )
    written = write_layout(tmp_path / "layout", [layer])
    seen: list[LayerImported] = []
    image = import_layout(
        store,
        written.path,
        policy=ImportPolicy(allow_devices=True, allow_setuid=True),
        progress=seen.append,
    )
    assert entry(store, image.rootfs, "/usr/bin/passwd").mode == EXEC_MODE
    assert store.lookup(image.rootfs, "/dev/null") is None
    assert seen[0].devices_skipped == 3
    assert (seen[0].index, seen[0].count, seen[0].entries) == (0, 1, 5)


def test_large_files_stream_through_a_temp_file(tmp_path: Path, store: ContentStore) -> None:
    big = bytes(range(256)) * (5 * 4096 + 7)  # > 1 MiB: the temp-file path
    root = one_layer(tmp_path, store, reg("big.bin", big))
    assert content(store, root, "/big.bin") == big
    assert list(store.tmp_dir.iterdir()) == []


# --- compression, media types, config ------------------------------------------------------


@pytest.mark.parametrize(
    "compression",
    [
        "gzip",
        "none",
        "zstd",
    ],
)
def test_compressions(tmp_path: Path, store: ContentStore, compression: str) -> None:
    layers = [tar_of(reg("a", b"1")), tar_of(reg("b", b"2"))]
    written = write_layout(tmp_path / "layout", layers, compression=compression)
    image = import_layout(store, written.path)
    assert names(store, image.rootfs) == ["a", "b"]


def test_multi_member_gzip(tmp_path: Path, store: ContentStore) -> None:
    import gzip

    layer = tar_of(reg("a", b"1"))
    blob = gzip.compress(layer[:700]) + gzip.compress(layer[700:])
    written = write_layout(tmp_path / "layout", [layer], blobs=[blob])
    assert names(store, import_layout(store, written.path).rootfs) == ["a"]


def test_docker_v2_media_types(tmp_path: Path, store: ContentStore) -> None:
    written = write_layout(tmp_path / "layout", [tar_of(reg("a"))], docker=True)
    image = import_layout(store, written.path)
    assert names(store, image.rootfs) == ["a"]


def test_config_is_mapped(tmp_path: Path, store: ContentStore) -> None:
    run = {
        "Entrypoint": ["/bin/server", "--flag"],
        "Cmd": ["serve"],
        "Env": ["PATH=/usr/bin:/bin", "EMPTY=", "EQ=a=b"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "9000": {}},
        "Labels": {"z": "last", "a": "first"},
        "Volumes": {"/data": {}},  # ignored
    }
    written = write_layout(tmp_path / "layout", [tar_of(reg("a"))], run=run)
    image = import_layout(store, written.path)
    assert image.config == ImageConfig(
        entrypoint=("/bin/server", "--flag"),
        env=(("PATH", "/usr/bin:/bin"), ("EMPTY", ""), ("EQ", "a=b")),
        workdir="/srv",
        cmd=("serve",),
        user="1000:1000",
        ports=(53, 8080, 9000),
        labels=(("a", "first"), ("z", "last")),
    )


def test_config_defaults(tmp_path: Path, store: ContentStore) -> None:
    written = write_layout(
        tmp_path / "layout", [tar_of(reg("a"))], config_hook=lambda c: c.pop("config")
    )
    assert import_layout(store, written.path).config == ImageConfig(entrypoint=())
    written = write_layout(
        tmp_path / "l2", [tar_of(reg("a"))], run={"WorkingDir": "app", "Entrypoint": None}
    )
    assert import_layout(store, written.path).config.workdir == "/app"


# --- layouts, archives, refs -------------------------------------------------------------


def test_archive_in_either_order_and_gzipped(tmp_path: Path, store: ContentStore) -> None:
    written = write_layout(tmp_path / "layout", [tar_of(reg("a", b"1"))])
    direct = import_layout(store, written.path)
    for i, first in enumerate((False, True)):
        archive = archive_of(written.path, tmp_path / f"image{i}.tar", index_first=first)
        assert import_layout(store, archive).digest == direct.digest
    import gzip

    zipped = tmp_path / "image.tar.gz"
    zipped.write_bytes(gzip.compress(archive.read_bytes()))
    assert import_layout(store, zipped).digest == direct.digest
    assert list(store.tmp_dir.iterdir()) == []  # the spool is gone


def test_docker_save_extras_are_ignored(tmp_path: Path, store: ContentStore) -> None:
    written = write_layout(tmp_path / "layout", [tar_of(reg("a"))])
    archive = archive_of(
        written.path,
        tmp_path / "image.tar",
        extra=[reg("manifest.json", b"[]"), reg("repositories", b"{}")],
    )
    assert names(store, import_layout(store, archive).rootfs) == ["a"]


def test_name_tags_the_image(tmp_path: Path, store: ContentStore) -> None:
    written = write_layout(tmp_path / "layout", [tar_of(reg("a"))])
    image = import_layout(store, written.path, name="web")
    assert image.name == "web"
    assert store.resolve("web").digest == image.digest


def test_refs_pick_the_image(tmp_path: Path, store: ContentStore) -> None:
    first = write_layout(tmp_path / "layout", [tar_of(reg("one"))], ref="one")
    second = write_layout(tmp_path / "other", [tar_of(reg("two"))], ref="two")
    for path in (second.path / "blobs" / "sha256").iterdir():
        (first.path / "blobs" / "sha256" / path.name).write_bytes(path.read_bytes())
    add_manifest(first.path, second, "two")
    assert names(store, import_layout(store, first.path, "two").rootfs) == ["two"]
    assert names(store, import_layout(store, first.path, "one").rootfs) == ["one"]
    with pytest.raises(ImportRejected, match="holds 2 images") as info:
        import_layout(store, first.path)
    assert "one" in (info.value.hint or "") and "two" in (info.value.hint or "")
    with pytest.raises(ImportRejected, match="no image named 'three'"):
        import_layout(store, first.path, "three")


def test_nested_index_picks_this_machine(tmp_path: Path, store: ContentStore) -> None:
    from graven.store.oci_types import host_platform

    arch, _ = host_platform()
    mine = write_layout(tmp_path / "layout", [tar_of(reg("mine"))])
    other = write_layout(tmp_path / "other", [tar_of(reg("other"))])
    for path in (other.path / "blobs" / "sha256").iterdir():
        (mine.path / "blobs" / "sha256" / path.name).write_bytes(path.read_bytes())
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": other.manifest_digest,
                    "size": len(other.manifest),
                    "platform": {"os": "linux", "architecture": "not-" + arch},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": mine.manifest_digest,
                    "size": len(mine.manifest),
                    "platform": {"os": "linux", "architecture": arch},
                },
            ],
        }
    ).encode()
    (mine.path / "blobs" / "sha256" / sha(nested)[7:]).write_bytes(nested)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_INDEX,
                "digest": sha(nested),
                "size": len(nested),
                "annotations": {"org.opencontainers.image.ref.name": "multi"},
            }
        ],
    }
    (mine.path / "index.json").write_text(json.dumps(index))
    assert names(store, import_layout(store, mine.path, "multi").rootfs) == ["mine"]


# --- the registry's entry point ------------------------------------------------------------


def test_import_from_manifest_with_streams(tmp_path: Path, store: ContentStore) -> None:
    written = write_layout(tmp_path / "layout", [tar_of(reg("a", b"x" * 100_000))])
    opened: list[str] = []

    @contextmanager
    def open_blob(desc: Descriptor) -> Iterator[BinaryIO]:
        opened.append(desc.digest)
        data = written.blob_path(desc.digest).read_bytes()

        class Trickle(io.BytesIO):  # a network stream: short reads
            def read(self, n: int | None = -1) -> bytes:
                return super().read(min(n if n is not None and n >= 0 else 1 << 30, 777))

        yield Trickle(data)

    image = import_from_manifest(
        store, written.manifest, Digest(written.manifest_digest), open_blob
    )
    assert content(store, image.rootfs, "/a") == b"x" * 100_000
    assert opened == [json.loads(written.manifest)["config"]["digest"], *written.layer_digests]
    # the digest is optional (a pull by tag has none to check)
    assert import_from_manifest(store, written.manifest, None, open_blob).digest == image.digest


# --- round trip with the exporter ------------------------------------------------------------


@pytest.mark.parametrize(
    "compression",
    [
        "gzip",
        "none",
        "zstd",
    ],
)
@pytest.mark.parametrize("form", ["layout", "archive"])
def test_round_trip_with_the_exporter_keeps_the_digest(
    tmp_path: Path, compression: str, form: str
) -> None:
    import os

    from graven.store.oci_export.compress import check_compression
    from graven.store.oci_export.layout import export_archive, export_layout

    kind = check_compression(compression)

    source = ContentStore(tmp_path / "source")
    work = tmp_path / "work"
    (work / "app" / "lib").mkdir(parents=True)
    (work / "app" / "lib" / "x.py").write_text("print('x')\n")
    (work / "bin").mkdir()
    (work / "bin" / "run").write_text("#!/bin/sh\nexec app\n")
    (work / "bin" / "run").chmod(0o755)
    os.symlink("../app", work / "bin" / "app")
    (work / "big").write_bytes(os.urandom(1_500_000))
    first = source.ingest_tree(work)
    (work / "app" / "lib" / "x.py").unlink()
    (work / "app" / "lib" / "y.py").write_text("y")
    (work / "bin" / "app").unlink()
    (work / "bin" / "app").mkdir()  # symlink -> directory
    (work / "big").unlink()
    second = source.ingest_tree(work)
    image = source.put_image(
        second,
        ImageConfig(
            entrypoint=("/bin/run",),
            env=(("A", "1"),),
            workdir="/app",
            cmd=("--serve",),
            user="app",
            ports=(8080,),
            labels=(("org.example", "yes"),),
        ),
        (first, second),
    )
    if form == "layout":
        path = export_layout(source, image, tmp_path / "out", "web", kind).path
    else:
        path = export_archive(source, image, tmp_path / "out.tar", "web", kind).path
    fresh = ContentStore(tmp_path / "fresh")
    imported = import_layout(fresh, path, "web", name="web")
    assert imported.digest == image.digest
    assert imported.layers == image.layers
    assert fresh.resolve("web").digest == image.digest


# --- the command line ----------------------------------------------------------------------


def test_cli_import_reports_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graven.cli.main import main

    written = write_layout(tmp_path / "layout", [tar_of(reg("a")), tar_of(reg("b"))], ref="web")
    state = tmp_path / "state"
    main(
        [
            "--state-dir",
            str(state),
            "image",
            "import",
            str(written.path),
            "--name",
            "web",
            "-o",
            "json",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert (data["name"], data["layers"], data["ref"]) == ("web", 2, None)
    store = ContentStore(state / "store")
    assert store.resolve("web").digest == data["digest"]


def test_cli_refusal_exits_2_naming_the_member_and_the_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graven.cli.main import main

    written = write_layout(tmp_path / "layout", [tar_of(reg("bin/su", b"x", 0o4755))])
    args = ["--state-dir", str(tmp_path / "state"), "image", "import", str(written.path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "-o", "json"])
    assert exit_info.value.code == 2
    error = json.loads(capsys.readouterr().out)
    assert error["error"] == "ImportRejected"
    assert error["member"] == "bin/su"
    assert error["layer"] == written.layer_digests[0]
    assert "--allow-setuid" in error["hint"]
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "member 'bin/su': a setuid file" in err
    assert "hint: Pass --allow-setuid" in err
    main([*args, "--allow-setuid"])
    assert "imported" in capsys.readouterr().out
