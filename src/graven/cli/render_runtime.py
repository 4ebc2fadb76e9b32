"""The view of ``graven runtime``: the machine report in, styled lines out (pure)."""

from __future__ import annotations

from graven.cli.lines import Cell, Line, bold, dim, green, red, table
from graven.runtime.machine import Feature, MachineReport


def _rows(features: tuple[Feature, ...]) -> list[list[Cell]]:
    return [[f.name, green("yes") if f.available else red("no"), f.detail] for f in features]


def machine_report(report: MachineReport) -> list[Line]:
    """Runtimes, then features; under each one that is missing, what to do."""
    lines: list[Line] = []
    for title, features in (("runtime", report.runtimes), ("feature", report.features)):
        rows = table([title, "available", "detail"], _rows(features))
        lines.append(rows[0])
        for feature, row in zip(features, rows[1:], strict=True):
            lines.append(row)
            if feature.fix:
                lines.append(("   ", dim("fix: "), feature.fix))
        lines.append(())
    missing = [f.name for f in (*report.runtimes, *report.features) if not f.available]
    if missing:
        lines.append((bold("missing: "), ", ".join(missing)))
    else:
        lines.append((green("everything graven can use is here"),))
    return lines
