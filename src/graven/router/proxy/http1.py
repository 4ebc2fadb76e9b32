"""HTTP/1.1 message heads for the embedded proxy: request and response parsing (the
fast paths and the strict parser they fall back to) and the proxy's own error answers.

Pure code over bytes: no I/O, nothing per connection.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

HEAD_LIMIT: Final = 64 * 1024  # request/response head, chunk-size lines, trailers

# Headers never copied across: hop-by-hop ones, and those the proxy writes itself
# (message framing, X-Forwarded-For, and Expect, which it answers on its own).
_NOT_COPIED: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
    }
)
_TOKEN_RE: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET_RE: Final = re.compile(rb"^[\x21-\x7e]+$")
_DIGITS_RE: Final = re.compile(rb"^[0-9]{1,18}$")
_BAD_VALUE_RE: Final = re.compile(rb"[\x00\r\n]")


class _BadMessage(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Request:
    __slots__ = (
        "chunked",
        "client_ip",
        "expect_continue",
        "forward",
        "has_host",
        "keep_alive",
        "length",
        "method",
        "target",
        "version",
        "xff",
    )

    method: bytes
    target: bytes
    version: int  # 10 or 11
    keep_alive: bool
    length: int
    chunked: bool
    expect_continue: bool
    has_host: bool
    forward: bytes  # end-to-end header lines, each ending in CRLF
    xff: bytes
    client_ip: bytes


def _split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes, bytes]]]:
    """Start line and ``(lowercase name, name, value)`` of each header line."""
    lines = head[:-4].split(b"\r\n")
    headers: list[tuple[bytes, bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # A name with surrounding space (or an obs-fold continuation line) is how
        # request smuggling starts: reject rather than guess.
        if not sep or not _TOKEN_RE.match(name):
            raise _BadMessage(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE_RE.search(value):
            raise _BadMessage(400, "invalid character in header value")
        headers.append((name.lower(), name, value))
    return lines[0], headers


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")]


def _content_length(values: list[bytes], status: int) -> int:
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])  # the usual case, decided at once
    # Several equal values ("5, 5") are tolerated by RFC 9112; differing ones are not.
    found = {t.strip(b" \t") for v in values for t in v.split(b",")}
    if len(found) != 1:
        raise _BadMessage(status, "conflicting Content-Length")
    (text,) = found
    if not _DIGITS_RE.match(text):
        raise _BadMessage(status, "invalid Content-Length")
    return int(text)


# Fast paths. A head in canonical form ("Name: value", one space after the colon, no
# whitespace around the value: what clients and servers nearly always send) is
# validated by one regular expression and copied without being rebuilt line by line.
# A "plain" head, one with no header the proxy must act on (besides Host, or the
# response's Content-Length), is then done; others have their special lines found and
# cut. Anything not canonical takes the strict parser, which names the problem. All
# paths give the same result for any head a faster one accepts (see the unit tests).
_START_LINE_REQUEST: Final = rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.([01])\r\n"
_START_LINE_RESPONSE: Final = rb"HTTP/1\.([01]) ([0-9]{3}) ([^\r\n]*)\r\n"
_CANONICAL_LINE: Final = (
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: (?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?\r\n"
)
_FAST_REQUEST_RE: Final = re.compile(_START_LINE_REQUEST + rb"((?:" + _CANONICAL_LINE + rb")*)\r\n")
_FAST_RESPONSE_RE: Final = re.compile(
    _START_LINE_RESPONSE + rb"((?:" + _CANONICAL_LINE + rb")*)\r\n"
)
# Hop-by-hop, framing and proxy-owned names (and "close": see below), as a prefix tree
# so that a line is cleared at its first letter or two.
_ACTED_ON: Final = (
    rb"c(?:onnection|lose)|keep-alive|proxy-(?:connection|authenticate|authorization)"
    rb"|t(?:e|railer|ransfer-encoding)|upgrade|expect|x-(?:forwarded-for|graven-backend)"
)
_PLAIN_REQUEST_RE: Final = re.compile(
    _START_LINE_REQUEST
    + rb"((?:(?!(?i:"
    + _ACTED_ON
    + rb"|content-length):)"
    + _CANONICAL_LINE
    + rb")*)\r\n"
)
_PLAIN_RESPONSE_RE: Final = re.compile(
    _START_LINE_RESPONSE + rb"((?:(?!(?i:" + _ACTED_ON + rb"):)" + _CANONICAL_LINE + rb")*)\r\n"
)
# The commonest heads of all, settled by one match with nothing left to look up: a
# plain request with exactly one Host line, and a plain response with exactly one
# all-digit Content-Length (captured, and the lines either side of it).
_CANONICAL_VALUE: Final = rb"(?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?\r\n"
_NO_HOST_LINE: Final = rb"(?!(?i:" + _ACTED_ON + rb"|content-length|host):)" + _CANONICAL_LINE
_ONE_HOST_REQUEST_RE: Final = re.compile(
    _START_LINE_REQUEST
    + rb"((?:"
    + _NO_HOST_LINE
    + rb")*(?i:host): "
    + _CANONICAL_VALUE
    + rb"(?:"
    + _NO_HOST_LINE
    + rb")*)\r\n"
)
_NO_LENGTH_LINE: Final = rb"(?!(?i:" + _ACTED_ON + rb"|content-length):)" + _CANONICAL_LINE
_ONE_LENGTH_RESPONSE_RE: Final = re.compile(
    _START_LINE_RESPONSE
    + rb"((?:"
    + _NO_LENGTH_LINE
    + rb")*)(?i:content-length): ([0-9]{1,18})\r\n((?:"
    + _NO_LENGTH_LINE
    + rb")*)\r\n"
)
# Header lines the proxy reads or drops (and "close", so that the rare header named by
# ``Connection: close`` is left to the strict parser), searched for in the lowercased
# head of a message the fast path accepted: each line is "name: value\r\n" there.
_SPECIAL_NAMES: Final = (
    rb"connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|proxy-authenticate|proxy-authorization|content-length|expect|x-forwarded-for|close"
)
_REQUEST_SPECIAL_RE: Final = re.compile(rb"\n(" + _SPECIAL_NAMES + rb"|host): ([^\r]*)\r")
_RESPONSE_SPECIAL_RE: Final = re.compile(
    rb"\n(" + _SPECIAL_NAMES + rb"|x-graven-backend): ([^\r]*)\r"
)
_PLAIN_CONNECTION_TOKENS: Final = frozenset({b"close", b"keep-alive"})


def _cut(head: bytes, start: int, end: int, cuts: list[tuple[int, int]]) -> bytes:
    """``head[start:end]`` without the ``cuts`` spans (ascending, inside the range)."""
    if not cuts:
        return head[start:end]
    pieces = []
    for cut_start, cut_end in cuts:
        pieces.append(head[start:cut_start])
        start = cut_end
    pieces.append(head[start:end])
    return b"".join(pieces)


def _parse_request(head: bytes) -> _Request:
    m = _ONE_HOST_REQUEST_RE.fullmatch(head)
    if m is not None:
        req = _Request()
        req.method, req.target, minor, req.forward = m.groups()
        if minor == b"1":
            req.version, req.keep_alive = 11, True
        else:
            req.version, req.keep_alive = 10, False
        req.has_host = True
        req.chunked = req.expect_continue = False
        req.length = 0
        req.xff = req.client_ip = b""
        return req
    m = _PLAIN_REQUEST_RE.fullmatch(head)
    if m is not None:
        return _request_from(
            m.group(1),
            m.group(2),
            11 if m.group(3) == b"1" else 10,
            [],
            [],
            [],
            [],
            head.lower().count(b"\nhost: "),
            False,
            m.group(4),
        )
    m = _FAST_REQUEST_RE.fullmatch(head)
    if m is None:
        return _parse_request_strict(head)
    block_start, block_end = m.span(4)
    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    xff: list[bytes] = []
    hosts = 0
    expect_continue = False
    cuts: list[tuple[int, int]] = []
    for special in _REQUEST_SPECIAL_RE.finditer(head.lower(), block_start - 1, block_end):
        name, value = special.groups()
        if name == b"host":
            hosts += 1
            continue
        cuts.append((special.start() + 1, special.end() + 1))
        if name == b"connection":
            connection.append(value)
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        elif name == b"x-forwarded-for":
            xff.append(head[special.start(2) : special.end(2)])  # as sent, not lowercased
        elif name == b"expect":
            expect_continue = value == b"100-continue"
        elif name == b"close":
            return _parse_request_strict(head)
    conn_tokens = _tokens(connection) if connection else []
    if not _PLAIN_CONNECTION_TOKENS.issuperset(conn_tokens):
        return _parse_request_strict(head)  # it names headers to drop
    return _request_from(
        m.group(1),
        m.group(2),
        11 if m.group(3) == b"1" else 10,
        conn_tokens,
        lengths,
        codings,
        xff,
        hosts,
        expect_continue,
        _cut(head, block_start, block_end, cuts),
    )


def _parse_request_strict(head: bytes) -> _Request:
    start, headers = _split_head(head)
    parts = start.split(b" ")
    if len(parts) != 3:
        raise _BadMessage(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.match(method) or not _TARGET_RE.match(target):
        raise _BadMessage(400, "malformed request line")
    if version == b"HTTP/1.1":
        ver = 11
    elif version == b"HTTP/1.0":
        ver = 10
    elif version.startswith(b"HTTP/") and len(version) == 8:
        raise _BadMessage(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    else:
        raise _BadMessage(400, "malformed request line")

    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    xff: list[bytes] = []
    hosts = 0
    expect_continue = False
    kept: list[tuple[bytes, bytes, bytes]] = []
    for lname, name, value in headers:
        if lname not in _NOT_COPIED:
            if lname == b"host":
                hosts += 1
            kept.append((lname, name, value))
        elif lname == b"connection":
            connection.append(value)
        elif lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
        elif lname == b"x-forwarded-for":
            xff.append(value)
        elif lname == b"expect":
            expect_continue = value.lower() == b"100-continue"
    conn_tokens = _tokens(connection)
    if conn_tokens:
        named = set(conn_tokens)
        kept = [h for h in kept if h[0] not in named]
    forward = b"".join(name + b": " + value + b"\r\n" for _, name, value in kept)
    return _request_from(
        method, target, ver, conn_tokens, lengths, codings, xff, hosts, expect_continue, forward
    )


def _request_from(
    method: bytes,
    target: bytes,
    ver: int,
    conn_tokens: list[bytes],
    lengths: list[bytes],
    codings: list[bytes],
    xff: list[bytes],
    hosts: int,
    expect_continue: bool,
    forward: bytes,
) -> _Request:
    req = _Request()
    req.method = method
    req.target = target
    req.version = ver
    if ver == 11:
        req.keep_alive = b"close" not in conn_tokens
    else:
        req.keep_alive = b"keep-alive" in conn_tokens
    if hosts > 1 or (ver == 11 and hosts == 0):
        raise _BadMessage(400, "exactly one Host header is required")
    req.has_host = hosts == 1
    req.chunked = False
    req.length = 0
    if codings:
        # Both framings at once is the textbook smuggling vector; refuse it.
        if lengths or ver == 10:
            raise _BadMessage(400, "Transfer-Encoding not allowed here")
        if _tokens(codings) != [b"chunked"]:
            raise _BadMessage(501, "only 'chunked' transfer coding is supported")
        req.chunked = True
    elif lengths:
        req.length = _content_length(lengths, 400)
    req.expect_continue = expect_continue and (req.chunked or req.length > 0)
    req.forward = forward
    req.xff = b", ".join(xff) if xff else b""
    req.client_ip = b""
    return req


class _Response:
    __slots__ = (
        "chunked",
        "close_delimited",
        "forward",
        "has_body",
        "keep_alive",
        "length",
        "start",
        "status",
    )

    status: int
    start: bytes  # b"HTTP/1.1 200 OK\r\n"
    forward: bytes
    chunked: bool
    close_delimited: bool
    keep_alive: bool  # the backend keeps the connection open after this response
    has_body: bool  # False for HEAD answers, 1xx, 204 and 304
    length: int | None  # None: no Content-Length (or a bodiless response)


def _parse_response(head: bytes, method: bytes) -> _Response:
    m = _ONE_LENGTH_RESPONSE_RE.fullmatch(head)
    if m is not None:
        minor, status, reason, before, length, after = m.groups()
        start = b"HTTP/1.1 " + status + b" " + reason + b"\r\n"
        code = int(status)
        if code < 200 or code in (204, 304) or method == b"HEAD":
            return _response_from(
                status, start, minor == b"1", set(), [length], [], before + after, method
            )
        resp = _Response()
        resp.status = code
        resp.start = start
        resp.forward = before + after
        resp.keep_alive = minor == b"1"
        resp.has_body = True
        resp.chunked = resp.close_delimited = False
        resp.length = int(length)
        return resp
    m = _PLAIN_RESPONSE_RE.fullmatch(head)
    if m is not None:
        status = m.group(2)
        start = b"HTTP/1.1 " + status + b" " + m.group(3) + b"\r\n"
        block_start, block_end = m.span(4)
        lowered = head.lower()
        at = lowered.find(b"\ncontent-length: ", block_start - 1)
        if at < 0:
            return _response_from(
                status, start, m.group(1) == b"1", set(), [], [], m.group(4), method
            )
        line_end = head.index(b"\r\n", at + 1) + 2
        if lowered.find(b"\ncontent-length: ", line_end - 1) < 0:  # just the one
            return _response_from(
                status,
                start,
                m.group(1) == b"1",
                set(),
                [head[at + 17 : line_end - 2]],
                [],
                head[block_start : at + 1] + head[line_end:block_end],
                method,
            )
    m = _FAST_RESPONSE_RE.fullmatch(head)
    if m is None:
        return _parse_response_strict(head, method)
    block_start, block_end = m.span(4)
    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    cuts: list[tuple[int, int]] = []
    for special in _RESPONSE_SPECIAL_RE.finditer(head.lower(), block_start - 1, block_end):
        name, value = special.groups()
        cuts.append((special.start() + 1, special.end() + 1))
        if name == b"content-length":
            lengths.append(value)
        elif name == b"connection":
            connection.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        elif name == b"close":
            return _parse_response_strict(head, method)
    named = set(_tokens(connection)) if connection else set()
    if not _PLAIN_CONNECTION_TOKENS.issuperset(named):
        return _parse_response_strict(head, method)  # it names headers to drop
    status = m.group(2)
    return _response_from(
        status,
        b"HTTP/1.1 " + status + b" " + m.group(3) + b"\r\n",
        m.group(1) == b"1",
        named,
        lengths,
        codings,
        _cut(head, block_start, block_end, cuts),
        method,
    )


def _parse_response_strict(head: bytes, method: bytes) -> _Response:
    start, headers = _split_head(head)
    parts = start.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise _BadMessage(502, "malformed status line from backend")
    if not parts[1].isdigit():
        raise _BadMessage(502, "malformed status line from backend")
    reason = parts[2] if len(parts) == 3 else b""

    connection: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    kept: list[tuple[bytes, bytes, bytes]] = []
    for lname, name, value in headers:
        if lname == b"connection":
            connection.append(value)
        elif lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
        elif lname in _NOT_COPIED or lname == b"x-graven-backend":
            continue
        else:
            kept.append((lname, name, value))
    named = set(_tokens(connection)) if connection else set()
    if named:
        kept = [h for h in kept if h[0] not in named]
    return _response_from(
        parts[1],
        b"HTTP/1.1 " + parts[1] + b" " + reason + b"\r\n",
        parts[0] == b"HTTP/1.1",
        named,
        lengths,
        codings,
        b"".join(name + b": " + value + b"\r\n" for _, name, value in kept),
        method,
    )


def _response_from(
    status: bytes,
    start: bytes,
    http11: bool,
    conn_tokens: set[bytes],
    lengths: list[bytes],
    codings: list[bytes],
    forward: bytes,
    method: bytes,
) -> _Response:
    resp = _Response()
    resp.status = code = int(status)
    resp.start = start
    resp.forward = forward
    resp.keep_alive = b"close" not in conn_tokens and (http11 or b"keep-alive" in conn_tokens)
    resp.chunked = False
    resp.close_delimited = False
    resp.length = None
    resp.has_body = not (method == b"HEAD" or code in (204, 304) or code < 200)
    if not resp.has_body:
        # A HEAD answer's Content-Length describes the GET body; pass it through as is.
        if lengths and code != 204 and code >= 200:
            resp.length = _content_length(lengths, 502)
    elif codings:
        # Transfer-Encoding overrides Content-Length (RFC 9112 6.3); a final coding
        # other than chunked means the body runs until the backend closes.
        if _tokens(codings)[-1:] == [b"chunked"]:
            resp.chunked = True
        else:
            resp.close_delimited = True
    elif lengths:
        resp.length = _content_length(lengths, 502)
    else:
        resp.close_delimited = True
    return resp


def _error_response(status: int, message: str, *, keep_alive: bool) -> bytes:
    body = message.encode() + b"\n"
    lines = [
        b"HTTP/1.1 %d %b\r\n" % (status, HTTPStatus(status).phrase.encode()),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if status == 503:
        lines.append(b"Retry-After: 1\r\n")
    lines.append(b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    return b"".join(lines) + body
