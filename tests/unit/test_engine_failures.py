"""Rollouts that cannot finish, crash loops and what status says of them: the engine
against fakes, with a fake clock (no processes, no sleeps)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from graven.controller.api import Api
from graven.controller.engine import ServiceWorker
from graven.controller.health_watch import BACKOFF_MAX, CRASH_RESET, backoff
from graven.controller.results import to_json
from graven.model import BlueGreenConfig, HealthCheck, ServiceConfig
from tests.unit.test_engine import World, config


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def one(**kw: Any) -> ServiceConfig:
    return config(replicas=1, **kw)


def status(world: World) -> dict[str, Any]:
    return to_json(Api(world.engine, lambda: None).engine_status("web")[0])


def health_pass(world: World) -> None:
    asyncio.run(world.engine.health_watch.check_once())


# --- a port someone else holds --------------------------------------------------------------


def test_a_router_that_cannot_listen_fails_the_first_rollout_with_the_reason(world: World) -> None:
    world.router.foreign_ports[18080] = "pid 4242 (nginx)"
    out = world.deploy(world.v1)
    world.converge()
    ro = world.state.rollout(out.rollout)
    assert ro.state == "failed"
    assert "port 18080 on 127.0.0.1 is in use by pid 4242 (nginx)" in ro.reason
    assert "Stop what holds port 18080" in ro.reason  # the next step
    assert world.state.desired_release("web") is None  # nothing left half-done
    assert world.state.live_instances("web") == []
    assert [e.action for e in world.state.ledger()] == ["deploy", "rollout-failed"]


def test_moving_to_a_busy_port_goes_back_to_the_release_that_served(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    world.router.foreign_ports[18081] = "pid 4242 (nginx)"
    out = world.deploy(world.v2, dataclasses.replace(config(), port=18081))
    world.converge()
    assert world.state.rollout(out.rollout).state == "failed"
    assert world.state.desired_release("web") == 1
    assert world.serving() == [(1, "healthy")] * 3
    assert world.router.running() == {"web": 18080}


# --- the progress deadline ------------------------------------------------------------------


def test_a_rollout_stuck_in_start_up_fails_at_its_progress_deadline(world: World) -> None:
    world.deploy(world.v1, one())
    world.converge()
    world.runtime.unhealthy_releases.add(2)
    slow = dataclasses.replace(
        one(), health=HealthCheck(start_timeout=3600), progress_deadline=60.0
    )
    start = world.clock.now()
    out = world.deploy(world.v2, slow)
    world.converge()
    ro = world.state.rollout(out.rollout)
    assert ro.state == "failed"
    assert ro.reason.startswith("no progress for 60s (the progress deadline)")
    assert "progress_deadline" in ro.reason  # says what to change
    assert world.clock.now() - start < 120  # gave up at the deadline, not the 1 h budget
    assert world.serving() == [(1, "healthy")]


def test_a_failing_pass_runs_into_the_deadline_instead_of_retrying_forever(world: World) -> None:
    world.deploy(world.v1, one(progress_deadline=30.0))
    calls = 0

    def broken(service: str, port: int) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    world.router.ensure = broken  # type: ignore[method-assign]

    async def loop() -> None:
        worker = world.engine.workers.setdefault("web", ServiceWorker())
        task = asyncio.ensure_future(world.engine._service_loop("web", worker))
        # Each pass calls the router in a worker thread, which a starved machine may
        # take a while to run: bound the wait by time, not by event-loop turns.
        give_up = time.monotonic() + 60.0
        while time.monotonic() < give_up:
            worker.wake.set()  # no real 2 s wait between passes
            await asyncio.sleep(0.001)
            if world.state.running_rollout("web") is None:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(loop())
    last = world.state.last_rollout("web")
    assert last is not None and last.state == "failed"
    assert "last error: internal error: ValueError('boom')" in last.reason
    assert calls >= 2


def test_manual_gates_do_not_count_against_the_deadline(world: World) -> None:
    world.deploy(world.v1, one())
    world.converge()
    gated = one(strategy=BlueGreenConfig(auto_promote=False), progress_deadline=5.0)
    out = world.deploy(world.v2, gated)

    async def scenario() -> None:
        task = asyncio.ensure_future(world.engine.reconcile("web"))
        for _ in range(100_000):
            await asyncio.sleep(0)
            ro = world.state.rollout(out.rollout)
            if ro.progress.startswith("paused"):
                break
        world.clock.advance(3600)  # an hour at the gate
        world.engine.commands.promote("web", "ana", "looks good")
        await task

    asyncio.run(scenario())
    world.converge()
    ro = world.state.rollout(out.rollout)
    assert ro.state == "succeeded", ro.reason


# --- crash loops ----------------------------------------------------------------------------


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert backoff(40) == BACKOFF_MAX
    assert backoff(0) == 0.0


def die(world: World, how: str = "exited with code 1") -> str:
    (inst,) = world.state.live_instances("web")
    world.runtime.kill(inst.pid, how)
    health_pass(world)
    return inst.id


def test_a_dead_instance_is_recorded_ledgered_and_replaced_after_a_growing_delay(
    world: World,
) -> None:
    world.deploy(world.v1, one())
    world.converge()
    hows = ["exited with code 1", "exited with code 1", "killed by SIGKILL"]
    first = die(world, hows[0])
    record = world.state.instance(first)
    assert record is not None and record.reason == "died: exited with code 1"
    entry = world.state.ledger()[-1]
    assert entry.action == "instance-died" and entry.details["instance"] == first
    assert entry.details["exit"] == "exited with code 1" and entry.details["restarts"] == 1
    assert first in entry.message

    for n in (1, 2, 3):
        world.converge()
        assert world.state.live_instances("web") == [], f"restarted before back-off {n}"
        world.clock.advance(backoff(n) - 0.5)
        world.converge()
        assert world.state.live_instances("web") == []
        world.clock.advance(0.5)
        world.converge()
        (inst,) = world.state.live_instances("web")
        assert inst.restarts == n and inst.last_exit == hows[n - 1]
        if n < 3:
            die(world, hows[n])

    s = status(world)
    assert s["restarts"] == 3 and s["crash_looping"] is True
    assert s["last_exit"] == "killed by SIGKILL"
    assert s["instances"][0]["restarts"] == 3
    assert [e.action for e in world.state.ledger()].count("instance-died") == 3


def test_while_backing_off_status_says_crash_looping_and_when_the_next_start_is(
    world: World,
) -> None:
    world.deploy(world.v1, one())
    world.converge()
    for n in range(1, 4):
        die(world)
        world.clock.advance(backoff(n))
        world.converge()
    die(world)
    world.converge()
    s = status(world)
    assert s["crash_looping"] is True and s["restarts"] == 4
    assert s["last_exit"] == "exited with code 1"
    assert s["next_start_in"] == 8.0
    assert s["instances"] == []


def test_instances_that_stay_up_end_the_crash_loop(world: World) -> None:
    world.deploy(world.v1, one())
    world.converge()
    die(world)
    world.clock.advance(1)
    world.converge()
    world.engine.health_watch.end_crash_loops()
    assert world.state.crashes("web").restarts == 1  # too soon
    world.clock.advance(CRASH_RESET)
    world.engine.health_watch.end_crash_loops()
    assert world.state.crashes("web").restarts == 0
    die(world)
    assert world.state.ledger()[-1].details["backoff_seconds"] == 1.0  # starts over


def test_a_replacement_that_cannot_start_counts_as_a_crash(world: World) -> None:
    world.deploy(world.v1, one())
    world.converge()
    die(world)
    world.runtime.fail_start = True
    world.clock.advance(1)
    world.converge()
    assert world.state.crashes("web").restarts == 2
    world.clock.advance(1)
    world.converge()
    assert world.state.live_instances("web") == []  # still backing off (2 s now)
    world.runtime.fail_start = False
    world.clock.advance(2)
    world.converge()
    assert world.serving() == [(1, "healthy")]


# --- status tells the truth -----------------------------------------------------------------


def test_status_is_healthy_only_while_the_last_probe_passed(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    victim = world.state.live_instances("web")[0]
    world.runtime.healthy_ports.discard(victim.port)
    world.clock.advance(2)
    health_pass(world)
    by_id = {i["id"]: i for i in status(world)["instances"]}
    assert by_id[victim.id]["state"] == "degraded"  # still routed (1 miss of 3), not healthy
    assert victim.id in world.routed()
    assert by_id[victim.id]["health"] == "failing (1 in a row)"
    assert by_id[victim.id]["probe"] == "HTTP 503"
    others = [i for i in by_id.values() if i["id"] != victim.id]
    assert {i["health"] for i in others} == {"passing"}


def test_status_shows_traffic_per_instance_and_per_release(world: World) -> None:
    world.deploy(world.v1)
    world.converge()
    s = status(world)
    assert [i["traffic_percent"] for i in s["instances"]] == [33.3, 33.3, 33.3]
    assert s["releases"] == [
        {
            "release": "web@r1",
            "traffic_percent": 100.0,
            "instances": 3,
            "healthy": 3,
            "preview": False,
            "role": "live",
        }
    ]
    ids = [i.id for i in world.state.live_instances("web")]
    with world.state.transaction() as tx:
        tx.set_weights({ids[0]: 0})
    s = status(world)
    assert [i["traffic_percent"] for i in s["instances"]] == [0.0, 50.0, 50.0]
    assert s["instances"][0]["weight"] == 0


def test_status_names_the_live_and_the_warm_release_after_a_blue_green_switch(
    world: World,
) -> None:
    bg = config(replicas=2, strategy=BlueGreenConfig(rollback_window=1000.0))
    world.deploy(world.v1, bg)
    world.converge()
    world.deploy(world.v2, bg)

    async def scenario() -> None:
        task = asyncio.ensure_future(world.engine.reconcile("web"))
        for _ in range(100_000):
            await asyncio.sleep(0)
            roles = {r["release"]: r["role"] for r in status(world)["releases"]}
            if roles.get("web@r2") == "live" and roles.get("web@r1") == "warm":
                break
        else:
            raise AssertionError(f"never saw r2 live and r1 warm: {status(world)['releases']}")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
