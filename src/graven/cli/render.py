"""The views of the verbs: values in, styled lines out.

``graven build`` (and the build inside ``deploy`` and ``plan``), ``deploy`` and
``rollback`` show what they did through these functions, whichever path ran them;
``status``, ``releases``, ``plan``, ``promote``, ``abort``, ``down`` and ``audit``
show the controller's typed replies and the ledger's records through them too.
:class:`~graven.cli.lines.LineWriter` writes the lines. Pure: nothing here writes,
and neither click nor rich is imported; user data is never parsed as markup.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from graven.cli import render_volumes
from graven.cli.lines import Line, Span, bold, cyan, dim, green, red, table, yellow
from graven.cli.output import short

if TYPE_CHECKING:
    from graven.build.builder import StepOutcome
    from graven.build.orchestrate import BuiltImage
    from graven.controller.results import (
        AbortResult,
        DeployResult,
        DownResult,
        InstanceStatus,
        PreviewResult,
        RollbackResult,
        RolloutView,
        ServiceStatus,
        StateDirView,
        StatusView,
    )
    from graven.ledger.chain import LedgerEntry
    from graven.ledger.state import ReleaseRecord

# --- build -----------------------------------------------------------------------------


def building(name: str, *, base: bool) -> Line:
    """An image's build starts (``base``: built because an asked-for image needs it)."""
    return (bold("build"), f" {name}" + (" (a base)" if base else ""))


def step_done(step: StepOutcome) -> Line:
    mark = (dim("cached"),) if step.cached else (cyan("ran"), f" {step.seconds:.2f}s")
    return (f"  step {step.index + 1} {step.kind:<10} ", *mark, f"  {step.summary}")


def nothing_changed(name: str) -> Line:
    return (f"build {name}: nothing changed since the last build",)


def built(images: Sequence[BuiltImage]) -> list[Line]:
    """The result of ``graven build``: one line per image asked for."""
    return [
        (
            green("built"),
            f" {i.name} {i.digest}  ({i.steps_run} step(s) ran, {i.steps_cached} cached)",
        )
        for i in images
    ]


# --- rollouts --------------------------------------------------------------------------


class ServiceOutcome(NamedTuple):
    """How a verb's change to one service went: ``state`` is None when the rollout was
    not waited for (or there was none), else how it ended (or "running": paused)."""

    service: str
    changed: bool
    release: str | None
    state: str | None = None
    progress: str = ""
    reason: str = ""

    @classmethod
    def of(
        cls, service: str, change: DeployResult | RollbackResult, ended: RolloutView | None
    ) -> ServiceOutcome:
        """From the controller's reply to the change and, once waited for, how its
        rollout ended."""
        if ended is None:
            return cls(service, change.changed, change.release)
        return cls(
            service, change.changed, change.release, ended.state, ended.progress, ended.reason
        )


def change_recorded(verb: str, service: str, release: str, *, changed: bool = True) -> Line:
    """A verb's change is recorded (before its rollout is waited for)."""
    if verb == "rollback":
        return (bold("rollback"), f" {service} -> {release}")
    return (bold(verb), f" {service}: {release}" + ("" if changed else " (unchanged)"))


def rollout_step(service: str, progress: str) -> Line:
    return (f"  {service}: {progress}",)


def following(service: str, rollout: int) -> Line:
    return (bold("following"), f" {service}: rollout #{rollout}")


def followed(service: str, state: str, reason: str | None) -> Line:
    return (f"  {service}: {state}" + (f" — {reason}" if reason else ""),)


def outcomes(results: Sequence[ServiceOutcome], verb: str, url: str | None) -> list[Line]:
    """The result of ``deploy`` or ``rollback``: how each service's rollout ended, then
    the URL if there is one."""
    lines: list[Line] = []
    for r in results:
        who = f"{verb} {r.service}"
        if not r.changed:
            lines.append((green(r.service), f": already at {r.release}; nothing to do"))
        elif r.state is None:
            # --no-wait: the change is recorded; how its rollout ends is not known here.
            lines.append((green(who), f": {r.release or ''} recorded; rolling out (not waiting)"))
        elif r.state == "running":
            lines.append((yellow(who), f": {r.progress}"))
        elif r.state == "succeeded":
            lines.append((green(who), f": {r.release or 'done'} serving"))
        else:
            lines.append((red(f"{who} {r.state}"), f": {r.reason}"))
    if url:
        lines.append((f"url: {url}",))
    return lines


def any_failed(results: Sequence[ServiceOutcome]) -> bool:
    """Whether a rollout that was waited for ended other than succeeded or paused."""
    # running: paused at a manual gate, not failed
    return any(r.state not in (None, "succeeded", "running") for r in results)


def promoted(service: str, state: str | None, progress: str) -> Line:
    """``promote``: how the rollout stands after the promote (``state`` None: not
    waited for)."""
    return (green(service), f": {state or 'promoted'} {progress}")


def aborted(result: AbortResult) -> Line:
    """``abort``: the rollout stopped, and the reason it records."""
    return (yellow(result.service), f": {result.reason}")


def taken_down(results: Sequence[DownResult], *, controller_stopped: bool) -> list[Line]:
    """``down``: each service stopped (or down already), then the controller."""
    lines: list[Line] = [
        (green(r.service), ": " + ("stopped" if r.changed else "already down")) for r in results
    ]
    if controller_stopped:
        lines.append(("controller stopped",))
    return lines


def nothing_running() -> Line:
    return ("nothing running",)


# --- status ----------------------------------------------------------------------------


def ago(seconds: float) -> str:
    """A duration for people: 42s, 5m, 3.5h, 2.0d."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def local_time(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def controller_stopped(controller: str | None) -> list[Line]:
    """The note that a look was answered from the records, no controller running."""
    if controller != "stopped":
        return []
    return [
        (
            yellow("controller: stopped"),
            " (answered from the records; 'graven serve' or any verb that changes state starts it)",
        )
    ]


def state_dir_problem(state_dir: StateDirView | None) -> list[Line]:
    """The state dir's problem (full, refusing writes), if it has one."""
    if state_dir is None or not state_dir.problem:
        return []
    lines: list[Line] = [(red(state_dir.problem),)]
    if state_dir.hint:
        lines.append((f"  hint: {state_dir.hint}",))
    return lines


def status(view: StatusView, now: float) -> list[Line]:
    """``graven status``: each service's release, traffic, rollout and instances
    (their ages as of ``now``)."""
    lines = controller_stopped(view.controller) + state_dir_problem(view.state_dir)
    if view.isolation is not None:
        sealed = view.isolation == "sealed"
        lines.append(
            (f"isolation: {view.isolation}" if sealed else yellow(f"isolation: {view.isolation}"),)
        )
    if not view.services:
        lines.append(("nothing deployed yet: run 'graven deploy -m WHY'",))
    for s in view.services:
        lines.extend(service_status(s, now))
    return lines


def service_status(s: ServiceStatus, now: float) -> list[Line]:
    head = f"  release {s.desired_release or '(down)'}"
    if s.image:
        head += f"  image {s.image_name}@{short(s.image)}"
    if s.url:
        head += f"  {s.url}"
    lines: list[Line] = [(bold(s.service), head)]
    if s.preview_url:
        lines.append((f"  preview {s.preview_url}",))
    lines.extend(render_volumes.mounts(s.volumes))
    if s.releases:
        shares = (f"{r.release} {r.traffic_percent:g}% {r.role}" for r in s.releases)
        lines.append(("  traffic: " + " · ".join(shares),))
    if s.problem:
        lines.append(("  ", red("problem:"), f" {s.problem}"))
    lines.extend(("  ", yellow("warning:"), f" {w}") for w in s.warnings)
    if s.restarts:
        what = red("crash-looping") if s.crash_looping else yellow("restarted")
        tail = f": {s.restarts} unexpected exits in a row, last: {s.last_exit}"
        if s.next_start_in:
            tail += f"; next start in {s.next_start_in:.0f}s"
        lines.append(("  ", what, tail))
    if s.rollout is not None:
        lines.append(_last_rollout(s.rollout))
    if s.instances:
        lines.extend(table(_INSTANCE_COLUMNS, [_instance_row(i, now) for i in s.instances]))
    return lines


def _last_rollout(ro: RolloutView) -> Line:
    line = f"  last rollout #{ro.id} {ro.kind} -> r{ro.to_release}: {ro.state}"
    if ro.state == "running" and ro.progress:
        line += f" ({ro.progress})"
    if ro.reason:
        line += f" — {ro.reason}"
    return (line,)


_INSTANCE_COLUMNS = (
    "INSTANCE",
    "RELEASE",
    "STATE",
    "HEALTH",
    "TRAFFIC",
    "RESTARTS",
    "ADDRESS",
    "PID",
    "AGE",
)
_STATE_STYLES = {"healthy": "green", "starting": "yellow", "degraded": "yellow"}


def _instance_row(i: InstanceStatus, now: float) -> tuple[str | Span, ...]:
    health = Span(i.health, "green" if i.health == "passing" else "yellow")
    return (
        i.id,
        i.release,
        Span(i.state, _STATE_STYLES.get(i.state, "red")),
        health,
        f"{i.traffic_percent:g}%" + (" preview" if i.preview else ""),
        str(i.restarts),
        i.address,
        str(i.pid),
        ago(now - i.started_at),
    )


def releases(records: Sequence[ReleaseRecord], desired: int | None) -> list[Line]:
    """``graven releases``: a service's releases, oldest first, ``*`` on the desired one."""
    return table(
        ("", "RELEASE", "IMAGE", "CREATED", "SERVED"),
        [
            (
                "*" if r.number == desired else "",
                r.id,
                f"{r.image_name}@{short(str(r.release.image))}",
                local_time(r.created_at),
                "yes" if r.healthy_at else "no",
            )
            for r in records
        ],
    )


# --- plan ------------------------------------------------------------------------------


def plans(previews: Sequence[tuple[str, PreviewResult]], controller: str | None) -> list[Line]:
    """``graven plan``: for each service, what a deploy would change and its steps."""
    lines = controller_stopped(controller)
    for service, p in previews:
        if not p.changed:
            lines.append((green(service), f": up to date ({p.from_release}); nothing to do"))
            continue
        lines.append((bold(service), f": {p.from_release or '(nothing)'} -> {p.to}"))
        lines.extend((f"  ~ {change}",) for change in p.changes or ())
        lines.extend(
            (f"  {n:>2}. {step.description}",) for n, step in enumerate(p.steps.steps, start=1)
        )
    return lines


# --- audit -----------------------------------------------------------------------------


def ledger(entries: Sequence[LedgerEntry], verified: int | None = None) -> list[Line]:
    """``graven audit``: the ledger's entries, then (``verified``: how many entries
    the chain proof covered) that the chain is intact."""
    lines = table(
        ("#", "WHEN", "WHO", "ACTION", "RELEASE", "WHY"),
        [(str(e.seq), local_time(e.at), e.actor, e.action, e.release, e.message) for e in entries],
    )
    if verified is not None:
        lines.append((green("verified"), f": {verified} entries, chain intact"))
    return lines
