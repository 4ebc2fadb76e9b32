"""Registry client set-up, and choosing this machine's entry of an index on pull."""

from __future__ import annotations

import json

import pytest

from graven.store.oci_types import OCI_MANIFEST
from graven.store.registry import transfer
from graven.store.registry.client import RegistryClient
from graven.store.registry.errors import RegistryError, RegistryNotFound
from graven.store.registry.transfer import pick_platform


def test_scheme_follows_loopback_and_insecure() -> None:
    assert RegistryClient("127.0.0.1:5000").base == "http://127.0.0.1:5000"
    assert RegistryClient("localhost:5000").base == "http://localhost:5000"
    assert RegistryClient("[::1]:5000").base == "http://[::1]:5000"
    assert RegistryClient("registry.example.com").base == "https://registry.example.com"
    assert RegistryClient("registry.example.com", insecure=True).base == (
        "http://registry.example.com"
    )


def _index(*platforms: tuple[str, str, str | None]) -> bytes:
    manifests = []
    for n, (os_, arch, variant) in enumerate(platforms):
        plat = {"os": os_, "architecture": arch}
        if variant:
            plat["variant"] = variant
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": "sha256:" + f"{n:02x}" * 32,
                "size": 100 + n,
                "platform": plat,
            }
        )
    return json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()


def test_pick_platform_takes_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "host_platform", lambda: ("arm64", None))
    index = _index(("linux", "amd64", None), ("windows", "arm64", None), ("linux", "arm64", "v8"))
    assert pick_platform(index, "x").size == 102
    monkeypatch.setattr(transfer, "host_platform", lambda: ("s390x", None))
    with pytest.raises(RegistryNotFound, match=r"linux/s390x.*linux/amd64, windows/arm64"):
        pick_platform(index, "x")


@pytest.mark.parametrize(
    ("index", "says"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"manifests": {}}', "manifests: expected a list"),
        (b'{"manifests": [{"mediaType": 1}]}', r"manifests\[0\].mediaType"),
    ],
)
def test_a_malformed_index_is_a_registry_error(index: bytes, says: str) -> None:
    with pytest.raises(RegistryError, match=f"the index is malformed: .*{says}"):
        pick_platform(index, "x")
