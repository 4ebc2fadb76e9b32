"""Reading what a registry sends: documents and error bodies, hostile ones included."""

from __future__ import annotations

import json

import pytest

from graven.store.oci_types import OCI_INDEX, OCI_MANIFEST
from graven.store.registry.wire import media_type_of, parse_json, registry_errors

DEEP = b"[" * 100_000  # the JSON parser gives up with RecursionError near 1000 levels


def test_parse_json_says_value_error_for_a_document_nested_too_deeply() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(DEEP)
    assert parse_json(b'{"a": [1]}') == {"a": [1]}


@pytest.mark.parametrize(
    ("content_type", "data", "expected"),
    [
        (None, json.dumps({"mediaType": OCI_INDEX}).encode(), OCI_INDEX),
        (f"{OCI_MANIFEST}; charset=utf-8", b"{}", OCI_MANIFEST),
        ("application/json", b'{"manifests": []}', OCI_INDEX),
        ("application/json", b'{"layers": []}', OCI_MANIFEST),
        ("text/plain", b"not json", "text/plain"),
        (OCI_MANIFEST, DEEP, OCI_MANIFEST),
    ],
)
def test_media_type_of(content_type: str | None, data: bytes, expected: str) -> None:
    assert media_type_of(content_type, data) == expected


def test_registry_errors_read_codes_and_survive_hostile_bodies() -> None:
    body = {"errors": [{"code": "NAME_UNKNOWN", "message": "repository name not known"}]}
    assert registry_errors(json.dumps(body).encode()) == (
        {"NAME_UNKNOWN"},
        "NAME_UNKNOWN: repository name not known",
    )
    codes, detail = registry_errors(DEEP)
    assert codes == set()
    assert detail.startswith("[[[") and len(detail) == 200
    assert registry_errors(b'{"errors": [{"message": "\\u001b[31mred"}]}') == (set(), "?[31mred")
