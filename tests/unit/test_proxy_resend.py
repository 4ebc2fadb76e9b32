"""The embedded proxy's rule for sending a request again after its backend connection
failed (``resend_decision``): the whole table, and the invariants that make it safe."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graven.router.proxy.exchange import FailureKind, resend_decision

FAILURES: list[FailureKind] = ["eof", "reset", "timeout", "other"]
METHODS = [b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"POST", b"PATCH", b"CONNECT"]
NON_IDEMPOTENT = {b"POST", b"PATCH", b"CONNECT"}


@pytest.mark.parametrize(
    ("method", "failure", "reused", "expected"),
    [
        # The keep-alive race on a pooled connection: resent on a fresh connection to
        # the same backend, whatever the method, after a clean close or a reset...
        (b"GET", "eof", True, "fresh-connection"),
        (b"GET", "reset", True, "fresh-connection"),
        (b"POST", "eof", True, "fresh-connection"),
        (b"POST", "reset", True, "fresh-connection"),
        # ... and after any other socket error only when the method is idempotent.
        (b"GET", "other", True, "fresh-connection"),
        (b"POST", "other", True, "no"),
        # A fresh connection: a reset means the backend never read it (any method goes
        # to another backend); a clean close is ambiguous (idempotent methods only).
        (b"GET", "reset", False, "next-backend"),
        (b"POST", "reset", False, "next-backend"),
        (b"GET", "eof", False, "next-backend"),
        (b"PUT", "eof", False, "next-backend"),
        (b"POST", "eof", False, "no"),
        (b"PATCH", "eof", False, "no"),
        (b"GET", "other", False, "no"),
        # A backend that sat on the request until the response timeout had it.
        (b"GET", "timeout", True, "no"),
        (b"GET", "timeout", False, "no"),
    ],
)
def test_the_rule(method: bytes, failure: FailureKind, reused: bool, expected: str) -> None:
    got = resend_decision(method, failure, reused=reused, replayable=True, answered=False)
    assert got == expected


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("reused", [True, False])
def test_never_once_the_answer_started_or_the_body_is_gone(
    method: bytes, failure: FailureKind, reused: bool
) -> None:
    assert resend_decision(method, failure, reused=reused, replayable=True, answered=True) == "no"
    assert resend_decision(method, failure, reused=reused, replayable=False, answered=False) == "no"


@given(
    method=st.sampled_from(METHODS),
    failure=st.sampled_from(FAILURES),
    reused=st.booleans(),
    replayable=st.booleans(),
    answered=st.booleans(),
)
def test_invariants(
    method: bytes, failure: FailureKind, reused: bool, replayable: bool, answered: bool
) -> None:
    got = resend_decision(method, failure, reused=reused, replayable=replayable, answered=answered)
    if got != "no":
        assert replayable and not answered and failure != "timeout"
    # The stale-connection resend goes out on a fresh connection, which can never
    # qualify again: one such resend per request at most.
    if got == "fresh-connection":
        assert reused
    assert (
        resend_decision(method, failure, reused=False, replayable=replayable, answered=answered)
        != "fresh-connection"
    )
    # A non-idempotent request goes again only when the backend cannot have read it
    # (a reset) or it met the keep-alive race (a close or reset on a reused connection).
    if method in NON_IDEMPOTENT and got != "no":
        assert failure in ("eof", "reset")
        assert reused or failure == "reset"
