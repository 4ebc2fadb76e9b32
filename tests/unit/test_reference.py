"""Registry references: parsing, defaults and the local names pulled images get."""

from __future__ import annotations

import pytest

from graven.errors import UsageError
from graven.model import Digest
from graven.reference import RegistryRef, local_name_for, parse_reference

D = Digest("sha256:" + "ab" * 32)


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
