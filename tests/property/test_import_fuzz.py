"""Property: no layer, however odd, makes the importer fail other than by refusing it.

Random members (names full of ``..``, ``.wh.`` and symlinks, every tar type, any mode,
odd pax records)
and random damage to a valid layer (digests kept consistent, so the tar parser itself
is reached) either import or raise a UsageError; never another exception. And an
accepted image reads back as a valid image.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graven.errors import UsageError
from graven.store.cas import ContentStore
from graven.store.oci_import.layouts import import_layout
from graven.store.oci_import.policy import ImportPolicy
from tests.unit.oci_build import Member, dir_, link, reg, sym, tar_of, write_layout

components = st.sampled_from(["a", "b", "..", ".", "", ".wh.a", ".wh..wh..opq", ".wh..wh.x", "é"])
paths = st.lists(components, min_size=1, max_size=4).map("/".join)
# Pax records tarfile would reinterpret, or that no tool writes, among ordinary ones.
records = st.sampled_from(
    [
        {},
        {"uid": "abc"},
        {"uid": "4294967295"},
        {"size": "x"},
        {"mtime": "nan"},
        {"mtime": "-1.5"},
        {"GNU.sparse.name": "a"},
        {"path": "../a"},
        {"linkpath": "a/../../b"},
    ]
)
kinds = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
)


@st.composite
def members(draw: st.DrawFn) -> Member:
    info, data = draw(plain_members())
    info.pax_headers = dict(draw(records))
    return info, data


@st.composite
def plain_members(draw: st.DrawFn) -> Member:
    name, kind, target = draw(paths), draw(kinds), draw(paths)
    if kind == tarfile.REGTYPE:
        return reg(
            name, draw(st.binary(max_size=20)), draw(st.sampled_from([0o644, 0o755, 0o4755]))
        )
    if kind == tarfile.DIRTYPE:
        return dir_(name)
    if kind == tarfile.SYMTYPE:
        return sym(name, target or "x")
    if kind == tarfile.LNKTYPE:
        return link(name, target)
    info, _ = reg(name)
    info.type = kind
    return info, None


layers = st.lists(st.lists(members(), max_size=8), min_size=1, max_size=3)
ALLOW = st.sampled_from([ImportPolicy(), ImportPolicy(allow_devices=True, allow_setuid=True)])


def _import(tars: list[bytes], policy: ImportPolicy) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        written = write_layout(Path(tmp) / "layout", tars)
        store = ContentStore(Path(tmp) / "store")
        try:
            image = import_layout(store, written.path, policy=policy)
        except UsageError:
            assert store.list_images() == []
            return
        assert store.get_image(image.digest) == image
        assert list(store.tmp_dir.iterdir()) == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=layers, policy=ALLOW)
def test_random_members_import_or_are_refused(
    spec: list[list[Member]], policy: ImportPolicy
) -> None:
    _import([tar_of(*items) for items in spec], policy)


VALID = tar_of(
    dir_("a"), reg("a/f", b"hello" * 50), sym("a/l", "f"), link("a/h", "a/f"), reg("a/.wh.x")
)


@settings(max_examples=300, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=6
    ),
    cut=st.integers(0, len(VALID)),
)
def test_damaged_layers_import_or_are_refused(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID)
    for at, mask in flips:
        data[at] ^= mask
    _import([bytes(data[:cut])], ImportPolicy())
