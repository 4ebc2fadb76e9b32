"""The Router port's shared rules: latency buckets, address syntax, and the backend-set
checks every adapter (the embedded proxy, HAProxy, the fake) applies alike."""

from __future__ import annotations

import pytest

from graven.errors import RouterError
from graven.router.base import (
    LATENCY_BOUNDS,
    MAX_WEIGHT,
    Backend,
    BackendSetError,
    check_backends,
    latency_bucket,
    split_address,
)
from graven.router.proxy.backends import backends_to_json, parse_backends

OVERFLOW = len(LATENCY_BOUNDS)


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, 0),
        (0.0004, 0),
        (0.001, 0),  # bounds are inclusive upper bounds, like Prometheus' "le"
        (0.0010001, 1),
        (0.002, 1),
        (0.0035, 2),
        (0.05, 5),
        (0.999, 9),
        (1.0, 9),
        (4.9, 11),
        (5.0, 11),
        (5.0001, OVERFLOW),
        (3600.0, OVERFLOW),
    ],
)
def test_latency_bucket(seconds: float, bucket: int) -> None:
    assert latency_bucket(seconds) == bucket


def test_every_bound_lands_in_its_own_bucket_and_just_above_in_the_next() -> None:
    for i, bound in enumerate(LATENCY_BOUNDS):
        assert latency_bucket(bound) == i
        assert latency_bucket(bound * 1.000001) == i + 1


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("web-1.internal:80", ("web-1.internal", 80)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_split_address(address: str, parts: tuple[str, int]) -> None:
    assert split_address(address) == parts


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("no-port", "expected host:port"),
        (":80", "expected host:port"),
        ("127.0.0.1:0", "port must be 1-65535"),
        ("127.0.0.1:http", "port must be 1-65535"),
        ("[zz::1]:80", "bad IPv6 address"),
        ("bad_host:80", "bad host"),
    ],
)
def test_split_address_says_what_is_wrong(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_address(address)


GOOD = [Backend("a", "127.0.0.1:1", "ready", 0), Backend("b@r2", "[::1]:2", "drain", MAX_WEIGHT)]
BAD = [
    ([Backend("a", "127.0.0.1:1"), Backend("a", "127.0.0.1:2")], r"backends\[1\]\.id: duplicate"),
    ([Backend("", "127.0.0.1:1")], r"backends\[0\]\.id: expected 1-128"),
    ([Backend("a", "127.0.0.1")], r"backends\[0\]\.address: expected host:port"),
    ([Backend("a", "127.0.0.1:1", "gone")], r"backends\[0\]\.state"),  # type: ignore[arg-type]
    ([Backend("a", "127.0.0.1:1", weight=True)], r"backends\[0\]\.weight: expected an integer"),
    (
        [Backend("a", "127.0.0.1:1", weight=MAX_WEIGHT + 1)],
        r"backends\[0\]\.weight: must be 0-1000",
    ),
]


def test_a_good_set_passes_both_checks_unchanged() -> None:
    check_backends(GOOD)
    assert parse_backends(backends_to_json(GOOD)) == GOOD


@pytest.mark.parametrize(("backends", "message"), BAD)
def test_the_adapters_check_refuses_what_the_proxy_refuses(
    backends: list[Backend], message: str
) -> None:
    with pytest.raises(BackendSetError, match=message):
        parse_backends(backends_to_json(backends))
    with pytest.raises(RouterError, match="invalid backend set: " + message) as caught:
        check_backends(backends)
    assert caught.value.hint is not None and "0-1000" in caught.value.hint
