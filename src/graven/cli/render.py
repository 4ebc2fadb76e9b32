"""The views of the verbs both entry paths answer: values in, styled lines out.

``graven build`` (and the build inside ``deploy`` and ``plan``), ``deploy`` and
``rollback`` show what they did through these functions, whichever path ran them;
:class:`~graven.cli.lines.LineWriter` writes the lines. Pure: nothing here writes,
and neither click nor rich is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from graven.cli.lines import Line, bold, cyan, dim, green, red, yellow

if TYPE_CHECKING:
    from graven.build.builder import StepOutcome
    from graven.build.orchestrate import BuiltImage

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
    def of(cls, result: Mapping[str, Any]) -> ServiceOutcome:
        """From a verb's JSON result (the controller's reply, with ``rollout_result``
        attached once waited for)."""
        ended = result.get("rollout_result")
        return cls(
            service=result["service"],
            changed=result.get("changed", True),
            release=result.get("release"),
            state=None if ended is None else ended.get("state", "failed"),
            progress="" if ended is None else ended.get("progress", ""),
            reason="" if ended is None else ended.get("reason", ""),
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
