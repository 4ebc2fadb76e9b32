"""Property: export -> import keeps the image digest, for any small two-layer image.

Layer 2 may delete, add and retype anything of layer 1, so every whiteout and type
change the exporter writes goes through the importer. (Names starting with ``.wh.``
cannot be carried by OCI layers at all: they mean whiteouts there.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from graven.model import ImageConfig
from graven.store.cas import ContentStore
from graven.store.oci_export.layout import export_archive
from graven.store.oci_import.layouts import import_layout
from tests.property.test_tree_roundtrip import Node, files, links, write

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=12
).filter(lambda n: n not in (".", "..") and not n.startswith(".wh."))
nodes: st.SearchStrategy[Node] = st.recursive(
    st.one_of(files, links),
    lambda children: st.dictionaries(names, children, max_size=4),
    max_leaves=12,
)
trees = st.dictionaries(names, nodes, max_size=5)


@settings(max_examples=40, deadline=None)
@given(first=trees, second=trees)
def test_export_import_keeps_the_digest(first: dict[str, Node], second: dict[str, Node]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        source = ContentStore(base / "source")
        write(base / "one", first)
        write(base / "two", second)
        snapshots = (source.ingest_tree(base / "one"), source.ingest_tree(base / "two"))
        image = source.put_image(snapshots[1], ImageConfig(entrypoint=("/x",)), snapshots)
        archive = export_archive(source, image, base / "image.tar", "t").path
        fresh = ContentStore(base / "fresh")
        imported = import_layout(fresh, archive)
        assert imported.layers == image.layers
        assert imported.digest == image.digest
