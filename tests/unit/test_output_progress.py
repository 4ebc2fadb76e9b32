"""Progress bars: a live bar on a terminal, the plain lines in a log, nothing for JSON.

Rendered into StringIO consoles and compared, as rich's own tests do.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console

from graven.cli.lines import Span
from graven.cli.output import Output
from graven.cli.registry_cmds import _Transfers
from graven.model import Digest
from graven.store.oci_types import OCI_CONFIG, OCI_LAYER_GZIP
from graven.store.registry.transfer import BlobTransfer

BAR = "━"  # what rich draws bars with
ESC = "\x1b"


def console(*, terminal: bool) -> Console:
    return Console(
        file=io.StringIO(), force_terminal=terminal, width=100, highlight=False, soft_wrap=True
    )


def written(con: Console) -> str:
    file = con.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def build_three_steps(out: Output) -> None:
    with out.bar("build web", total=3) as bar:
        for n in range(1, 4):
            bar.line(f"  step {n} [dim]cached[/]")
            bar.advance()


def test_a_terminal_gets_a_bar_and_the_lines() -> None:
    err = console(terminal=True)
    out = Output("text", err=err)
    assert out.bars_shown
    build_three_steps(out)
    text = written(err)
    assert BAR in text
    assert "build web" in text
    assert "3/3" in text  # the last frame, drawn before the bar is erased
    for n in range(1, 4):
        assert f"step {n}" in text


def test_a_log_gets_only_the_plain_lines() -> None:
    err = console(terminal=False)
    out = Output("text", err=err)
    assert not out.bars_shown
    build_three_steps(out)
    assert written(err) == "  step 1 cached\n  step 2 cached\n  step 3 cached\n"


def test_json_mode_writes_nothing_at_all() -> None:
    err, std = console(terminal=True), console(terminal=True)
    out = Output("json", out=std, err=err)
    assert not out.bars_shown
    build_three_steps(out)
    with out.bar("push", unit="bytes") as bar:
        row = bar.child("layer", 10)
        row.advance(10)
        row.remove()
        bar.update(total=10, completed=10, description="push web")
    assert written(err) == "" and written(std) == ""


def test_force_color_alone_does_not_make_a_log_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # FORCE_COLOR colours CI logs; rich then calls them terminals, bars must not follow.
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    out = Output("text")
    assert out.err.is_terminal
    assert not out.bars_shown
    build_three_steps(out)
    err = capsys.readouterr().err
    assert BAR not in err
    assert "step 3" in err


def test_a_dumb_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    err = console(terminal=True)
    out = Output("text", err=err)
    assert not out.bars_shown


def test_bars_in_bytes_with_a_row_per_blob() -> None:
    err = console(terminal=True)
    out = Output("text", err=err)
    with out.bar("push web", total=3_000_000, unit="bytes") as bar:
        assert bar.shown
        row = bar.child("  abc123", 3_000_000)
        for _ in range(3):
            row.advance(1_000_000)
            bar.advance(1_000_000)
        row.remove()
    text = written(err)
    assert "push web" in text
    assert "abc123" in text
    assert "3.0/3.0 MB" in text


def test_a_bar_inside_a_bar_is_one_more_row() -> None:
    err = console(terminal=True)
    out = Output("text", err=err)
    with out.bar("deploy", total=2) as outer:
        with out.bar("build web", total=1) as inner:
            assert inner.shown
            inner.advance()
        outer.advance(2)
    text = written(err)
    assert "build web" in text and "deploy" in text and "2/2" in text


def test_the_bar_is_gone_after_an_error() -> None:
    err = console(terminal=True)
    out = Output("text", err=err)
    with pytest.raises(RuntimeError), out.bar("build web", total=3):
        raise RuntimeError("step failed")
    # The live display stopped: a new bar may start (rich allows one at a time).
    build_three_steps(out)


# --- push and pull feed the bar bytes, and print a line per blob --------------------------------

LAYER = Digest("sha256:" + "1" * 64)
CONFIG = Digest("sha256:" + "2" * 64)
THERE = Digest("sha256:" + "3" * 64)


def push_blobs(out: Output) -> None:
    with out.bar("push web", total=1_500, unit="bytes") as bar:
        transfers = _Transfers(bar)
        transfers.done(BlobTransfer(THERE, OCI_LAYER_GZIP, 1_000, "skipped"))
        for _ in range(2):  # a retried upload sends its bytes twice
            for _ in range(4):
                transfers.moved(LAYER, 400, 100)
        transfers.done(BlobTransfer(LAYER, OCI_LAYER_GZIP, 400, "uploaded", 800))
        transfers.moved(CONFIG, 100, 100)
        transfers.done(BlobTransfer(CONFIG, OCI_CONFIG, 100, "uploaded", 100))


def test_transfers_fill_the_overall_bar_exactly_once() -> None:
    err = console(terminal=True)
    push_blobs(Output("text", err=err))
    text = written(err)
    overall = [float(done) for done in re.findall(r"(\d+\.\d)/1\.5 kB", text)]
    assert overall[-1] == 1.5  # filled...
    assert max(overall) == 1.5  # ...and never past full, though the layer went twice
    assert "111111111111" in text  # the layer's own row while it travelled
    for action in ("skipped", "uploaded"):
        assert action in text


def test_transfers_in_a_log_are_the_blob_lines() -> None:
    err = console(terminal=False)
    push_blobs(Output("text", err=err))
    lines = written(err).splitlines()
    assert [line.split()[0] for line in lines] == ["skipped", "uploaded", "uploaded"]
    assert lines[1].split()[1] == LAYER.short
    assert ESC not in written(err)


def test_json_mode_and_the_output_module_never_import_rich() -> None:
    # CLI start time: rich loads only when something is drawn for a person.
    code = textwrap.dedent(
        """
        import sys
        from graven.cli.output import Output
        out = Output("json")
        with out.bar("build web", total=2) as bar:
            bar.line("step 1")
            bar.advance()
            bar.child("row", 1).remove()
        assert "rich" not in sys.modules, sorted(m for m in sys.modules if "rich" in m)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_styled_lines_go_above_a_live_bar_and_plain_into_a_log() -> None:
    """A styled line (never markup) prints as it is: in a log as its text, on a
    terminal above the bar, its brackets untouched."""
    for terminal in (True, False):
        err = console(terminal=terminal)
        out = Output("text", err=err)
        with out.bar("build web", total=1) as bar:
            bar.line(("  step 1 ", Span("cached", "dim"), "  run: echo [x]"))
        text = written(err)
        assert "  step 1 cached  run: echo [x]" in re.sub(ESC + r"\[[0-9;]*m", "", text)
        assert (BAR in text) is terminal
