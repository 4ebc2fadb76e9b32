"""A recipe based on a registry image pinned by digest, against a real registry
(docker-registry on loopback).

Proves: the base is pulled once and the image built on it; later builds find it in
the store by digest, with the registry stopped (no network on a cached build); a
tag-only reference is a spec error (exit 2); a registry that is down or sends another
manifest than the digest names fails the build clearly (exit 1); credentials are
found as for 'graven pull'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graven.store.cas import ContentStore
from graven.store.oci_types import OCI_MANIFEST
from graven.testing.cli import Result, clean_env, run_graven
from graven.testing.registry import Registry, running_registry
from tests.e2e.registry_fixture import Canned, basic_auth_registry, relay_proxy

pytestmark = pytest.mark.e2e

RUNTIME_SPEC = """\
version: 1
images:
  runtime:
    steps:
      - copy: lib
        to: /opt/lib
      - env: {PYTHONPATH: /opt/lib, MODE: base}
      - workdir: /srv
      - entrypoint: python3 -m app
"""
APP_SPEC = """\
version: 1
images:
  app:
    base: {{registry: "{reference}"}}
    steps:
      - copy: app
        to: /srv/app
      - env: {{MODE: app}}
"""


@dataclass
class Workspace:
    """Two projects: 'maker' builds and pushes the base, 'consumer' builds on it."""

    root: Path

    def project(self, name: str) -> Path:
        return self.root / name

    def state(self, name: str) -> Path:
        return self.root / f"state-{name}"

    def store(self, name: str) -> ContentStore:
        return ContentStore(self.state(name) / "store")

    def graven(
        self,
        project: str,
        *args: str,
        state: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> Result:
        return run_graven(
            args,
            cwd=self.project(project),
            env=clean_env(self.root / "home", **(env or {})),
            state_dir=self.state(state or project),
            check=check,
        )

    def push_runtime(self, registry: Registry, repository: str = "team/runtime") -> str:
        """Build the base, push it; the pinned reference 'graven push' prints."""
        self.graven("maker", "build", "runtime")
        pushed = self.graven(
            "maker", "push", "runtime", f"{registry.host}/{repository}:v1", "-o", "json"
        ).json()
        return str(pushed["reference"])

    def use_base(self, reference: str) -> None:
        (self.project("consumer") / "graven.yaml").write_text(APP_SPEC.format(reference=reference))

    def build_app(self, *args: str, state: str = "consumer") -> dict[str, Any]:
        out = self.graven("consumer", "build", "app", "-o", "json", *args, state=state).json()
        image: dict[str, Any] = out["images"][0]
        return image


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    w = Workspace(tmp_path)
    (w.root / "home").mkdir()
    (w.project("maker") / "lib").mkdir(parents=True)
    (w.project("maker") / "lib" / "util.py").write_text("X = 1\n")
    (w.project("maker") / "graven.yaml").write_text(RUNTIME_SPEC)
    (w.project("consumer") / "app").mkdir(parents=True)
    (w.project("consumer") / "app" / "main.py").write_text("print('hi')\n")
    return w


def read(store: ContentStore, image: str, path: str) -> bytes:
    entry = store.lookup(store.resolve(image).rootfs, path)
    assert entry is not None and entry.digest is not None, path
    with store.open_blob(entry.digest) as f:
        return f.read()


def test_a_pinned_registry_base_is_pulled_once_then_found_by_digest(
    ws: Workspace, tmp_path: Path
) -> None:
    with running_registry(tmp_path / "registry") as registry:
        reference = ws.push_runtime(registry)
        assert "@sha256:" in reference
        ws.use_base(reference)
        assert ws.graven("consumer", "check").code == 0

        text = ws.graven("consumer", "build", "app")
        assert f"base: pulling {reference}" in text.stderr
        first = ws.build_app()
        assert first["steps_run"] == 0  # the text build above ran them

    # The registry is gone: everything the build needs is in the store.
    store = ws.store("consumer")
    assert read(store, "app", "/opt/lib/util.py") == b"X = 1\n"
    assert read(store, "app", "/srv/app/main.py") == b"print('hi')\n"
    app = store.resolve("app")
    assert dict(app.config.env) == {"PYTHONPATH": "/opt/lib", "MODE": "app"}
    assert app.config.workdir == "/srv"
    assert app.config.entrypoint == ("python3", "-m", "app")
    runtime = ws.store("maker").resolve("runtime")
    assert app.layers[: len(runtime.layers)] == runtime.layers

    # A real build (no fast path): steps from the cache, the base from the store.
    again = ws.build_app("--no-cache")
    assert again["digest"] == first["digest"]
    (ws.project("consumer") / "app" / "main.py").write_text("print('changed')\n")
    changed = ws.build_app()
    assert changed["digest"] != first["digest"]
    assert [s["cached"] for s in changed["steps"]] == [False, False]
    assert read(store, "app", "/srv/app/main.py") == b"print('changed')\n"

    # The pulled base has a name of its own, so it cannot replace an image of the spec.
    names = [i["name"] for i in ws.graven("consumer", "images", "-o", "json").json()["images"]]
    digest_hex = reference.rpartition("@sha256:")[2]
    assert names == ["app", f"runtime-{digest_hex[:12]}"]


def test_the_base_digest_is_part_of_the_cache_key(ws: Workspace, registry: Registry) -> None:
    first_ref = ws.push_runtime(registry)
    ws.use_base(first_ref)
    first = ws.build_app()
    (ws.project("maker") / "lib" / "util.py").write_text("X = 2\n")
    second_ref = ws.push_runtime(registry)
    assert second_ref != first_ref
    ws.use_base(second_ref)
    second = ws.build_app()
    assert second["digest"] != first["digest"]
    assert second["steps_run"] == len(second["steps"])  # a new base: every step again
    assert read(ws.store("consumer"), "app", "/opt/lib/util.py") == b"X = 2\n"
    ws.use_base(first_ref)
    assert ws.build_app()["steps_run"] == 0  # the first base's results are still cached


def test_a_tag_only_reference_is_a_spec_error(ws: Workspace, registry: Registry) -> None:
    ws.push_runtime(registry)
    ws.use_base(f"{registry.host}/team/runtime:v1")
    for verb in ("check", "build"):
        result = ws.graven("consumer", verb, check=False)
        assert result.code == 2, result
        assert (
            "graven.yaml:4: images.app.base.registry: a registry base must be pinned by digest,"
            f" got '{registry.host}/team/runtime:v1'; pin it: graven pull prints the digest"
        ) in result.stderr


def test_an_unreachable_registry_fails_the_build_clearly(ws: Workspace, tmp_path: Path) -> None:
    with running_registry(tmp_path / "registry") as registry:
        reference = ws.push_runtime(registry)
    ws.use_base(reference)
    result = ws.graven("consumer", "build", "app", check=False)
    assert result.code == 1
    assert "error: images.app.base.registry: registry at" in result.stderr
    assert "is down or unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not ws.store("consumer").list_images()


def test_a_manifest_that_does_not_match_the_digest_is_refused(
    ws: Workspace, registry: Registry
) -> None:
    reference = ws.push_runtime(registry)
    digest = reference.rpartition("@")[2]
    other = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()

    def swap(method: str, path: str) -> Canned | None:
        if path.endswith(f"/manifests/{digest}"):
            return Canned(200, (("Content-Type", OCI_MANIFEST),), other)
        return None

    with relay_proxy(registry.host, swap) as proxy:
        ws.use_base(reference.replace(registry.host, proxy))
        result = ws.graven("consumer", "build", "app", check=False)
    assert result.code == 1
    assert "images.app.base.registry:" in result.stderr
    assert f"not {digest}" in result.stderr
    assert not ws.store("consumer").list_images()


def test_credentials_are_found_as_for_pull(ws: Workspace, tmp_path: Path) -> None:
    with basic_auth_registry(tmp_path / "registry", "alice", "s3cret") as registry:
        creds = {"GRAVEN_REGISTRY_USER": "alice", "GRAVEN_REGISTRY_PASSWORD": "s3cret"}
        ws.graven("maker", "build", "runtime")
        pushed = ws.graven(
            "maker",
            "push",
            "runtime",
            f"{registry.host}/team/runtime:v1",
            "-o",
            "json",
            env=creds,
        ).json()
        ws.use_base(pushed["reference"])
        anonymous = ws.graven("consumer", "build", "app", check=False)
        assert anonymous.code == 1
        assert "images.app.base.registry:" in anonymous.stderr
        built = ws.graven("consumer", "build", "app", "-o", "json", env=creds).json()
        assert built["images"][0]["name"] == "app"
