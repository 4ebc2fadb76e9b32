"""``graven audit``: the ledger, and the proof that nobody altered it."""

from __future__ import annotations

import sys
from typing import Any

import click

from graven.cli import render
from graven.cli.context import app_context
from graven.cli.options import output_option
from graven.cli.output import Output


@click.command()
@click.argument("service", required=False)
@click.option(
    "--verify",
    is_flag=True,
    help="Prove the ledger untouched; exit 1 naming the first altered entry.",
)
@output_option
@click.pass_context
def audit(ctx: click.Context, service: str | None, verify: bool, output: str) -> None:
    """The ledger: who changed what, when and why."""
    import json as _json

    from graven.errors import LedgerTampered
    from graven.ledger.chain import verify_chain

    app = app_context(ctx)
    st = app.state()
    entries = st.ledger()
    shown = [e for e in entries if service is None or e.service == service]
    data: dict[str, Any] = {"entries": [e.to_dict() for e in shown]}
    verified: int | None = None  # how many entries the chain proof covered
    if verify:
        head_file = app.state_dir / "ledger.head"
        head = None
        if head_file.exists():
            try:
                raw = _json.loads(head_file.read_text())
                head = (int(raw["seq"]), str(raw["hash"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise LedgerTampered(0, f"the head record {head_file} is unreadable") from exc
        try:
            count = verify_chain(entries, head)
        except LedgerTampered as exc:
            if output != "json":
                raise
            data.update(verified=False, first_bad_entry=exc.seq, **exc.to_dict())
            Output(output).emit(data)
            sys.exit(exc.exit_code)
        verified = count
        data["verified"] = True
        data["verified_entries"] = count
    Output(output).show(data, render.ledger(shown, verified))
