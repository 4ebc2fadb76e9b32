"""The controller API's request parsing: pure functions, no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from graven.controller.api import (
    MAX_BODY,
    MAX_DEPTH,
    MAX_HEAD,
    MAX_INT,
    NAME_PATTERN,
    BadRequest,
    field,
    parse_body,
    parse_decimal,
    parse_head,
    query_number,
    service_config,
    service_name,
)
from graven.model import AnalysisConfig, CanaryConfig, CanaryStep, HealthCheck, ServiceConfig
from graven.spec.fields import NAME_PATTERN as SPEC_NAME_PATTERN


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("12", 12), ("007", 7), (str(MAX_INT), MAX_INT), ("0" * 5000 + "3", 3)],
)
def test_parse_decimal_takes_ascii_digits(text: str, value: int) -> None:
    assert parse_decimal(text, "x") == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\u0661\u0662",
        "1_0",
        " 12 ",
        "12 ",
        "+1",
        "-1",
        "12a",
        "²",
        "0x10",
        "1.0",
        "\uff11\uff12",
    ],
)
def test_parse_decimal_refuses_what_int_would_take_or_choke_on(text: str) -> None:
    with pytest.raises(BadRequest, match=r"^query: 'id' must be a decimal number, got "):
        parse_decimal(text, "query: 'id'")


@pytest.mark.parametrize("text", [str(MAX_INT + 1), "9" * 5000, "1" + "0" * 19])
def test_parse_decimal_refuses_numbers_out_of_range(text: str) -> None:
    with pytest.raises(BadRequest, match=f"^Content-Length must be from 0 to {MAX_INT}, got "):
        parse_decimal(text, "Content-Length")


def test_parse_decimal_honours_the_low_bound() -> None:
    with pytest.raises(BadRequest, match="must be from 1 to"):
        parse_decimal("0", "rollout", low=1)


def head(*lines: str | bytes) -> bytes:
    return b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\r\n" for ln in lines) + (
        b"\r\n"
    )


def test_parse_head_reads_method_path_query_and_length() -> None:
    got = parse_head(
        head("GET /v1/rollout?id=7&x=a%20b HTTP/1.1", "Host: graven", "Content-Length: \t12 ")
    )
    assert got.method == "GET" and got.path == "/v1/rollout"
    assert got.query == {"id": ["7"], "x": ["a b"]}
    assert got.length == 12


def test_parse_head_takes_repeated_equal_lengths_and_no_length() -> None:
    assert (
        parse_head(head("POST /v1/down HTTP/1.1", "Content-Length: 2", "content-length: 2")).length
        == 2
    )
    assert parse_head(head("GET /v1/health HTTP/1.0")).length == 0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["GET /v1/health HTTP/1.1", b"Content-Length: \xb2"], "Content-Length must be a decimal"),
        (
            ["GET /v1/health HTTP/1.1", "Content-Length: \u0661\u0662"],
            "Content-Length must be a decimal",
        ),
        (["GET /v1/health HTTP/1.1", "Content-Length: 1_0"], "Content-Length must be a decimal"),
        (["GET /v1/health HTTP/1.1", "Content-Length: -1"], "Content-Length must be a decimal"),
        (["GET /v1/health HTTP/1.1", "Content-Length: "], "Content-Length must be a decimal"),
        (["GET /v1/health HTTP/1.1", "Content-Length: " + "9" * 40], "Content-Length must be from"),
        (["GET / HTTP/1.1", "Content-Length: 1", "Content-Length: 2"], "conflicting"),
        (["POST /v1/down HTTP/1.1", "Transfer-Encoding: chunked"], "Transfer-Encoding"),
        (["GET / HTTP/1.1", "no colon here"], "malformed header line"),
        (["GET / HTTP/1.1", "Content-Length : 2"], "malformed header line"),
        (["GET / HTTP/1.1", " folded: line"], "malformed header line"),
        (["get /v1/health HTTP/1.1"], "malformed request line"),
        (["GET /v1/health"], "malformed request line"),
        (["GET /v1/health HTTP/2"], "malformed request line"),
        (["GET  /v1/health HTTP/1.1"], "malformed request line"),
        (["GET v1/health HTTP/1.1"], "malformed request line"),
        (["GET http://graven/v1/health HTTP/1.1"], "malformed request line"),
        ([b"GET /v1/h\xe9alth HTTP/1.1"], "malformed request line"),
        ([""], "malformed request line"),
        (["GET /?" + "&".join(f"k{i}=1" for i in range(40)) + " HTTP/1.1"], "more than 16"),
    ],
)
def test_parse_head_refuses_malformed_heads(lines: list[str | bytes], message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        parse_head(head(*lines))
    assert caught.value.status == 400


def test_parse_head_refuses_oversized_heads_and_bodies() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_head(head("GET / HTTP/1.1", "X-Pad: " + "a" * MAX_HEAD))
    assert caught.value.status == 431
    with pytest.raises(BadRequest) as caught:
        parse_head(head("POST / HTTP/1.1", f"Content-Length: {MAX_BODY + 1}"))
    assert caught.value.status == 413


def nested(depth: int) -> bytes:
    """An object whose deepest value sits ``depth`` containers down."""
    return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_parse_body_takes_objects_up_to_the_depth_limit() -> None:
    assert parse_body(b"") == {}
    assert parse_body(b'{"n": -9223372036854775808, "s": "\\u00e9"}') == {"n": -(2**63), "s": "é"}
    assert parse_body(nested(MAX_DEPTH))["a"] is not None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (nested(MAX_DEPTH + 1), "nests deeper than 32"),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 32"),
        (b'{"a": ' + b'{"b": ' * 5000 + b"1" + b"}" * 5001, "nests deeper than 32"),
        (b'{"s": "\xff"}', r"not UTF-8 \(byte 7\)"),
        ('{"s": 1}'.encode("utf-16"), "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not JSON"),
        (b"{", "not JSON"),
        (b'{"to": NaN}', "NaN is not a number JSON allows"),
        (b'{"to": -Infinity}', "-Infinity is not a number JSON allows"),
        (b"[]", "must be a JSON object, got list"),
        (b"12", "must be a JSON object, got int"),
        (b'"x"', "must be a JSON object, got str"),
        (b"null", "must be a JSON object, got NoneType"),
        (
            b'{"details": {"a": [1, 18446744073709551616]}}',
            r"^request body: details\.a\[1\]: integer 18446744073709551616 out of range \(-9223372036854775808 to 9223372036854775807\)$",
        ),
        (
            b'{"to": -9223372036854775809}',
            "^request body: to: integer -9223372036854775809 out of range",
        ),
        (
            b'{"config": {"interval": 1e400}}',
            r"^request body: config\.interval: number out of range \(got inf\)$",
        ),
        (b'{"service": "\\ud800"}', r"^request body: service: lone surrogate \\ud800$"),
        (b'{"details": {"\\udfff": 1}}', r"^request body: details: a key: lone surrogate \\udfff$"),
    ],
)
def test_parse_body_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_body(raw)


def test_field_checks_type_and_range() -> None:
    body: dict[str, Any] = {"to": 3, "flag": True, "big": 2**63, "name": "web"}
    assert field(body, "to", int, low=1) == 3
    assert field(body, "missing", int, required=False) is None
    with pytest.raises(BadRequest, match="missing key 'missing'"):
        field(body, "missing", int)
    with pytest.raises(BadRequest, match="'flag' must be an integer"):
        field(body, "flag", int)
    with pytest.raises(BadRequest, match=f"'big' must be from 0 to {MAX_INT}"):
        field(body, "big", int)
    with pytest.raises(BadRequest, match="'to' must be from 5 to"):
        field(body, "to", int, low=5)
    with pytest.raises(BadRequest, match="'name' must be int"):
        field(body, "name", int)


def test_query_number() -> None:
    assert query_number({"id": ["42"]}, "id") == 42
    for query, message in [
        ({}, "given once \\(got 0\\)"),
        ({"id": ["1", "2"]}, "given once \\(got 2\\)"),
        ({"id": ["\u0661"]}, "'id' must be a decimal number"),
        ({"id": ["0"]}, "'id' must be from 1 to"),
        ({"id": [str(2**63)]}, "'id' must be from 1 to"),
    ]:
        with pytest.raises(BadRequest, match=message):
            query_number(query, "id")


def test_service_name_is_the_spec_name() -> None:
    assert NAME_PATTERN == SPEC_NAME_PATTERN
    assert service_name({"service": "web-2"}) == "web-2"
    assert service_name({}, required=False) is None
    for bad in ["../x", "Web", "", "web\n", "a" * 64, "wéb"]:
        with pytest.raises(BadRequest, match="'service' must match"):
            service_name({"service": bad})


FULL = ServiceConfig(
    replicas=3,
    port=8080,
    health=HealthCheck(kind="command", command=("true",), interval=0.5),
    env=(("A", "1"),),
    strategy=CanaryConfig(
        steps=(CanaryStep(10, 30.0, True), CanaryStep(50, None, False)),
        analysis=AnalysisConfig(max_p99=None),
    ),
)


def test_service_config_round_trips_its_json_form() -> None:
    assert service_config(json.loads(json.dumps(FULL.to_dict()))) == FULL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"replicas": "3"}, r"config\.replicas must be an integer from 0 to"),
        ({"replicas": True}, r"config\.replicas must be an integer"),
        ({"replicas": 2.0}, r"config\.replicas must be an integer"),
        ({"replicas": -1}, r"config\.replicas must be an integer from 0 to"),
        (
            {"max_surge": 2**63},
            r"config\.max_surge must be an integer from 0 to 9223372036854775807",
        ),
        ({"port": 65536}, r"config\.port must be an integer from 0 to 65535"),
        ({"preview_port": 10**20}, r"config\.preview_port must be an integer from 0 to 65535"),
        ({"drain_timeout": "10s"}, r"config\.drain_timeout must be a number"),
        ({"drain_timeout": -1.0}, r"config\.drain_timeout must be a number from 0"),
        ({"max_p99": "x"}, r"config\.max_p99 must be a number"),
        ({"auto_promote": 1}, r"config\.auto_promote must be true or false"),
        ({"strategy": 3}, r"config\.strategy must be a string"),
        ({"env": {"A": "1"}}, r"config\.env must be a list, got dict"),
        ({"env": [["A"]]}, r"config\.env\[0\] must have 2 items, got 1"),
        ({"env": [["A", 1]]}, r"config\.env\[0\]\[1\] must be a string"),
        ({"canary_steps": [[10, "x", True]]}, r"config\.canary_steps\[0\]\[1\] must be a number"),
        ({"health": []}, r"config\.health must be an object, got list"),
        ({"health": {"interval": "1s"}}, r"config\.health\.interval must be a number"),
        ({"health": {"command": "true"}}, r"config\.health\.command must be a list"),
        ({"health": {"verb": "GET"}}, r"config\.health: unknown key 'verb'"),
        ({"colour": "red"}, r"config: unknown key 'colour'"),
    ],
)
def test_service_config_refuses_wrong_types_naming_the_key(
    change: dict[str, Any], message: str
) -> None:
    data = {**FULL.to_dict(), **change}
    with pytest.raises(BadRequest, match="^request body: " + message):
        service_config(json.loads(json.dumps(data)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"strategy": "recreate"},
            r"config\.strategy: expected one of rolling, blue-green, canary",
        ),
        # Settings of another strategy would be dropped unseen: refused instead.
        ({"preview_port": 9000}, r"config\.preview_port: strategy 'canary' does not use it"),
        ({"max_surge": 3}, r"config\.max_surge: strategy 'canary' does not use it"),
        ({"canary_steps": [[0, 1.0, True]]}, r"config\.canary_steps\[0\]: canary step weight"),
        (
            {"strategy": "rolling", "canary_steps": [], "max_surge": 0, "max_unavailable": 0},
            r"config\.max_surge and max_unavailable cannot both be 0",
        ),
    ],
)
def test_service_config_refuses_what_its_strategy_cannot_take(
    change: dict[str, Any], message: str
) -> None:
    data = {**FULL.to_dict(), **change}
    with pytest.raises(BadRequest, match="^request body: " + message):
        service_config(json.loads(json.dumps(data)))


def test_service_config_needs_its_required_keys() -> None:
    with pytest.raises(BadRequest, match="config: missing key 'health'"):
        service_config({"replicas": 1, "port": 1})
    with pytest.raises(BadRequest, match="config must be an object"):
        service_config([])  # type: ignore[arg-type]
