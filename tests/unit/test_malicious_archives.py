"""Hostile layouts and archives: each is refused with a message naming the problem, and
nothing is written anywhere but the store (DESIGN invariant 8).

Every case runs with the store inside a temp dir that also holds sentinel directories,
the source and the working directory; the whole temp tree is listed (types, modes,
contents) before and after and must be unchanged apart from the store, the store's
tmp/ must be empty again and no name may be recorded. Names that aim at
``/tmp/graven-evil*`` must leave nothing there either.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from graven.errors import UsageError
from graven.model import Digest
from graven.store.cas import ContentStore
from graven.store.oci_import.images import import_from_manifest
from graven.store.oci_import.layouts import import_layout
from graven.store.oci_import.policy import ImportPolicy, ImportRejected
from graven.store.oci_types import (
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    REF_NAME,
    Descriptor,
)
from tests.unit.oci_build import (
    Member,
    Written,
    add_manifest,
    archive_of,
    compress,
    dev,
    dir_,
    link,
    patched,
    pax,
    pax_records,
    raw_header,
    reg,
    sha,
    sym,
    tar_of,
    tree_listing,
    write_layout,
)

EVIL = Path("/tmp")
HEX = "ab" * 32
BLOB = bytes(range(256)) * 20  # 5120 bytes: no padding after it in a tar


@dataclass(frozen=True)
class Case:
    """A hostile source: ``build(dir)`` writes it below ``dir`` and returns its path."""

    id: str
    build: Callable[[Path], Path]
    match: str
    policy: ImportPolicy = field(default_factory=ImportPolicy)
    ref: str | None = None


def layout_of(*tars: Callable[[], bytes], compression: str = "gzip") -> Callable[[Path], Path]:
    return lambda d: write_layout(d / "layout", [t() for t in tars], compression=compression).path


def members(*items: Member, **kw: Any) -> Callable[[], bytes]:
    return lambda: tar_of(*items, **kw)


def archived(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
    return lambda d: archive_of(build(d / "src"), d / "image.tar")


# --- what a layer may not do (each runs as a layout and as an oci-archive) ---------------------


def _sparse() -> bytes:
    info, _ = reg("sparse", b"")
    info.type = tarfile.GNUTYPE_SPARSE
    return tar_of((info, None), fmt=tarfile.GNU_FORMAT)


def _unknown_type() -> bytes:
    info, data = reg("odd", b"data")
    info.type = b"Z"
    return tar_of((info, data))


def _nul_symlink() -> bytes:
    info, _ = sym("s", "target")
    info.pax_headers = {"linkpath": "/etc\x00passwd"}
    return tar_of((info, None))


def _truncated_member() -> bytes:
    return tar_of(reg("a", b"x" * 4000), end=False)[:2000]


def _corrupt_header() -> bytes:
    return tar_of(reg("a", b"1"), end=False) + b"\x01" * 512 + tar_of(reg("hidden"))


LAYER_CASES = [
    Case("traversal-dotdot", layout_of(members(reg("../x"))), r"'\.\.' component"),
    Case(
        "traversal-to-tmp",
        layout_of(members(reg("../../../../../../../../tmp/graven-evil-trav", b"pwn"))),
        r"'\.\.' component",
    ),
    Case("traversal-inner", layout_of(members(reg("a/../../x"))), r"'\.\.' component"),
    Case("traversal-dir", layout_of(members(dir_("a/.."))), r"'\.\.' component"),
    Case("absolute-etc", layout_of(members(reg("/etc/x"))), "absolute path"),
    Case("absolute-tmp", layout_of(members(reg("/tmp/graven-evil-abs", b"pwn"))), "absolute path"),
    Case(
        "symlink-to-root-then-write",
        layout_of(members(sym("evil", "/"), reg("evil/tmp/graven-evil-sym", b"pwn"))),
        r"goes through 'evil', a symlink",
    ),
    Case(
        "symlink-to-dotdot-then-write",
        layout_of(members(sym("up", ".."), reg("up/graven-evil-up", b"pwn"))),
        r"'up', a symlink",
    ),
    Case(
        "symlink-chain-escape",
        layout_of(members(sym("a", "b"), sym("b", "../../tmp"), reg("a/graven-evil-chain"))),
        r"'a', a symlink",
    ),
    Case(
        "symlink-in-lower-layer-then-write",
        layout_of(members(sym("lib", "/tmp")), members(reg("lib/graven-evil-lower", b"pwn"))),
        r"'lib', a symlink",
    ),
    Case(
        "symlink-then-directory-through-it",
        layout_of(members(sym("evil", "/tmp"), dir_("evil/graven-evil-dir"))),
        r"'evil', a symlink",
    ),
    Case(
        "symlink-then-hardlink-through-it",
        layout_of(members(reg("f"), sym("evil", "/tmp"), link("evil/graven-evil-h", "f"))),
        r"'evil', a symlink",
    ),
    Case("hardlink-to-etc-passwd", layout_of(members(link("pw", "/etc/passwd"))), "absolute path"),
    Case("hardlink-dotdot", layout_of(members(link("x", "../x"))), r"'\.\.' component"),
    Case(
        "hardlink-to-not-yet-seen",
        layout_of(members(link("early", "late"), reg("late"))),
        "not in the image yet",
    ),
    Case(
        "hardlink-through-symlink",
        layout_of(members(sym("etc", "/etc"), link("pw", "etc/passwd"))),
        r"hardlink target goes through 'etc', a symlink",
    ),
    Case("hardlink-to-directory", layout_of(members(dir_("d"), link("l", "d"))), "a directory"),
    Case("hardlink-to-root", layout_of(members(link("l", "./"))), "image root"),
    Case("char-device", layout_of(members(dev("dev/mem"))), "character device"),
    Case("block-device", layout_of(members(dev("dev/sda", tarfile.BLKTYPE))), "block device"),
    Case("fifo", layout_of(members(dev("run/pipe", tarfile.FIFOTYPE))), "fifo"),
    Case("setuid-file", layout_of(members(reg("bin/su", b"x", 0o4755))), "setuid file"),
    Case("setgid-file", layout_of(members(reg("bin/wall", b"x", 0o2755))), "setgid file"),
    Case("whiteout-dotdot", layout_of(members(reg(".wh..."))), "whiteout of '..'"),
    Case("whiteout-dot", layout_of(members(reg("a/.wh.."))), "whiteout of '.'"),
    Case("whiteout-empty-name", layout_of(members(reg(".wh."))), "whiteout of 'its own"),
    Case("opaque-whiteout-of-root", layout_of(members(reg(".wh..wh..opq"))), "image root"),
    Case("opaque-whiteout-of-root-dot", layout_of(members(reg("./.wh..wh..opq"))), "image root"),
    Case("whiteout-traversal", layout_of(members(reg("../.wh.etc"))), r"'\.\.' component"),
    Case("whiteout-as-directory", layout_of(members(reg(".wh.x/y"))), "used as a directory"),
    Case(
        "whiteout-target-through-symlink-in-lower",
        layout_of(members(sym("lnk", "/etc")), members(reg("lnk/.wh.passwd"))),
        r"'lnk', a symlink",
    ),
    Case("whiteout-as-symlink", layout_of(members(sym(".wh.x", "/"))), "regular file"),
    Case("duplicate-file", layout_of(members(reg("a", b"1"), reg("a", b"2"))), "second entry"),
    Case("duplicate-dir", layout_of(members(dir_("d"), dir_("d/"))), "second entry"),
    Case("duplicate-after-normalizing", layout_of(members(reg("a"), reg("./a"))), "second entry"),
    Case("duplicate-whiteout", layout_of(members(reg(".wh.a"), reg(".wh.a"))), "second entry"),
    Case("write-below-a-file", layout_of(members(reg("f"), reg("f/x"))), "which is a file"),
    Case(
        "file-over-a-directory-just-written",
        layout_of(members(reg("d/x"), reg("d"))),
        "replaces a directory",
    ),
    Case(
        "non-utf8-name",
        layout_of(members(reg("bad-\udcff\udcfe"), fmt=tarfile.GNU_FORMAT)),
        "not valid UTF-8",
    ),
    Case("nul-in-name", layout_of(members(pax("x", path="etc/passwd\x00.txt"))), "NUL byte"),
    Case("nul-in-symlink-target", layout_of(_nul_symlink), "NUL byte"),
    Case("root-as-file", layout_of(members(reg("./", b"x"))), "root must be a directory"),
    Case("sparse-file", layout_of(_sparse), "sparse"),
    Case("unknown-member-type", layout_of(_unknown_type), "unsupported tar member type"),
    Case("path-too-deep", layout_of(members(reg("/".join(["d"] * 300)))), "nested deeper"),
    Case("name-component-too-long", layout_of(members(reg("x" * 300))), "longer than 255"),
    Case("truncated-member-data", layout_of(_truncated_member), "truncated"),
    Case(
        "member-size-larger-than-data",
        layout_of(members(reg("a", b"abc"), size_lie=100_000)),
        "truncated",
    ),
    Case("missing-end-of-archive", layout_of(members(reg("a"), end=False)), "end-of-archive"),
    Case("corrupt-header-hides-members", layout_of(_corrupt_header), "not a valid tar header"),
    Case(
        "garbage-after-end",
        layout_of(lambda: tar_of(reg("a")) + b"trailing garbage"),
        "not a valid tar header",
    ),
    Case("empty-layer-stream", layout_of(lambda: b""), "tar stream is empty"),
    Case("not-a-tar", layout_of(lambda: b"hello world\n" * 100), "not a valid"),
    Case(
        "too-many-entries",
        layout_of(members(*(reg(f"f{i}") for i in range(10)))),
        "more than 5 entries",
        ImportPolicy(max_entries=5),
    ),
    Case(
        "gzip-bomb",
        layout_of(members(reg("zeros", bytes(8 << 20)))),
        "compression bomb",
        ImportPolicy(max_layer_bytes=1 << 20),
    ),
    Case(
        "image-size-cap",
        layout_of(members(reg("a", bytes(300_000))), members(reg("b", bytes(300_000)))),
        "image limit of 500000 bytes",
        ImportPolicy(max_image_bytes=500_000),
    ),
    Case(
        "pax-header-bomb",
        layout_of(members(pax("a", comment="x" * (2 << 20)))),
        "header records",
        ImportPolicy(max_header_bytes=4096),
    ),
    Case(
        "gnu-long-name-bomb",
        layout_of(members(reg("n" * (2 << 20)), fmt=tarfile.GNU_FORMAT)),
        "header records",
        ImportPolicy(max_header_bytes=4096),
    ),
]


# --- the import policy, hazard by hazard (docs/oci-import.md has the table) --------------------
#
# POLICY_CASES are refused, each as a layout and as an oci-archive, by the test above;
# NEUTRALIZED are imported, and the tree that results is the one the policy says.


def _smuggled(carrier: Member, *before: Member) -> Callable[[], bytes]:
    """``carrier`` (not a file) declares as its data a whole tar header: a reader that
    skips a member's data sees nothing there, tarfile reads the header as a member."""
    header = reg("tmp/graven-evil-smuggled", b"pwn")[0].tobuf(tarfile.GNU_FORMAT)
    info, _ = carrier
    info.size = len(header) + 512
    data = header + b"pwn".ljust(512, b"\0")
    return lambda: tar_of(*before, (info, data), fmt=tarfile.GNU_FORMAT)


def _pax_link(name: str, target: str) -> Member:
    info, _ = link(name, "placeholder")
    info.pax_headers = {"linkpath": target}
    return info, None


def _pax_device(name: str) -> Member:
    info, _ = dev(name)
    info.pax_headers = {"comment": "just a device"}
    return info, None


def _pax_size_garbage() -> bytes:
    # tarfile reads size=abc as 0, so the file's data is read as the next header.
    hidden = reg("tmp/graven-evil-pax-size", b"pwn")[0].tobuf(tarfile.GNU_FORMAT)
    info, _ = pax("carrier", size="abc")
    info.size = len(hidden) + 512
    data = hidden + b"pwn".ljust(512, b"\0")
    head = info.tobuf(tarfile.PAX_FORMAT)
    return head + data + b"\0" * 1024


def _number(value: int, width: int = 8) -> bytes:
    """A tar number field in base-256 (GNU), as tarfile itself never writes a mode."""
    if value < 0:
        return (256**width + value).to_bytes(width, "big")
    return b"\x80" + value.to_bytes(width - 1, "big")


def _gnu_long(kind: bytes, name: bytes, member: Member) -> Callable[[], bytes]:
    return members(raw_header(kind, name), member, fmt=tarfile.GNU_FORMAT)


def _global_pax(**records: str) -> Callable[[], bytes]:
    header = raw_header(tarfile.XGLTYPE, pax_records(**records), "pax_global_header")
    return members(header, reg("a", b"x"), fmt=tarfile.GNU_FORMAT)


def _with_owner(uid: int) -> Member:
    info, data = reg("owned", b"x")
    info.uid = uid
    return info, data


CAPABILITY = "SCHILY.xattr.security.capability"

POLICY_CASES = [
    # whiteouts
    Case(
        "whiteout-below-symlink-to-dir-in-lower",
        layout_of(
            members(reg("etc/passwd", b"root"), sym("lnk", "etc")),
            members(reg("lnk/.wh.passwd")),
        ),
        r"whiteout goes through 'lnk', a symlink",
    ),
    Case(
        "opaque-whiteout-below-symlink-in-lower",
        layout_of(
            members(reg("etc/passwd", b"root"), sym("lnk", "/etc")),
            members(reg("lnk/.wh..wh..opq")),
        ),
        r"opaque whiteout in 'lnk', which is a symlink in the layers below",
    ),
    Case(
        "opaque-whiteout-below-file-in-lower",
        layout_of(members(reg("f", b"data")), members(reg("f/.wh..wh..opq"))),
        r"opaque whiteout in 'f', which is a file in the layers below",
    ),
    Case(
        "opaque-whiteout-below-symlinked-parent-in-lower",
        layout_of(
            members(dir_("etc/ssl"), sym("lnk", "etc")), members(reg("lnk/ssl/.wh..wh..opq"))
        ),
        r"whiteout goes through 'lnk', a symlink",
    ),
    Case(
        "opaque-whiteout-below-symlink-of-this-layer",
        layout_of(members(dir_("etc")), members(sym("lnk", "/etc"), reg("lnk/.wh..wh..opq"))),
        "inside a symlink of this same layer",
    ),
    Case(
        "whiteout-below-file-in-lower",
        layout_of(members(reg("f", b"data")), members(reg("f/.wh.x"))),
        r"goes through 'f', which is a file",
    ),
    Case("whiteout-of-dotdot-below-dir", layout_of(members(reg("a/.wh..."))), "whiteout of '..'"),
    # hardlinks
    Case(
        "hardlink-below-symlinked-dir-in-lower",
        layout_of(members(sym("etc", "/etc")), members(link("pw", "etc/passwd"))),
        r"hardlink target goes through 'etc', a symlink",
    ),
    Case(
        "hardlink-chain-below-symlink",
        layout_of(members(sym("s", "/etc"), link("h1", "s"), link("h2", "h1/passwd"))),
        r"hardlink target goes through 'h1', a symlink",
    ),
    Case(
        "hardlink-to-lower-entry-whited-out-earlier",
        layout_of(members(reg("secret", b"s")), members(reg(".wh.secret"), link("h", "secret"))),
        "not in the image yet",
    ),
    Case(
        "hardlink-via-pax-linkpath-escape",
        layout_of(members(reg("f"), _pax_link("h", "../../etc/passwd"))),
        r"'\.\.' component",
    ),
    # header values tarfile would reinterpret, or no tool writes
    Case(
        "symlink-with-data-smuggles-a-member",
        layout_of(_smuggled(sym("s", "target"))),
        "a symlink that declares 1024 bytes of data",
    ),
    Case(
        "directory-with-data-smuggles-a-member",
        layout_of(_smuggled(dir_("d"))),
        "a dir that declares 1024 bytes of data",
    ),
    Case(
        "hardlink-with-data-smuggles-a-member",
        layout_of(_smuggled(link("h", "f"), reg("f"))),
        "a hardlink that declares 1024 bytes of data",
    ),
    Case("pax-size-not-a-number", layout_of(_pax_size_garbage), r"pax record size='abc'"),
    Case("pax-uid-not-a-number", layout_of(members(pax("a", uid="abc"))), r"uid='abc'"),
    Case("pax-uid-negative", layout_of(members(pax("a", uid="-1"))), r"uid='-1'"),
    Case("pax-uid-too-large", layout_of(members(pax("a", uid="99999999999"))), "out of range"),
    Case("pax-gid-too-large", layout_of(members(pax("a", gid=str(2**32)))), "gid 4294967296"),
    Case("pax-uid-is-no-owner", layout_of(members(pax("a", uid=str(2**32 - 1)))), "uid 4294967295"),
    Case(
        "base256-uid-too-large",
        layout_of(members(_with_owner(2**40), fmt=tarfile.GNU_FORMAT)),
        "uid 1099511627776 is out of range",
    ),
    Case(
        "base256-uid-negative",
        layout_of(members(_with_owner(-3), fmt=tarfile.GNU_FORMAT)),
        "uid -3 is out of range",
    ),
    Case(
        "mode-beyond-file-type-bits",
        layout_of(members(patched(reg("m", b"x"), 100, _number(0o10000644)))),
        "mode 0o10000644 is out of range",
    ),
    Case(
        "mode-negative-on-a-directory",
        layout_of(members(patched(dir_("d"), 100, _number(-1)))),
        "mode -0o1 is out of range",
    ),
    Case(
        "size-negative",
        layout_of(members(patched(reg("n"), 124, _number(-5, 12)))),
        "negative size",
    ),
    Case("pax-mtime-infinite", layout_of(members(pax("a", mtime="1e400"))), "mtime='1e400'"),
    Case("pax-mtime-nan", layout_of(members(pax("a", mtime="nan"))), "mtime='nan'"),
    Case(
        "pax-mtime-too-many-digits",
        layout_of(members(pax("a", mtime="9" * 5000))),
        "is not a valid number",
    ),
    Case(
        "pax-path-escape",
        layout_of(members(pax("innocent", b"pwn", path="../../tmp/graven-evil-pax"))),
        r"'\.\.' component",
    ),
    Case(
        "pax-path-absolute",
        layout_of(members(pax("innocent", b"pwn", path="/tmp/graven-evil-pax-abs"))),
        "absolute path",
    ),
    Case(
        "pax-gnu-sparse-name-renames-a-plain-file",
        layout_of(members(pax("innocent", b"x", **{"GNU.sparse.name": "etc/shadow"}))),
        r"GNU sparse record \('GNU\.sparse\.name'\)",
    ),
    Case(
        "pax-gnu-sparse-1.0",
        layout_of(
            members(pax("s", b"1\n0\n1\n", **{"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
        ),
        "sparse",
    ),
    Case(
        "global-pax-path",
        layout_of(_global_pax(path="etc/shadow")),
        "global pax header sets 'path'",
    ),
    Case("global-pax-size", layout_of(_global_pax(size="0")), "global pax header sets 'size'"),
    Case("global-pax-uid-garbage", layout_of(_global_pax(uid="x")), r"uid='x'"),
    Case(
        "gnu-long-name-with-nul",
        layout_of(
            _gnu_long(tarfile.GNUTYPE_LONGNAME, b"bin/ok\0/../../tmp/graven-evil\0", reg("x"))
        ),
        r"member 'bin/ok': its GNU long name goes on after a NUL",
    ),
    Case(
        "gnu-long-link-with-nul",
        layout_of(_gnu_long(tarfile.GNUTYPE_LONGLINK, b"lib\0/../../etc\0", sym("l", "x"))),
        "GNU long link target goes on after a NUL",
    ),
    Case(
        "file-capabilities",
        layout_of(members(pax("bin/ping", b"p", **{CAPABILITY: "\x01\x00\x00\x02 "}))),
        r"a file with capabilities",
    ),
    Case(
        "file-capabilities-libarchive",
        layout_of(
            members(pax("bin/ping", b"p", **{"LIBARCHIVE.xattr.security.capability": "AQAAAg"}))
        ),
        r"a file with capabilities",
    ),
    Case(
        "device-node-with-pax-records",
        layout_of(members(_pax_device("dev/kmem"))),
        "character device",
    ),
    # duplicates that would turn a directory into a symlink to write through it
    Case(
        "directory-then-symlink-then-write",
        layout_of(members(dir_("d"), sym("d", "/tmp"), reg("d/graven-evil-dup", b"pwn"))),
        "second entry",
    ),
    Case(
        "directory-below-then-symlink-then-write",
        layout_of(members(dir_("d")), members(sym("d", "/tmp"), reg("d/graven-evil-dup2", b"pwn"))),
        r"goes through 'd', a symlink",
    ),
]


# --- blobs and documents ---------------------------------------------------------------------


def _simple(d: Path, **kw: Any) -> Written:
    return write_layout(d / "layout", [tar_of(reg("a", b"content"))], **kw)


def _flip_digest_char(data: bytes) -> bytes:
    at = data.index(b"sha256:") + 7
    return data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]


def _manifest_digest_mismatch(d: Path) -> Path:
    w = _simple(d)
    path = w.blob_path(w.manifest_digest)
    path.write_bytes(_flip_digest_char(path.read_bytes()))  # same size, other content
    return w.path


def _tamper_layer(d: Path) -> Path:
    w = _simple(d)
    path = w.blob_path(w.layer_digests[0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return w.path


def _truncate_layer_file(d: Path) -> Path:
    w = _simple(d)
    path = w.blob_path(w.layer_digests[0])
    path.write_bytes(path.read_bytes()[:-10])
    return w.path


def _layer_size_lie(d: Path) -> Path:
    def hook(m: dict[str, Any]) -> None:
        m["layers"][0]["size"] += 1

    return _simple(d, manifest_hook=hook).path


def _truncated_gzip(d: Path) -> Path:
    tar = tar_of(reg("a", os.urandom(20_000)))
    return write_layout(d / "layout", [tar], blobs=[gzip.compress(tar)[:-3000]]).path


def _gzip_bad_crc(d: Path) -> Path:
    tar = tar_of(reg("a", b"content"))
    blob = bytearray(gzip.compress(tar))
    blob[-8] ^= 0xFF  # the CRC32 in the trailer
    return write_layout(d / "layout", [tar], blobs=[bytes(blob)]).path


def _gzip_trailing_garbage(d: Path) -> Path:
    tar = tar_of(reg("a", b"content"))
    return write_layout(d / "layout", [tar], blobs=[gzip.compress(tar) + b"garbage!"]).path


def _truncated_zstd(d: Path) -> Path:
    tar = tar_of(reg("a", os.urandom(20_000)))
    blob = compress(tar, "zstd")
    return write_layout(
        d / "layout", [tar], compression="zstd", blobs=[blob[: len(blob) // 2]]
    ).path


def _plain_declared_gzip(d: Path) -> Path:
    tar = tar_of(reg("a"))
    return write_layout(d / "layout", [tar], blobs=[tar]).path  # media type says gzip


def _diff_id_mismatch(d: Path) -> Path:
    def hook(c: dict[str, Any]) -> None:
        c["rootfs"]["diff_ids"][0] = sha(b"something else")

    return _simple(d, config_hook=hook).path


def _config_hook(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    return lambda d: _simple(d, config_hook=edit).path


def _run(**run: Any) -> Callable[[Path], Path]:
    return lambda d: _simple(d, run=run).path


def _manifest_hook(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    return lambda d: _simple(d, manifest_hook=edit).path


def _index_hook(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    return lambda d: _simple(d, index_hook=edit).path


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value

    return edit


def _huge_manifest(d: Path) -> Path:
    return _manifest_hook(_set("annotations", {"pad": "x" * (MAX_MANIFEST_BYTES + 10)}))(d)


def _manifest_bytes(data: bytes) -> Callable[[Path], Path]:
    return lambda d: _simple(d, manifest_bytes=data).path


def _index_bytes(data: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        w = _simple(d)
        (w.path / "index.json").write_bytes(data)
        return w.path

    return build


def _missing_blob(d: Path) -> Path:
    w = _simple(d)
    w.blob_path(w.layer_digests[0]).unlink()
    return w.path


def _missing_manifest(d: Path) -> Path:
    return _index_hook(_set("manifests.0.digest", "sha256:" + HEX))(d)


def _directory_at(where: str) -> Callable[[Path], Path]:
    """A layout with a directory where a file should be: ``where`` is a path in it, or
    "layer" for the first layer's blob."""

    def build(d: Path) -> Path:
        w = _simple(d)
        path = w.blob_path(w.layer_digests[0]) if where == "layer" else w.path / where
        path.unlink()
        path.mkdir()
        return w.path

    return build


def _blob_symlink(d: Path) -> Path:
    w = _simple(d)
    path = w.blob_path(w.layer_digests[0])
    outside = d / "sentinel-blob"
    outside.write_bytes(path.read_bytes())  # even the right content is refused
    path.unlink()
    path.symlink_to(outside)
    return w.path


def _blob_fifo(d: Path) -> Path:
    w = _simple(d)
    path = w.blob_path(w.layer_digests[0])
    path.unlink()
    os.mkfifo(path)
    return w.path


def _no_marker(d: Path) -> Path:
    w = _simple(d)
    (w.path / "oci-layout").unlink()
    return w.path


def _bad_marker(d: Path) -> Path:
    w = _simple(d)
    (w.path / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    return w.path


def _four_layers(d: Path) -> Path:
    return write_layout(d / "layout", [tar_of(reg(f"{i}")) for i in range(4)]).path


def _nested_index_without_this_platform(d: Path) -> Path:
    w = _simple(d)
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": w.manifest_digest,
                    "size": len(w.manifest),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for arch in ("mips64le", "s390x-not-here")
            ],
        }
    ).encode()
    (w.path / "blobs" / "sha256" / sha(nested)[7:]).write_bytes(nested)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_INDEX, "digest": sha(nested), "size": len(nested)}],
    }
    (w.path / "index.json").write_text(json.dumps(index))
    return w.path


DOCUMENT_CASES: list[Any] = [
    Case(
        "manifest-digest-mismatch",
        _manifest_digest_mismatch,
        "manifest sha256:.* hashes to sha256:.*not to its declared digest",
    ),
    Case("layer-digest-mismatch", _tamper_layer, r"layer sha256:\w+: the blob hashes to sha256:"),
    Case("layer-size-mismatch", _layer_size_lie, r"bytes; its descriptor says"),
    Case("truncated-blob", _truncate_layer_file, r"bytes; its descriptor says"),
    Case("truncated-gzip", _truncated_gzip, r"Compressed file ended|truncated"),
    Case("gzip-bad-crc", _gzip_bad_crc, "CRC check failed"),
    Case("gzip-trailing-garbage", _gzip_trailing_garbage, r"Not a gzipped file|not a valid"),
    Case("truncated-zstd", _truncated_zstd, r"end-of-archive|truncated"),
    Case("declared-gzip-is-plain", _plain_declared_gzip, "Not a gzipped file"),
    Case("diff-id-mismatch", _diff_id_mismatch, r"rootfs.diff_ids\[0\]"),
    Case(
        "diff-id-count",
        _config_hook(lambda c: c["rootfs"]["diff_ids"].append(sha(b"x"))),
        "2 diff_ids for the manifest's 1 layers",
    ),
    Case(
        "diff-id-not-a-digest", _config_hook(_set("rootfs.diff_ids.0", "md5:abc")), "not a sha256"
    ),
    Case(
        "oversized-manifest-descriptor",
        _index_hook(_set("manifests.0.size", MAX_MANIFEST_BYTES + 1)),
        "limit is",
    ),
    Case("oversized-manifest", _huge_manifest, "limit is"),
    Case("oversized-config", _manifest_hook(_set("config.size", MAX_CONFIG_BYTES + 1)), "limit is"),
    Case(
        "config-entrypoint-string", _run(Entrypoint="/bin/sh -c evil"), "Entrypoint must be a list"
    ),
    Case("config-cmd-numbers", _run(Cmd=[1, 2]), "Cmd must be a list of strings"),
    Case("config-env-map", _run(Env={"A": "B"}), "Env must be a list"),
    Case("config-env-no-equals", _run(Env=["JUSTNAME"]), "not NAME=VALUE"),
    Case("config-env-nul", _run(Env=["A=b\x00c"]), "NUL"),
    Case("config-user-number", _run(User=0), "User must be a string"),
    Case("config-workdir-list", _run(WorkingDir=["/"]), "WorkingDir must be a string"),
    Case("config-port-name", _run(ExposedPorts={"http": {}}), "is not PORT/tcp"),
    Case("config-port-range", _run(ExposedPorts={"70000/tcp": {}}), "out of range"),
    Case("config-labels-number", _run(Labels={"a": 1}), "Labels must be a map of strings"),
    Case(
        "config-section-list", _config_hook(_set("config", [])), "config.config must be an object"
    ),
    Case("config-no-rootfs", _config_hook(lambda c: c.pop("rootfs")), "config.rootfs must be"),
    Case("config-windows", _config_hook(_set("os", "windows")), "graven runs linux images"),
    Case("config-not-json", lambda d: _simple(d, config_bytes=b"{not json").path, "not valid JSON"),
    Case(
        "manifest-unknown-layer-media-type",
        _manifest_hook(
            _set(
                "layers.0.mediaType",
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            )
        ),
        "is not supported",
    ),
    Case(
        "manifest-config-not-an-image",
        _manifest_hook(_set("config.mediaType", "application/vnd.cncf.helm.config.v1+json")),
        "not an image config",
    ),
    Case("manifest-schema-1", _manifest_hook(_set("schemaVersion", 1)), "schemaVersion must be 2"),
    Case(
        "manifest-schema-true",
        _manifest_hook(_set("schemaVersion", True)),
        "schemaVersion must be 2",
    ),
    Case("manifest-is-an-index", _manifest_hook(_set("mediaType", OCI_INDEX)), "got an index"),
    Case(
        "manifest-duplicate-keys",
        _manifest_bytes(b'{"schemaVersion": 2, "layers": [], "layers": []}'),
        "duplicate key 'layers'",
    ),
    Case("manifest-nan", _manifest_bytes(b'{"schemaVersion": NaN}'), "not valid JSON"),
    Case("manifest-deep-nesting", _manifest_bytes(b"[" * 200_000), "nested too deeply"),
    Case("manifest-not-utf8", _manifest_bytes(b'{"schemaVersion": 2, "x": "\xff"}'), "not UTF-8"),
    Case("manifest-bad-descriptor", _manifest_hook(_set("layers.0.size", -1)), r"layers\[0\].size"),
    Case(
        "manifest-digest-traversal",
        _manifest_hook(_set("layers.0.digest", "sha256:../../../../etc/passwd")),
        r"layers\[0\].digest",
    ),
    Case("too-many-layers", _four_layers, "4 layers; the limit is 3", ImportPolicy(max_layers=3)),
    Case("index-points-at-missing-blob", _missing_manifest, "is missing from"),
    Case("layer-blob-missing", _missing_blob, "is missing from"),
    Case("layer-blob-is-a-symlink", _blob_symlink, "is a symlink"),
    Case("layer-blob-is-a-fifo", _blob_fifo, "not a regular file"),
    Case("layer-blob-is-a-directory", _directory_at("layer"), "not a regular file"),
    Case("index-is-a-directory", _directory_at("index.json"), "not a regular file"),
    Case("oci-layout-is-a-directory", _directory_at("oci-layout"), "not a regular file"),
    Case("no-oci-layout-file", _no_marker, "oci-layout file is missing"),
    Case("unsupported-layout-version", _bad_marker, "imageLayoutVersion"),
    Case("index-not-json", _index_bytes(b"[1, 2"), "not valid JSON"),
    Case(
        "index-no-images", _index_bytes(b'{"schemaVersion": 2, "manifests": []}'), "lists no images"
    ),
    Case("ref-not-found", lambda d: _simple(d).path, "no image named 'nope'", ref="nope"),
    Case(
        "nested-index-no-platform-for-this-machine",
        _nested_index_without_this_platform,
        "multi-platform",
    ),
]


def _ref(value: str) -> Callable[[Path], Path]:
    return _index_hook(_set("manifests.0.annotations", {REF_NAME: value}))


def _two_platforms(arch: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        w = _simple(d)
        add_manifest(w.path, w, "other", {"os": "linux", "architecture": arch})
        return w.path

    return build


def _bad_second_ref(index: dict[str, Any]) -> None:
    index["manifests"].append({**index["manifests"][0], "annotations": {REF_NAME: "v1\r"}})


# Annotations: only org.opencontainers.image.ref.name is read (to match --ref, and in
# messages); a value the image-spec's grammar does not allow is refused.
ANNOTATION_CASES = [
    Case("ref-name-newline", _ref("latest\nerror: forged line"), "not a valid ref name"),
    Case("ref-name-traversal", _ref("../../tmp/graven-evil-ref"), "not a valid ref name"),
    Case("ref-name-nul", _ref("latest\x00.tar"), "not a valid ref name"),
    Case("ref-name-escape-sequence", _ref("\x1b]0;owned\x07latest"), "not a valid ref name"),
    Case("ref-name-empty", _ref(""), "not a valid ref name"),
    Case("ref-name-too-long", _ref("a" * 513), r"'a{60}'\.\.\. is not a valid ref name"),
    Case(
        "ref-name-bad-in-another-entry",
        _index_hook(_bad_second_ref),
        r"manifests\[1\]\.annotations",
    ),
    Case("platform-escape-sequence", _two_platforms("\x1b[2Jamd64"), "not an os, architecture"),
]


# --- archives ----------------------------------------------------------------------------------


def _archive(*extra: Member, **kw: Any) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        w = _simple(d / "src")
        return archive_of(w.path, d / "image.tar", extra=extra, **kw)

    return build


def _archive_blob_content_mismatch(d: Path) -> Path:
    return _archive(reg(f"blobs/sha256/{HEX}", b"not what the name says"))(d)


def _archive_duplicate_blob(d: Path) -> Path:
    w = _simple(d / "src")
    digest = w.layer_digests[0]
    return archive_of(
        w.path, d / "image.tar", extra=[reg(f"blobs/sha256/{digest[7:]}", w.layer_blobs[0])]
    )


def _archive_raw(data: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        d.mkdir(parents=True)
        (d / "image.tar").write_bytes(data)
        return d / "image.tar"

    return build


def _archive_smuggled_index(d: Path) -> Path:
    """A directory member whose "data" is an index.json member: tarfile would read it."""
    w = _simple(d / "src")
    index = reg("index.json", (w.path / "index.json").read_bytes())
    header = index[0].tobuf(tarfile.GNU_FORMAT)
    data = index[1] or b""
    payload = header + data + b"\0" * (-len(data) % 512)
    carrier, _ = dir_("blobs")
    carrier.size = len(payload)
    members: list[Member] = [(carrier, payload), dir_("blobs/sha256")]
    for path in sorted((w.path / "blobs" / "sha256").iterdir()):
        members.append(reg(f"blobs/sha256/{path.name}", path.read_bytes()))
    members.append(reg("oci-layout", (w.path / "oci-layout").read_bytes()))
    (d / "image.tar").write_bytes(tar_of(*members, fmt=tarfile.GNU_FORMAT))
    return d / "image.tar"


ARCHIVE_CASES = [
    Case("archive-traversal", _archive(reg("../../graven-evil-arc", b"pwn")), r"'\.\.' component"),
    Case(
        "archive-blob-path-traversal",
        _archive(reg("blobs/sha256/../../../../../../tmp/graven-evil-blob", b"pwn")),
        r"'\.\.' component",
    ),
    Case("archive-absolute", _archive(reg("/tmp/graven-evil-abs2", b"pwn")), "absolute path"),
    Case("archive-short-blob-name", _archive(reg("blobs/sha256/abc", b"x")), "unexpected entry"),
    Case(
        "archive-other-algorithm",
        _archive(reg("blobs/sha512/" + "ab" * 64, b"x")),
        "unexpected entry",
    ),
    Case(
        "archive-uppercase-hex",
        _archive(reg("blobs/sha256/" + "AB" * 32, b"x")),
        "unexpected entry",
    ),
    Case("archive-unexpected-file", _archive(reg("etc/passwd", b"x")), "unexpected entry"),
    Case("archive-unexpected-dir", _archive(dir_("etc")), "unexpected directory"),
    Case(
        "archive-symlink", _archive(sym(f"blobs/sha256/{HEX}", "/etc/passwd")), "only regular files"
    ),
    Case("archive-hardlink", _archive(link("evil", "/etc/passwd")), "only regular files"),
    Case("archive-device", _archive(dev("blobs/null")), "only regular files"),
    Case(
        "archive-blob-content-mismatch", _archive_blob_content_mismatch, "holds content with digest"
    ),
    Case("archive-duplicate-blob", _archive_duplicate_blob, "second entry"),
    Case(
        "archive-oversized-index",
        _archive_raw(tar_of(reg("index.json", b" " * (MAX_MANIFEST_BYTES + 1)))),
        "larger than",
    ),
    Case(
        "archive-not-a-tar",
        _archive_raw(b"PK\x03\x04 this is a zip" * 50),
        "not a valid OCI archive",
    ),
    Case("archive-empty", _archive_raw(b""), "tar stream is empty"),
    Case(
        "archive-without-index",
        _archive_raw(tar_of(reg("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'))),
        "index.json is missing",
    ),
    Case(
        "archive-non-utf8",
        _archive_raw(tar_of(reg("bad\udcff"), fmt=tarfile.GNU_FORMAT)),
        "not valid UTF-8",
    ),
    Case(
        "archive-too-big",
        _archive(reg(f"blobs/sha256/{HEX}", bytes(200_000))),
        "larger than 100000 bytes",
        ImportPolicy(max_archive_bytes=100_000),
    ),
    Case("archive-truncated", lambda d: _truncate(_archive()(d)), r"truncated|end-of-archive"),
    Case(
        "archive-directory-with-data-smuggles-index",
        _archive_smuggled_index,
        "a dir that declares .* bytes of data",
    ),
    Case(
        "archive-pax-uid-not-a-number",
        _archive(pax("oci-layout", b"{}", path=f"blobs/sha256/{HEX}", uid="root")),
        r"uid='root'",
    ),
    Case(
        "archive-global-pax-path",
        _archive_raw(
            tar_of(
                raw_header(tarfile.XGLTYPE, pax_records(path="index.json"), "pax_global_header"),
                reg("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                fmt=tarfile.GNU_FORMAT,
            )
        ),
        "global pax header sets 'path'",
    ),
    Case(
        "archive-truncated-inside-a-blob",
        lambda d: _truncate(_archive(reg(f"blobs/sha256/{sha(BLOB)[7:]}", BLOB))(d), 1024 + 100),
        r"member 'blobs/sha256/\w+': its data is truncated",
    ),
]


def _truncate(path: Path, cut: int = 3000) -> Path:
    path.write_bytes(path.read_bytes()[:-cut])
    return path


def _cases() -> Iterator[Any]:
    for case in LAYER_CASES + POLICY_CASES:
        yield pytest.param(case, id=f"{case.id}[layout]")
        archived_case = Case(case.id, archived(case.build), case.match, case.policy, case.ref)
        yield pytest.param(archived_case, id=f"{case.id}[archive]")
    for case in ANNOTATION_CASES:
        yield pytest.param(case, id=case.id)
    for case in DOCUMENT_CASES:
        if isinstance(case, Case):
            yield pytest.param(case, id=case.id)
        else:
            yield pytest.param(*case.values, id=case.values[0].id, marks=case.marks)
    for case in ARCHIVE_CASES:
        yield pytest.param(case, id=case.id)


def _evil() -> set[str]:
    return {p.name for p in EVIL.iterdir() if p.name.startswith("graven-evil")}


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp tree with sentinels around where the store goes (``state/store``)."""
    for sentinel in ("sentinel-a/inner", "state/sentinel-b", "cwd"):
        (tmp_path / sentinel).mkdir(parents=True)
        (tmp_path / sentinel / "keep.txt").write_text("untouched")
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


@pytest.mark.parametrize("case", list(_cases()))
def test_hostile_input_is_refused_and_nothing_is_written(sandbox: Path, case: Case) -> None:
    source = case.build(sandbox / "build")
    store_root = sandbox / "state" / "store"
    store = ContentStore(store_root)
    evil_before = _evil()
    before = tree_listing(sandbox, skip=store_root)

    with pytest.raises(UsageError) as info:
        import_layout(store, source, case.ref, name="victim", policy=case.policy)

    message = info.value.message
    assert re.search(case.match, message), message
    # Whatever the source holds, what reaches a terminal has no control characters.
    assert not re.search(r"[\x00-\x1f\x7f]", message + (info.value.hint or "")), message
    assert info.value.exit_code == 2
    assert info.value.hint
    if isinstance(info.value, ImportRejected) and info.value.member is not None:
        assert repr(info.value.member) in message
    assert tree_listing(sandbox, skip=store_root) == before
    assert _evil() == evil_before
    assert list(store.tmp_dir.iterdir()) == []  # spools and temp files are gone
    assert store.list_images() == []
    assert list((store_root / "refs").iterdir()) == []


def test_at_least_25_distinct_cases() -> None:
    ids = {c.id for c in LAYER_CASES} | {c.id for c in ARCHIVE_CASES}
    ids |= {(c if isinstance(c, Case) else c.values[0]).id for c in DOCUMENT_CASES}
    assert len(ids) >= 25


# --- hazards neutralized: imported, and the tree is what the policy says ----------------------


def _flat(store: ContentStore, tree: Digest, prefix: str = "") -> dict[str, str]:
    """Every path of ``tree``: "dir", "file <content>" (with "+x" when executable) or
    "-> <target>"."""
    out: dict[str, str] = {}
    for e in store.read_tree(tree).entries:
        path = f"{prefix}/{e.name}"
        if e.type == "dir":
            assert e.digest is not None
            out[path] = "dir"
            out |= _flat(store, e.digest, path)
        elif e.type == "symlink":
            out[path] = f"-> {e.target}"
        else:
            assert e.digest is not None
            exe = "+x " if e.mode & 0o111 else ""
            out[path] = f"file {exe}{store.read_blob(e.digest).decode()}"
    return out


def _owned(name: str, **fields: int) -> Member:
    info, data = reg(name, b"o")
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


@dataclass(frozen=True)
class Neutral:
    id: str
    layers: list[bytes]
    tree: dict[str, str]
    policy: ImportPolicy = field(default_factory=ImportPolicy)


PASSWD = tar_of(dir_("etc"), reg("etc/passwd", b"root"), reg("etc/shadow", b"hash"))

NEUTRALIZED = [
    # A whiteout below a symlink of this same layer is about the directory the layer
    # replaced (umoci writes that): it deletes nothing through the link.
    Neutral(
        "whiteout-below-symlink-of-this-layer-deletes-nothing-through-it",
        [PASSWD, tar_of(sym("x", "etc"), reg("x/.wh.passwd"))],
        {"/etc": "dir", "/etc/passwd": "file root", "/etc/shadow": "file hash", "/x": "-> etc"},
    ),
    Neutral(
        "whiteout-before-the-symlink-of-this-layer",
        [PASSWD, tar_of(reg("x/.wh.shadow"), sym("x", "/etc"))],
        {"/etc": "dir", "/etc/passwd": "file root", "/etc/shadow": "file hash", "/x": "-> /etc"},
    ),
    Neutral(
        "whiteout-below-a-file-of-this-layer",
        [PASSWD, tar_of(reg("f", b"new"), reg("f/.wh.passwd"))],
        {"/etc": "dir", "/etc/passwd": "file root", "/etc/shadow": "file hash", "/f": "file new"},
    ),
    Neutral(
        "opaque-whiteout-after-this-layer-replaces-a-symlink-with-a-directory",
        [
            tar_of(dir_("etc"), reg("etc/a", b"a"), sym("lnk", "etc")),
            tar_of(dir_("lnk"), reg("lnk/.wh..wh..opq")),
        ],
        {"/etc": "dir", "/etc/a": "file a", "/lnk": "dir"},
    ),
    # AUFS metadata (the reserved .wh..wh. prefix) is skipped: it whites out nothing.
    Neutral(
        "aufs-metadata-whites-out-nothing",
        [tar_of(reg("foo", b"kept")), tar_of(reg(".wh..wh.foo"), reg(".wh..wh..wh.foo"))],
        {"/foo": "file kept"},
    ),
    # Hardlinks become copies of what they name: a hardlink to a symlink is that symlink
    # (never the file it points to), however many links lead to it.
    Neutral(
        "hardlink-to-hardlink-to-symlink-outside-stays-a-symlink",
        [tar_of(sym("s", "/etc/passwd"), link("h1", "s"), link("h2", "h1"))],
        {"/s": "-> /etc/passwd", "/h1": "-> /etc/passwd", "/h2": "-> /etc/passwd"},
    ),
    Neutral(
        "hardlink-to-symlink-to-parent-stays-a-symlink",
        [tar_of(sym("up", "../../.."), link("h", "up"))],
        {"/up": "-> ../../..", "/h": "-> ../../.."},
    ),
    # ... and may name an entry of a lower layer (as Docker and containerd allow).
    Neutral(
        "hardlink-to-a-lower-layer-file",
        [tar_of(reg("bin/tool", b"T", 0o755)), tar_of(link("bin/alias", "bin/tool"))],
        {"/bin": "dir", "/bin/tool": "file +x T", "/bin/alias": "file +x T"},
    ),
    # Owners and times are not recorded: any value in range imports, and is dropped.
    Neutral(
        "owners-and-times-in-range-are-dropped",
        [
            tar_of(
                pax("a", b"1", uid=str(2**32 - 2), gid="0", mtime="-86400.5"),
                pax("b", b"2", mtime="9" * 20, atime="0", ctime="1700000000.123456789"),
                _owned("c", uid=2**31, gid=65534, mtime=-1),
                fmt=tarfile.PAX_FORMAT,
            )
        ],
        {"/a": "file 1", "/b": "file 2", "/c": "file o"},
    ),
    Neutral(
        "file-type-bits-in-the-mode-are-ignored",
        [
            tar_of(
                patched(reg("run", b"r"), 100, b"0100755\x00"),
                patched(dir_("d"), 100, b"0040755\x00"),
            )
        ],
        {"/run": "file +x r", "/d": "dir"},
    ),
    Neutral(
        "capabilities-are-dropped-when-allowed",
        [
            tar_of(
                pax("ping", b"p", **{CAPABILITY: "x"}),
                pax("ls", b"l", **{"SCHILY.xattr.user.a": "b"}),
            )
        ],
        {"/ping": "file p", "/ls": "file l"},
        ImportPolicy(allow_setuid=True),
    ),
    Neutral(
        "other-extended-attributes-are-dropped",
        [tar_of(pax("ls", b"l", **{"SCHILY.xattr.user.a": "b", "SCHILY.acl.access": "x"}))],
        {"/ls": "file l"},
    ),
    Neutral(
        "git-archive-global-comment-is-fine",
        [
            tar_of(
                raw_header(tarfile.XGLTYPE, pax_records(comment="0" * 40), "pax_global_header"),
                reg("a", b"a"),
                fmt=tarfile.GNU_FORMAT,
            )
        ],
        {"/a": "file a"},
    ),
]


@pytest.mark.parametrize("case", NEUTRALIZED, ids=[c.id for c in NEUTRALIZED])
def test_neutralized_hazards_give_the_tree_the_policy_says(sandbox: Path, case: Neutral) -> None:
    source = write_layout(sandbox / "build" / "layout", case.layers).path
    store_root = sandbox / "state" / "store"
    store = ContentStore(store_root)
    evil_before = _evil()
    before = tree_listing(sandbox, skip=store_root)

    image = import_layout(store, source, name="victim", policy=case.policy)

    assert _flat(store, image.rootfs) == case.tree
    assert tree_listing(sandbox, skip=store_root) == before
    assert _evil() == evil_before
    assert list(store.tmp_dir.iterdir()) == []


def test_annotations_never_name_anything(sandbox: Path) -> None:
    """Annotations other than the ref name are not read at all: hostile values import,
    and the only name recorded is the one given."""
    hostile = {
        "io.containerd.image.name": "../../../../tmp/graven-evil-ann\n\x00",
        "org.opencontainers.image.title": "/" * 5000,
        "x\x1b[2J": "..",
    }

    def index(doc: dict[str, Any]) -> None:
        doc["manifests"][0]["annotations"] |= hostile

    def manifest(doc: dict[str, Any]) -> None:
        doc["annotations"] = hostile
        doc["layers"][0]["annotations"] = hostile

    source = write_layout(
        sandbox / "build" / "layout",
        [tar_of(reg("a", b"a"))],
        index_hook=index,
        manifest_hook=manifest,
    ).path
    store_root = sandbox / "state" / "store"
    store = ContentStore(store_root)
    before = tree_listing(sandbox, skip=store_root)
    evil_before = _evil()

    image = import_layout(store, source, "latest", name="victim")

    assert _flat(store, image.rootfs) == {"/a": "file a"}
    assert sorted(p.name for p in (store_root / "refs").iterdir()) == ["victim", "victim.history"]
    assert tree_listing(sandbox, skip=store_root) == before
    assert _evil() == evil_before


# --- the registry path: streams that lie --------------------------------------------------------


def _streamed(
    written: Written | None, tamper: Callable[[bytes], bytes]
) -> Callable[[Descriptor], Any]:
    @contextmanager
    def open_blob(desc: Descriptor) -> Iterator[BinaryIO]:
        assert written is not None
        data = written.blob_path(desc.digest).read_bytes()
        if desc.digest in written.layer_digests:
            data = tamper(data)
        yield io.BytesIO(data)

    return open_blob


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda b: b[:-5], r"ends after \d+ of \d+ bytes \(truncated\)"),
        (lambda b: b[: len(b) // 2], r"truncated"),
        (lambda b: b + b"extra", "longer than the"),
        (lambda b: bytes([b[0] ^ 1]) + b[1:], r"hashes to sha256:"),
        (lambda b: b"", r"ends after 0 of"),
    ],
    ids=["truncated-tail", "truncated-half", "overlong", "flipped-byte", "empty"],
)
def test_streamed_blobs_are_checked_while_read(
    sandbox: Path, tamper: Callable[[bytes], bytes], match: str
) -> None:
    written = write_layout(sandbox / "layout", [tar_of(reg("a", os.urandom(50_000)))])
    store_root = sandbox / "state" / "store"
    store = ContentStore(store_root)
    before = tree_listing(sandbox, skip=store_root)
    with pytest.raises(ImportRejected, match=match) as info:
        import_from_manifest(
            store, written.manifest, Digest(written.manifest_digest), _streamed(written, tamper)
        )
    assert info.value.layer == written.layer_digests[0]
    assert tree_listing(sandbox, skip=store_root) == before
    assert store.list_images() == []


def test_manifest_digest_is_checked(sandbox: Path) -> None:
    written = write_layout(sandbox / "layout", [tar_of(reg("a"))])
    store = ContentStore(sandbox / "state" / "store")
    with pytest.raises(ImportRejected, match="not the expected"):
        import_from_manifest(
            store, written.manifest, Digest(sha(b"other")), _streamed(written, lambda b: b)
        )


def test_oversized_manifest_bytes_are_refused_before_parsing(sandbox: Path) -> None:
    store = ContentStore(sandbox / "state" / "store")
    huge = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ImportRejected, match="limit is"):
        import_from_manifest(store, huge, None, _streamed(None, lambda b: b))
