"""Registry authentication: challenges, credentials, Basic auth and bearer tokens.

``parse_challenges`` reads ``WWW-Authenticate`` headers (RFC 9110); ``find_credentials``
finds what to authenticate with (flags, environment, a docker config); ``RegistryAuth``
answers a registry's challenges for a client and caches the tokens it gets.
Credentials go only to the registry's own origin and to the token realm it names.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from graven.errors import UsageError
from graven.reference import is_loopback_host
from graven.store.registry.errors import RegistryAuthError, RegistryError
from graven.store.registry.wire import Reply, origin_text, parse_json, with_query

CREDENTIALS_HINT = (
    "Pass --username USER --password-stdin, or set GRAVEN_REGISTRY_USER and "
    "GRAVEN_REGISTRY_PASSWORD (a docker login in ~/.docker/config.json works too)."
)

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lowercase) and parameters (keys lowercase)."""

    scheme: str
    params: tuple[tuple[str, str], ...] = ()
    token68: str | None = None

    def get(self, key: str) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return None


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (RFC 9110 §11.6.1) into its challenges.

    Handles several challenges in one header, quoted values holding commas and escaped
    quotes, optional whitespace around '=', and token68 credentials. ValueError (naming
    the position) when the header is malformed.
    """
    s, n = header, len(header)
    out: list[tuple[str, list[tuple[str, str]], str | None]] = []

    def skip(i: int, chars: str = " \t") -> int:
        while i < n and s[i] in chars:
            i += 1
        return i

    def token(i: int) -> tuple[str, int]:
        j = i
        while j < n and s[j] in _TCHAR:
            j += 1
        return s[i:j], j

    def value(i: int) -> tuple[str, int]:
        i = skip(i)
        if i < n and s[i] == '"':
            chars: list[str] = []
            i += 1
            while i < n and s[i] != '"':
                if s[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(s[i])
                i += 1
            if i >= n:
                raise ValueError(f"unterminated quoted string in {header!r}")
            return "".join(chars), i + 1
        text, j = token(i)
        if not text:
            raise ValueError(f"expected a value at position {i} of {header!r}")
        return text, j

    i = 0
    while True:
        i = skip(i, " \t,")
        if i >= n:
            break
        name, j = token(i)
        if not name:
            raise ValueError(f"unexpected {s[i]!r} at position {i} of {header!r}")
        k = skip(j)
        if k < n and s[k] == "=":
            # name=value: a parameter of the challenge being read.
            if not out:
                raise ValueError(f"parameter {name!r} before any scheme in {header!r}")
            text, i = value(k + 1)
            out[-1][1].append((name.lower(), text))
            continue
        # A new challenge: its scheme, then maybe a token68 or its first parameter.
        out.append((name.lower(), [], None))
        i = k
        m = _TOKEN68.match(s, i)
        if m and i < n and s[i] != ",":
            after = skip(m.end())
            first, end = token(i)
            is_param = (
                bool(first) and skip(end) < n and s[skip(end)] == "=" and not _ends_token68(s, end)
            )
            if not is_param and (after >= n or s[after] == ","):
                out[-1] = (name.lower(), [], m.group())
                i = after
            elif not is_param:
                raise ValueError(f"unexpected text at position {i} of {header!r}")
    return [Challenge(scheme, tuple(params), t68) for scheme, params, t68 in out]


def _ends_token68(s: str, end: int) -> bool:
    """After a name at ``end``: '=' characters running to the end or a comma make the
    whole thing a token68 (``abc==``) rather than ``name=value``."""
    i = end
    while i < len(s) and s[i] in " \t":
        i += 1
    while i < len(s) and s[i] == "=":
        i += 1
    while i < len(s) and s[i] in " \t":
        i += 1
    return i >= len(s) or s[i] == ","


@dataclass(frozen=True)
class Credentials:
    """A username and password for a registry, and where they came from."""

    username: str
    password: str = field(repr=False)
    source: str = "flags"

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def find_credentials(
    registry: str,
    *,
    username: str | None = None,
    password: str | None = None,
    environ: Mapping[str, str] | None = None,
    docker_config: Path | None = None,
) -> Credentials | None:
    """Credentials for ``registry``: flags first, then ``GRAVEN_REGISTRY_USER`` and
    ``GRAVEN_REGISTRY_PASSWORD``, then a docker-style ``auths`` config file
    (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``). None: anonymous."""
    env = os.environ if environ is None else environ
    env_user, env_password = env.get("GRAVEN_REGISTRY_USER"), env.get("GRAVEN_REGISTRY_PASSWORD")
    if username is not None:
        if password is None:
            password = env_password
        if password is None:
            raise UsageError(
                "--username needs a password",
                hint="Pipe it in with --password-stdin, or set GRAVEN_REGISTRY_PASSWORD.",
            )
        return Credentials(username, password, "flags")
    if password is not None:
        if not env_user:
            raise UsageError(
                "a password was given without a username",
                hint="Pass --username USER, or set GRAVEN_REGISTRY_USER.",
            )
        return Credentials(env_user, password, "flags")
    if env_user or env_password:
        if not (env_user and env_password is not None):
            raise UsageError(
                "set both GRAVEN_REGISTRY_USER and GRAVEN_REGISTRY_PASSWORD, or neither",
                hint=CREDENTIALS_HINT,
            )
        return Credentials(env_user, env_password, "environment")
    return _docker_config_credentials(registry, docker_config, env)


def _docker_config_credentials(
    registry: str, path: Path | None, env: Mapping[str, str]
) -> Credentials | None:
    if path is None:
        base = env.get("DOCKER_CONFIG")
        path = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    try:
        doc = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no config, or one we cannot read: anonymous, as docker does
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        host = urllib.parse.urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
        if host != registry or not isinstance(entry, dict):
            continue
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                user, sep, password = base64.b64decode(encoded).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, sep, password = "", "", ""
            if sep and user:
                return Credentials(user, password, f"docker config {path}")
        plain_user, plain_password = entry.get("username"), entry.get("password")
        if isinstance(plain_user, str) and isinstance(plain_password, str) and plain_user:
            return Credentials(plain_user, plain_password, f"docker config {path}")
    return None


def scope_of(repository: str, actions: str) -> str:
    """The token scope for ``actions`` (``pull``, ``pull,push``) on a repository."""
    return f"repository:{repository}:{actions}"


def scope_repository(scope: str) -> str:
    """The (first) repository a scope is about, or ''."""
    kind, _, rest = scope.split(maxsplit=1)[0].partition(":")
    return rest.rpartition(":")[0] if kind == "repository" else ""


def insufficient_scope(reply: Reply) -> bool:
    """Whether a 401 says the token lacks the scope asked for (authenticated, not allowed)."""
    for header in reply.headers.get_all("WWW-Authenticate") or []:
        with contextlib.suppress(ValueError):
            for challenge in parse_challenges(header):
                if challenge.get("error") == "insufficient_scope":
                    return True
    return False


TokenFetch = Callable[[str, dict[str, str], str, str], Reply]
"""``(url, headers, scope, what)``: GET a token; the reply, read up to a cap. It raises
RegistryError itself for any status but 200, 401 and 403."""


class RegistryAuth:
    """How one client authenticates to its registry: the challenge it answered, whether
    Basic auth applies, and the bearer tokens it holds, per scope, until they expire.

    ``credentials`` go as Basic auth when the registry asks for it, and to the token
    realm of a Bearer challenge (HTTPS, loopback, or any realm when the registry itself
    is spoken to over plain HTTP). ``fetch`` sends the token requests.
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None,
        plain_http: bool,
        fetch: TokenFetch,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self._plain_http = plain_http
        self._fetch = fetch
        self._monotonic = monotonic
        self._bearer: Challenge | None = None
        self._basic = False
        self._tokens: dict[str, tuple[str, float]] = {}

    def authorize(self, headers: dict[str, str], scope: str) -> None:
        """Add the Authorization header a request for ``scope`` needs, if any yet."""
        if self._bearer is not None:
            token = self._token(scope)
            headers["Authorization"] = f"Bearer {token}"
        elif self._basic and self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()

    def answer(self, raw: list[str], scope: str) -> None:
        """Answer a 401's ``WWW-Authenticate`` headers, so the resent request passes."""
        challenges: list[Challenge] = []
        for header in raw:
            try:
                challenges += parse_challenges(header)
            except ValueError as exc:
                raise RegistryError(
                    f"{self.registry} sent a malformed WWW-Authenticate header: {exc}",
                    registry=self.registry,
                    status=401,
                ) from None
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            # A token for this scope may have expired or been revoked: fetch one (once),
            # for what we asked and what the challenge says this request needs.
            self._bearer = bearer
            self._tokens.pop(scope, None)
            self._token(scope, also=bearer.get("scope"))
            return
        if basic is not None:
            if self.credentials is None or self._basic:
                raise self.error(scope, status=401)
            self._basic = True
            return
        schemes = ", ".join(c.scheme for c in challenges) or "none"
        raise RegistryAuthError(
            f"{self.registry} asks for authentication graven does not speak (schemes: {schemes})",
            hint="graven supports Basic and Bearer token authentication.",
            registry=self.registry,
            status=401,
        )

    def _token(self, scope: str, *, also: str | None = None) -> str:
        """A bearer token for ``scope`` (space-separated scopes), cached until it expires."""
        cached = self._tokens.get(scope)
        if cached is not None and cached[1] > self._monotonic():
            return cached[0]
        assert self._bearer is not None
        challenge = self._bearer
        realm = challenge.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise RegistryError(
                f"{self.registry} sent a Bearer challenge without a usable realm ({realm!r})",
                registry=self.registry,
                status=401,
            )
        realm_host = urllib.parse.urlsplit(realm).hostname or ""
        if realm.startswith("http://") and not (self._plain_http or is_loopback_host(realm_host)):
            raise RegistryAuthError(
                f"{self.registry} sends graven for a token to {origin_text(realm)} over plain "
                "HTTP; refusing to send credentials there",
                registry=self.registry,
            )
        scopes = scope.split()
        scopes += [s for s in (also or "").split() if s not in scopes]
        params: list[tuple[str, str]] = []
        if service := challenge.get("service"):
            params.append(("service", service))
        params += [("scope", s) for s in scopes]
        headers: dict[str, str] = {}
        if self.credentials is not None:
            params.append(("account", self.credentials.username))
            headers["Authorization"] = self.credentials.basic()
        url = with_query(realm, params)
        what = f"a token from {origin_text(realm)}"
        reply = self._fetch(url, headers, scope, what)
        if reply.status in (401, 403):
            raise self.error(scope, status=reply.status, realm=realm)
        try:
            doc = parse_json(reply.body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = doc.get("expires_in", 60)
        except (ValueError, AttributeError):
            token, expires_in = None, 0
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise RegistryError(
                f"the token service {origin_text(realm)} sent no usable token",
                registry=self.registry,
            )
        # A number no float holds (10**400) or NaN would break the expiry arithmetic.
        usable = isinstance(expires_in, int | float) and abs(expires_in) < 1e9
        lifetime = float(expires_in) if usable else 60.0
        # Renew a little early: a token expiring in flight costs a round trip.
        self._tokens[scope] = (token, self._monotonic() + max(lifetime - 10.0, 1.0))
        return token

    def error(self, scope: str, *, status: int, realm: str | None = None) -> RegistryAuthError:
        """The error for a refusal (401) or denial (403) of ``scope``: what to provide."""
        first = scope.split(maxsplit=1)[0] if scope else ""
        action = "push to" if "push" in first.rpartition(":")[2] else "pull from"
        repo = scope_repository(scope) or "?"
        who = self.credentials
        by = f" ({origin_text(realm)})" if realm else ""
        if who is None:
            return RegistryAuthError(
                f"{self.registry} needs credentials to {action} repository {repo!r}",
                hint=CREDENTIALS_HINT,
                registry=self.registry,
                status=status,
            )
        if status == 403:
            return RegistryAuthError(
                f"{self.registry}{by} denies user {who.username!r} access to {action} "
                f"repository {repo!r}",
                hint=f"Use credentials allowed to {action} {repo!r}, or ask the registry's "
                "administrator for access.",
                registry=self.registry,
                status=status,
            )
        return RegistryAuthError(
            f"{self.registry}{by} rejected the credentials of user {who.username!r} "
            f"(from {who.source})",
            hint="Check the username and password. " + CREDENTIALS_HINT,
            registry=self.registry,
            status=status,
        )
