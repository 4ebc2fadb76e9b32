"""The renderers of the verbs that need no controller (init, check, images, store fsck,
gc, image export/import, push, pull, base): typed results in, lines out, rendered into
a StringIO (plain) and a fake terminal."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from graven.build.bases.common import MadeBase
from graven.cli import render_local as view
from graven.cli.lines import Line, LineWriter
from graven.errors import SpecProblem
from graven.model import Digest, Image, ImageConfig
from graven.reference import RegistryRef
from graven.spec.summary import SpecSummary
from graven.store.cas.fsck import Damage, FsckReport
from graven.store.gc import GcReport
from graven.store.oci_export.documents import LayerProgress, OciImage
from graven.store.oci_export.layers import LayerBlob
from graven.store.oci_export.layout import ExportResult, ImageExport
from graven.store.oci_import.policy import LayerImported
from graven.store.registry.transfer import BlobTransfer, PullResult, PushResult

IMAGE = Digest("sha256:" + "ab" * 32)
ROOTFS = Digest("sha256:" + "cd" * 32)
BLOB = Digest("sha256:" + "ef" * 32)
MANIFEST = Digest("sha256:" + "12" * 32)
CONFIG = Digest("sha256:" + "34" * 32)
ODD = r"[red]x[/] :smile: \[y]"  # markup, an emoji code and an escape: none may be read


@pytest.fixture(autouse=True)
def _no_color_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


def written(lines: list[Line]) -> str:
    out = io.StringIO()
    LineWriter(file=out).write_all(lines)
    return out.getvalue()


def drawn(lines: list[Line]) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, highlight=False, soft_wrap=True)
    LineWriter(through=console).write_all(lines)
    return out.getvalue()


def image(name: str = "web", *, labels: tuple[tuple[str, str], ...] = ()) -> Image:
    config = ImageConfig(entrypoint=("/app/run", "--port", "8080"), labels=labels)
    return Image(IMAGE, ROOTFS, config, name, (ROOTFS,))


# --- the project -------------------------------------------------------------------------


def test_init_lists_what_it_wrote_and_what_comes_next() -> None:
    lines = view.scaffolded([Path("/p/graven.yaml"), Path("/p/app/app.py")])
    assert written(lines) == (
        "created /p/graven.yaml\n"
        "created /p/app/app.py\n"
        "\n"
        "Next: graven deploy -m 'first deploy' in that directory.\n"
    )
    assert "\x1b[1mgraven deploy -m 'first deploy'\x1b[0m" in drawn(lines)


def test_check_counts_what_the_spec_defines_and_its_warnings_apart() -> None:
    warning = SpecProblem("/p/graven.yaml", 7, "services.web.port", "port 8080 is in use")
    summary = SpecSummary(Path("/p/graven.yaml"), ("web",), ("api", "web"), ("local",), (warning,))
    assert written(view.checked(summary)) == (
        "ok /p/graven.yaml: 1 image(s), 2 service(s), 1 target(s)\n"
    )
    assert written(view.spec_warnings(summary.warnings)) == (
        "warning: /p/graven.yaml:7: services.web.port: port 8080 is in use\n"
    )
    assert view.spec_warnings(()) == []


# --- the store ---------------------------------------------------------------------------


def test_images_as_a_table_with_whole_digests() -> None:
    assert written(view.images([("web", image()), ("api", image("api"))])) == (
        f" NAME  DIGEST{' ' * 65}  ENTRYPOINT           \n"
        f" web   {IMAGE}  /app/run --port 8080 \n"
        f" api   {IMAGE}  /app/run --port 8080 \n"
    )
    assert written(view.images([])) == "no images yet: run 'graven build'\n"


def test_a_sound_store() -> None:
    assert written(view.fsck(Path("/s/store"), FsckReport(problems=()))) == (
        "ok /s/store: no problems found\n"
    )


def test_a_damaged_store_names_problems_images_and_the_next_step() -> None:
    report = FsckReport(
        problems=("blob sha256:ef: corrupt", "tree sha256:cd: file 'a' is corrupt"),
        damaged=(Damage(BLOB, "corrupt", ("web",)), Damage(ROOTFS, "incomplete", ("web",))),
        names=("api",),
    )
    assert written(view.fsck(Path("/s/store"), report)) == (
        "2 problem(s) in /s/store:\n"
        "  - blob sha256:ef: corrupt\n"
        "  - tree sha256:cd: file 'a' is corrupt\n"
        "damaged images: api, web\n"
        "Run 'graven store fsck --repair' to quarantine what is damaged, then rebuild the"
        " images built here ('graven build api web') and pull again the ones pulled"
        " ('graven pull REF --name IMAGE'); 'graven gc' never deletes damaged data.\n"
    )


def test_a_repaired_store_says_what_was_quarantined_where() -> None:
    report = FsckReport(
        problems=("blob: corrupt",),
        damaged=(Damage(BLOB, "corrupt", ("web",)),),
        names=("web",),
        quarantine=Path("/s/store/quarantine/1"),
    )
    assert written(view.fsck(Path("/s/store"), report)).splitlines()[-2:] == [
        "quarantined 1 object(s) and the name(s) web in /s/store/quarantine/1",
        "Now rebuild the images built here ('graven build web') and pull again the ones"
        " pulled ('graven pull REF --name IMAGE'). Delete /s/store/quarantine/1 once you no"
        " longer need it.",
    ]


def test_gc_reports_what_it_freed_and_why_the_rest_stayed() -> None:
    report = GcReport(
        dry_run=False,
        kept={IMAGE: ["ref web", "release web@r3"], ROOTFS: ["the empty tree"]},
        missing={BLOB: ["release web@r1"]},
        objects_kept=5,
        bytes_kept=2048,
        objects_young=2,
        objects_deleted=3,
        bytes_freed=1536,
        objects_restored=1,
        cache_entries_deleted=4,
        tmp_removed=1,
        checkouts_removed=["/s/checkouts/a", "/s/checkouts/b"],
        checkout_bytes_freed=10 * 1024 * 1024,
    )
    assert written(view.collected(report)) == (
        "deleted 3 object(s), 1.5 KiB; kept 5 object(s), 2.0 KiB\n"
        "  2 unreferenced object(s) spared: younger than --grace\n"
        "  1 object(s) became needed meanwhile and stayed\n"
        "  also deleted: 4 cache entries, 1 temp file(s), 2 checkout(s) (10.0 MiB)\n"
        " KEPT          WHY                     \n"
        " abababababab  ref web; release web@r3 \n"
        " cdcdcdcdcdcd  the empty tree          \n"
        "  already gone: efefefefefef (release web@r1)\n"
    )


def test_a_dry_run_says_would_and_a_quiet_one_says_little() -> None:
    assert written(view.collected(GcReport(dry_run=True))) == (
        "would delete 0 object(s), 0 B; kept 0 object(s), 0 B\n"
    )
    assert written(view.nothing_to_collect()) == "no store yet: nothing to collect\n"
    assert written([view.collecting(Path("/s/store"), dry_run=True)]) == ("gc (dry run) /s/store\n")
    assert written([view.collecting(Path("/s/store"), dry_run=False)]) == "gc /s/store\n"


def test_gc_on_a_damaged_store_deletes_nothing_and_says_so() -> None:
    report = GcReport(dry_run=False, problems=["blob sha256:ef: corrupt"], objects_deleted=9)
    assert written(view.collected(report)) == (
        "gc stopped: the store is damaged; nothing was deleted\n"
        "  - blob sha256:ef: corrupt\n"
        "Run 'graven store fsck' for details; rebuild or pull what is damaged.\n"
    )


# --- images in and out -------------------------------------------------------------------


def layer_blob(size: int = 1536) -> LayerBlob:
    return LayerBlob(ROOTFS, BLOB, size, "application/vnd.oci.image.layer.v1.tar+gzip")


def oci() -> OciImage:
    return OciImage(b"{}", MANIFEST, b"{}", CONFIG, (layer_blob(), layer_blob()))


def test_export_progress_and_result() -> None:
    layout = ExportResult(Path("/o/out"), "v1", IMAGE, "gzip", oci(), 3, 1)
    archive = ExportResult(Path("/o/web.tar"), "v1", IMAGE, "gzip", oci(), 4, 0)
    both = ImageExport(IMAGE, "web", "v1", "gzip", oci(), layout=layout, archive=archive)
    lines = [
        view.exporting("web", str(IMAGE), "v1"),
        view.layer_exported(LayerProgress(0, 2, layer_blob(), cached=False), "gzip"),
        view.layer_exported(LayerProgress(1, 2, layer_blob(900), cached=True), "none"),
        *view.exported(both),
    ]
    assert written(lines) == (
        f"export web {IMAGE} as 'v1'\n"
        "  layer 1/2 efefefefefef    1.5 KiB gzip written\n"
        "  layer 2/2 efefefefefef      900 B none cached\n"
        "exported web -> oci:/o/out:v1, oci-archive:/o/web.tar:v1\n"
        f"  manifest {MANIFEST}  (2 layer(s))\n"
    )
    unnamed = ImageExport(IMAGE, "", "latest", "gzip", oci(), archive=archive)
    assert written(view.exported(unnamed))[:-1].splitlines()[0] == (
        f"exported {IMAGE} -> oci-archive:/o/web.tar:latest"
    )


def test_the_export_json_has_layout_counts_only_with_a_layout() -> None:
    archive = ExportResult(Path("/o/web.tar"), "v1", IMAGE, "zstd", oci(), 4, 0)
    data = ImageExport(IMAGE, "web", "v1", "zstd", oci(), archive=archive).to_dict()
    assert data.keys() == {
        "image",
        "name",
        "ref",
        "compression",
        "manifest",
        "config",
        "layers",
        "archive",
    }
    assert data["archive"] == "/o/web.tar" and data["compression"] == "zstd"


def test_import_progress_and_result() -> None:
    lines = [
        view.importing(Path("/in/web.tar"), "v1"),
        view.importing(Path("/in/out"), None),
        view.layer_imported(LayerImported(0, 2, BLOB, ROOTFS, 12, 40960, 0)),
        view.layer_imported(LayerImported(1, 2, BLOB, ROOTFS, 3, 2_000_000, 2)),
        *view.imported(image("copy")),
        *view.imported(image("")),
    ]
    assert written(lines) == (
        "import /in/web.tar ref 'v1'\n"
        "import /in/out\n"
        "  layer 1/2 efefefefefef         40 KiB 12 entries\n"
        "  layer 2/2 efefefefefef      1,953 KiB 3 entries, 2 device node(s) left out\n"
        f"imported copy {IMAGE}  (1 layer(s))\n"
        f"imported abababababab {IMAGE}  (1 layer(s))\n"
        "  name it with --name NAME, or use the digest above\n"
    )


# --- registries --------------------------------------------------------------------------


def test_each_blob_of_a_transfer_gets_a_line() -> None:
    lines = [
        view.blob_moved(BlobTransfer(BLOB, "m", 2048, "uploaded", 2048), config=False),
        view.blob_moved(BlobTransfer(CONFIG, "m", 300, "skipped"), config=True),
        view.blob_moved(BlobTransfer(BLOB, "m", 2048, "mounted", source="team/api"), config=False),
        view.blob_moved(BlobTransfer(BLOB, "m", 2048, "downloaded", 2048), config=False),
    ]
    assert written(lines) == (
        "  uploaded   efefefefefef  layer    2.0 KiB\n"
        "  skipped    343434343434  config     300 B\n"
        "  mounted    efefefefefef  layer    2.0 KiB  from team/api\n"
        "  downloaded efefefefefef  layer    2.0 KiB\n"
    )
    styled = drawn(lines)
    assert "\x1b[36muploaded  \x1b[0m" in styled
    assert "\x1b[2mskipped   \x1b[0m" in styled
    assert "\x1b[32mmounted   \x1b[0m" in styled


def test_push_and_pull_results() -> None:
    ref = RegistryRef("127.0.0.1:5000", "team/web", tag="v1")
    blobs = (
        BlobTransfer(BLOB, "m", 2048, "uploaded", 2048),
        BlobTransfer(CONFIG, "m", 300, "uploaded", 300),
        BlobTransfer(ROOTFS, "m", 10, "mounted", source="team/api"),
        BlobTransfer(IMAGE, "m", 10, "skipped"),
    )
    pushed = PushResult(ref, IMAGE, MANIFEST, "application/vnd.oci.image.manifest.v1+json", blobs)
    lines = [view.pushing("web", str(ref)), *view.pushed(pushed), view.pulling(str(ref))]
    pulled = PullResult(ref, "web", IMAGE, MANIFEST, blobs[:2])
    assert written([*lines, *view.pulled(pulled)]) == (
        "push web -> 127.0.0.1:5000/team/web:v1\n"
        "pushed 127.0.0.1:5000/team/web:v1  (2 uploaded, 1 mounted, 1 already there;"
        " 2.3 KiB sent)\n"
        f"pull with: graven pull 127.0.0.1:5000/team/web@{MANIFEST}\n"
        "pull 127.0.0.1:5000/team/web:v1\n"
        f"pulled 127.0.0.1:5000/team/web:v1 as web  image {IMAGE}  (2.3 KiB received)\n"
    )
    assert pushed.to_dict()["pinned"] == str(pushed.pinned)


# --- bases -------------------------------------------------------------------------------


def test_a_base_with_an_interpreter() -> None:
    labels = (
        ("dev.graven.base.kind", "host-python"),
        ("dev.graven.interpreter.path", "/usr/bin/python3.11"),
        ("dev.graven.interpreter.source", "image"),
    )
    base = MadeBase(image("host-python", labels=labels), 75 * 1024 * 1024)
    lines = [
        view.making_base("host-python"),
        view.tool_output("44 shared libraries"),
        *view.base_made(base),
    ]
    assert written(lines) == (
        "base host-python\n"
        "44 shared libraries\n"
        f"base host-python {IMAGE}  75.0 MiB\n"
        "  interpreter: /usr/bin/python3.11 (image)\n"
        "  use it in a recipe: base: {image: host-python}\n"
    )
    assert base.interpreter == {"path": "/usr/bin/python3.11", "source": "image"}
    assert "cached" not in base.to_dict()


def test_a_reused_debian_base() -> None:
    base = MadeBase(image("debian-bookworm"), 512, cached=True)
    lines = [view.making_base("debian", "bookworm (minbase)"), *view.base_made(base)]
    assert written(lines) == (
        "base debian bookworm (minbase)\n"
        f"base debian-bookworm {IMAGE}  512 B (reused: made earlier with the same parameters)\n"
        "  use it in a recipe: base: {image: debian-bookworm}\n"
    )
    assert base.to_dict()["cached"] is True
    assert MadeBase(image("d"), 1, cached=False).to_dict()["cached"] is False


# --- user text is never markup -----------------------------------------------------------


def test_paths_names_and_tool_output_print_as_they_are() -> None:
    odd_path = Path(f"/p/{ODD}")
    report = FsckReport(problems=(f"stray file in the blob store: {odd_path}",))
    lines = [
        *view.scaffolded([odd_path]),
        *view.checked(SpecSummary(odd_path, (), (), ())),
        *view.spec_warnings([SpecProblem(str(odd_path), 1, "services.web", ODD)]),
        *view.fsck(odd_path, report),
        view.collecting(odd_path, dry_run=False),
        view.importing(odd_path, ODD),
        view.making_base("debian", ODD),
        view.tool_output(ODD),
    ]
    plain = written(lines)
    styled = drawn(lines)
    for text in (plain, styled):
        assert text.count(ODD) == plain.count(ODD) >= 9
        assert "😄" not in text


def test_the_verbs_print_a_path_with_markup_in_it_as_it_is(tmp_path: Path) -> None:
    """Through the CLI: ``init`` and ``gc`` into directories whose names look like rich
    markup, ``check`` of a spec there (stdout and stderr, as a user sees them)."""
    from click.testing import CliRunner

    from graven.cli.main import cli

    odd = tmp_path / "[bold]x[/]"
    state = ["--state-dir", str(odd / "state")]
    init = CliRunner().invoke(cli, [*state, "init", str(odd)])
    assert init.exit_code == 0, init.output
    assert f"created {odd}/graven.yaml\n" in init.stdout
    check = CliRunner().invoke(cli, ["-f", str(odd / "graven.yaml"), *state, "check"])
    assert check.exit_code == 0, check.output
    assert check.stdout.startswith(f"ok {odd}/graven.yaml: ")
    (odd / "state" / "store").mkdir(parents=True)
    gc = CliRunner().invoke(cli, [*state, "gc", "--dry-run"])
    assert gc.exit_code == 0, gc.output
    assert gc.stderr.startswith(f"gc (dry run) {odd}/state/store\n")


# --- the demo ----------------------------------------------------------------------------


def test_the_demo_tour_ends_with_what_serves_the_audit_and_what_to_try() -> None:
    from graven.controller.results import StatusView
    from graven.ledger.chain import LedgerEntry
    from tests.unit.test_cli_render_views import DIGEST, instance, service

    hello = service(
        "hello",
        desired_release="hello@r1",
        url="http://127.0.0.1:8080/",
        instances=(instance("hello-r1-a1", "hello@r1", "healthy", "passing", age=5),),
    )
    status = StatusView(services=(hello,))
    entries = [
        LedgerEntry(0.0, "me@host", "deploy", "hello", "hello@r1", message="demo: first", seq=1),
        LedgerEntry(0.0, "me@host", "rollback", "hello", "hello@r1", message=ODD, seq=2),
    ]
    commands = {"what runs": "/v/bin/graven status", "stop everything": "/v/bin/graven down"}
    lines = [
        view.demo_note("stopping the previous demo"),
        view.demo_phase("1. Build and deploy v1", f"(3 replicas) from /d/{ODD}/graven.yaml"),
        view.demo_traffic(600, 0, "during the v2 deploy", [("v1", 350), ("v2", 250)]),
        *view.demo_tour(
            status, entries, (0, 0), "http://127.0.0.1:8080/", commands, Path("/v/bin/activate")
        ),
    ]
    assert written(lines) == (
        "stopping the previous demo\n"
        "\n"
        f"1. Build and deploy v1 (3 replicas) from /d/{ODD}/graven.yaml\n"
        "  600 requests during the v2 deploy: 0 failed  (v1: 350, v2: 250)\n"
        "hello serving hello@r1 at http://127.0.0.1:8080/\n"
        f"  hello-r1-a1  healthy  127.0.0.1:40123  image {DIGEST[:19]}\n"
        "\n"
        "5. Audit trail (hash-chained, verified)\n"
        f" #  WHO      ACTION    RELEASE   {'WHY'.ljust(len(ODD))} \n"
        f" 1  me@host  deploy    hello@r1  {'demo: first'.ljust(len(ODD))} \n"
        f" 2  me@host  rollback  hello@r1  {ODD} \n"
        "\n"
        "failed requests: 0 during deploy, 0 during rollback\n"
        "\n"
        "The service is running: curl http://127.0.0.1:8080/\n"
        "Try these from any shell (or run 'source /v/bin/activate' to type plain 'graven'):\n"
        "  /v/bin/graven status   # what runs\n"
        "  /v/bin/graven down   # stop everything\n"
    )
    styled = drawn(lines)
    assert "\x1b[32m600 requests during the v2 deploy: 0 failed\x1b[0m" in styled
    assert "\x1b[32mfailed requests: 0" in styled


def test_failed_demo_requests_are_red_and_no_virtualenv_means_no_source_hint() -> None:
    from graven.controller.results import StatusView

    lines = view.demo_tour(StatusView(services=()), [], (2, 1), "http://x/", {}, None)
    styled = drawn(lines)
    assert "\x1b[31mfailed requests: 2 during deploy, 1 during rollback\x1b[0m" in styled
    assert written(lines).endswith("Try these from any shell:\n")
    assert "\x1b[31m3 requests during the rollback: 3 failed" in drawn(
        [view.demo_traffic(3, 3, "during the rollback", [])]
    )
