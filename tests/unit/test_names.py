"""Names and digests are whole-string matches: a trailing newline is not allowed in."""

from __future__ import annotations

import pytest

from graven.model import Digest, is_valid_name
from graven.reference import _COMPONENT_RE, _TAG_RE
from graven.spec.fields import check_env_name


def test_a_digest_with_a_trailing_newline_is_refused() -> None:
    good = "sha256:" + "a" * 64
    assert Digest(good) == good
    with pytest.raises(ValueError, match="not a sha256 digest"):
        Digest(good + "\n")


@pytest.mark.parametrize("name", ["web\n", "web\n\n", "\nweb"])
def test_a_name_with_a_newline_is_refused(name: str) -> None:
    assert not is_valid_name(name)


def test_env_names_and_registry_names_match_whole() -> None:
    assert check_env_name("TOKEN") == "TOKEN"
    with pytest.raises(ValueError):
        check_env_name("TOKEN\n")
    assert _TAG_RE.match("v1") and not _TAG_RE.match("v1\n")
    assert _COMPONENT_RE.match("library") and not _COMPONENT_RE.match("library\n")
