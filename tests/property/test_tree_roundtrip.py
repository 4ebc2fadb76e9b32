"""Property: ingest -> checkout -> ingest names the same tree, for any small tree."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Union

from hypothesis import given, settings
from hypothesis import strategies as st

from graven.store.cas import ContentStore

# A node is file content with its exec bit, a symlink target, or a directory.
File = tuple[bytes, bool]
Link = str
Node = Union[File, Link, "dict[str, Node]"]

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=12
).filter(lambda n: n not in (".", ".."))
files = st.tuples(st.binary(max_size=64), st.booleans())
links = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=40
)
nodes: st.SearchStrategy[Node] = st.recursive(
    st.one_of(files, links),
    lambda children: st.dictionaries(names, children, max_size=4),
    max_leaves=12,
)
trees = st.dictionaries(names, nodes, max_size=5)


def write(directory: Path, tree: dict[str, Node]) -> None:
    directory.mkdir()
    for name, node in tree.items():
        path = directory / name
        if isinstance(node, dict):
            write(path, node)
        elif isinstance(node, str):
            path.symlink_to(node)
        else:
            data, executable = node
            path.write_bytes(data)
            path.chmod(0o755 if executable else 0o644)


@settings(max_examples=50, deadline=None)
@given(tree=trees, read_only=st.booleans())
def test_ingest_checkout_ingest_is_identity(tree: dict[str, Node], read_only: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = ContentStore(Path(tmp) / "store")
        write(Path(tmp) / "src", tree)
        digest = store.ingest_tree(Path(tmp) / "src")
        dest = store.checkout(digest, Path(tmp) / "out", read_only=read_only)
        try:
            assert store.ingest_tree(dest) == digest
            assert store.fsck() == []
        finally:
            store.remove_checkout(dest)
