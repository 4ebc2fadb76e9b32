"""The spec edge: ``graven.yaml`` in, a validated ``Spec`` out, or precise problems.

- ``find_spec`` locates the file, ``load_spec`` reads and validates it;
- ``json_schema`` describes the format for editors;
- ``scaffold`` writes a starter project (``graven init``).
"""

from graven.spec.loader import LoadedSpec, find_spec, load_spec
from graven.spec.models import Spec
from graven.spec.scaffold import scaffold
from graven.spec.schema import json_schema

__all__ = ["LoadedSpec", "Spec", "find_spec", "json_schema", "load_spec", "scaffold"]
