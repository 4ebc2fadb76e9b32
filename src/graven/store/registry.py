"""Registry client: push and pull images over the OCI distribution API.

A small synchronous client on ``http.client``: no dependency earns its place for six
endpoints (HEAD/GET blob, POST/PATCH/PUT upload, GET/PUT manifest) plus token auth.

Push sends only what the registry lacks: every blob is probed with ``HEAD`` first;
a blob the store remembers in another repository of the same registry is mounted
from there (no bytes travel); the rest is streamed from the content store, in one
``PUT`` when small and in ``PATCH`` chunks when large, never loaded whole. The
manifest goes last, and the digest the registry names it by must be ours.

Pull fetches the manifest (an index resolves to the ``linux/<this machine>`` entry),
checks its digest against the pinned one or ``Docker-Content-Digest``, and hands it
to the OCI importer, which streams every blob through ``open_blob`` and verifies
digest and size; only then is a local name pointed at the image.

Registry replies are untrusted: documents are size-capped, digests verified, and
every failure is a ``RegistryError`` that says what to do::

    GravenError
    └── RegistryError              the registry refused or failed, or replied nonsense (exit 1)
        ├── RegistryAuthError      401/403: which credentials to provide
        ├── RegistryNotFound       404: names the missing repository, tag or blob
        └── RegistryUnavailable    down, unreachable, timing out or 5xx after retries

Plain HTTP is used for loopback registries and with ``insecure``; anything else
speaks HTTPS with verified certificates. Credentials go only to the registry's own
origin and to the token realm it names (HTTPS, or loopback).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import io
import ipaddress
import json
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, cast

from graven.errors import GravenError, StoreError, UsageError
from graven.model import Digest, Image, is_valid_name
from graven.store.oci_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    InvalidOCI,
)

if TYPE_CHECKING:
    from graven.store.base import ImageStore

# Blobs up to this size go in one PUT; larger ones in PATCH chunks of CHUNK_SIZE.
MONOLITHIC_MAX = 32 * 1024 * 1024
CHUNK_SIZE = 16 * 1024 * 1024
_IO_BLOCK = 1 << 16
_MAX_ERROR_BODY = 64 * 1024
_MAX_TOKEN_BODY = 1024 * 1024
_MAX_REDIRECTS = 5
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST])
_BLOB_SOURCES_KEY = "graven.registry.blob-sources/v1"
_MAX_SOURCES = 8
CREDENTIALS_HINT = (
    "Pass --username USER --password-stdin, or set GRAVEN_REGISTRY_USER and "
    "GRAVEN_REGISTRY_PASSWORD (a docker login in ~/.docker/config.json works too)."
)


class RegistryError(GravenError):
    """A registry refused a request, failed, or sent a reply graven cannot trust."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        registry: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.registry = registry
        self.status = status

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.registry:
            out["registry"] = self.registry
        if self.status is not None:
            out["status"] = self.status
        return out


class RegistryAuthError(RegistryError):
    """The registry (or its token service) wants other credentials (401) or denies (403)."""


class RegistryNotFound(RegistryError):
    """The repository, tag or blob asked for does not exist on the registry."""


class RegistryUnavailable(RegistryError):
    """The registry is down, unreachable, too slow, or failing (5xx) after retries."""


# --- references ------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?P<host>{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d+))?$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_MAX_REPOSITORY = 255
_REF_HINT = "Write HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST], e.g. localhost:5000/team/web:v1."


def _split_host(registry: str) -> str:
    match = _HOST_RE.match(registry)
    return match["host"] if match else registry


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RegistryRef:
    """``registry/repository[:tag][@digest]``: where an image lives on a registry."""

    registry: str  # host[:port], as written
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    @property
    def host(self) -> str:
        return _split_host(self.registry)

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> RegistryRef:
    """Parse ``HOST[:PORT]/REPO[/PATH...][:TAG][@sha256:...]``; UsageError says what is wrong.

    The host is required (graven has no default registry): the first component must be
    ``localhost``, carry a dot or a port, or be a bracketed IPv6 address.
    """

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid registry reference {text!r}: {why}", hint=_REF_HINT)

    if "://" in text:
        raise UsageError(
            f"invalid registry reference {text!r}: references have no scheme",
            hint="Drop 'http://' or 'https://'; pass --insecure to use plain HTTP. " + _REF_HINT,
        )
    rest, digest = text, None
    if "@" in rest:
        rest, _, digest_text = rest.partition("@")
        try:
            digest = Digest(digest_text)
        except ValueError:
            raise bad(f"{digest_text!r} after '@' is not sha256:<64 hex>") from None
    host, slash, path = rest.partition("/")
    if not slash or not path:
        raise bad("expected a registry host, then '/' and a repository")
    match = _HOST_RE.match(host)
    if match is None:
        raise bad(f"{host!r} is not a registry host")
    if not ("." in host or ":" in host or host == "localhost" or host.startswith("[")):
        raise bad(
            f"it must start with the registry host ({host!r} has no dot or port and is not "
            "'localhost'; graven has no default registry)"
        )
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(match["host"].strip("[]"))
        except ValueError:
            raise bad(f"{match['host']} is not an IPv6 address") from None
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise bad(f"port {match['port']} is out of range")
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise bad(f"tag {tag!r} must be 1-128 of letters, digits, '_', '.', '-'")
    if len(path) > _MAX_REPOSITORY:
        raise bad(f"the repository name is longer than {_MAX_REPOSITORY} characters")
    for component in path.split("/"):
        if not _COMPONENT_RE.match(component):
            raise bad(
                f"repository component {component!r} must be lowercase letters and digits, "
                "separated by '.', '_', '__' or '-'"
            )
    return RegistryRef(host, path, tag, digest)


def local_name_for(repository: str) -> str:
    """The default local image name for a pulled repository: its last component,
    made a valid graven name (``team/My_App.v2`` -> ``my-app-v2``)."""
    last = repository.rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9]+", "-", last).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:63].rstrip("-")
    return name if is_valid_name(name) else "image"


# --- authentication --------------------------------------------------------------------

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
        doc = json.loads(path.read_text(encoding="utf-8"))
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


def _scope(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


def _scope_repository(scope: str) -> str:
    """The (first) repository a scope is about, or ''."""
    kind, _, rest = scope.split(maxsplit=1)[0].partition(":")
    return rest.rpartition(":")[0] if kind == "repository" else ""


# --- HTTP ------------------------------------------------------------------------------


@dataclass
class _Upload:
    """A request body streamed from the store: ``length`` bytes from ``offset``."""

    open: Callable[[], BinaryIO]
    offset: int
    length: int
    on_sent: Callable[[int], None] | None = None


class _BodyReader:
    """What http.client reads a streamed body from: at most ``limit`` bytes, counted."""

    def __init__(self, f: BinaryIO, limit: int, on_sent: Callable[[int], None] | None) -> None:
        self._f, self._left, self._on_sent = f, limit, on_sent

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size < 0 else min(size, self._left)
        data = self._f.read(want)
        if not data:
            raise StoreError("a blob in the content store is shorter than its recorded size")
        self._left -= len(data)
        if self._on_sent is not None:
            self._on_sent(len(data))
        return data


@dataclass
class _Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as the registry sent it, with what it said about it."""

    data: bytes
    media_type: str
    digest: Digest  # of ``data``, verified against what the registry or the reference said


_Body = bytes | _Upload | None


class RegistryClient:
    """A client for one registry: pooled keep-alive connections, auth, bounded retries.

    ``credentials`` are sent as Basic auth when the registry asks for it, and to the
    token realm of a Bearer challenge; tokens are cached per scope until they expire.
    Idempotent requests (GET, HEAD, manifest PUT, token fetches) are retried ``retries``
    times on 5xx replies and dropped connections, waiting ``backoff`` seconds, doubling
    each time; a failed blob upload starts over, in a new session, the same way.
    ``sleep`` and ``monotonic`` are injectable so tests never wait.
    """

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        monolithic_max: int = MONOLITHIC_MAX,
        chunk_size: int = CHUNK_SIZE,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive (got {chunk_size})")
        self.registry = registry
        host = _split_host(registry)
        self.scheme = "http" if insecure or _is_loopback(host) else "https"
        self.base = f"{self.scheme}://{registry}"
        self.credentials = credentials
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.monolithic_max = monolithic_max
        self.chunk_size = chunk_size
        self._sleep = sleep
        self._monotonic = monotonic
        self._idle: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._bearer: Challenge | None = None
        self._basic = False
        self._tokens: dict[str, tuple[str, float]] = {}
        self._ssl: ssl.SSLContext | None = None

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self._idle.values():
            conn.close()
        self._idle.clear()

    # --- blobs ---------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: Digest) -> int | None:
        """The size of a blob the repository holds, or None when it lacks it (HEAD)."""
        reply = self._request(
            "HEAD",
            self._url(repository, f"blobs/{digest}"),
            scope=_scope(repository, "pull"),
            expect={200, 404} | _REDIRECT_STATUSES,
            what=f"blob {digest} in repository {repository!r}",
        )
        if reply.status == 404:
            return None
        length = reply.header("Content-Length")
        return int(length) if reply.status == 200 and length and length.isdigit() else 0

    def mount_blob(self, repository: str, digest: Digest, source: str) -> str | None:
        """Ask the registry to link a blob from repository ``source`` (no bytes travel).

        None when mounted; otherwise the upload location the registry opened instead.
        """
        query = urllib.parse.urlencode({"mount": str(digest), "from": source})
        reply = self._request(
            "POST",
            self._url(repository, "blobs/uploads/") + "?" + query,
            scope=f"{_scope(repository, 'pull,push')} {_scope(source, 'pull')}",
            expect={201, 202},
            what=f"blob {digest} mounted into {repository!r} from {source!r}",
        )
        if reply.status == 201:
            return None
        return self._location(reply, "a blob upload")

    def start_upload(self, repository: str) -> str:
        """Open an upload session; its URL (absolute)."""
        reply = self._request(
            "POST",
            self._url(repository, "blobs/uploads/"),
            scope=_scope(repository, "pull,push"),
            expect={202},
            what=f"an upload to repository {repository!r}",
        )
        return self._location(reply, "a blob upload")

    def upload_blob(
        self,
        repository: str,
        digest: Digest,
        size: int,
        open_blob: Callable[[], BinaryIO],
        *,
        location: str | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> int:
        """Stream a blob into the repository; the number of bytes sent (retries included).

        One PUT up to ``monolithic_max`` bytes, PATCH chunks of ``chunk_size`` above. A
        transient failure restarts the whole upload in a new session (a blob is named
        by its content, so sending it again is harmless), up to ``retries`` times.
        """
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            if on_sent is not None:
                on_sent(n)

        attempt = 0
        while True:
            try:
                self._upload_once(repository, digest, size, open_blob, location, count)
                return sent
            except RegistryUnavailable:
                if attempt >= self.retries:
                    raise
                attempt += 1
                location = None
                self._sleep(self.backoff * 2 ** (attempt - 1))

    def _upload_once(
        self,
        repository: str,
        digest: Digest,
        size: int,
        open_blob: Callable[[], BinaryIO],
        location: str | None,
        count: Callable[[int], None],
    ) -> None:
        scope = _scope(repository, "pull,push")
        what = f"the upload of blob {digest} to repository {repository!r}"
        location = location or self.start_upload(repository)
        offset = 0
        if size > self.monolithic_max:
            while offset < size:
                n = min(self.chunk_size, size - offset)
                reply = self._request(
                    "PATCH",
                    location,
                    scope=scope,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + n - 1}",
                    },
                    body=_Upload(open_blob, offset, n, count),
                    expect={202},
                    what=what,
                )
                location = self._location(reply, "the next chunk")
                accepted = _range_end(reply.header("Range"))
                if accepted is not None and accepted != offset + n - 1:
                    raise RegistryError(
                        f"{self.registry} accepted bytes up to {accepted} of blob {digest}, "
                        f"expected {offset + n - 1}",
                        registry=self.registry,
                    )
                offset += n
        body: _Body = _Upload(open_blob, offset, size - offset, count)
        reply = self._request(
            "PUT",
            _with_query(location, digest=str(digest)),
            scope=scope,
            headers={"Content-Type": "application/octet-stream"},
            body=body,
            expect={201},
            what=what,
        )
        stored = reply.header("Docker-Content-Digest")
        if stored and stored != digest:
            raise RegistryError(
                f"{self.registry} stored blob {digest} under another digest, {stored}",
                registry=self.registry,
            )

    @contextlib.contextmanager
    def open_blob(self, repository: str, digest: Digest, size: int) -> Iterator[BlobStream]:
        """Stream a blob (following redirects to this registry or any HTTPS location).

        The stream ends after ``size`` bytes; a registry that declares or sends more or
        fewer raises RegistryError. The caller verifies the digest of what it reads.
        """
        what = f"blob {digest} in repository {repository!r}"
        url = self._url(repository, f"blobs/{digest}")
        response, conn, origin = self._open_stream(url, _scope(repository, "pull"), what)
        try:
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) != size:
                raise RegistryError(
                    f"{self.registry} is sending {declared} bytes for {what}, "
                    f"but the manifest says {size}",
                    registry=self.registry,
                )
            raw = _CappedStream(response, size, f"{what} on {self.registry}", self._unreachable)
            with BlobStream(raw) as stream:
                yield stream
        finally:
            if response.isclosed():
                self._release(origin, conn, response)
            else:
                conn.close()

    def _open_stream(
        self, url: str, scope: str, what: str
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, tuple[str, str]]:
        expect = {200} | _REDIRECT_STATUSES
        response, conn = self._request_stream("GET", url, scope=scope, expect=expect, what=what)
        for _ in range(_MAX_REDIRECTS):
            if response.status not in _REDIRECT_STATUSES:
                return response, conn, _origin(url)
            target = response.getheader("Location")
            self._drain_release(_origin(url), conn, response)
            if not target:
                raise RegistryError(
                    f"{self.registry} redirected {what} without a Location",
                    registry=self.registry,
                )
            url = urllib.parse.urljoin(url, target)
            if _origin(url) != _origin(self.base) and not url.startswith("https://"):
                raise RegistryError(
                    f"{self.registry} redirected {what} to {_origin_text(url)} over plain HTTP; "
                    "graven follows redirects only to this registry or to HTTPS",
                    registry=self.registry,
                )
            response, conn = self._request_stream("GET", url, scope=scope, expect=expect, what=what)
        raise RegistryError(
            f"{self.registry} redirected {what} more than {_MAX_REDIRECTS} times",
            registry=self.registry,
        )

    # --- manifests -----------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """Fetch a manifest or index by tag or digest; its digest is verified against
        the digest asked for, else against ``Docker-Content-Digest`` when present."""
        what = _manifest_what(repository, reference)
        reply = self._request(
            "GET",
            self._url(repository, f"manifests/{reference}"),
            scope=_scope(repository, "pull"),
            headers={"Accept": _MANIFEST_ACCEPT},
            expect={200},
            what=what,
            max_body=MAX_MANIFEST_BYTES,
        )
        digest = Digest.of_bytes(reply.body)
        claimed = reference if reference.startswith("sha256:") else None
        if claimed is None:
            header = reply.header("Docker-Content-Digest")
            claimed = header if header and header.startswith("sha256:") else None
        if claimed is not None and claimed != digest:
            raise RegistryError(
                f"{self.registry} sent a manifest for {what} whose digest is {digest}, "
                f"not {claimed}: it was altered on the way or the registry is broken",
                hint="Nothing was imported. Retry; if it persists, tell the registry's operator.",
                registry=self.registry,
            )
        return Manifest(reply.body, _media_type(reply.header("Content-Type"), reply.body), digest)

    def put_manifest(self, repository: str, reference: str, media_type: str, data: bytes) -> Digest:
        """Store a manifest under a tag or its digest; the digest the registry names it
        by, which must be the digest of ``data``."""
        what = _manifest_what(repository, reference)
        reply = self._request(
            "PUT",
            self._url(repository, f"manifests/{reference}"),
            scope=_scope(repository, "pull,push"),
            headers={"Content-Type": media_type},
            body=data,
            expect={201, 200},
            what=what,
            idempotent=True,
        )
        ours = Digest.of_bytes(data)
        stored = reply.header("Docker-Content-Digest")
        if stored and stored != ours:
            raise RegistryError(
                f"{self.registry} stored the manifest for {what} as {stored}, but its "
                f"digest is {ours}: the registry changed it",
                hint="Registries that rewrite manifests break digest pinning; use another one.",
                registry=self.registry,
            )
        return ours

    # --- requests: auth, errors ----------------------------------------------------------

    def _url(self, repository: str, rest: str) -> str:
        return f"{self.base}/v2/{repository}/{rest}"

    def _location(self, reply: _Reply, what: str) -> str:
        location = reply.header("Location")
        if not location:
            raise RegistryError(
                f"{self.registry} opened {what} without saying where (no Location header)",
                registry=self.registry,
            )
        url = urllib.parse.urljoin(reply.url, location)
        if _origin(url) != _origin(self.base) and not url.startswith("https://"):
            raise RegistryError(
                f"{self.registry} sent {what} to {_origin_text(url)} over plain HTTP; "
                "graven sends data only to this registry or over HTTPS",
                registry=self.registry,
            )
        return url

    def _request(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        expect: set[int],
        what: str,
        headers: dict[str, str] | None = None,
        body: _Body = None,
        max_body: int = _MAX_ERROR_BODY,
        idempotent: bool | None = None,
    ) -> _Reply:
        response, conn = self._request_stream(
            method,
            url,
            scope=scope,
            expect=expect,
            what=what,
            headers=headers,
            body=body,
            idempotent=idempotent,
        )
        return self._read_reply(url, conn, response, max_body, what)

    def _request_stream(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        expect: set[int],
        what: str,
        headers: dict[str, str] | None = None,
        body: _Body = None,
        idempotent: bool | None = None,
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send with auth; on 401 answer the challenge once and resend. The response of
        an expected status is returned unread; anything else raises RegistryError.

        ``idempotent`` (default: GET and HEAD) allows retries on 5xx and dropped
        connections."""
        retry = method in _SAFE_METHODS if idempotent is None else idempotent
        answered = False
        while True:
            sent = dict(headers or {})
            same_origin = _origin(url) == _origin(self.base)
            if same_origin:
                self._authorize(sent, scope)
            response, conn = self._exchange(method, url, sent, body, what, retry=retry)
            if response.status == 401 and same_origin and not answered:
                challenges = response.headers.get_all("WWW-Authenticate") or []
                self._drain_release(_origin(url), conn, response)
                self._answer(challenges, scope)
                answered = True
                continue
            if response.status in expect:
                return response, conn
            reply = self._read_reply(url, conn, response, _MAX_ERROR_BODY, what, strict=False)
            raise self._error(reply, scope, what)

    def _authorize(self, headers: dict[str, str], scope: str) -> None:
        if self._bearer is not None:
            token = self._token(scope)
            headers["Authorization"] = f"Bearer {token}"
        elif self._basic and self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()

    def _answer(self, raw: list[str], scope: str) -> None:
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
                raise self._auth_error(scope, status=401)
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
        if realm.startswith("http://") and not (self.scheme == "http" or _is_loopback(realm_host)):
            raise RegistryAuthError(
                f"{self.registry} sends graven for a token to {_origin_text(realm)} over plain "
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
        url = _with_query(realm, params)
        what = f"a token from {_origin_text(realm)}"
        response, conn = self._exchange("GET", url, headers, None, what, retry=True)
        reply = self._read_reply(url, conn, response, _MAX_TOKEN_BODY, what, strict=False)
        if reply.status in (401, 403):
            raise self._auth_error(scope, status=reply.status, realm=realm)
        if reply.status != 200:
            raise self._error(reply, scope, what)
        try:
            doc = json.loads(reply.body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = doc.get("expires_in", 60)
        except (ValueError, AttributeError):
            token, expires_in = None, 0
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise RegistryError(
                f"the token service {_origin_text(realm)} sent no usable token",
                registry=self.registry,
            )
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 60.0
        # Renew a little early: a token expiring in flight costs a round trip.
        self._tokens[scope] = (token, self._monotonic() + max(lifetime - 10.0, 1.0))
        return token

    def _auth_error(
        self, scope: str, *, status: int, realm: str | None = None
    ) -> RegistryAuthError:
        first = scope.split(maxsplit=1)[0] if scope else ""
        action = "push to" if "push" in first.rpartition(":")[2] else "pull from"
        repo = _scope_repository(scope) or "?"
        who = self.credentials
        by = f" ({_origin_text(realm)})" if realm else ""
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

    def _error(self, reply: _Reply, scope: str, what: str) -> RegistryError:
        status = reply.status
        codes, detail = _registry_errors(reply.body)
        said = f": {detail}" if detail else ""
        if status == 401 and _insufficient_scope(reply) and self.credentials is not None:
            # Authenticated, but the token does not grant what was asked: a denial.
            return self._auth_error(scope, status=403)
        if status == 401 or (status == 403 and "DENIED" in codes):
            return self._auth_error(scope, status=status)
        if status == 403:
            return RegistryAuthError(
                f"{self.registry} forbids {what} (HTTP 403){said}",
                hint="Use credentials with access, or ask the registry's administrator.",
                registry=self.registry,
                status=status,
            )
        if status == 404:
            repo = _scope_repository(scope)
            if "NAME_UNKNOWN" in codes and repo:
                message = f"repository {repo!r} not found on {self.registry}"
            else:
                message = f"{what} not found on {self.registry}"
            return RegistryNotFound(
                message,
                hint="Check the reference; push the image first if it is not there yet.",
                registry=self.registry,
                status=status,
            )
        if status >= 500:
            return RegistryUnavailable(
                f"{self.registry} failed on {what} (HTTP {status}){said}",
                hint="The registry is having trouble; retry later or tell its operator.",
                registry=self.registry,
                status=status,
            )
        return RegistryError(
            f"{self.registry} refused {what} (HTTP {status}){said}",
            registry=self.registry,
            status=status,
        )

    # --- transport -----------------------------------------------------------------------

    def _exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: _Body,
        what: str,
        *,
        retry: bool,
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """One request; with ``retry``, resent on dropped connections and 5xx replies."""
        attempt = 0
        while True:
            try:
                response, conn = self._send(method, url, headers, body)
            except (OSError, http.client.HTTPException) as exc:
                if not retry or attempt >= self.retries or not _transient(exc):
                    raise self._unreachable(exc, what, url) from exc
            else:
                if not retry or response.status not in _RETRY_STATUSES or attempt >= self.retries:
                    return response, conn
                self._drain_release(_origin(url), conn, response)
            attempt += 1
            self._sleep(self.backoff * 2 ** (attempt - 1))

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: _Body
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        origin = _origin(url)
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": "graven", **headers}
        conn = self._idle.pop(origin, None)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(origin)
            try:
                if isinstance(body, _Upload):
                    headers["Content-Length"] = str(body.length)
                    with body.open() as f:
                        f.seek(body.offset)
                        reader = _BodyReader(f, body.length, body.on_sent)
                        conn.request(method, target, body=cast(Any, reader), headers=headers)
                else:
                    if body is not None or method in ("PUT", "POST", "PATCH"):
                        headers["Content-Length"] = str(len(body or b""))
                    conn.request(method, target, body=body, headers=headers)
                return conn.getresponse(), conn
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = None
                # A kept-alive connection the server closed meanwhile: one fresh try.
                if reused and _transient(exc):
                    reused = False
                    continue
                raise
            except BaseException:
                conn.close()  # half a request went out (the store failed, say): unusable
                raise

    def _connect(self, origin: tuple[str, str]) -> http.client.HTTPConnection:
        scheme, netloc = origin
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            return http.client.HTTPSConnection(
                netloc, timeout=self.timeout, context=self._ssl, blocksize=_IO_BLOCK
            )
        return http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=_IO_BLOCK)

    def _release(
        self,
        origin: tuple[str, str],
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        if response.will_close or not response.isclosed() or origin in self._idle:
            conn.close()
        else:
            self._idle[origin] = conn

    def _drain_release(
        self,
        origin: tuple[str, str],
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        try:
            response.read(_MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            conn.close()
            return
        self._release(origin, conn, response)

    def _read_reply(
        self,
        url: str,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        limit: int,
        what: str,
        *,
        strict: bool = True,
    ) -> _Reply:
        try:
            body = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(exc, what, url) from exc
        if len(body) > limit:
            conn.close()
            if strict:
                raise RegistryError(
                    f"{self.registry} sent more than {limit} bytes for {what}; refusing it",
                    registry=self.registry,
                )
            body = body[:limit]
        else:
            self._release(_origin(url), conn, response)
        return _Reply(response.status, response.headers, body, url)

    def _unreachable(self, exc: BaseException, what: str, url: str | None = None) -> RegistryError:
        where = self.registry
        if url and _origin(url) != _origin(self.base):
            where = _origin_text(url)  # a token service or a redirect target
        if isinstance(exc, ssl.SSLError):
            return RegistryUnavailable(
                f"TLS with {where} failed ({exc.reason or exc}) while requesting {what}",
                hint="If the registry serves plain HTTP, pass --insecure.",
                registry=self.registry,
            )
        if isinstance(exc, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(exc, TimeoutError):
            why = f"no answer within {self.timeout:g}s"
        elif isinstance(exc, http.client.HTTPException):
            why = f"the reply broke off or was not HTTP ({type(exc).__name__})"
        else:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return RegistryUnavailable(
            f"registry at {where} is down or unreachable: {why} (while requesting {what})",
            hint="Check the address and that the registry is running, then retry.",
            registry=self.registry,
        )


class _CappedStream(io.RawIOBase):
    """A blob download that ends after exactly ``size`` bytes, or says the registry lied.

    Transport failures become RegistryErrors here, where they happen, so a failure of
    the reader's own (writing to the store, say) is never mistaken for the registry's.
    """

    def __init__(
        self,
        response: http.client.HTTPResponse,
        size: int,
        what: str,
        unreachable: Callable[[BaseException, str], RegistryError],
    ) -> None:
        super().__init__()
        self._response, self._left, self._size, self._what = response, size, size, what
        self._unreachable = unreachable
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            if self._left == 0:
                if self._response.read(1):
                    raise RegistryError(
                        f"{self._what}: the registry sent more than {self._size} bytes"
                    )
                return 0
            n = self._response.readinto(view[: min(len(view), self._left)])
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc, self._what) from exc
        if n == 0:
            raise RegistryError(
                f"{self._what}: the registry ended the blob after {self.received} of "
                f"{self._size} bytes",
                hint="Retry the pull; if it persists, tell the registry's operator.",
            )
        self._left -= n
        self.received += n
        return n


class BlobStream(io.BufferedReader):
    """A blob being downloaded: a buffered binary stream that counts what arrived."""

    def __init__(self, raw: _CappedStream) -> None:
        super().__init__(raw, _IO_BLOCK)
        self._capped = raw

    @property
    def received(self) -> int:
        return self._capped.received


def _insufficient_scope(reply: _Reply) -> bool:
    for header in reply.headers.get_all("WWW-Authenticate") or []:
        with contextlib.suppress(ValueError):
            for challenge in parse_challenges(header):
                if challenge.get("error") == "insufficient_scope":
                    return True
    return False


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLError):
        return False
    return isinstance(exc, ConnectionError | TimeoutError | http.client.HTTPException)


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def _origin_text(url: str) -> str:
    scheme, netloc = _origin(url)
    return f"{scheme}://{netloc}"


def _with_query(url: str, params: list[tuple[str, str]] | None = None, **more: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query += list(params or []) + list(more.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _range_end(header: str | None) -> int | None:
    if not header:
        return None
    match = re.fullmatch(r"(?:bytes=)?0-(\d+)", header.strip())
    return int(match[1]) if match else None


def _manifest_what(repository: str, reference: str) -> str:
    if reference.startswith("sha256:"):
        return f"manifest {reference} in repository {repository!r}"
    return f"tag {reference!r} in repository {repository!r}"


def _media_type(content_type: str | None, data: bytes) -> str:
    """What a fetched document is: its own ``mediaType``, else a Content-Type that names
    a manifest or index, else what its shape says (``mediaType`` is optional in OCI)."""
    header = (content_type or "").split(";", 1)[0].strip()
    try:
        doc = json.loads(data)
    except ValueError:
        return header
    if not isinstance(doc, dict):
        return header
    if isinstance(doc.get("mediaType"), str) and doc["mediaType"]:
        return str(doc["mediaType"])
    if header in MANIFEST_TYPES | INDEX_TYPES:
        return header
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if isinstance(doc.get("layers"), list):
        return OCI_MANIFEST
    return header


def _registry_errors(body: bytes) -> tuple[set[str], str]:
    """The codes and a readable summary of a distribution-spec error body."""
    try:
        doc = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return set(), _printable(text[:200]) if text and not text.startswith("<") else ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return set(), ""
    codes: set[str] = set()
    messages: list[str] = []
    for item in errors[:5]:
        if not isinstance(item, dict):
            continue
        code, message = item.get("code"), item.get("message")
        if isinstance(code, str):
            codes.add(code)
        text = str(message) if message else str(code or "")
        if text:
            messages.append(f"{code}: {text}" if isinstance(code, str) and code != text else text)
    return codes, _printable("; ".join(messages)[:500])


def _printable(text: str) -> str:
    """``text`` safe for a terminal: a hostile registry's message cannot drive it."""
    return "".join(c if c.isprintable() else "?" for c in text)


# --- push and pull ---------------------------------------------------------------------

BlobAction = Literal["uploaded", "skipped", "mounted", "downloaded"]


@dataclass(frozen=True)
class BlobTransfer:
    """What happened to one blob: sent, found already there, mounted, or fetched."""

    digest: Digest
    media_type: str
    size: int
    action: BlobAction
    bytes: int = 0  # bytes sent or received for it (retries included)
    source: str | None = None  # the repository a mounted blob came from

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": str(self.digest),
            "media_type": self.media_type,
            "size": self.size,
            "action": self.action,
            "bytes": self.bytes,
        }
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class PushResult:
    """A pushed image: where it went, its manifest digest, and what travelled."""

    reference: RegistryRef
    image: Digest
    manifest_digest: Digest
    media_type: str
    blobs: tuple[BlobTransfer, ...]

    @property
    def bytes_sent(self) -> int:
        return sum(b.bytes for b in self.blobs)

    def count(self, action: BlobAction) -> int:
        return sum(b.action == action for b in self.blobs)

    def to_dict(self) -> dict[str, Any]:
        pinned = RegistryRef(
            self.reference.registry, self.reference.repository, digest=self.manifest_digest
        )
        return {
            "reference": str(self.reference),
            "pinned": str(pinned),
            "image": str(self.image),
            "manifest_digest": str(self.manifest_digest),
            "media_type": self.media_type,
            "bytes_sent": self.bytes_sent,
            "uploaded": self.count("uploaded"),
            "skipped": self.count("skipped"),
            "mounted": self.count("mounted"),
            "blobs": [b.to_dict() for b in self.blobs],
        }


@dataclass(frozen=True)
class PullResult:
    """A pulled image: the local name now pointing at it and what was fetched."""

    reference: RegistryRef
    name: str
    image: Digest
    manifest_digest: Digest
    blobs: tuple[BlobTransfer, ...]

    @property
    def bytes_received(self) -> int:
        return sum(b.bytes for b in self.blobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": str(self.reference),
            "name": self.name,
            "image": str(self.image),
            "manifest_digest": str(self.manifest_digest),
            "bytes_received": self.bytes_received,
            "blobs": [b.to_dict() for b in self.blobs],
        }


Progress = Callable[[BlobTransfer], None]


class BlobSources:
    """Which repositories of a registry are known to hold a blob: the candidates for a
    cross-repository mount. Kept in the store's cache; only a hint (a wrong entry costs
    one failed mount, then a normal upload)."""

    def __init__(self, store: ImageStore, registry: str) -> None:
        self._store, self._registry = store, registry

    def _key(self, digest: Digest) -> str:
        return f"{_BLOB_SOURCES_KEY} {self._registry} {digest}"

    def repositories(self, digest: Digest) -> list[str]:
        text = self._store.cache_get(self._key(digest))
        try:
            repos = json.loads(text) if text else []
        except ValueError:
            return []
        if not isinstance(repos, list):
            return []
        return [
            r for r in repos if isinstance(r, str) and all(map(_COMPONENT_RE.match, r.split("/")))
        ]

    def add(self, digest: Digest, repository: str) -> None:
        repos = self.repositories(digest)
        if repos[:1] == [repository]:
            return
        repos = [repository, *(r for r in repos if r != repository)][:_MAX_SOURCES]
        self._store.cache_put(self._key(digest), json.dumps(repos))


def _blob_descriptors(manifest: bytes) -> list[Descriptor]:
    """The config and layer descriptors of an (already validated) manifest."""
    doc = json.loads(manifest)
    blobs = [Descriptor.from_dict(doc["config"], "manifest.config")]
    blobs += [Descriptor.from_dict(d, f"manifest.layers[{i}]") for i, d in enumerate(doc["layers"])]
    return blobs


def push_image(
    store: ImageStore,
    image: Image,
    ref: RegistryRef,
    client: RegistryClient,
    *,
    compression: str = "gzip",
    progress: Progress | None = None,
) -> PushResult:
    """Push ``image`` to ``ref``: the blobs the repository lacks, then the manifest.

    ``ref`` names a tag (default ``latest``) and/or a digest; a digest must be the one
    the image's manifest has. ``progress`` is told about every blob as it is done.
    """
    from graven.store.oci import check_compression, oci_documents

    oci = oci_documents(store, image, check_compression(compression))
    if ref.digest is not None and ref.digest != oci.manifest_digest:
        raise UsageError(
            f"{ref} pins digest {ref.digest}, but the manifest of image "
            f"{image.name or image.digest.short} is {oci.manifest_digest}",
            hint="Push by tag, or pin the manifest digest 'graven push -o json' reported.",
        )
    repo = ref.repository
    sources = BlobSources(store, client.registry)
    config = Descriptor(OCI_CONFIG, oci.config_digest, len(oci.config))
    transfers: list[BlobTransfer] = []
    # Layers first, the config last: the config names every layer (the usual order).
    for desc in [*(layer.descriptor() for layer in oci.layers), config]:
        if desc.digest in {t.digest for t in transfers}:
            continue  # the same layer twice in one image travels once
        if desc is config:
            opener: Callable[[], BinaryIO] = functools.partial(io.BytesIO, oci.config)
        else:
            opener = functools.partial(store.open_blob, desc.digest)
        transfer = _push_blob(client, sources, repo, desc, opener)
        sources.add(desc.digest, repo)
        transfers.append(transfer)
        if progress is not None:
            progress(transfer)
    tag = ref.tag or (None if ref.digest else "latest")
    client.put_manifest(repo, tag or str(oci.manifest_digest), OCI_MANIFEST, oci.manifest)
    final = RegistryRef(ref.registry, repo, tag, oci.manifest_digest)
    return PushResult(final, image.digest, oci.manifest_digest, OCI_MANIFEST, tuple(transfers))


def _push_blob(
    client: RegistryClient,
    sources: BlobSources,
    repo: str,
    desc: Descriptor,
    opener: Callable[[], BinaryIO],
) -> BlobTransfer:
    def done(action: BlobAction, sent: int = 0, source: str | None = None) -> BlobTransfer:
        return BlobTransfer(desc.digest, desc.media_type, desc.size, action, sent, source)

    if client.blob_size(repo, desc.digest) is not None:
        return done("skipped")
    location = None
    for source in sources.repositories(desc.digest):
        if source == repo:
            continue
        try:
            location = client.mount_blob(repo, desc.digest, source)
        except (RegistryAuthError, RegistryNotFound):
            continue  # no pull access there, or it is gone: try the next, then upload
        if location is None:
            return done("mounted", source=source)
        break  # the registry opened an upload session instead: use it
    sent = client.upload_blob(repo, desc.digest, desc.size, opener, location=location)
    return done("uploaded", sent)


def pick_platform(index: bytes, where: str) -> Descriptor:
    """The manifest of an index for this machine (``linux/<arch>``); RegistryError if
    the index has none, naming the platforms it has."""
    from graven.store.oci import host_platform

    want_os = "linux"
    want_arch, want_variant = host_platform()
    try:
        doc = json.loads(index)
        entries = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise InvalidOCI("manifests: expected a list")
        found: list[tuple[Descriptor, str, str, str | None]] = []
        for i, entry in enumerate(entries):
            desc = Descriptor.from_dict(entry, f"manifests[{i}]")
            plat = entry.get("platform") if isinstance(entry, dict) else None
            if isinstance(plat, dict):
                variant = plat.get("variant")
                found.append(
                    (
                        desc,
                        str(plat.get("os", "")),
                        str(plat.get("architecture", "")),
                        str(variant) if variant else None,
                    )
                )
    except ValueError as exc:
        raise RegistryError(f"{where}: the index is malformed: {exc}") from None
    matches = [f for f in found if f[1] == want_os and f[2] == want_arch]
    matches.sort(key=lambda f: f[3] != want_variant)  # an exact variant first
    if not matches or matches[0][0].media_type not in MANIFEST_TYPES:
        have = ", ".join(f"{o}/{a}" + (f"/{v}" if v else "") for _, o, a, v in found) or "none"
        raise RegistryNotFound(
            f"{where} has no image for {want_os}/{want_arch} (it has: {have})",
            hint="Pull an image built for this machine's platform.",
        )
    return matches[0][0]


def pull_image(
    store: ImageStore,
    ref: RegistryRef,
    client: RegistryClient,
    *,
    name: str | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Pull ``ref`` into ``store`` and point local name ``name`` at it.

    The default name is the repository's last component. Every blob is verified
    while it streams in; on any failure nothing is tagged.
    """
    from graven.store.oci_import import import_from_manifest

    local = name if name is not None else local_name_for(ref.repository)
    if not is_valid_name(local):
        raise UsageError(
            f"invalid image name {local!r}: use lowercase letters, digits and '-', "
            "starting with a letter",
            hint="Pass --name NAME.",
        )
    repo = ref.repository
    manifest = client.get_manifest(repo, ref.reference)
    if manifest.media_type in INDEX_TYPES:
        entry = pick_platform(manifest.data, f"{ref} on {client.registry}")
        manifest = client.get_manifest(repo, str(entry.digest))
        if len(manifest.data) != entry.size:
            raise RegistryError(
                f"{client.registry}: manifest {entry.digest} is {len(manifest.data)} bytes, "
                f"the index says {entry.size}",
                registry=client.registry,
            )
    if manifest.media_type not in MANIFEST_TYPES:
        raise RegistryError(
            f"{ref} is a {_printable(manifest.media_type[:100]) or 'document of unknown type'}, "
            "not an image manifest graven can import",
            hint="graven pulls OCI and Docker v2 image manifests (and indexes of them).",
            registry=client.registry,
        )
    transfers: list[BlobTransfer] = []

    @contextlib.contextmanager
    def open_blob(desc: Descriptor) -> Iterator[BinaryIO]:
        with client.open_blob(repo, desc.digest, desc.size) as stream:
            yield cast(BinaryIO, stream)
            # Reached only when the importer read the blob without complaint.
            transfer = BlobTransfer(
                desc.digest, desc.media_type, desc.size, "downloaded", stream.received
            )
            transfers.append(transfer)
            if progress is not None:
                progress(transfer)

    image = import_from_manifest(store, manifest.data, manifest.digest, open_blob)
    store.tag(local, image.digest)
    sources = BlobSources(store, client.registry)
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for desc in _blob_descriptors(manifest.data):
            sources.add(desc.digest, repo)
    pinned = RegistryRef(ref.registry, repo, ref.tag, manifest.digest)
    return PullResult(pinned, local, image.digest, manifest.digest, tuple(transfers))
