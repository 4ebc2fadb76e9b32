"""``graven push`` / ``graven pull`` against a real registry (docker-registry on loopback).

Proves: only missing blobs travel (HEAD first; a changed file sends one layer);
cross-repository mounts; pulls into a fresh store give the same image and manifest
digests, by tag and by digest; skopeo agrees on the manifest digest; Basic and token
auth, with clear errors for wrong or missing credentials; a registry that is down,
a missing tag, and a registry that alters a blob (nothing gets tagged).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from graven.cli.output import human_size
from graven.reference import parse_reference
from graven.store.cas import ContentStore
from graven.store.oci_types import OCI_CONFIG, OCI_LAYER_GZIP
from graven.store.registry.client import RegistryClient
from graven.store.registry.errors import RegistryError, RegistryUnavailable
from graven.store.registry.transfer import pull_image, push_image
from graven.testing.cli import Result, clean_env, run_graven
from graven.testing.net import free_port
from graven.testing.registry import Registry
from tests.e2e.registry_fixture import (
    BLOB_PATH,
    Canned,
    basic_auth_registry,
    relay_proxy,
    tampering_proxy,
    token_auth_registry,
)

pytestmark = pytest.mark.e2e

SPEC = """\
version: 1
images:
  web:
    steps:
      - copy: app
        to: /app
      - copy: data
        to: /data
      - copy: assets
        to: /assets
      - entrypoint: python3 /app/main.py
"""
DATA_SIZE = 200_000
ASSETS_SIZE = 1_000_000


@dataclass
class Workspace:
    """A project to build from, and state dirs (stores) to push from and pull into."""

    root: Path

    @property
    def project(self) -> Path:
        return self.root / "project"

    def state(self, name: str = "main") -> Path:
        return self.root / f"state-{name}"

    def graven(
        self,
        *args: str,
        state: str = "main",
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> Result:
        return run_graven(
            args,
            cwd=self.project,
            env=clean_env(self.root / "home", **(env or {})),
            state_dir=self.state(state),
            stdin=stdin,
            check=check,
        )

    def build(self) -> str:
        out = self.graven("build", "web", "-o", "json").json()
        return str(out["images"][0]["digest"])

    def images(self, state: str) -> list[dict[str, Any]]:
        return list(self.graven("images", "-o", "json", state=state).json()["images"])


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    w = Workspace(tmp_path)
    (w.root / "home").mkdir()
    (w.project / "app").mkdir(parents=True)
    (w.project / "data").mkdir()
    (w.project / "assets").mkdir()
    (w.project / "graven.yaml").write_text(SPEC)
    (w.project / "app" / "main.py").write_text("print('hello from the registry test')\n")
    # Random bytes: gzip cannot shrink them, so blob sizes track file sizes.
    (w.project / "data" / "data.bin").write_bytes(os.urandom(DATA_SIZE))
    (w.project / "assets" / "big.bin").write_bytes(os.urandom(ASSETS_SIZE))
    return w


def skopeo_digest(reference: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--no-tags", "--tls-verify=false", f"docker://{reference}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return str(json.loads(out)["Digest"])


def by_action(result: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [b for b in result["blobs"] if b["action"] == action]


# --- push: only what is missing travels --------------------------------------------------


def test_push_sends_each_blob_once_and_skopeo_agrees(ws: Workspace, registry: Registry) -> None:
    image = ws.build()
    ref = f"{registry.host}/team/web:v1"
    first = ws.graven("push", "web", ref, "-o", "json").json()
    assert first["image"] == image
    assert first["reference"] == f"{ref}@{first['manifest_digest']}"
    assert first["uploaded"] == 4 and first["skipped"] == 0  # 3 layers + the config
    assert first["bytes_sent"] == sum(b["size"] for b in first["blobs"])
    assert first["bytes_sent"] > DATA_SIZE + ASSETS_SIZE
    assert skopeo_digest(ref) == first["manifest_digest"]
    # Another client copies it whole, checking every blob's digest on the way.
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{ws.root / 'copy'}:web",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )

    # HEAD before upload: the second push sends no blob bytes at all.
    again = ws.graven("push", "web", ref, "-o", "json").json()
    assert again["manifest_digest"] == first["manifest_digest"]
    assert again["bytes_sent"] == 0
    assert again["skipped"] == 4 and again["uploaded"] == 0

    # Human output: one line per blob on stderr, a summary on stdout.
    text = ws.graven("push", "web", ref)
    assert text.stderr.count("skipped") == 4
    assert "pushed" in text.stdout and "0 B sent" in text.stdout


def test_push_and_pull_json_keys_scripts_read(ws: Workspace, registry: Registry) -> None:
    """The keys of push's and pull's JSON, pinned: scripts read them."""
    ws.build()
    ref = f"{registry.host}/keys/web:v1"
    pushed = ws.graven("push", "web", ref, "-o", "json").json()
    assert pushed.keys() == {
        "name",
        "reference",
        "pinned",
        "image",
        "manifest_digest",
        "media_type",
        "bytes_sent",
        "uploaded",
        "skipped",
        "mounted",
        "blobs",
    }
    assert pushed["name"] == "web"
    assert pushed["pinned"] == f"{registry.host}/keys/web@{pushed['manifest_digest']}"
    assert {
        b.keys() == {"digest", "media_type", "size", "action", "bytes"} for b in pushed["blobs"]
    } == {True}
    pulled = ws.graven("pull", ref, "-o", "json", state="fresh").json()
    assert pulled.keys() == {
        "reference",
        "name",
        "image",
        "manifest_digest",
        "bytes_received",
        "blobs",
    }
    assert {b["action"] for b in pulled["blobs"]} == {"downloaded"}
    text = ws.graven("pull", ref, "--name", "again", state="text")
    assert text.stdout == (
        f"pulled {pulled['reference']} as again  image {pulled['image']}  "
        f"({human_size(pulled['bytes_received'])} received)\n"
    )


def test_a_changed_file_sends_only_its_layer(ws: Workspace, registry: Registry) -> None:
    ws.build()
    ref = f"{registry.host}/web:v1"
    first = ws.graven("push", "web", ref, "-o", "json").json()
    (ws.project / "data" / "data.bin").write_bytes(os.urandom(DATA_SIZE))
    ws.build()
    second = ws.graven("push", "web", f"{registry.host}/web:v2", "-o", "json").json()

    uploaded = by_action(second, "uploaded")
    # The changed layer and the new config, only.
    assert sorted(b["media_type"] for b in uploaded) == sorted([OCI_CONFIG, OCI_LAYER_GZIP])
    layer = next(b for b in uploaded if b["media_type"] == OCI_LAYER_GZIP)
    config = next(b for b in uploaded if b["media_type"] == OCI_CONFIG)
    assert second["bytes_sent"] == layer["size"] + config["size"]
    assert DATA_SIZE <= layer["size"] < DATA_SIZE * 1.1
    assert second["bytes_sent"] < first["bytes_sent"] / 4
    assert second["skipped"] == 2
    assert skopeo_digest(f"{registry.host}/web:v2") == second["manifest_digest"]


# --- pull ----------------------------------------------------------------------------------


def test_pull_into_a_fresh_store_by_tag_and_by_digest(ws: Workspace, registry: Registry) -> None:
    image = ws.build()
    ref = f"{registry.host}/team/web:v1"
    pushed = ws.graven("push", "web", ref, "-o", "json").json()

    pulled = ws.graven("pull", ref, "-o", "json", state="fresh").json()
    assert pulled["image"] == image
    assert pulled["manifest_digest"] == pushed["manifest_digest"]
    assert pulled["name"] == "web"
    assert pulled["bytes_received"] == pushed["bytes_sent"]
    assert [i["digest"] for i in ws.images("fresh")] == [image]

    pinned = f"{registry.host}/team/web@{pushed['manifest_digest']}"
    by_digest = ws.graven("pull", pinned, "--name", "pinned", "-o", "json", state="other").json()
    assert by_digest["image"] == image
    assert by_digest["manifest_digest"] == pushed["manifest_digest"]
    assert {i["name"]: i["digest"] for i in ws.images("other")} == {"pinned": image}

    # The pulled image is a real image: it pushes back to the same manifest digest.
    back = ws.graven("push", "pinned", f"{registry.host}/copy:v1", "-o", "json", state="other")
    assert back.json()["manifest_digest"] == pushed["manifest_digest"]


def test_chunked_upload_streams_large_blobs(
    tmp_path: Path, ws: Workspace, registry: Registry
) -> None:
    ws.build()
    store = ContentStore(ws.state() / "store")
    image = store.resolve("web")
    ref = parse_reference(f"{registry.host}/chunked:v1")
    # Every blob above 64 KiB goes in 100 kB PATCH chunks (the 1 MB layer: 10 chunks).
    with RegistryClient(ref.registry, monolithic_max=65_536, chunk_size=100_000) as client:
        pushed = push_image(store, image, ref, client)
    assert pushed.count("uploaded") == 4
    assert skopeo_digest(str(ref)) == pushed.manifest_digest

    fresh = ContentStore(tmp_path / "fresh-store")
    with RegistryClient(ref.registry) as client:
        pulled = pull_image(fresh, ref, client, name="chunky")
    assert pulled.image == image.digest
    assert fresh.resolve("chunky").digest == image.digest


def test_push_by_digest(ws: Workspace, registry: Registry) -> None:
    ws.build()
    digest = ws.graven("push", "web", f"{registry.host}/web:v1", "-o", "json").json()[
        "manifest_digest"
    ]
    pinned = f"{registry.host}/pinned@{digest}"
    pushed = ws.graven("push", "web", pinned, "-o", "json").json()
    assert pushed["reference"] == pinned and pushed["manifest_digest"] == digest
    assert skopeo_digest(pinned) == digest


def test_cross_repository_mount(ws: Workspace, registry: Registry) -> None:
    ws.build()
    first = ws.graven("push", "web", f"{registry.host}/team-a/web:v1", "-o", "json").json()
    second = ws.graven("push", "web", f"{registry.host}/team-b/web:v1", "-o", "json").json()
    assert second["mounted"] == 4 and second["uploaded"] == 0
    assert second["bytes_sent"] == 0
    assert {b["source"] for b in by_action(second, "mounted")} == {"team-a/web"}
    assert second["manifest_digest"] == first["manifest_digest"]
    # The registry really holds it there: another client reads it back.
    assert skopeo_digest(f"{registry.host}/team-b/web:v1") == first["manifest_digest"]
    pulled = ws.graven("pull", f"{registry.host}/team-b/web:v1", "-o", "json", state="b")
    assert pulled.json()["manifest_digest"] == first["manifest_digest"]


# --- auth ----------------------------------------------------------------------------------


def test_basic_auth(tmp_path: Path, ws: Workspace) -> None:
    image = ws.build()
    with basic_auth_registry(tmp_path / "basic", "alice", "s3cret-pw") as reg:
        ref = f"{reg.host}/web:v1"
        ok = ws.graven(
            "push", "web", ref, "-u", "alice", "--password-stdin", "-o", "json", stdin="s3cret-pw\n"
        )
        assert ok.json()["uploaded"] == 4

        wrong = ws.graven(
            "push", "web", ref, "-u", "alice", "--password-stdin", stdin="nope\n", check=False
        )
        assert wrong.code == 1
        assert "rejected the credentials of user 'alice'" in wrong.stderr
        assert "hint:" in wrong.stderr and "Traceback" not in wrong.stderr

        anonymous = ws.graven("pull", ref, "-o", "json", state="anon", check=False)
        assert anonymous.code == 1
        error = anonymous.json()
        assert error["error"] == "RegistryAuthError"
        assert "needs credentials" in error["message"]
        assert "--username" in error["hint"] and error["status"] == 401

        env = {"GRAVEN_REGISTRY_USER": "alice", "GRAVEN_REGISTRY_PASSWORD": "s3cret-pw"}
        pulled = ws.graven("pull", ref, "-o", "json", state="env", env=env).json()
        assert pulled["image"] == image


def test_docker_config_credentials(tmp_path: Path, ws: Workspace) -> None:
    import base64

    ws.build()
    with basic_auth_registry(tmp_path / "basic", "bob", "pw-from-docker") as reg:
        config = ws.root / "home" / ".docker" / "config.json"
        config.parent.mkdir(parents=True)
        auth = base64.b64encode(b"bob:pw-from-docker").decode()
        config.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        pushed = ws.graven("push", "web", f"{reg.host}/web:v1", "-o", "json").json()
        assert pushed["uploaded"] == 4


def test_token_auth(tmp_path: Path, ws: Workspace) -> None:
    image = ws.build()
    with token_auth_registry(tmp_path / "token", "carol", "tok-pw") as reg:
        ref = f"{reg.host}/team/web:v1"
        env = {"GRAVEN_REGISTRY_USER": "carol", "GRAVEN_REGISTRY_PASSWORD": "tok-pw"}
        pushed = ws.graven("push", "web", ref, "-o", "json", env=env).json()
        assert pushed["uploaded"] == 4
        issued = reg.extra["issuer"].issued
        assert issued and all(t["subject"] == "carol" for t in issued)
        # A token is fetched per scope and reused: far fewer tokens than requests.
        assert len(issued) <= 3

        again = ws.graven("push", "web", f"{reg.host}/team/web2:v1", "-o", "json", env=env)
        assert again.json()["mounted"] == 4  # the mount scope covers both repositories

        pulled = ws.graven("pull", ref, "-o", "json", state="fresh", env=env).json()
        assert pulled["image"] == image
        assert pulled["manifest_digest"] == pushed["manifest_digest"]

        wrong = {"GRAVEN_REGISTRY_USER": "carol", "GRAVEN_REGISTRY_PASSWORD": "bad"}
        refused = ws.graven("pull", ref, state="w", env=wrong, check=False)
        assert refused.code == 1
        assert "rejected the credentials of user 'carol'" in refused.stderr
        assert reg.extra["realm"].rsplit("/", 1)[0] in refused.stderr

        anonymous = ws.graven("pull", ref, state="anon", check=False)
        assert anonymous.code == 1
        assert "needs credentials to pull from repository 'team/web'" in anonymous.stderr

        # Authenticated, but the token grants no push there: a denial, not bad credentials.
        denied = ws.graven("push", "web", f"{reg.host}/readonly/web:v1", env=env, check=False)
        assert denied.code == 1
        assert "denies user 'carol' access to push to repository 'readonly/web'" in denied.stderr


# --- failures ------------------------------------------------------------------------------


def test_registry_down(ws: Workspace) -> None:
    ws.build()
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    down = ws.graven("push", "web", f"{host}/web:v1", check=False)
    assert down.code == 1
    assert f"registry at {host} is down or unreachable: connection refused" in down.stderr
    assert "Traceback" not in down.stderr
    as_json = ws.graven("pull", f"{host}/web:v1", "-o", "json", state="x", check=False)
    assert as_json.code == 1
    assert as_json.json()["error"] == "RegistryUnavailable"


def test_missing_tag_and_repository(ws: Workspace, registry: Registry) -> None:
    ws.build()
    ws.graven("push", "web", f"{registry.host}/web:v1")
    missing = ws.graven("pull", f"{registry.host}/web:nope", "-o", "json", check=False)
    assert missing.code == 1
    error = missing.json()
    assert error["error"] == "RegistryNotFound" and error["status"] == 404
    assert "tag 'nope' in repository 'web' not found" in error["message"]

    no_repo = ws.graven("pull", f"{registry.host}/nothing/here:v1", check=False)
    assert no_repo.code == 1
    assert "not found" in no_repo.stderr and "nothing/here" in no_repo.stderr


def test_bad_reference_is_a_usage_error(ws: Workspace) -> None:
    ws.build()
    bad = ws.graven("push", "web", "team/web:v1", check=False)
    assert bad.code == 2
    assert "must start with the registry host" in bad.stderr


def test_a_tampered_blob_is_rejected_and_nothing_is_tagged(
    ws: Workspace, registry: Registry
) -> None:
    ws.build()
    pushed = ws.graven("push", "web", f"{registry.host}/web:v1", "-o", "json").json()
    with tampering_proxy(registry.host) as (proxy, flipped):
        for ref in (f"{proxy}/web:v1", f"{proxy}/web@{pushed['manifest_digest']}"):
            result = ws.graven("pull", ref, "-o", "json", state="victim", check=False)
            assert result.code != 0, result.stdout
            error = result.json()
            assert "Traceback" not in result.stderr
            assert "sha256" in error["message"] or "digest" in error["message"]
        assert flipped, "the proxy altered no blob"
    assert ws.images("victim") == []
    # The honest registry still serves the image.
    ok = ws.graven("pull", f"{registry.host}/web:v1", "-o", "json", state="victim").json()
    assert ok["manifest_digest"] == pushed["manifest_digest"]


# --- transport faults: retries, registry errors, redirects ------------------------------------

ERROR_JSON = b'{"errors":[{"code":"UNKNOWN","message":"disk full on the registry"}]}'


def _built(ws: Workspace) -> tuple[ContentStore, Any]:
    ws.build()
    store = ContentStore(ws.state() / "store")
    return store, store.resolve("web")


def test_transient_failures_are_retried(tmp_path: Path, ws: Workspace, registry: Registry) -> None:
    store, image = _built(ws)
    seen: dict[str, int] = {}

    def flaky(method: str, path: str) -> Canned | str | None:
        kind = (
            "upload-put"
            if method == "PUT" and "/blobs/uploads/" in path
            else f"{method} {'manifest' if '/manifests/' in path else 'blob'}"
        )
        seen[kind] = seen.get(kind, 0) + 1
        first = seen[kind] == 1
        if kind == "HEAD blob" and seen[kind] <= 2:
            return Canned(503, (("Content-Type", "application/json"),), ERROR_JSON)
        if kind == "upload-put" and first:
            return Canned(500, (("Content-Type", "application/json"),), ERROR_JSON)
        if kind == "PUT manifest" and first:
            return Canned(502)
        if kind == "GET blob" and first:
            return Canned(drop=True)  # connection closed without a reply
        return None

    sleeps: list[float] = []
    with relay_proxy(registry.host, hook=flaky) as proxy:
        ref = parse_reference(f"{proxy}/web:v1")
        with RegistryClient(proxy, sleep=sleeps.append) as client:
            pushed = push_image(store, image, ref, client)
            fresh = ContentStore(tmp_path / "fresh")
            pulled = pull_image(fresh, ref, client)
    assert pushed.count("uploaded") == 4
    assert pulled.image == image.digest
    # Backoff for the two HEADs, the restarted upload and the manifest PUT; the dropped
    # GET came on a kept-alive connection, which is retried at once on a fresh one.
    assert sleeps == [0.25, 0.5, 0.25, 0.25]
    assert seen["GET blob"] >= 3  # config, layers, and the retried one
    assert skopeo_digest(f"{registry.host}/web:v1") == pushed.manifest_digest


def test_a_failing_registry_says_what_it_said(ws: Workspace, registry: Registry) -> None:
    store, image = _built(ws)
    attempts: list[str] = []

    def broken_manifests(method: str, path: str) -> Canned | None:
        if method == "PUT" and "/manifests/" in path:
            attempts.append(path)
            return Canned(500, (("Content-Type", "application/json"),), ERROR_JSON)
        return None

    sleeps: list[float] = []
    with (
        relay_proxy(registry.host, hook=broken_manifests) as proxy,
        RegistryClient(proxy, sleep=sleeps.append) as client,
        pytest.raises(RegistryUnavailable) as info,
    ):
        push_image(store, image, parse_reference(f"{proxy}/web:v1"), client)
    assert "HTTP 500" in info.value.message
    assert "UNKNOWN: disk full on the registry" in info.value.message
    assert "tag 'v1' in repository 'web'" in info.value.message
    assert len(attempts) == 4 and sleeps == [0.25, 0.5, 1.0]  # bounded, with backoff


def test_blob_redirects(tmp_path: Path, ws: Workspace, registry: Registry) -> None:
    store, image = _built(ws)
    ref_text = f"{registry.host}/web:v1"
    with RegistryClient(registry.host) as client:
        push_image(store, image, parse_reference(ref_text), client)

    def same_origin(method: str, path: str) -> Canned | str | None:
        if path.startswith("/elsewhere/"):
            return path.removeprefix("/elsewhere")
        if method == "GET" and BLOB_PATH.match(path):
            return Canned(307, (("Location", f"/elsewhere{path}"),))
        return None

    with relay_proxy(registry.host, hook=same_origin) as proxy:
        fresh = ContentStore(tmp_path / "fresh")
        with RegistryClient(proxy) as client:
            pulled = pull_image(fresh, parse_reference(f"{proxy}/web:v1"), client)
        assert pulled.image == image.digest

    def plain_http_elsewhere(method: str, path: str) -> Canned | None:
        if method == "GET" and BLOB_PATH.match(path):
            return Canned(307, (("Location", f"http://{registry.host}{path}"),))
        return None

    with relay_proxy(registry.host, hook=plain_http_elsewhere) as proxy:
        other = ContentStore(tmp_path / "other")
        with RegistryClient(proxy) as client, pytest.raises(RegistryError) as info:
            pull_image(other, parse_reference(f"{proxy}/web:v1"), client)
        assert "over plain HTTP" in info.value.message
        assert other.list_images() == []
