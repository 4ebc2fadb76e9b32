"""Recipe bases: an image starts from scratch, another spec image, a stored image by
digest, an OCI layout or (see tests/e2e/test_registry_base.py) a pinned registry image."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from graven.build import fingerprint
from graven.build.builder import BuildResult, build_image, build_order
from graven.cli.main import main
from graven.controller.paths import store_root
from graven.errors import BuildError, NotFoundError, SpecError, UsageError
from graven.model import Image, ImageConfig
from graven.spec import json_schema, load_spec
from graven.spec.models import Spec
from graven.spec.recipe import Recipe
from graven.store.cas import ContentStore
from graven.store.oci_export.documents import oci_documents
from graven.store.oci_export.layout import export_layout
from graven.store.oci_import import layouts

RUNTIME_STEPS: list[dict[str, Any]] = [
    {"copy": "lib", "to": "/opt/lib"},
    {"env": {"A": "1", "B": "2"}},
    {"workdir": "/srv"},
    {"entrypoint": ["python3", "-m", "app"]},
    {"cmd": ["--port", "8080"]},
    {"user": "1000"},
    {"expose": 8080},
    {"label": {"tier": "runtime", "team": "core"}},
]
APP_STEPS: list[dict[str, Any]] = [
    {"copy": "app", "to": "/srv/app"},
    {"env": {"B": "3", "C": "4"}},
    {"cmd": ["--port", "9090"]},
    {"expose": 9090},
    {"label": {"tier": "web"}},
]

SPEC = """\
version: 1
images:
  app:
    base: {image: runtime}
    steps:
      - copy: app
        to: /srv/app
      - env: {B: "3"}
  runtime:
    steps:
      - copy: lib
        to: /opt/lib
      - env: {A: "1", B: "2"}
      - entrypoint: python3 -m app
  tool:
    base: {image: app}
    steps:
      - copy: tool.txt
        to: /srv/tool.txt
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "util.py").write_text("X = 1\n")
    (root / "app").mkdir()
    (root / "app" / "main.py").write_text("print('hi')\n")
    (root / "tool.txt").write_text("tool\n")
    return root


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def recipe(steps: list[dict[str, Any]], base: Any = "scratch") -> Recipe:
    return Recipe.model_validate({"base": base, "steps": steps})


def read(store: ContentStore, image: Image, path: str) -> bytes:
    entry = store.lookup(image.rootfs, path)
    assert entry is not None and entry.digest is not None, path
    with store.open_blob(entry.digest) as f:
        return f.read()


def ran(result: BuildResult) -> list[int]:
    return [s.index for s in result.steps if not s.cached]


def build_runtime(project: Path, store: ContentStore) -> BuildResult:
    return build_image("runtime", recipe(RUNTIME_STEPS), project, store)


def graven(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    """The CLI in-process, as a user runs it: (exit code, stdout, stderr)."""
    argv = ["-f", str(root / "graven.yaml"), "--state-dir", str(root / ".graven"), *args]
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- spec images by name, built in dependency order -------------------------------------


def test_build_order_puts_every_base_before_the_images_on_it() -> None:
    spec = Spec.model_validate(
        {
            "images": {
                "c": {"base": {"image": "b"}, "steps": [{"env": {"X": "1"}}]},
                "a": {"steps": [{"entrypoint": "x"}]},
                "b": {"base": {"image": "a"}, "steps": [{"env": {"Y": "1"}}]},
                "d": {"steps": [{"entrypoint": "x"}]},
            }
        }
    )
    assert build_order(spec.images, ["c"]) == ["a", "b", "c"]
    assert build_order(spec.images, ["d", "b"]) == ["d", "a", "b"]
    assert build_order(spec.images) == ["a", "b", "c", "d"]


def test_build_order_refuses_a_cycle_the_loader_did_not_see() -> None:
    spec = Spec.model_validate(
        {
            "images": {
                "a": {"base": {"image": "b"}, "steps": [{"entrypoint": "x"}]},
                "b": {"base": {"image": "a"}, "steps": [{"entrypoint": "x"}]},
            }
        }
    )
    with pytest.raises(BuildError, match=r"base images form a cycle: a -> b -> a"):
        build_order(spec.images, ["a"])


def test_building_an_image_builds_its_bases_first(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "graven.yaml").write_text(SPEC)
    code, out, err = graven(capsys, project, "build", "tool")
    assert code == 0, err
    # Its bases were built first, in order; only what was asked for is reported.
    assert err.index("build runtime (a base)") < err.index("build app (a base)")
    assert err.index("build app (a base)") < err.index("build tool")
    assert "built tool" in out and "built app" not in out

    store = ContentStore(store_root(project / ".graven"))
    runtime, app, tool = (store.resolve(n) for n in ("runtime", "app", "tool"))
    assert read(store, tool, "/opt/lib/util.py") == b"X = 1\n"
    assert read(store, tool, "/srv/app/main.py") == b"print('hi')\n"
    assert read(store, tool, "/srv/tool.txt") == b"tool\n"
    assert tool.config.entrypoint == ("python3", "-m", "app")
    assert tool.config.env == (("A", "1"), ("B", "3"))
    assert tool.layers[: len(app.layers)] == app.layers
    assert app.layers[: len(runtime.layers)] == runtime.layers

    # Everything: each image once, bases first, reported in name order.
    code, out, err = graven(capsys, project, "build", "-o", "json")
    assert code == 0, err
    images = json.loads(out)["images"]
    assert [i["name"] for i in images] == ["app", "runtime", "tool"]
    assert all(i["steps_run"] == 0 for i in images)


def test_a_cycle_of_bases_is_a_spec_error_naming_its_lines(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "graven.yaml").write_text(
        textwrap.dedent(
            """\
            version: 1
            images:
              a:
                base: {image: c}
                steps: [{entrypoint: x}]
              b:
                base: {image: a}
                steps: [{entrypoint: x}]
              c:
                base:
                  image: b
                steps: [{entrypoint: x}]
              self:
                base: {image: self}
                steps: [{entrypoint: x}]
            """
        )
    )
    code, _, err = graven(capsys, project, "check")
    assert code == 2
    spec = project / "graven.yaml"
    assert (
        f"{spec}:4: images.a.base.image: base images form a cycle: a -> c -> b -> a"
        " (bases of a on line 4, c on line 11, b on line 7)"
    ) in err
    assert f"{spec}:14: images.self.base.image: image 'self' cannot be its own base" in err


def test_an_unknown_base_image_suggests_close_names(project: Path) -> None:
    spec = project / "graven.yaml"
    spec.write_text(SPEC.replace("{image: runtime}", "{image: runtim}"))
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    (problem,) = caught.value.problems
    assert (problem.line, problem.key_path) == (4, "images.app.base.image")
    assert problem.message == "unknown image 'runtim' (did you mean 'runtime'?)"

    spec.write_text(SPEC.replace("{image: runtime}", "{image: zzz}"))
    with pytest.raises(SpecError, match=r"NAME@sha256:\.\.\."):
        load_spec(spec)


@pytest.mark.parametrize(
    ("base", "key_path", "message"),
    [
        ("ubuntu", "images.app.base", "expected 'scratch', 'host-python' or a mapping with one"),
        ("image:runtime", "images.app.base", "did you mean {image: runtime}?"),
        ("{imgae: runtime}", "images.app.base", "did you mean 'image'?"),
        ("{image: runtime, layout: x}", "images.app.base", "got 'image' and 'layout'"),
        ("{image: runtime, reff: x}", "images.app.base.reff", "unknown key 'reff'"),
        ("{image: 'sha256:abc'}", "images.app.base.image", "expected sha256:<64 hex>"),
        ("{image: Runtime}", "images.app.base.image", "expected the name of an image"),
        ("{layout: /abs}", "images.app.base.layout", "expected a relative path"),
        ("{layout: ../up}", "images.app.base.layout", "must not leave the project"),
        ("{layout: missing}", "images.app.base.layout", "layout 'missing' does not exist"),
        ("{layout: lib}", "images.app.base.layout", "has no index.json"),
        (
            "{registry: 'localhost:5000/team/base:v1'}",
            "images.app.base.registry",
            "must be pinned by digest, got 'localhost:5000/team/base:v1'; pin it: graven pull",
        ),
        (
            "{registry: 'nohost/base@sha256:" + "a" * 64 + "'}",
            "images.app.base.registry",
            "invalid registry reference",
        ),
    ],
)
def test_bad_bases_are_located(project: Path, base: str, key_path: str, message: str) -> None:
    spec = project / "graven.yaml"
    spec.write_text(SPEC.replace("{image: runtime}", base))
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    (problem,) = caught.value.problems
    assert problem.key_path == key_path
    assert problem.line == 4
    assert message in problem.message


def test_a_layout_ref_stays_text(project: Path) -> None:
    (project / "vendor").mkdir()
    (project / "vendor" / "index.json").write_text("{}")
    spec = project / "graven.yaml"
    spec.write_text(SPEC.replace("{image: runtime}", "{layout: vendor, ref: 1.10}"))
    base = load_spec(spec).spec.images["app"].base
    assert (
        base
        == Recipe.model_validate(
            {"base": {"layout": "vendor", "ref": "1.10"}, "steps": [{"entrypoint": "x"}]}
        ).base
    )


def test_the_schema_offers_every_base_form() -> None:
    schema = json_schema()
    base = schema["$defs"]["Recipe"]["properties"]["base"]
    assert base["default"] == "scratch"
    refs = {b.get("$ref", b.get("const")) for b in base["oneOf"]}
    assert refs == {
        "scratch",
        "host-python",
        "#/$defs/ImageBase",
        "#/$defs/LayoutBase",
        "#/$defs/RegistryBase",
    }
    registry = schema["$defs"]["RegistryBase"]["properties"]["registry"]
    assert "@sha256:" in registry["pattern"]


# --- what a base gives: files, layers, config, cache keys ---------------------------------


def test_config_is_inherited_and_steps_override_it(project: Path, store: ContentStore) -> None:
    runtime = build_runtime(project, store).image
    # No entrypoint step: the base brings one.
    app = build_image(
        "app", recipe(APP_STEPS, {"image": "runtime"}), project, store, built={"runtime": runtime}
    ).image
    own_labels = tuple(kv for kv in app.config.labels if not kv[0].startswith("dev.graven."))
    assert replace(app.config, labels=own_labels) == ImageConfig(
        entrypoint=("python3", "-m", "app"),
        env=(("A", "1"), ("B", "3"), ("C", "4")),
        workdir="/srv",
        cmd=("--port", "9090"),
        user="1000",
        ports=(8080, 9090),
        labels=(("team", "core"), ("tier", "web")),
    )
    assert read(store, app, "/opt/lib/util.py") == b"X = 1\n"
    assert read(store, app, "/srv/app/main.py") == b"print('hi')\n"


def test_layers_are_the_bases_then_the_images_own(project: Path, store: ContentStore) -> None:
    runtime = build_runtime(project, store).image
    app = build_image(
        "app", recipe(APP_STEPS, {"image": "runtime"}), project, store, built={"runtime": runtime}
    ).image
    assert len(runtime.layers) == 1
    assert app.layers[:1] == runtime.layers
    assert len(app.layers) == 2 and app.layers[-1] == app.rootfs

    # Exported, the derived image reuses the base's layer blobs: a registry or a
    # runtime holding the base already has them.
    base_layers = [layer.digest for layer in oci_documents(store, runtime).layers]
    app_layers = [layer.digest for layer in oci_documents(store, app).layers]
    assert app_layers[: len(base_layers)] == base_layers
    assert len(app_layers) == len(base_layers) + 1


def test_a_changed_base_reruns_every_step_and_an_unchanged_one_hits_the_cache(
    project: Path, store: ContentStore
) -> None:
    app_recipe = recipe(APP_STEPS, {"image": "runtime"})
    runtime = build_runtime(project, store).image
    first = build_image("app", app_recipe, project, store, built={"runtime": runtime})
    assert ran(first) == list(range(len(APP_STEPS)))

    again = build_image("app", app_recipe, project, store, built={"runtime": runtime})
    assert ran(again) == []
    assert again.image.digest == first.image.digest

    (project / "lib" / "util.py").write_text("X = 2\n")
    changed = build_runtime(project, store).image
    assert changed.digest != runtime.digest
    rebuilt = build_image("app", app_recipe, project, store, built={"runtime": changed})
    assert ran(rebuilt) == list(range(len(APP_STEPS)))
    assert rebuilt.base == changed
    assert read(store, rebuilt.image, "/opt/lib/util.py") == b"X = 2\n"

    # Back to the first base: its results are still cached.
    (project / "lib" / "util.py").write_text("X = 1\n")
    back = build_image(
        "app", app_recipe, project, store, built={"runtime": build_runtime(project, store).image}
    )
    assert ran(back) == []
    assert back.image.digest == first.image.digest


def test_a_base_from_the_spec_must_have_been_built(project: Path, store: ContentStore) -> None:
    with pytest.raises(BuildError, match=r"images.app.base.image: image 'runtime' has not"):
        build_image("app", recipe(APP_STEPS, {"image": "runtime"}), project, store)


def test_an_image_needs_an_entrypoint_from_its_steps_or_its_base(
    project: Path, store: ContentStore
) -> None:
    runtime = build_runtime(project, store).image
    bare = store.put_image(runtime.rootfs, ImageConfig(entrypoint=()), runtime.layers)
    with pytest.raises(BuildError, match=r"images.app: the image has no entrypoint"):
        build_image("app", recipe(APP_STEPS, {"image": bare.digest}), project, store)
    # A recipe on scratch must say it itself: the spec rejects it already.
    with pytest.raises(ValueError, match="needs an 'entrypoint' step"):
        recipe(APP_STEPS)


# --- images in the store, by digest --------------------------------------------------------


def test_a_base_pinned_by_digest_comes_from_the_store(project: Path, store: ContentStore) -> None:
    runtime = build_runtime(project, store).image
    by_digest = build_image("app", recipe(APP_STEPS, {"image": runtime.digest}), project, store)
    by_name = build_image(
        "app", recipe(APP_STEPS, {"image": f"runtime@{runtime.digest}"}), project, store
    )
    assert by_digest.base is not None and by_digest.base.digest == runtime.digest
    assert by_name.image.digest == by_digest.image.digest
    assert ran(by_name) == []  # the same base image: the same keys
    assert read(store, by_digest.image, "/opt/lib/util.py") == b"X = 1\n"


def test_a_digest_the_store_lacks_is_a_clear_error(project: Path, store: ContentStore) -> None:
    runtime = build_runtime(project, store).image
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError, match=rf"images.app.base.image: no image {missing}"):
        build_image("app", recipe(APP_STEPS, {"image": missing}), project, store)
    # The name never pointed at that digest: pinned to something else than meant.
    other = "sha256:" + "1" * 64
    with pytest.raises(NotFoundError, match=r"image 'runtime' never had version"):
        build_image("app", recipe(APP_STEPS, {"image": f"runtime@{other}"}), project, store)
    assert runtime.digest != other


# --- OCI layouts ---------------------------------------------------------------------------


def export_runtime(project: Path, store: ContentStore, ref: str = "rt") -> Image:
    runtime = build_runtime(project, store).image
    export_layout(store, runtime, project / "vendor" / "runtime", ref)
    return runtime


def test_a_layout_base_is_imported_once(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_runtime(project, ContentStore(tmp_path / "other-store"))
    store = ContentStore(tmp_path / "store")
    layout_recipe = recipe(APP_STEPS, {"layout": "vendor/runtime", "ref": "rt"})
    progress: list[str] = []
    first = build_image("app", layout_recipe, project, store, on_progress=progress.append)
    assert progress[0] == "base: importing layout vendor/runtime (rt)"
    assert first.base is not None
    assert read(store, first.image, "/opt/lib/util.py") == b"X = 1\n"
    assert first.image.config.entrypoint == ("python3", "-m", "app")
    assert first.image.layers[: len(first.base.layers)] == first.base.layers

    def no_import(*args: object, **kwargs: object) -> Image:
        raise AssertionError("the layout was imported again")

    monkeypatch.setattr(layouts, "import_layout", no_import)
    progress.clear()
    second = build_image("app", layout_recipe, project, store, on_progress=progress.append)
    assert not [line for line in progress if line.startswith("base:")]
    assert ran(second) == []
    assert second.image.digest == first.image.digest


def test_a_changed_layout_is_imported_again(project: Path, tmp_path: Path) -> None:
    other = ContentStore(tmp_path / "other-store")
    export_runtime(project, other)
    store = ContentStore(tmp_path / "store")
    layout_recipe = recipe(APP_STEPS, {"layout": "vendor/runtime", "ref": "rt"})
    first = build_image("app", layout_recipe, project, store)

    (project / "lib" / "util.py").write_text("X = 2\n")
    export_runtime(project, other)  # the same ref, a new image
    second = build_image("app", layout_recipe, project, store)
    assert second.base is not None and first.base is not None
    assert second.base.digest != first.base.digest
    assert ran(second) == list(range(len(APP_STEPS)))
    assert read(store, second.image, "/opt/lib/util.py") == b"X = 2\n"


def test_a_layout_ref_may_be_left_out_when_it_holds_one_image(
    project: Path, tmp_path: Path
) -> None:
    export_runtime(project, ContentStore(tmp_path / "other-store"))
    store = ContentStore(tmp_path / "store")
    result = build_image("app", recipe(APP_STEPS, {"layout": "vendor/runtime"}), project, store)
    assert read(store, result.image, "/srv/app/main.py") == b"print('hi')\n"


def test_a_missing_layout_or_ref_is_a_clear_error(project: Path, tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    with pytest.raises(UsageError, match=r"images.app.base.layout: .*vendor/runtime does not"):
        build_image("app", recipe(APP_STEPS, {"layout": "vendor/runtime"}), project, store)
    export_runtime(project, ContentStore(tmp_path / "other-store"))
    with pytest.raises(UsageError) as caught:
        build_image(
            "app", recipe(APP_STEPS, {"layout": "vendor/runtime", "ref": "v2"}), project, store
        )
    assert caught.value.message.startswith("images.app.base.layout: import rejected:")
    assert "has no image named 'v2'" in caught.value.message
    assert "rt" in (caught.value.hint or "")


def test_a_layout_through_a_symlink_out_of_the_project_is_refused(
    project: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    runtime_store = ContentStore(tmp_path / "other-store")
    export_layout(runtime_store, build_runtime(project, runtime_store).image, outside, "rt")
    (project / "vendor").symlink_to(outside)
    store = ContentStore(tmp_path / "store")
    with pytest.raises(UsageError, match="leaves the project directory"):
        build_image("app", recipe(APP_STEPS, {"layout": "vendor"}), project, store)


# --- the no-op fast path -----------------------------------------------------------------


def test_the_fast_path_sees_changes_to_bases(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)
    (project / "graven.yaml").write_text(SPEC)

    def build_app() -> dict[str, Any]:
        code, out, err = graven(capsys, project, "build", "app", "-o", "json")
        assert code == 0, err
        image: dict[str, Any] = json.loads(out)["images"][0]
        return image

    first = build_app()
    assert build_app()["digest"] == first["digest"]
    # A file only the base copies: 'app' must be rebuilt on the new base.
    (project / "lib" / "util.py").write_text("X = 2\n")
    second = build_app()
    assert second["digest"] != first["digest"]
    assert second["steps_run"] == len(second["steps"])
