"""Registry authentication, pure parts: WWW-Authenticate challenges and credentials."""

from __future__ import annotations

import base64
import json
from http.client import HTTPMessage
from pathlib import Path

import pytest

from graven.errors import UsageError
from graven.store.registry.auth import (
    Challenge,
    Credentials,
    RegistryAuth,
    find_credentials,
    parse_challenges,
)
from graven.store.registry.errors import RegistryAuthError, RegistryError
from graven.store.registry.wire import Reply

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


# --- bearer tokens ---------------------------------------------------------------------------

BEARER = 'Bearer realm="https://auth.example.com/token",service="registry.example.com"'
SCOPE = "repository:team/web:pull"


def _auth(*bodies: bytes, status: int = 200) -> tuple[RegistryAuth, list[str]]:
    """A RegistryAuth whose token service answers ``bodies`` in turn; the URLs asked."""
    asked: list[str] = []
    replies = iter(bodies)

    def fetch(url: str, headers: dict[str, str], scope: str, what: str) -> Reply:
        asked.append(url)
        return Reply(status, HTTPMessage(), next(replies), url)

    auth = RegistryAuth(
        "registry.example.com",
        credentials=Credentials("alice", "pw"),
        plain_http=False,
        fetch=fetch,
        monotonic=lambda: 1000.0,
    )
    return auth, asked


def test_a_token_is_fetched_for_the_scope_and_cached() -> None:
    auth, asked = _auth(json.dumps({"token": "t1", "expires_in": 300}).encode())
    auth.answer([BEARER], SCOPE)
    for _ in range(2):
        headers: dict[str, str] = {}
        auth.authorize(headers, SCOPE)
        assert headers == {"Authorization": "Bearer t1"}
    assert len(asked) == 1
    assert "scope=repository%3Ateam%2Fweb%3Apull" in asked[0] and "account=alice" in asked[0]


@pytest.mark.parametrize("expires_in", ["10" + "0" * 400, "NaN", "1e999"])
def test_a_token_lifetime_no_clock_can_use_is_taken_as_the_default(expires_in: str) -> None:
    # 10**400 once broke float(); NaN made the token expire at once, so every request
    # fetched a new one.
    body = ('{"token": "t1", "expires_in": ' + expires_in + "}").encode()
    auth, asked = _auth(body)
    auth.answer([BEARER], SCOPE)
    headers: dict[str, str] = {}
    auth.authorize(headers, SCOPE)
    assert headers == {"Authorization": "Bearer t1"}
    assert len(asked) == 1


@pytest.mark.parametrize("body", [b"[" * 100_000, b"[]", b'{"token": "a\\r\\nX-Evil: 1"}'])
def test_a_token_reply_graven_cannot_use_is_a_registry_error(body: bytes) -> None:
    auth, _ = _auth(body)
    with pytest.raises(RegistryError, match="sent no usable token"):
        auth.answer([BEARER], SCOPE)


def test_a_refused_token_request_names_the_user() -> None:
    auth, _ = _auth(b"{}", status=401)
    with pytest.raises(RegistryAuthError, match="rejected the credentials of user 'alice'"):
        auth.answer([BEARER], SCOPE)


def test_a_plain_http_token_realm_gets_no_credentials() -> None:
    auth, asked = _auth(b"{}")
    with pytest.raises(RegistryAuthError, match="over plain HTTP; refusing to send credentials"):
        auth.answer(['Bearer realm="http://auth.example.com/token"'], SCOPE)
    assert asked == []
