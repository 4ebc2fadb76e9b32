"""The spec edge: ``graven.yaml`` in, a validated ``Spec`` out, or precise problems.

- ``find_spec`` locates the file, ``load_spec`` reads and validates it;
- ``json_schema`` describes the format for editors;
- ``scaffold`` writes a starter project (``graven init``).

Names are imported on first use: validation needs pydantic, finding the file does not,
and a no-op build should pay only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graven.spec.loader import LoadedSpec, load_spec
    from graven.spec.locate import find_spec
    from graven.spec.models import Spec
    from graven.spec.schema import json_schema
    from graven.spec.starter import scaffold

_WHERE = {
    "LoadedSpec": "graven.spec.loader",
    "load_spec": "graven.spec.loader",
    "find_spec": "graven.spec.locate",
    "Spec": "graven.spec.models",
    "scaffold": "graven.spec.starter",
    "json_schema": "graven.spec.schema",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'graven.spec' has no attribute {name!r}")


__all__ = ["LoadedSpec", "Spec", "find_spec", "json_schema", "load_spec", "scaffold"]
