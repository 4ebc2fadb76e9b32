"""``graven logs``: what a service's instances (or one instance) wrote, by time."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import click

from graven.cli.context import AppContext, app_context
from graven.cli.options import output_option
from graven.cli.output import Output
from graven.cli.render_logs import log_lines
from graven.errors import NotFoundError
from graven.logtimes import LogLine, merge, parse_since, read_log, select

_FOLLOW_POLL = 0.2  # seconds between looks at the logs while following


def instance_logs(state_dir: Path, target: str) -> dict[str, Path]:
    """The logs of ``target``: the instance of that id, or every instance (running or
    stopped, until its directory is cleaned) of the service of that name."""
    root = state_dir / "instances"
    if (root / target / "log").is_file():
        return {target: root / target / "log"}
    # Instance ids are SERVICE-rNUMBER-TOKEN: a service's own never match another's.
    own = re.compile(rf"{re.escape(target)}-r\d+-[0-9a-f]+")
    found = {}
    with contextlib.suppress(OSError):
        for d in sorted(root.iterdir()):
            if own.fullmatch(d.name) and (d / "log").is_file():
                found[d.name] = d / "log"
    return found


def _known_service(app: AppContext, target: str) -> bool:
    from graven.controller.paths import state_db

    if not state_db(app.state_dir).exists():
        return False
    return target in app.state().services()


@click.command()
@click.argument("target", metavar="SERVICE|INSTANCE")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep printing new lines, and those of new instances "
    "of the service (a rollout's), until Ctrl-C.",
)
@click.option(
    "--since",
    metavar="DURATION|TIME",
    help="Only lines written since then: 10m, 1h30m, 2d ago, or a time such as "
    "2026-12-03T18:00:00Z (UTC unless it says otherwise).",
)
@click.option("--tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines.")
@output_option
@click.pass_context
def logs(
    ctx: click.Context,
    target: str,
    follow: bool,
    since: str | None,
    tail: int | None,
    output: str,
) -> None:
    """What SERVICE's instances (or one INSTANCE) wrote, oldest first, interleaved by time.

    \b
    Times are when the controller saw each line: it marks every log about once a
    second, so a time is at most about a second late, and --since never leaves out a
    line written after the time given (it may show one written up to a second before).
    A line newer than the last mark shows its file's last write until it is marked.
    Lines of stopped instances stay readable while their directory is kept. With
    -o json: one document with every line, or one JSON object per line with -f.
    """
    app = app_context(ctx)
    out = Output(output)
    since_at = None if since is None else parse_since(since, time.time())
    found = instance_logs(app.state_dir, target)
    if not found and not follow and not _known_service(app, target):
        raise NotFoundError(
            f"no service or instance named {target!r} has logs in {app.state_dir}",
            hint="'graven status' lists services and their instances.",
        )
    several = len(found) != 1 or target not in found
    offsets: dict[str, int] = {}
    per_instance = []
    for instance, path in found.items():
        lines, offsets[instance] = read_log(path, instance, partial=not follow)
        per_instance.append(lines)
    shown = select(merge(per_instance), since=since_at, tail=tail)
    try:
        if not follow:
            data = {
                "target": target,
                "instances": sorted(found),
                "lines": [ln.to_dict() for ln in shown],
            }
            out.show(data, log_lines(shown, several=several))
            return
        _write(out, shown, several)
        while True:
            time.sleep(_FOLLOW_POLL)
            fresh = []
            for instance, path in instance_logs(app.state_dir, target).items():
                lines, offsets[instance] = read_log(
                    path, instance, offsets.get(instance, 0), partial=False
                )
                fresh.append(lines)
            _write(out, merge(fresh), several)
    except KeyboardInterrupt:
        return  # Ctrl-C ends following: that is success
    except BrokenPipeError:
        # The reader went away (| head): nothing more to say, and nothing failed.
        with contextlib.suppress(OSError):  # quiets the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return


def _write(out: Output, lines: list[LogLine], several: bool) -> None:
    if out.json:
        for ln in lines:
            sys.stdout.write(json.dumps(ln.to_dict(), separators=(",", ":")) + "\n")
        sys.stdout.flush()
    else:
        out.lines.write_all(log_lines(lines, several=several))
