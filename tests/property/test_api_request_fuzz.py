"""Whatever bytes a client sends, the API's parsers end in a value or a BadRequest.

Never an internal exception, which the server would log with a traceback and answer
with a 500: requests are untrusted input (DESIGN invariant 8).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from graven.controller.api import (
    MAX_INT,
    BadRequest,
    parse_body,
    parse_head,
    query_number,
    service_config,
)
from graven.model import HealthCheck, ServiceConfig

FUZZ = settings(max_examples=200, deadline=None)

# Pieces that steer random bytes towards heads the parser has to think about.
HEAD_TOKENS = [
    b"GET ",
    b"POST ",
    b"/v1/rollout",
    b"?id=",
    b"&",
    b"%",
    b"%D9%A1",
    b" HTTP/1.1",
    b"\r\n",
    b"Content-Length:",
    b"content-length: ",
    b"Transfer-Encoding: chunked",
    b" ",
    b"\t",
    b":",
    b"0",
    b"12",
    b"\xb2",
    b"\xd9\xa1",
    b"_",
    b"9" * 30,
    b"//[",
]

JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=30,
)


def refused_or(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BadRequest as exc:
        assert exc.message and 400 <= exc.status < 500


@FUZZ
@given(st.lists(st.sampled_from(HEAD_TOKENS) | st.binary(max_size=4), max_size=24))
@example([b"GET /v1/health HTTP/1.1\r\nContent-Length: \xb2"])
def test_any_head_parses_or_is_refused(pieces: list[bytes]) -> None:
    refused_or(parse_head, b"".join(pieces) + b"\r\n\r\n")


@FUZZ
@given(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 3000 + b"]" * 3000)
@example(b'{"a": "\\udc00"}')
def test_any_body_parses_or_is_refused(raw: bytes) -> None:
    refused_or(parse_body, raw)


@FUZZ
@given(st.lists(st.text(max_size=24), max_size=3))
@example(["\u0661"])
@example([str(MAX_INT + 1)])
def test_any_query_id_parses_or_is_refused(values: list[str]) -> None:
    refused_or(query_number, {"id": values}, "id")


DEFAULTS = ServiceConfig(replicas=1, port=8080, health=HealthCheck()).to_dict()


@FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(DEFAULTS)), JSON, max_size=4),
    st.dictionaries(st.sampled_from(sorted(DEFAULTS["health"])), JSON, max_size=3),
)
def test_any_config_becomes_a_service_config_or_is_refused(
    changes: dict[str, Any], health: dict[str, Any]
) -> None:
    data = {**DEFAULTS, **changes}
    if isinstance(data["health"], dict):
        data["health"] = {**data["health"], **health}
    try:
        config = service_config(data)
    except BadRequest:
        return
    assert isinstance(config, ServiceConfig)
    # Keys left out of the health object take their defaults; nothing else changes.
    expected = {**data, "health": {**DEFAULTS["health"], **data["health"]}}
    assert json.loads(json.dumps(config.to_dict())) == json.loads(json.dumps(expected))
