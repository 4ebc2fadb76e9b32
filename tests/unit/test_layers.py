"""Layer snapshots: diffs on Merkle trees, and content-defined splitting of big steps."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graven.model import Digest
from graven.store import layers
from graven.store.cas import ContentStore


def make_tree(store: ContentStore, root: Path, files: dict[str, bytes]) -> Digest:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return store.ingest_tree(root)


names = st.sampled_from(["a", "b", "c", "d/e", "d/f", "g/h/i", "g/j"])
file_sets = st.dictionaries(names, st.binary(max_size=8), max_size=6).filter(
    # a path cannot be both a file and a directory
    lambda d: not any(k != o and o.startswith(k + "/") for k in d for o in d)
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(old=file_sets, new=file_sets)
def test_applying_the_changes_gives_the_new_tree(
    tmp_path_factory: pytest.TempPathFactory, old: dict[str, bytes], new: dict[str, bytes]
) -> None:
    base = tmp_path_factory.mktemp("t")
    store = ContentStore(base / "store")
    a = make_tree(store, base / "old", old)
    b = make_tree(store, base / "new", new)
    assert layers.apply_changes(store, a, layers.changes(store, a, b)) == b
    assert layers.changes(store, b, b) == []


def test_small_steps_are_one_layer(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    empty = make_tree(store, tmp_path / "e", {})
    full = make_tree(store, tmp_path / "f", {"x": b"1", "y/z": b"2"})
    assert layers.split(store, empty, full) == [full]
    assert layers.split(store, full, full) == []


def test_big_steps_split_by_content_and_one_edit_touches_one_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layers, "SPLIT_ABOVE", 10_000)
    monkeypatch.setattr(layers, "MIN_CHUNK", 2_000)
    monkeypatch.setattr(layers, "MAX_CHUNK", 50_000)
    monkeypatch.setattr(layers, "CUT_EVERY", 4)
    store = ContentStore(tmp_path / "store")
    files = {f"vendor/pkg{n // 20}/mod{n}.py": bytes([n % 256]) * 300 for n in range(400)}
    empty = make_tree(store, tmp_path / "e", {})
    v1 = make_tree(store, tmp_path / "v1", files)
    files["vendor/pkg7/mod150.py"] = b"edited" * 50
    v2 = make_tree(store, tmp_path / "v2", files)

    snaps1 = layers.split(store, empty, v1)
    snaps2 = layers.split(store, empty, v2)
    assert len(snaps1) > 5
    assert snaps1[-1] == v1 and snaps2[-1] == v2

    def diffs(snaps: list[Digest]) -> list[list[layers.Change]]:
        prev, out = empty, []
        for s in snaps:
            out.append(layers.changes(store, prev, s))
            prev = s
        return out

    d1, d2 = diffs(snaps1), diffs(snaps2)
    assert len(d1) == len(d2)
    differing = [i for i, (x, y) in enumerate(zip(d1, d2, strict=True)) if x != y]
    assert len(differing) == 1, differing
    assert any(c.path == "/vendor/pkg7/mod150.py" for c in d2[differing[0]])


def test_each_file_changing_step_adds_a_layer(tmp_path: Path) -> None:
    from graven.build.builder import build_image
    from graven.spec.recipe import Recipe

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print('hi')\n")
    (tmp_path / "conf.txt").write_text("x=1\n")
    recipe = Recipe.model_validate(
        {
            "steps": [
                {"copy": "app", "to": "/app"},
                {"env": {"A": "1"}},
                {"copy": "conf.txt", "to": "/etc/conf.txt"},
                {"copy": "conf.txt", "to": "/etc/conf.txt"},  # no change: no layer
                {"entrypoint": "python3 /app/main.py"},
            ]
        }
    )
    store = ContentStore(tmp_path / ".graven" / "store")
    image = build_image("web", recipe, tmp_path, store).image
    assert len(image.layers) == 2
    assert image.layers[-1] == image.rootfs
    assert store.get_image(image.digest).layers == image.layers
    first = layers.changes(store, store.put_tree(layers.Tree()), image.layers[0])
    assert [c.path for c in first] == ["/app/main.py"]
