"""The renderers of ``status``, ``releases``, ``plan``, ``promote``, ``abort``, ``down``
and ``audit``: typed replies and records in, lines out, rendered into a StringIO
(plain) and a fake terminal."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from graven.cli import render
from graven.cli.lines import Line, LineWriter, table
from graven.controller.results import (
    AbortResult,
    DownResult,
    InstanceStatus,
    PlanView,
    PreviewResult,
    ReleaseShare,
    RolloutView,
    ServiceStatus,
    StateDirView,
    StatusView,
    StepView,
)
from graven.ledger.chain import LedgerEntry
from graven.ledger.state import ReleaseRecord
from graven.model import Digest, HealthCheck, Release, ServiceConfig

NOW = 1_700_000_000.0
DIGEST = Digest("sha256:" + "ab" * 32)


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


def instance(
    id: str, release: str, state: str, health: str, *, age: float, **more: object
) -> InstanceStatus:
    fields: dict[str, object] = {
        "image": str(DIGEST),
        "address": "127.0.0.1:40123",
        "pid": 4242,
        "probe": "http",
        "failed_probes": 0,
        "weight": 1,
        "traffic_percent": 100.0,
        "preview": False,
        "restarts": 0,
        "last_exit": "",
        **more,
    }
    return InstanceStatus(
        id=id,
        release=release,
        state=state,
        started_at=NOW - age,
        health=health,
        **fields,  # type: ignore[arg-type]
    )


def service(name: str = "web", **more: object) -> ServiceStatus:
    fields: dict[str, object] = {
        "desired_release": "web@r2",
        "image": str(DIGEST),
        "image_name": "web",
        "replicas": 1,
        "url": "http://127.0.0.1:8080/",
        "preview_url": None,
        "rollout": None,
        "releases": (),
        "restarts": 0,
        "last_exit": "",
        "crash_looping": False,
        "next_start_in": None,
        "problem": None,
        "instances": (),
        **more,
    }
    return ServiceStatus(service=name, **fields)  # type: ignore[arg-type]


def rollout(state: str, *, progress: str = "", reason: str = "") -> RolloutView:
    return RolloutView(7, "web", "deploy", 1, 2, state, reason, progress, NOW - 5, None)


# --- the table -------------------------------------------------------------------------


def test_columns_are_laid_out_as_a_borderless_rich_table() -> None:
    lines = table(("", "NAME", "N"), [("*", "web", "1"), ("", "a-longer-name", "22")])
    assert written(lines) == (
        "    NAME           N  \n *  web            1  \n    a-longer-name  22 \n"
    )
    from rich.table import Table

    rich_table = Table("", "NAME", "N", box=None)
    rich_table.add_row("*", "web", "1")
    rich_table.add_row("", "a-longer-name", "22")
    out = io.StringIO()
    Console(file=out, highlight=False, soft_wrap=True).print(rich_table)
    assert written(lines) == out.getvalue()


def test_a_wide_row_runs_on_instead_of_being_cut() -> None:
    long = "x" * 120
    (_, row) = table(("A",), [(long,)])
    assert written([row]) == f" {long} \n"


# --- status ----------------------------------------------------------------------------


def test_status_of_a_service_with_instances() -> None:
    web = service(
        preview_url="http://127.0.0.1:8081/",
        releases=(
            ReleaseShare("web@r2", 90.0, 1, 1, False, "live"),
            ReleaseShare("web@r1", 10.0, 1, 1, True, "preview"),
        ),
        rollout=rollout("running", progress="step 2/4: shift traffic", reason="slow start"),
        instances=(
            instance("web-r2-a1", "web@r2", "healthy", "passing", age=65),
            instance(
                "web-r1-b2",
                "web@r1",
                "degraded",
                "failing (2 in a row)",
                age=4000,
                traffic_percent=10.0,
                preview=True,
                restarts=3,
                pid=99,
            ),
        ),
    )
    assert written(render.status(StatusView((web,)), NOW)) == (
        "web  release web@r2  image web@abababababab  http://127.0.0.1:8080/\n"
        "  preview http://127.0.0.1:8081/\n"
        "  traffic: web@r2 90% live · web@r1 10% preview\n"
        "  last rollout #7 deploy -> r2: running (step 2/4: shift traffic) — slow start\n"
        " INSTANCE   RELEASE  STATE     HEALTH                TRAFFIC      RESTARTS  ADDRESS "
        "         PID   AGE  \n"
        " web-r2-a1  web@r2   healthy   passing               100%         0         127.0.0."
        "1:40123  4242  1m   \n"
        " web-r1-b2  web@r1   degraded  failing (2 in a row)  10% preview  3         127.0.0."
        "1:40123  99    1.1h \n"
    )


def test_status_styles_states_and_health_on_a_terminal() -> None:
    web = service(instances=(instance("web-r2-a1", "web@r2", "starting", "starting", age=1),))
    out = drawn(render.status(StatusView((web,)), NOW))
    assert "\033[1mweb\033[0m  release web@r2" in out
    assert "\033[33mstarting\033[0m" in out
    assert "\033[31m" not in out


def test_status_of_a_crash_looping_service_with_a_problem() -> None:
    web = service(
        desired_release=None,
        image=None,
        url=None,
        problem="port 8080 is in use",
        restarts=4,
        last_exit="exit code 1",
        crash_looping=True,
        next_start_in=7.6,
        rollout=rollout("failed", reason="no healthy instance"),
    )
    assert written(render.status(StatusView((web,)), NOW)) == (
        "web  release (down)\n"
        "  problem: port 8080 is in use\n"
        "  crash-looping: 4 unexpected exits in a row, last: exit code 1; next start in 8s\n"
        "  last rollout #7 deploy -> r2: failed — no healthy instance\n"
    )
    restarted = service(restarts=1, last_exit="killed by signal 9")
    assert "  restarted: 1 unexpected exits in a row, last: killed by signal 9\n" in written(
        render.status(StatusView((restarted,)), NOW)
    )


def test_status_answered_from_the_records_on_a_full_state_dir() -> None:
    full = StateDirView("/s", 10, 1 << 20, "the state dir /s is full", "Free space on /s.")
    assert written(render.status(StatusView((), "stopped", full), NOW)) == (
        "controller: stopped (answered from the records; 'graven serve' or any verb that "
        "changes state starts it)\n"
        "the state dir /s is full\n"
        "  hint: Free space on /s.\n"
        "nothing deployed yet: run 'graven deploy -m WHY'\n"
    )
    ok = StateDirView("/s", 1 << 30, 1 << 20, None, None)
    assert "full" not in written(render.status(StatusView((service(),), None, ok), NOW))


def test_status_prints_brackets_in_names_and_messages_as_they_are() -> None:
    odd = service(
        "[bold]web[/]",
        problem="[red]boom[/] :smile:",
        restarts=1,
        last_exit="[/] exit",
        rollout=rollout("failed", reason="[link=x]y[/link]"),
        instances=(instance("[i]d", "r[1]", "[x]", "[dim]h", age=3),),
    )
    out = written(render.status(StatusView((odd,)), NOW))
    assert out.startswith("[bold]web[/]  release web@r2")
    assert "  problem: [red]boom[/] :smile:\n" in out
    assert "last: [/] exit\n" in out
    assert " — [link=x]y[/link]\n" in out
    assert "\n [i]d      r[1]     [x]    [dim]h  100%  " in out
    assert "[bold]web[/]" in drawn(render.status(StatusView((odd,)), NOW))


def test_ages() -> None:
    assert [render.ago(s) for s in (5, 125, 7200, 90000)] == ["5s", "2m", "2.0h", "1.0d"]


# --- releases --------------------------------------------------------------------------


def record(number: int, image_name: str, *, served: bool) -> ReleaseRecord:
    config = ServiceConfig(replicas=1, port=18080, health=HealthCheck())
    created = NOW - 100 * number
    return ReleaseRecord(
        Release("web", number, DIGEST, config), image_name, created, created if served else None
    )


def test_releases_mark_the_desired_one() -> None:
    records = [record(1, "web", served=True), record(2, "web[x]", served=False)]
    when = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)) for r in records]
    assert written(render.releases(records, 1)) == (
        "    RELEASE  IMAGE                CREATED              SERVED \n"
        f" *  web@r1   web@abababababab     {when[0]}  yes    \n"
        f"    web@r2   web[x]@abababababab  {when[1]}  no     \n"
    )
    assert "*" not in written(render.releases(records, None))


# --- plan ------------------------------------------------------------------------------


def test_plans_list_changes_and_steps() -> None:
    steps = tuple(StepView("start", f"start instance {n} of web@r2") for n in range(1, 11))
    changed = PreviewResult(
        True,
        "web@r1",
        to="web@r2",
        changes=("image abababababab -> cdcdcdcdcdcd", "env [FOO] set"),
        steps=PlanView("web", 2, steps),
    )
    first = PreviewResult(True, None, to="api@r1", changes=(), steps=PlanView("api", 1, ()))
    same = PreviewResult(False, "db@r3", steps=PlanView("db", None, ()))
    out = written(render.plans([("web", changed), ("api", first), ("db", same)], None))
    assert out == (
        "web: web@r1 -> web@r2\n"
        "  ~ image abababababab -> cdcdcdcdcdcd\n"
        "  ~ env [FOO] set\n"
        + "".join(f"  {n:>2}. start instance {n} of web@r2\n" for n in range(1, 11))
        + "api: (nothing) -> api@r1\n"
        "db: up to date (db@r3); nothing to do\n"
    )


def test_a_plan_answered_from_the_records_says_so() -> None:
    same = PreviewResult(False, "db@r3", steps=PlanView("db", None, ()))
    assert written(render.plans([("db", same)], "stopped")).startswith("controller: stopped (")


# --- promote, abort, down ----------------------------------------------------------------


def test_promote_abort_and_down() -> None:
    assert written(
        [
            render.promoted("web", "running", "paused: awaiting promote"),
            render.promoted("web", None, ""),
            render.aborted(AbortResult("web", 7, "[bold]stop[/] it")),
            *render.taken_down(
                [DownResult(True, "web", 8), DownResult(False, "api", None)],
                controller_stopped=True,
            ),
            render.nothing_running(),
        ]
    ) == (
        "web: running paused: awaiting promote\n"
        "web: promoted \n"
        "web: [bold]stop[/] it\n"
        "web: stopped\n"
        "api: already down\n"
        "controller stopped\n"
        "nothing running\n"
    )
    assert "controller" not in written(
        render.taken_down([DownResult(True, "web", 8)], controller_stopped=False)
    )


# --- audit -----------------------------------------------------------------------------


def test_the_ledger_and_its_proof() -> None:
    entries = [
        LedgerEntry(NOW, "alice", "deploy", "web", "web@r1", message="first go", seq=1),
        LedgerEntry(NOW, "bob", "rollback", "web", "web@r0", message="[red]oops[/]", seq=12),
    ]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW))
    assert written(render.ledger(entries, 2)) == (
        " #   WHEN                 WHO    ACTION    RELEASE  WHY          \n"
        f" 1   {when}  alice  deploy    web@r1   first go     \n"
        f" 12  {when}  bob    rollback  web@r0   [red]oops[/] \n"
        "verified: 2 entries, chain intact\n"
    )
    assert written(render.ledger([])) == " #  WHEN  WHO  ACTION  RELEASE  WHY \n"
