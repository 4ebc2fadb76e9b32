"""The views of the verbs that work on the project and the store: values in, styled
lines out.

``init``, ``check``, ``images``, ``store fsck``, ``gc``, ``image export``/``import``,
``push``, ``pull`` and ``base`` show their typed results (and their progress lines)
through these functions, and so does ``demo`` its tour; :mod:`graven.cli.render` holds
the views of build, deploy and the controller's replies. Pure, like it: nothing here
writes, neither click nor rich is imported, and user data (paths, names, tool output)
is never parsed as markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from graven.cli.lines import Line, Span, bold, cyan, dim, green, red, table, yellow
from graven.cli.output import human_size, short

if TYPE_CHECKING:
    from graven.build.bases.common import MadeBase
    from graven.controller.results import StatusView
    from graven.errors import SpecProblem
    from graven.ledger.chain import LedgerEntry
    from graven.model import Image
    from graven.spec.summary import SpecSummary
    from graven.store.cas.fsck import FsckReport
    from graven.store.gc import GcReport
    from graven.store.oci_export.documents import LayerProgress
    from graven.store.oci_export.layout import ImageExport
    from graven.store.oci_import.policy import LayerImported
    from graven.store.registry.transfer import BlobTransfer, PullResult, PushResult

# --- the project -----------------------------------------------------------------------


def scaffolded(written: Sequence[Path]) -> list[Line]:
    """``graven init``: the files written, then what to run next."""
    lines: list[Line] = [(green("created"), f" {p}") for p in written]
    lines.append(("",))
    lines.append(("Next: ", bold("graven deploy -m 'first deploy'"), " in that directory."))
    return lines


def checked(summary: SpecSummary) -> list[Line]:
    """``graven check``: the spec is valid, and what it defines (warnings aside)."""
    counts = (
        f"{len(summary.images)} image(s), {len(summary.services)} service(s), "
        f"{len(summary.targets)} target(s)"
    )
    lines: list[Line] = [(green("ok"), f" {summary.file}: {counts}")]
    if summary.isolation:
        shown = summary.isolation_text
        sealed = summary.isolation.get("mode") == "sealed"
        lines.append(("isolation: ", green(shown) if sealed else yellow(shown)))
    return lines


def spec_warnings(warnings: Sequence[SpecProblem]) -> list[Line]:
    """Problems that leave the spec valid (shown on stderr)."""
    return [(yellow("warning:"), f" {w}") for w in warnings]


# --- the store -------------------------------------------------------------------------


def images(listing: Sequence[tuple[str, Image]]) -> list[Line]:
    """``graven images``: each name, its image's digest and entrypoint."""
    if not listing:
        return [("no images yet: run 'graven build'",)]
    return table(
        ("NAME", "DIGEST", "ENTRYPOINT"),
        [(name, str(img.digest), " ".join(img.config.entrypoint)) for name, img in listing],
    )


def fsck(store: Path, report: FsckReport) -> list[Line]:
    """``graven store fsck``: sound, or each problem, the damaged images, what was
    quarantined and what to do next."""
    if report.ok:
        return [(green("ok"), f" {store}: no problems found")]
    lines: list[Line] = [(red(f"{len(report.problems)} problem(s)"), f" in {store}:")]
    lines.extend((f"  - {p}",) for p in report.problems)
    if report.images:
        lines.append(("damaged images: " + ", ".join(report.images),))
    if report.quarantine is not None:
        names = f" and the name(s) {', '.join(report.names)}" if report.names else ""
        moved = f" {len(report.damaged)} object(s){names} in {report.quarantine}"
        lines.append((yellow("quarantined"), moved))
    lines.append((report.next_step,))
    return lines


def collecting(store: Path, *, dry_run: bool) -> Line:
    """``graven gc`` starts (a progress line)."""
    return (bold("gc"), " " + ("(dry run) " if dry_run else "") + str(store))


def nothing_to_collect() -> list[Line]:
    return [("no store yet: nothing to collect",)]


def collected(report: GcReport) -> list[Line]:
    """``graven gc``: what was (or would be) deleted and freed, and why the rest stayed."""
    if report.problems:
        lines: list[Line] = [(red("gc stopped: the store is damaged; nothing was deleted"),)]
        lines.extend((f"  - {p}",) for p in report.problems)
        lines.append(("Run 'graven store fsck' for details; rebuild or pull what is damaged.",))
        return lines
    verb = "would delete" if report.dry_run else "deleted"
    lines = [
        (
            green(verb),
            f" {report.objects_deleted} object(s), {human_size(report.bytes_freed)}; "
            f"kept {report.objects_kept} object(s), {human_size(report.bytes_kept)}",
        )
    ]
    if report.objects_young:
        spared = f"  {report.objects_young} unreferenced object(s) spared: younger than --grace"
        lines.append((spared,))
    if report.objects_restored:
        restored = f"  {report.objects_restored} object(s) became needed meanwhile and stayed"
        lines.append((restored,))
    extras = []
    if report.cache_entries_deleted:
        extras.append(f"{report.cache_entries_deleted} cache entries")
    if report.tmp_removed:
        extras.append(f"{report.tmp_removed} temp file(s)")
    if report.checkouts_removed:
        freed = human_size(report.checkout_bytes_freed)
        extras.append(f"{len(report.checkouts_removed)} checkout(s) ({freed})")
    if extras:
        lines.append((f"  also {verb}: " + ", ".join(extras),))
    if report.kept:
        rows = [(short(d), "; ".join(why)) for d, why in report.kept.items()]
        lines.extend(table(("KEPT", "WHY"), rows))
    lines.extend(
        ("  ", dim(f"already gone: {short(d)} ({'; '.join(why)})"))
        for d, why in report.missing.items()
    )
    return lines


# --- images in and out -----------------------------------------------------------------


def exporting(label: str, image: str, ref: str) -> Line:
    return (bold("export"), f" {label} {image} as {ref!r}")


def layer_exported(p: LayerProgress, compression: str) -> Line:
    how = dim("cached") if p.cached else cyan("written")
    size = human_size(p.blob.size)
    return (
        f"  layer {p.index + 1}/{p.count} {short(p.blob.digest)} {size:>10} {compression:<4} ",
        how,
    )


def exported(result: ImageExport) -> list[Line]:
    """``graven image export``: where the image is now, and its manifest."""
    label = result.name or str(result.image)
    return [
        (green("exported"), f" {label} -> {', '.join(result.locations)}"),
        (f"  manifest {result.oci.manifest_digest}  ({len(result.oci.layers)} layer(s))",),
    ]


def importing(source: Path, ref: str | None) -> Line:
    return (bold("import"), f" {source}" + (f" ref {ref!r}" if ref else ""))


def layer_imported(p: LayerImported) -> Line:
    note = f", {p.devices_skipped} device node(s) left out" if p.devices_skipped else ""
    return (
        f"  layer {p.index + 1}/{p.count} {short(p.digest)} "
        f"{p.size / 1024:>10,.0f} KiB {p.entries} entries{note}",
    )


def imported(image: Image) -> list[Line]:
    """``graven image import``: the image recorded (and how to name it, if unnamed)."""
    label = image.name or short(image.digest)
    lines: list[Line] = [
        (green("imported"), f" {label} {image.digest}  ({len(image.layers)} layer(s))")
    ]
    if not image.name:
        lines.append(("  name it with --name NAME, or use the digest above",))
    return lines


# --- registries ------------------------------------------------------------------------

_ACTION_STYLES = {"uploaded": "cyan", "downloaded": "cyan", "mounted": "green"}


def pushing(label: str, reference: str) -> Line:
    return (bold("push"), f" {label} -> {reference}")


def pulling(reference: str) -> Line:
    return (bold("pull"), f" {reference}")


def blob_moved(t: BlobTransfer, *, config: bool) -> Line:
    """One blob of a push or pull is done (``config``: it is the image's config)."""
    kind = "config" if config else "layer"
    line: Line = (
        "  ",
        Span(f"{t.action:<10}", _ACTION_STYLES.get(t.action, "dim")),
        f" {t.digest.short}  {kind:<6} {human_size(t.size):>9}",
    )
    if t.action == "mounted" and t.source:
        line += (f"  from {t.source}",)
    return line


def pushed(result: PushResult) -> list[Line]:
    """``graven push``: where the image went, what travelled, and how to pull it."""
    moved = (
        f"{result.count('uploaded')} uploaded, {result.count('mounted')} mounted, "
        f"{result.count('skipped')} already there; {human_size(result.bytes_sent)} sent"
    )
    return [
        (green("pushed"), f" {result.reference}  ({moved})"),
        (f"pull with: graven pull {result.pinned}",),
    ]


def pulled(result: PullResult) -> list[Line]:
    """``graven pull``: the image now under its local name."""
    return [
        (
            green("pulled"),
            f" {result.reference} as {result.name}  image {result.image}  "
            f"({human_size(result.bytes_received)} received)",
        )
    ]


# --- bases -----------------------------------------------------------------------------


def making_base(kind: str, detail: str = "") -> Line:
    """``graven base KIND`` starts (a progress line)."""
    return (bold(f"base {kind}"), *((f" {detail}",) if detail else ()))


def tool_output(text: str) -> Line:
    """A line a tool printed (debootstrap), as it is."""
    return (text,)


def base_made(base: MadeBase) -> list[Line]:
    """``graven base``: the image made (or reused), its interpreter, how to use it."""
    image = base.image
    how = " (reused: made earlier with the same parameters)" if base.cached else ""
    lines: list[Line] = [
        (green("base"), f" {image.name} {image.digest}  {human_size(base.size)}{how}")
    ]
    interpreter = base.interpreter
    if interpreter:
        where = f"{interpreter.get('path')} ({interpreter.get('source')})"
        lines.append((f"  interpreter: {where}",))
    lines.append((f"  use it in a recipe: base: {{image: {image.name}}}",))
    return lines


# --- the demo --------------------------------------------------------------------------


def demo_phase(title: str, detail: str = "") -> Line:
    """A numbered part of the tour begins (after a blank line)."""
    return ("\n", bold(title), *((f" {detail}",) if detail else ()))


def demo_note(text: str) -> Line:
    return (dim(text),)


def demo_traffic(sent: int, failed: int, phase: str, versions: Sequence[tuple[str, int]]) -> Line:
    """How the requests sent during a rollout went, and which versions answered."""
    answered = ", ".join(f"{version}: {n}" for version, n in versions)
    outcome = Span(f"{sent} requests {phase}: {failed} failed", "green" if not failed else "red")
    return ("  ", outcome, f"  ({answered})")


def demo_tour(
    status: StatusView,
    entries: Sequence[LedgerEntry],
    traffic_failed: tuple[int, int],
    url: str,
    commands: Mapping[str, str],
    activate: Path | None,
) -> list[Line]:
    """The end of ``graven demo``: what serves, the audit trail, the failed requests
    (during the deploy, during the rollback), and commands to try next (``activate``:
    the virtualenv's activate script, if there is one)."""
    lines: list[Line] = []
    for s in status.services:
        lines.append((bold(s.service), f" serving {s.desired_release} at {s.url}"))
        lines.extend(
            (f"  {i.id}  {i.state}  {i.address}  image {i.image[:19]}",) for i in s.instances
        )
    lines.append(demo_phase("5. Audit trail", "(hash-chained, verified)"))
    lines.extend(
        table(
            ("#", "WHO", "ACTION", "RELEASE", "WHY"),
            [(str(e.seq), e.actor, e.action, e.release, e.message) for e in entries],
        )
    )
    during_deploy, during_rollback = traffic_failed
    failed = f"failed requests: {during_deploy} during deploy, {during_rollback} during rollback"
    lines.append(("\n", red(failed) if during_deploy + during_rollback else green(failed)))
    lines.append(("\nThe service is running: ", bold(f"curl {url}")))
    source = f" (or run 'source {activate}' to type plain 'graven'):" if activate else ":"
    lines.append(("Try these from any shell" + source,))
    lines.extend(("  ", bold(command), f"   # {what}") for what, command in commands.items())
    return lines
