"""The proxy's fast head parsers agree with the strict ones on every head: same fields,
or the same refusal. The fast path only skips work; it never decides differently."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from graven.router.proxy.http1 import (
    _BadMessage,
    _parse_request,
    _parse_request_strict,
    _parse_response,
    _parse_response_strict,
    _Request,
    _Response,
)

NAMES = [
    b"Host",
    b"host",
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"Connection",
    b"CONNECTION",
    b"Keep-Alive",
    b"X-Forwarded-For",
    b"Expect",
    b"TE",
    b"Trailer",
    b"Upgrade",
    b"Proxy-Connection",
    b"Close",
    b"X-Secret",
    b"X-Graven-Backend",
    b"Accept",
    b"Set-Cookie",
    b"Tee",
    b"Content-Length-Extra",
    b"Bad Name",
]
SEPARATORS = [b": ", b": ", b": ", b": ", b":", b":  ", b" : ", b":\t"]  # mostly canonical
VALUES = [
    b"1",
    b"5",
    b"0",
    b"5, 5",
    b"1, 2",
    b"chunked",
    b"gzip, chunked",
    b"close",
    b"keep-alive",
    b"Keep-Alive, close",
    b"X-Secret",
    b"keep-alive, x-secret",
    b"100-continue",
    b"203.0.113.9",
    b"2001:DB8::1",
    b"padded ",
    b"",
    b"a\tb",
    b"caf\xc3\xa9",
    b"nul\x00byte",
    b"bare\rcr",
]

# Mostly headers the proxy passes along untouched: the "plain" fast path's heads.
PLAIN_NAMES = [b"Host", b"HOST", b"Accept", b"Set-Cookie", b"Tee", b"Content-Length", b"ETag"]

header_lines = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(NAMES), st.sampled_from(PLAIN_NAMES)),
        st.sampled_from(SEPARATORS),
        st.sampled_from(VALUES),
    ),
    max_size=6,
)


def head_of(start: bytes, lines: list[tuple[bytes, bytes, bytes]]) -> bytes:
    return start + b"\r\n" + b"".join(n + s + v + b"\r\n" for n, s, v in lines) + b"\r\n"


def request_fields(req: _Request) -> tuple[object, ...]:
    return (
        req.method,
        req.target,
        req.version,
        req.keep_alive,
        req.length,
        req.chunked,
        req.expect_continue,
        req.has_host,
        req.forward,
        req.xff,
    )


def response_fields(resp: _Response) -> tuple[object, ...]:
    return (
        resp.status,
        resp.start,
        resp.forward,
        resp.chunked,
        resp.close_delimited,
        resp.keep_alive,
        resp.length,
    )


@settings(max_examples=400)
@given(
    start=st.sampled_from(
        [
            b"GET / HTTP/1.1",
            b"POST /a?b=c HTTP/1.1",
            b"PUT /x HTTP/1.0",
            b"GET / HTTP/2.0",
            b"GET  / HTTP/1.1",
            b"BAD\x01 / HTTP/1.1",
        ]
    ),
    lines=header_lines,
)
@example(
    b"GET / HTTP/1.1",
    [(b"Host", b": ", b"x"), (b"Connection", b": ", b"X-Secret"), (b"X-Secret", b": ", b"1")],
)
@example(b"GET / HTTP/1.1", [(b"Host", b": ", b"x"), (b"TE", b": ", b"0"), (b"Tee", b": ", b"0")])
@example(b"GET / HTTP/1.1", [(b"Host", b": ", b"x"), (b"Close", b": ", b"1")])
@example(
    b"GET / HTTP/1.1", [(b"Accept", b": ", b"1"), (b"host", b": ", b"x"), (b"Tee", b": ", b"")]
)
@example(b"PUT /x HTTP/1.0", [(b"Host", b": ", b"x")])
@example(b"GET / HTTP/1.1", [(b"Host", b": ", b"x"), (b"HOST", b": ", b"y")])
@example(b"GET / HTTP/1.1", [(b"Host", b": ", b"padded ")])
def test_requests_parse_the_same_either_way(
    start: bytes, lines: list[tuple[bytes, bytes, bytes]]
) -> None:
    head = head_of(start, lines)
    try:
        strict: tuple[object, ...] = request_fields(_parse_request_strict(head))
    except _BadMessage as exc:
        strict = ("refused", exc.status, exc.reason)
    try:
        fast: tuple[object, ...] = request_fields(_parse_request(head))
    except _BadMessage as exc:
        fast = ("refused", exc.status, exc.reason)
    assert fast == strict


@settings(max_examples=400)
@given(
    start=st.sampled_from(
        [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.0 200 OK",
            b"HTTP/1.1 204 No Content",
            b"HTTP/1.1 304 Not Modified",
            b"HTTP/1.1 103 Early Hints",
            b"HTTP/1.1 500 Internal Server Error",
            b"HTTP/1.1 200",
            b"HTTP/1.1 200 ",
            b"HTTP/1.1 20x OK",
        ]
    ),
    method=st.sampled_from([b"GET", b"HEAD"]),
    lines=header_lines,
)
@example(b"HTTP/1.1 200 OK", b"GET", [(b"ETag", b": ", b"1"), (b"Content-Length", b": ", b"5")])
@example(b"HTTP/1.0 204 No Content", b"GET", [(b"content-length", b": ", b"0")])
@example(b"HTTP/1.1 200 OK", b"HEAD", [(b"Content-Length", b": ", b"5, 5")])
@example(b"HTTP/1.1 200 OK", b"HEAD", [(b"ETag", b": ", b"1"), (b"content-length", b": ", b"5")])
@example(b"HTTP/1.1 204 No Content", b"GET", [(b"Content-Length", b": ", b"0")])
@example(b"HTTP/1.1 103 Early Hints", b"GET", [(b"Content-Length", b": ", b"5")])
@example(b"HTTP/1.0 200 OK", b"GET", [(b"Content-Length", b": ", b"5"), (b"Tee", b": ", b"1")])
@example(
    b"HTTP/1.1 200 OK", b"GET", [(b"Content-Length", b": ", b"5"), (b"Content-Length", b": ", b"5")]
)
def test_responses_parse_the_same_either_way(
    start: bytes, method: bytes, lines: list[tuple[bytes, bytes, bytes]]
) -> None:
    head = head_of(start, lines)
    try:
        strict: tuple[object, ...] = response_fields(_parse_response_strict(head, method))
    except _BadMessage as exc:
        strict = ("refused", exc.status, exc.reason)
    try:
        fast: tuple[object, ...] = response_fields(_parse_response(head, method))
    except _BadMessage as exc:
        fast = ("refused", exc.status, exc.reason)
    assert fast == strict


def test_the_fast_path_takes_the_common_heads() -> None:
    req = _parse_request(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n")
    assert (req.forward, req.xff, req.length) == (b"Host: a\r\n", b"192.0.2.1", 0)
    resp = _parse_response(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: keep-alive\r\nETag: x\r\n\r\n",
        b"GET",
    )
    assert (resp.forward, resp.length, resp.keep_alive) == (b"ETag: x\r\n", 2, True)
    req = _parse_request(b"GET /y HTTP/1.1\r\nAccept: */*\r\nHost: a\r\nUser-Agent: u\r\n\r\n")
    assert (req.forward, req.keep_alive) == (b"Accept: */*\r\nHost: a\r\nUser-Agent: u\r\n", True)
    resp = _parse_response(
        b"HTTP/1.1 404 Not Found\r\nETag: x\r\nContent-Length: 12\r\nVary: y\r\n\r\n", b"GET"
    )
    assert (resp.start, resp.forward, resp.length) == (
        b"HTTP/1.1 404 Not Found\r\n",
        b"ETag: x\r\nVary: y\r\n",
        12,
    )
    resp = _parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", b"GET")
    assert not resp.keep_alive  # HTTP/1.0 without keep-alive closes after the answer
    resp = _parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"GET")
    assert (resp.keep_alive, resp.close_delimited) == (False, True)
