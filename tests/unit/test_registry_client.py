"""Registry client, pure parts: references, auth challenges, credentials, names."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from graven.errors import UsageError
from graven.model import Digest
from graven.store.oci_types import OCI_MANIFEST
from graven.store.registry import (
    Challenge,
    Credentials,
    RegistryClient,
    RegistryNotFound,
    RegistryRef,
    find_credentials,
    local_name_for,
    parse_challenges,
    parse_reference,
    pick_platform,
)

D = Digest("sha256:" + "ab" * 32)


# --- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:5000/web", RegistryRef("localhost:5000", "web")),
        ("localhost/web:v1", RegistryRef("localhost", "web", "v1")),
        (
            "127.0.0.1:5000/team/web:v1.2-rc_3",
            RegistryRef("127.0.0.1:5000", "team/web", "v1.2-rc_3"),
        ),
        ("registry.example.com/a/b/c", RegistryRef("registry.example.com", "a/b/c")),
        (f"localhost:5000/web@{D}", RegistryRef("localhost:5000", "web", None, D)),
        (f"localhost:5000/web:v1@{D}", RegistryRef("localhost:5000", "web", "v1", D)),
        ("[::1]:5000/web:v1", RegistryRef("[::1]:5000", "web", "v1")),
        ("reg.io/my_app/a__b/c-d/e--f/g.h", RegistryRef("reg.io", "my_app/a__b/c-d/e--f/g.h")),
    ],
)
def test_valid_references(text: str, expected: RegistryRef) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == text


def test_reference_defaults_and_hosts() -> None:
    assert parse_reference("localhost:5000/web").reference == "latest"
    assert parse_reference("localhost:5000/web:v1").reference == "v1"
    assert parse_reference(f"localhost:5000/web:v1@{D}").reference == str(D)
    assert parse_reference("localhost:5000/web").host == "localhost"
    assert parse_reference("[::1]:5000/web").is_loopback
    assert parse_reference("127.0.0.2:80/web").is_loopback
    assert not parse_reference("registry.example.com/web").is_loopback


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("web", "registry host"),
        ("web:v1", "registry host"),
        ("team/web:v1", "must start with the registry host"),
        ("localhost:5000/", "repository"),
        ("localhost:5000/Web", "lowercase"),
        ("localhost:5000/web/", "component ''"),
        ("localhost:5000/-web", "component '-web'"),
        ("localhost:5000/web:", "tag ''"),
        ("localhost:5000/web:-v1", "tag '-v1'"),
        ("localhost:5000/web:" + "x" * 129, "1-128"),
        ("localhost:5000/web@sha256:abc", "is not sha256"),
        ("localhost:99999/web", "port 99999"),
        ("https://localhost:5000/web", "no scheme"),
        ("local_host:5000/web", "not a registry host"),
        ("[:::::]:5000/web", "not an IPv6 address"),
        ("localhost:5000/" + "a" * 256, "longer than 255"),
    ],
)
def test_invalid_references_say_why(text: str, says: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_reference(text)
    assert says in info.value.message
    assert text[:20] in info.value.message
    assert info.value.exit_code == 2
    assert info.value.hint


@pytest.mark.parametrize(
    ("repository", "name"),
    [
        ("web", "web"),
        ("team/web", "web"),
        ("team/My_App.v2", "my-app-v2"),
        ("a/2048-game", "game"),
        ("a/123", "image"),
        ("a/" + "x" * 80, "x" * 63),
    ],
)
def test_local_names(repository: str, name: str) -> None:
    assert local_name_for(repository) == name


# --- challenges ----------------------------------------------------------------------------


def test_bearer_challenge_with_quoted_commas() -> None:
    header = (
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:team/web:pull,push"'
    )
    [c] = parse_challenges(header)
    assert c.scheme == "bearer"
    assert c.get("realm") == "https://auth.example.com/token"
    assert c.get("service") == "registry.example.com"
    assert c.get("scope") == "repository:team/web:pull,push"


def test_several_challenges_spaces_case_and_escapes() -> None:
    header = (
        'Basic realm="Registry \\"Realm\\", inc", '
        'BEARER Realm = "http://127.0.0.1:1/token" , Service=reg ,error="insufficient_scope"'
    )
    basic, bearer = parse_challenges(header)
    assert basic == Challenge("basic", (("realm", 'Registry "Realm", inc'),))
    assert bearer.scheme == "bearer"
    assert bearer.get("realm") == "http://127.0.0.1:1/token"
    assert bearer.get("service") == "reg"
    assert bearer.get("error") == "insufficient_scope"


def test_token68_and_bare_schemes() -> None:
    negotiate, basic, bearer = parse_challenges('Negotiate abc+/d==, Basic realm="r", Bearer')
    assert negotiate.token68 == "abc+/d=="
    assert basic.get("realm") == "r"
    assert bearer == Challenge("bearer")


@pytest.mark.parametrize(
    "header",
    ['Bearer realm="unterminated', "realm=x", "Bearer foo bar", '"quoted"', 'Bearer realm="x", =y'],
)
def test_malformed_challenges_raise_value_error(header: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_challenges(header)


def test_a_name_with_trailing_equals_is_a_token68() -> None:
    # 'realm=' at the end is a valid token68, not a parameter without a value.
    assert parse_challenges("Bearer realm=")[0].token68 == "realm="


# --- credentials -----------------------------------------------------------------------------


def test_credentials_precedence(tmp_path: Path) -> None:
    env = {"GRAVEN_REGISTRY_USER": "envuser", "GRAVEN_REGISTRY_PASSWORD": "envpw"}
    none = tmp_path / "missing.json"
    flags = find_credentials("r:5000", username="u", password="p", environ=env, docker_config=none)
    assert flags == Credentials("u", "p", "flags")
    # --username alone takes the password from the environment
    assert find_credentials("r:5000", username="u", environ=env, docker_config=none) == (
        Credentials("u", "envpw", "flags")
    )
    # --password-stdin alone takes the user from the environment
    assert find_credentials("r:5000", password="p", environ=env, docker_config=none) == (
        Credentials("envuser", "p", "flags")
    )
    assert find_credentials("r:5000", environ=env, docker_config=none) == Credentials(
        "envuser", "envpw", "environment"
    )
    assert find_credentials("r:5000", environ={}, docker_config=none) is None


def test_credentials_usage_errors(tmp_path: Path) -> None:
    none = tmp_path / "missing.json"
    with pytest.raises(UsageError, match="needs a password"):
        find_credentials("r:5000", username="u", environ={}, docker_config=none)
    with pytest.raises(UsageError, match="without a username"):
        find_credentials("r:5000", password="p", environ={}, docker_config=none)
    with pytest.raises(UsageError, match="both"):
        find_credentials("r:5000", environ={"GRAVEN_REGISTRY_USER": "u"}, docker_config=none)


def test_credentials_from_docker_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"dock:pw:with:colons").decode()
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://other.example.com/v1/": {"auth": base64.b64encode(b"x:y").decode()},
                    "127.0.0.1:5000": {"auth": auth},
                    "plain.example.com": {"username": "p", "password": "q"},
                }
            }
        )
    )
    found = find_credentials("127.0.0.1:5000", environ={}, docker_config=config)
    assert found is not None
    assert (found.username, found.password) == ("dock", "pw:with:colons")
    assert str(config) in found.source
    other = find_credentials("other.example.com", environ={}, docker_config=config)
    assert other is not None and other.username == "x"
    plain = find_credentials("plain.example.com", environ={}, docker_config=config)
    assert plain is not None and (plain.username, plain.password) == ("p", "q")
    assert find_credentials("nope.example.com", environ={}, docker_config=config) is None
    config.write_text("{not json")
    assert find_credentials("127.0.0.1:5000", environ={}, docker_config=config) is None


def test_password_never_in_repr() -> None:
    creds = Credentials("u", "hunter2")
    assert "hunter2" not in repr(creds)
    assert creds.basic() == "Basic " + base64.b64encode(b"u:hunter2").decode()


# --- client set-up and platform choice --------------------------------------------------------


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
    import graven.store.oci as oci

    monkeypatch.setattr(oci, "host_platform", lambda: ("arm64", None))
    index = _index(("linux", "amd64", None), ("windows", "arm64", None), ("linux", "arm64", "v8"))
    assert pick_platform(index, "x").size == 102
    monkeypatch.setattr(oci, "host_platform", lambda: ("s390x", None))
    with pytest.raises(RegistryNotFound, match=r"linux/s390x.*linux/amd64, windows/arm64"):
        pick_platform(index, "x")
