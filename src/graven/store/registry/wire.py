"""What travels between the registry client and a registry, below the protocol.

Request bodies streamed from the content store (``Upload``), replies read whole up to a
cap (``Reply``), blob downloads that end at their declared size (``BlobStream``), URL
origins, and reading a registry's error bodies and documents safely.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from graven.errors import StoreError
from graven.store.oci_types import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from graven.store.registry.errors import RegistryError

IO_BLOCK = 1 << 16


@dataclass
class Upload:
    """A request body streamed from the store: ``length`` bytes from ``offset``."""

    open: Callable[[], BinaryIO]
    offset: int
    length: int
    on_sent: Callable[[int], None] | None = None


class BodyReader:
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
class Reply:
    """A registry's reply, its body read whole (up to a cap)."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


Body = bytes | Upload | None


class CappedStream(io.RawIOBase):
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

    def __init__(self, raw: CappedStream) -> None:
        super().__init__(raw, IO_BLOCK)
        self._capped = raw

    @property
    def received(self) -> int:
        return self._capped.received


def origin_of(url: str) -> tuple[str, str]:
    """``(scheme, netloc)`` of ``url``: what credentials and connections are tied to."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def origin_text(url: str) -> str:
    """``scheme://netloc`` of ``url``, for messages."""
    scheme, netloc = origin_of(url)
    return f"{scheme}://{netloc}"


def with_query(url: str, params: list[tuple[str, str]] | None = None, **more: str) -> str:
    """``url`` with more query parameters appended."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query += list(params or []) + list(more.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def range_end(header: str | None) -> int | None:
    """The last byte offset a ``Range: 0-N`` header accepts, or None."""
    if not header:
        return None
    match = re.fullmatch(r"(?:bytes=)?0-(\d+)", header.strip())
    return int(match[1]) if match else None


def parse_json(data: bytes | str) -> Any:
    """``data`` parsed as JSON; ValueError for anything that is not, including a document
    nested too deeply for the parser (which raises RecursionError)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def media_type_of(content_type: str | None, data: bytes) -> str:
    """What a fetched document is: its own ``mediaType``, else a Content-Type that names
    a manifest or index, else what its shape says (``mediaType`` is optional in OCI)."""
    header = (content_type or "").split(";", 1)[0].strip()
    try:
        doc = parse_json(data)
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


def registry_errors(body: bytes) -> tuple[set[str], str]:
    """The codes and a readable summary of a distribution-spec error body."""
    try:
        doc = parse_json(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return set(), printable(text[:200]) if text and not text.startswith("<") else ""
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
    return codes, printable("; ".join(messages)[:500])


def printable(text: str) -> str:
    """``text`` safe for a terminal: a hostile registry's message cannot drive it."""
    return "".join(c if c.isprintable() else "?" for c in text)
