"""``graven runtime``: which runtimes, isolation features and resource limits this
machine offers instances, and what to install or do for the missing ones."""

from __future__ import annotations

import click

from graven.cli.options import output_option
from graven.cli.output import Output
from graven.cli.render_runtime import machine_report


@click.command()
@output_option
def runtime(output: str) -> None:
    """What this machine offers instances: runtimes, isolation and resource limits.

    Each missing part says what to install or do. 'graven check' warns when the spec
    asks for something (resources:, isolation: required) the machine cannot do.
    """
    from graven.runtime.machine import probe_machine, report_of

    report = report_of(probe_machine())
    Output(output).show(report.to_dict(), machine_report(report))
