"""What ``graven check`` found: a valid spec's names, and warnings that do not make it
invalid (a port another program holds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graven.errors import SpecProblem

if TYPE_CHECKING:
    from graven.spec.loader import LoadedSpec


@dataclass(frozen=True)
class SpecSummary:
    """A valid spec: its file, the names it defines (sorted), and its warnings."""

    file: Path
    images: tuple[str, ...]
    services: tuple[str, ...]
    targets: tuple[str, ...]
    warnings: tuple[SpecProblem, ...] = ()
    # How instances run on this machine: {"mode": "sealed"} or {"mode": "none", "reason": ...}
    isolation: Mapping[str, str] | None = None

    @classmethod
    def of(
        cls,
        loaded: LoadedSpec,
        warnings: Sequence[SpecProblem] = (),
        *,
        isolation: Mapping[str, str] | None = None,
    ) -> SpecSummary:
        spec = loaded.spec
        return cls(
            loaded.path,
            tuple(sorted(spec.images)),
            tuple(sorted(spec.services)),
            tuple(sorted(spec.targets)),
            tuple(warnings),
            isolation,
        )

    @property
    def isolation_text(self) -> str:
        """``sealed``, or ``none (why)``."""
        if not self.isolation:
            return ""
        mode = self.isolation.get("mode", "")
        reason = self.isolation.get("reason", "")
        return f"{mode} ({reason})" if reason else mode

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "valid": True,
            "images": list(self.images),
            "services": list(self.services),
            "targets": list(self.targets),
            **({"isolation": dict(self.isolation)} if self.isolation is not None else {}),
            "warnings": [w.to_dict() for w in self.warnings],
        }
