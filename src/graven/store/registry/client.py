"""The registry client: the OCI distribution API over pooled HTTP connections.

A small synchronous client on ``http.client``: no dependency earns its place for six
endpoints (HEAD/GET blob, POST/PATCH/PUT upload, GET/PUT manifest) plus token auth.
Registry replies are untrusted: documents are size-capped, digests verified, and every
failure is a ``RegistryError`` that says what to do.

Plain HTTP is used for loopback registries and with ``insecure``; anything else
speaks HTTPS with verified certificates.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from graven.model import Digest
from graven.reference import is_loopback_host, split_host
from graven.store.oci_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from graven.store.registry.auth import (
    Credentials,
    RegistryAuth,
    insufficient_scope,
    scope_of,
    scope_repository,
)
from graven.store.registry.errors import (
    RegistryAuthError,
    RegistryError,
    RegistryNotFound,
    RegistryUnavailable,
)
from graven.store.registry.wire import (
    IO_BLOCK,
    BlobStream,
    Body,
    BodyReader,
    CappedStream,
    Reply,
    Upload,
    media_type_of,
    origin_of,
    origin_text,
    range_end,
    registry_errors,
    with_query,
)

# Blobs up to this size go in one PUT; larger ones in PATCH chunks of CHUNK_SIZE.
MONOLITHIC_MAX = 32 * 1024 * 1024
CHUNK_SIZE = 16 * 1024 * 1024
_MAX_ERROR_BODY = 64 * 1024
_MAX_TOKEN_BODY = 1024 * 1024
_MAX_REDIRECTS = 5
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST])


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as the registry sent it, with what it said about it."""

    data: bytes
    media_type: str
    digest: Digest  # of ``data``, verified against what the registry or the reference said


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
        host = split_host(registry)
        self.scheme = "http" if insecure or is_loopback_host(host) else "https"
        self.base = f"{self.scheme}://{registry}"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.monolithic_max = monolithic_max
        self.chunk_size = chunk_size
        self._sleep = sleep
        self._idle: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._ssl: ssl.SSLContext | None = None
        self._auth = RegistryAuth(
            registry,
            credentials=credentials,
            plain_http=self.scheme == "http",
            fetch=self._fetch_token,
            monotonic=monotonic,
        )

    @property
    def credentials(self) -> Credentials | None:
        return self._auth.credentials

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
            scope=scope_of(repository, "pull"),
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
            scope=f"{scope_of(repository, 'pull,push')} {scope_of(source, 'pull')}",
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
            scope=scope_of(repository, "pull,push"),
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
        scope = scope_of(repository, "pull,push")
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
                    body=Upload(open_blob, offset, n, count),
                    expect={202},
                    what=what,
                )
                location = self._location(reply, "the next chunk")
                accepted = range_end(reply.header("Range"))
                if accepted is not None and accepted != offset + n - 1:
                    raise RegistryError(
                        f"{self.registry} accepted bytes up to {accepted} of blob {digest}, "
                        f"expected {offset + n - 1}",
                        registry=self.registry,
                    )
                offset += n
        body: Body = Upload(open_blob, offset, size - offset, count)
        reply = self._request(
            "PUT",
            with_query(location, digest=str(digest)),
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
        response, conn, origin = self._open_stream(url, scope_of(repository, "pull"), what)
        try:
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) != size:
                raise RegistryError(
                    f"{self.registry} is sending {declared} bytes for {what}, "
                    f"but the manifest says {size}",
                    registry=self.registry,
                )
            raw = CappedStream(response, size, f"{what} on {self.registry}", self._unreachable)
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
                return response, conn, origin_of(url)
            target = response.getheader("Location")
            self._drain_release(origin_of(url), conn, response)
            if not target:
                raise RegistryError(
                    f"{self.registry} redirected {what} without a Location",
                    registry=self.registry,
                )
            url = urllib.parse.urljoin(url, target)
            if origin_of(url) != origin_of(self.base) and not url.startswith("https://"):
                raise RegistryError(
                    f"{self.registry} redirected {what} to {origin_text(url)} over plain HTTP; "
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
            scope=scope_of(repository, "pull"),
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
        return Manifest(reply.body, media_type_of(reply.header("Content-Type"), reply.body), digest)

    def put_manifest(self, repository: str, reference: str, media_type: str, data: bytes) -> Digest:
        """Store a manifest under a tag or its digest; the digest the registry names it
        by, which must be the digest of ``data``."""
        what = _manifest_what(repository, reference)
        reply = self._request(
            "PUT",
            self._url(repository, f"manifests/{reference}"),
            scope=scope_of(repository, "pull,push"),
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

    # --- requests and their errors -------------------------------------------------------

    def _url(self, repository: str, rest: str) -> str:
        return f"{self.base}/v2/{repository}/{rest}"

    def _location(self, reply: Reply, what: str) -> str:
        location = reply.header("Location")
        if not location:
            raise RegistryError(
                f"{self.registry} opened {what} without saying where (no Location header)",
                registry=self.registry,
            )
        url = urllib.parse.urljoin(reply.url, location)
        if origin_of(url) != origin_of(self.base) and not url.startswith("https://"):
            raise RegistryError(
                f"{self.registry} sent {what} to {origin_text(url)} over plain HTTP; "
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
        body: Body = None,
        max_body: int = _MAX_ERROR_BODY,
        idempotent: bool | None = None,
    ) -> Reply:
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
        body: Body = None,
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
            same_origin = origin_of(url) == origin_of(self.base)
            if same_origin:
                self._auth.authorize(sent, scope)
            response, conn = self._exchange(method, url, sent, body, what, retry=retry)
            if response.status == 401 and same_origin and not answered:
                challenges = response.headers.get_all("WWW-Authenticate") or []
                self._drain_release(origin_of(url), conn, response)
                self._auth.answer(challenges, scope)
                answered = True
                continue
            if response.status in expect:
                return response, conn
            reply = self._read_reply(url, conn, response, _MAX_ERROR_BODY, what, strict=False)
            raise self._error(reply, scope, what)

    def _fetch_token(self, url: str, headers: dict[str, str], scope: str, what: str) -> Reply:
        response, conn = self._exchange("GET", url, headers, None, what, retry=True)
        reply = self._read_reply(url, conn, response, _MAX_TOKEN_BODY, what, strict=False)
        if reply.status not in (200, 401, 403):
            raise self._error(reply, scope, what)
        return reply

    def _error(self, reply: Reply, scope: str, what: str) -> RegistryError:
        status = reply.status
        codes, detail = registry_errors(reply.body)
        said = f": {detail}" if detail else ""
        if status == 401 and insufficient_scope(reply) and self.credentials is not None:
            # Authenticated, but the token does not grant what was asked: a denial.
            return self._auth.error(scope, status=403)
        if status == 401 or (status == 403 and "DENIED" in codes):
            return self._auth.error(scope, status=status)
        if status == 403:
            return RegistryAuthError(
                f"{self.registry} forbids {what} (HTTP 403){said}",
                hint="Use credentials with access, or ask the registry's administrator.",
                registry=self.registry,
                status=status,
            )
        if status == 404:
            repo = scope_repository(scope)
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
        body: Body,
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
                self._drain_release(origin_of(url), conn, response)
            attempt += 1
            self._sleep(self.backoff * 2 ** (attempt - 1))

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: Body
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        origin = origin_of(url)
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": "graven", **headers}
        conn = self._idle.pop(origin, None)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(origin)
            try:
                if isinstance(body, Upload):
                    headers["Content-Length"] = str(body.length)
                    with body.open() as f:
                        f.seek(body.offset)
                        reader = BodyReader(f, body.length, body.on_sent)
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
                netloc, timeout=self.timeout, context=self._ssl, blocksize=IO_BLOCK
            )
        return http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=IO_BLOCK)

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
    ) -> Reply:
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
            self._release(origin_of(url), conn, response)
        return Reply(response.status, response.headers, body, url)

    def _unreachable(self, exc: BaseException, what: str, url: str | None = None) -> RegistryError:
        where = self.registry
        if url and origin_of(url) != origin_of(self.base):
            where = origin_text(url)  # a token service or a redirect target
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


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLError):
        return False
    return isinstance(exc, ConnectionError | TimeoutError | http.client.HTTPException)


def _manifest_what(repository: str, reference: str) -> str:
    if reference.startswith("sha256:"):
        return f"manifest {reference} in repository {repository!r}"
    return f"tag {reference!r} in repository {repository!r}"
