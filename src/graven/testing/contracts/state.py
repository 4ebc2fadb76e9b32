"""The StateStore port's contract: what every adapter must do, fakes included.

Subclass ``StateStoreContract`` once per adapter (the class name shows in the test
ids) and provide two fixtures:

- ``store``: a new, empty store;
- ``reopen``: a callable that closes ``store`` and opens the same store again, as a
  restarted controller would.

and set ``persists``: whether what was committed is there after ``reopen``. A durable
adapter says True; an in-memory one says False, and the suite then checks that a
reopened store starts empty, so neither case is skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import ClassVar

import pytest

from graven.errors import InternalError, NotFoundError
from graven.ledger.chain import LedgerEntry, verify_chain
from graven.ledger.state import (
    AnalysisGate,
    Crashes,
    PauseGate,
    RolloutGate,
    StateStore,
)
from graven.model import Digest, HealthCheck, Instance, InstanceState, Release, ServiceConfig
from graven.router.base import BackendStats

IMAGE_A = Digest("sha256:" + "a1" * 32)
IMAGE_B = Digest("sha256:" + "b2" * 32)


def config(replicas: int = 2, port: int = 18080) -> ServiceConfig:
    return ServiceConfig(
        replicas=replicas, port=port, health=HealthCheck(path="/ready"), env=(("MODE", "x"),)
    )


def instance(
    instance_id: str,
    *,
    service: str = "web",
    release: int = 1,
    started_at: float = 10.0,
    state: InstanceState = "starting",
    port: int = 30001,
) -> Instance:
    return Instance(
        id=instance_id,
        service=service,
        release=release,
        image=IMAGE_A,
        host="127.0.0.1",
        port=port,
        pid=4000 + port % 1000,
        started_at=started_at,
        state=state,
        restarts=2,
        last_exit="exited with code 1",
    )


def entry(n: int, service: str = "web") -> LedgerEntry:
    return LedgerEntry(
        at=100.0 + n,
        actor="ana@host",
        action="deploy",
        service=service,
        release=f"{service}@r{n}",
        image=str(IMAGE_A),
        message=f"change {n}",
        details={"n": n, "nested": {"k": [1, 2]}},
    )


def deployed(store: StateStore, service: str = "web", at: float = 1.0) -> Release:
    """A first release of ``service``, desired."""
    with store.transaction() as tx:
        release = tx.add_release(service, IMAGE_A, f"{service}-image", config(), at)
        tx.set_desired(service, release.number, at)
    return release


class StateStoreContract:
    """Behaviour every StateStore adapter shares. Not collected itself (no ``Test``
    prefix); its subclasses are."""

    persists: ClassVar[bool]

    @pytest.fixture
    def store(self) -> StateStore:
        raise NotImplementedError("a StateStoreContract subclass provides 'store'")

    @pytest.fixture
    def reopen(self, store: StateStore) -> Callable[[], StateStore]:
        raise NotImplementedError("a StateStoreContract subclass provides 'reopen'")

    # --- an empty store ---------------------------------------------------------------

    def test_a_new_store_is_empty(self, store: StateStore) -> None:
        assert store.services() == {}
        assert store.desired_release("web") is None
        assert store.crashes("web") == Crashes()
        assert store.releases("web") == []
        assert store.release_record("web", 1) is None
        assert store.last_served_release("web", other_than=1) is None
        assert store.live_instances() == []
        assert store.instance("web-r1-0000") is None
        assert store.instance_ids() == set()
        assert store.pid_start("web-r1-0000") == 0
        assert store.weights("web") == {}
        assert store.preview_instances("web") == []
        assert store.running_rollout("web") is None
        assert store.last_rollout("web") is None
        assert store.ledger() == []

    def test_unknown_releases_and_rollouts_are_not_found(self, store: StateStore) -> None:
        with pytest.raises(NotFoundError, match=r"web@r3 does not exist"):
            store.release("web", 3)
        with pytest.raises(NotFoundError, match=r"rollout 7 does not exist"):
            store.rollout(7)

    # --- releases and desired state ---------------------------------------------------

    def test_releases_are_numbered_per_service_and_hold_their_row(self, store: StateStore) -> None:
        with store.transaction() as tx:
            web1 = tx.add_release("web", IMAGE_A, "web-image", config(), 1.0)
            api1 = tx.add_release("api", IMAGE_B, "api-image", config(3, 18081), 2.0)
            web2 = tx.add_release("web", IMAGE_B, "web-image:2", config(4), 3.0)
        assert (web1.id, web2.id, api1.id) == ("web@r1", "web@r2", "api@r1")
        assert web2.content_hash == Release.hash_of("web", IMAGE_B, config(4))
        records = store.releases("web")
        assert [r.number for r in records] == [1, 2]
        assert [r.id for r in records] == ["web@r1", "web@r2"]
        second = records[1]
        assert second.release == web2
        assert second.release.config == config(4)  # the whole config round-trips
        assert (second.image_name, second.created_at, second.healthy_at) == (
            "web-image:2",
            3.0,
            None,
        )
        assert store.release("api", 1) == api1
        assert store.release_record("api", 1) == store.releases("api")[0]

    def test_a_release_says_who_deployed_it_and_why(self, store: StateStore) -> None:
        release = deployed(store)
        record = store.release_record("web", release.number)
        assert record is not None and (record.actor, record.message) == ("", "")  # no entry
        with store.transaction() as tx:
            tx.append_ledger(
                LedgerEntry(
                    at=2.0,
                    actor="ana@host",
                    action="deploy",
                    service="web",
                    release=release.id,
                    message="first cut",
                )
            )
            tx.append_ledger(
                LedgerEntry(
                    at=3.0,
                    actor="bob@host",
                    action="rollback",
                    service="web",
                    release=release.id,
                    message="back",
                )
            )
        record = store.release_record("web", release.number)
        assert record is not None and (record.actor, record.message) == ("ana@host", "first cut")
        assert store.releases("web") == [record]

    def test_a_release_keeps_the_first_time_it_served(self, store: StateStore) -> None:
        release = deployed(store)
        with store.transaction() as tx:
            tx.mark_release_healthy("web", release.number, 5.0)
        with store.transaction() as tx:
            tx.mark_release_healthy("web", release.number, 9.0)
            tx.mark_release_healthy("web", 99, 9.0)  # no such release: nothing happens
        record = store.release_record("web", release.number)
        assert record is not None and record.healthy_at == 5.0

    def test_desired_release_per_service_and_down(self, store: StateStore) -> None:
        deployed(store, "web")
        deployed(store, "api")
        with store.transaction() as tx:
            again = tx.add_release("web", IMAGE_B, "web-image", config(), 2.0)
            tx.set_desired("web", again.number, 2.0)
            tx.set_desired("api", None, 2.0)
        assert store.services() == {"web": 2, "api": None}  # a service down stays listed
        assert store.desired_release("web") == 2
        assert store.desired_release("api") is None

    # --- instances --------------------------------------------------------------------

    def test_instances_their_states_and_records(self, store: StateStore) -> None:
        deployed(store)
        with store.transaction() as tx:
            tx.add_instance(instance("web-r1-bbbb", started_at=20.0, port=30002), 777)
            tx.add_instance(instance("web-r1-aaaa", started_at=20.0, port=30001), 555)
            tx.add_instance(instance("web-r1-0000", started_at=10.0, port=30003), 333)
            tx.add_instance(instance("api-r1-0000", service="api", port=30004), 111)
        # Oldest first, then by id.
        assert [i.id for i in store.live_instances("web")] == [
            "web-r1-0000",
            "web-r1-aaaa",
            "web-r1-bbbb",
        ]
        assert {i.id for i in store.live_instances()} == {
            "web-r1-0000",
            "web-r1-aaaa",
            "web-r1-bbbb",
            "api-r1-0000",
        }
        assert store.live_instances("web")[1] == instance(
            "web-r1-aaaa", started_at=20.0, port=30001
        )
        assert store.pid_start("web-r1-bbbb") == 777

        with store.transaction() as tx:
            tx.set_instance_state("web-r1-aaaa", "healthy")
            tx.set_instance_state("web-r1-bbbb", "unhealthy", reason="health check: 503")
            tx.set_instance_state("web-r1-0000", "stopped", at=30.0, reason="replaced")
        states = {i.id: i.state for i in store.live_instances("web")}
        assert states == {"web-r1-aaaa": "healthy", "web-r1-bbbb": "unhealthy"}
        unhealthy = store.instance("web-r1-bbbb")
        assert unhealthy is not None and unhealthy.reason == "health check: 503"

        stopped = store.instance("web-r1-0000")  # not live, still recorded
        assert stopped is not None
        assert (stopped.state, stopped.stopped_at, stopped.reason) == ("stopped", 30.0, "replaced")
        assert (stopped.pid_start, stopped.id) == (333, "web-r1-0000")
        assert stopped.instance.restarts == 2
        assert stopped.instance.last_exit == "exited with code 1"
        assert store.instance_ids() == {"web-r1-0000", "web-r1-aaaa", "web-r1-bbbb", "api-r1-0000"}

        with store.transaction() as tx:
            tx.set_instance_state("web-r1-aaaa", "draining")
        assert {i.id: i.state for i in store.live_instances("web")}["web-r1-aaaa"] == "draining"

    def test_weights_and_the_preview_route(self, store: StateStore) -> None:
        deployed(store)
        with store.transaction() as tx:
            for n, name in enumerate(("web-r1-aaaa", "web-r1-bbbb", "web-r2-cccc")):
                tx.add_instance(instance(name, started_at=float(n), port=30001 + n), n)
        assert store.weights("web") == {"web-r1-aaaa": 100, "web-r1-bbbb": 100, "web-r2-cccc": 100}
        record = store.instance("web-r2-cccc")
        assert record is not None and (record.weight, record.preview) == (100, False)

        with store.transaction() as tx:
            tx.set_weights({"web-r1-aaaa": 80, "web-r1-bbbb": 80, "web-r2-cccc": 20})
            tx.set_preview("web-r2-cccc", True)
            tx.set_preview("web-r1-bbbb", True)
            tx.set_instance_state("web-r2-cccc", "healthy")
        assert store.weights("web") == {"web-r1-aaaa": 80, "web-r1-bbbb": 80, "web-r2-cccc": 20}
        # Only healthy instances are behind the preview route.
        assert store.preview_instances("web") == ["web-r2-cccc"]

        with store.transaction() as tx:
            tx.set_weights({"web-r2-cccc": 100, "web-r1-aaaa": 0}, clear_preview=True)
            tx.set_instance_state("web-r1-bbbb", "stopped", at=5.0, reason="replaced")
        assert store.weights("web") == {"web-r1-aaaa": 0, "web-r2-cccc": 100}  # live only
        assert store.preview_instances("web") == []
        record = store.instance("web-r2-cccc")
        assert record is not None and (record.weight, record.preview) == (100, False)

    # --- rollouts ---------------------------------------------------------------------

    def test_rollout_lifecycle(self, store: StateStore) -> None:
        deployed(store)
        with store.transaction() as tx:
            first = tx.start_rollout("web", "deploy", None, 1, 10.0)
        ro = store.rollout(first)
        assert (ro.id, ro.service, ro.kind, ro.from_release, ro.to_release) == (
            first,
            "web",
            "deploy",
            None,
            1,
        )
        assert (ro.state, ro.reason, ro.progress, ro.started_at) == ("running", "", "", 10.0)
        assert (ro.finished_at, ro.progressed_at, ro.step_index, ro.promoted) == (
            None,
            10.0,
            0,
            False,
        )
        assert (ro.switched_at, ro.paused_until, ro.gate) == (None, None, RolloutGate())
        assert store.running_rollout("web") == ro

        with store.transaction() as tx:
            tx.set_rollout_progress(first, progress="step 1/3: start", progressed_at=11.0)
            tx.set_rollout_step(first, 2)
            tx.set_rollout_promoted(first, True)
            tx.set_rollout_pause(first, 40.0)
            tx.set_rollout_switched(first, 12.0)
        with store.transaction(durable=False) as tx:
            tx.set_rollout_progress(first, progress="paused: waiting")  # time kept
        ro = store.rollout(first)
        assert (ro.progress, ro.progressed_at, ro.step_index) == ("paused: waiting", 11.0, 2)
        assert (ro.promoted, ro.paused_until, ro.switched_at) == (True, 40.0, 12.0)
        with store.transaction() as tx:
            tx.set_rollout_progress(first, progressed_at=13.0)  # text kept
            tx.set_rollout_promoted(first, False)
            tx.set_rollout_pause(first, None)
        ro = store.rollout(first)
        assert (ro.progress, ro.progressed_at, ro.promoted, ro.paused_until) == (
            "paused: waiting",
            13.0,
            False,
            None,
        )
        status = ro.to_dict()
        assert "gate" not in status
        assert status["promoted"] == 0 and status["step_index"] == 2 and status["id"] == first

        # A newer desire supersedes the running rollout.
        with store.transaction() as tx:
            second = tx.start_rollout("web", "rollback", 1, 1, 20.0)
            other = tx.start_rollout("api", "deploy", None, 1, 20.0)
        assert second > first
        superseded = store.rollout(first)
        assert (superseded.state, superseded.finished_at) == ("superseded", 20.0)
        assert store.running_rollout("web") == store.rollout(second)
        assert store.running_rollout("api") == store.rollout(other)

        with store.transaction() as tx:
            tx.finish_rollout(first, "succeeded", "", 21.0)  # not running: kept as it was
            tx.finish_rollout(second, "failed", "step 2 failed", 22.0)
            tx.finish_rollout(second, "succeeded", "", 23.0)  # ends only once
        assert store.rollout(first).state == "superseded"
        done = store.rollout(second)
        assert (done.state, done.reason, done.finished_at) == ("failed", "step 2 failed", 22.0)
        assert store.running_rollout("web") is None
        assert store.last_rollout("web") == done

        with store.transaction() as tx:  # unconditionally: an abort or a failed step
            tx.finish_rollout(first, "aborted", "aborted by ana", 24.0, running_only=False)
        assert store.rollout(first).state == "aborted"
        assert store.last_rollout("web") == store.rollout(second)  # the newest, by id

    def test_gates_round_trip(self, store: StateStore) -> None:
        deployed(store)
        with store.transaction() as tx:
            rid = tx.start_rollout("web", "deploy", None, 1, 1.0)
        pause = RolloutGate(pause=PauseGate(until=61.5))
        with store.transaction() as tx:
            tx.set_rollout_gate(rid, pause)
        assert store.rollout(rid).gate == pause

        analysis = AnalysisGate(
            canary_release=2,
            baseline_release=1,
            window=60.0,
            started_at=62.25,
            start=(
                BackendStats("web-r1-aaaa", "127.0.0.1:30001", "ready", 0, 10, 1, 80, 1, (3, 4, 3)),
                BackendStats("web-r2-bbbb", "127.0.0.1:30002", "drain", 2, 5, 0, 20, 0, ()),
            ),
            releases=(("web-r1-aaaa", 1), ("web-r2-bbbb", 2)),
        )
        both = RolloutGate(pause=PauseGate(until=61.5, done=True), analysis=analysis)
        with store.transaction() as tx:
            tx.set_rollout_gate(rid, both)
        got = store.rollout(rid).gate
        assert got == both
        assert got.analysis is not None and got.analysis.matches(2, 1, 60.0)
        assert not got.analysis.matches(2, 1, 30.0)
        assert dict(got.analysis.releases) == {"web-r1-aaaa": 1, "web-r2-bbbb": 2}

        with store.transaction() as tx:  # a new step: nothing of the last one's gate
            tx.set_rollout_gate(rid, RolloutGate())
        assert store.rollout(rid).gate == RolloutGate()
        assert store.rollout(rid).gate.empty

    def test_the_default_rollback_target(self, store: StateStore) -> None:
        deployed(store)
        with store.transaction() as tx:
            tx.add_release("web", IMAGE_B, "web-image", config(3), 2.0)
            tx.add_release("web", IMAGE_A, "web-image", config(4), 3.0)
            r1 = tx.start_rollout("web", "deploy", None, 1, 1.0)
            tx.finish_rollout(r1, "succeeded", "", 1.5)
            r2 = tx.start_rollout("web", "deploy", 1, 2, 2.0)
            tx.finish_rollout(r2, "failed", "bad", 2.5)
            r3 = tx.start_rollout("web", "deploy", 1, 3, 3.0)
            tx.finish_rollout(r3, "succeeded", "", 3.5)
            down = tx.start_rollout("web", "down", 3, None, 4.0)
            tx.finish_rollout(down, "succeeded", "", 4.5)
        assert store.last_served_release("web", other_than=3) == 1  # r2 never served
        assert store.last_served_release("web", other_than=1) == 3
        assert store.last_served_release("api", other_than=1) is None

    # --- crash loops ------------------------------------------------------------------

    def test_crash_counters(self, store: StateStore) -> None:
        with store.transaction() as tx:
            assert tx.record_crash("web", "exited with code 1", 1.0) == 0  # never deployed
        assert store.crashes("web") == Crashes()
        deployed(store)
        with store.transaction() as tx:
            assert tx.record_crash("web", "exited with code 1", 5.0) == 1
            assert tx.record_crash("web", "killed by SIGKILL", 7.0) == 2
        assert store.crashes("web") == Crashes(2, "killed by SIGKILL", 7.0)
        with store.transaction() as tx:
            tx.reset_crashes("web")
        # The loop is over; how the last one ended stays to be shown.
        assert store.crashes("web") == Crashes(0, "killed by SIGKILL", 7.0)
        with store.transaction() as tx:
            assert tx.record_crash("web", "exited with code 2", 9.0) == 1

    # --- the ledger -------------------------------------------------------------------

    def test_ledger_appends_in_order_as_a_chain(self, store: StateStore) -> None:
        sealed = []
        for n in (1, 2, 3):
            with store.transaction() as tx:
                sealed.append(tx.append_ledger(entry(n, "api" if n == 2 else "web")))
        with store.transaction() as tx:
            sealed.append(tx.append_ledger(entry(4)))
            sealed.append(tx.append_ledger(entry(5)))  # two in one transaction
        entries = store.ledger()
        assert entries == sealed
        assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
        assert entries[0].prev_hash == ""
        assert all(e.prev_hash == p.hash for p, e in itertools.pairwise(entries))
        assert entries[1].details == {"n": 2, "nested": {"k": [1, 2]}}
        assert verify_chain(entries, (5, entries[-1].hash)) == 5
        assert [e.seq for e in store.ledger("web")] == [1, 3, 4, 5]
        assert [e.seq for e in store.ledger("api")] == [2]

    # --- transactions -----------------------------------------------------------------

    def test_an_exception_in_a_transaction_writes_nothing(self, store: StateStore) -> None:
        release = deployed(store)
        with store.transaction() as tx:
            tx.add_instance(instance("web-r1-aaaa"), 1)
            rid = tx.start_rollout("web", "deploy", None, 1, 1.0)
            tx.append_ledger(entry(1))
        before = (
            store.services(),
            store.releases("web"),
            store.instance("web-r1-aaaa"),
            store.rollout(rid),
            store.crashes("web"),
            store.ledger(),
        )
        for durable in (True, False):
            with (
                pytest.raises(RuntimeError, match="crash before commit"),
                store.transaction(durable=durable) as tx,
            ):
                again = tx.add_release("web", IMAGE_B, "web-image", config(5), 2.0)
                tx.set_desired("web", again.number, 2.0)
                tx.mark_release_healthy("web", release.number, 2.0)
                tx.add_instance(instance("web-r2-bbbb", release=2, port=30009), 2)
                tx.set_instance_state("web-r1-aaaa", "stopped", at=2.0, reason="x")
                tx.set_weights({"web-r1-aaaa": 0}, clear_preview=True)
                tx.set_preview("web-r1-aaaa", True)
                tx.start_rollout("web", "deploy", 1, 2, 2.0)  # supersedes rid
                tx.set_rollout_gate(rid, RolloutGate(pause=PauseGate(until=9.0)))
                tx.finish_rollout(rid, "failed", "x", 2.0, running_only=False)
                tx.record_crash("web", "exited", 2.0)
                tx.append_ledger(entry(2))
                raise RuntimeError("crash before commit")
            after = (
                store.services(),
                store.releases("web"),
                store.instance("web-r1-aaaa"),
                store.rollout(rid),
                store.crashes("web"),
                store.ledger(),
            )
            assert after == before
            assert store.instance("web-r2-bbbb") is None
        # The store goes on working, and numbers nothing twice.
        with store.transaction() as tx:
            assert tx.add_release("web", IMAGE_B, "web-image", config(5), 3.0).number == 2
            assert tx.append_ledger(entry(2)).seq == 2

    def test_reads_inside_a_transaction_see_its_writes(self, store: StateStore) -> None:
        deployed(store)
        with store.transaction() as tx:
            tx.set_desired("web", None, 2.0)
            assert store.desired_release("web") is None
        assert store.desired_release("web") is None

    def test_transactions_do_not_nest(self, store: StateStore) -> None:
        with store.transaction(), pytest.raises(InternalError), store.transaction():
            pass
        with store.transaction() as tx:  # the outer one closed cleanly
            tx.set_desired("web", None, 1.0)
        assert store.services() == {"web": None}

    def test_a_transaction_cannot_be_used_after_its_block(self, store: StateStore) -> None:
        with store.transaction() as tx:
            tx.set_desired("web", None, 1.0)
        with pytest.raises(InternalError):
            tx.set_desired("web", 1, 2.0)
        assert store.services() == {"web": None}

    # --- persistence ------------------------------------------------------------------

    def test_reopening(self, store: StateStore, reopen: Callable[[], StateStore]) -> None:
        release = deployed(store)
        gate = RolloutGate(pause=PauseGate(until=5.0, done=True))
        with store.transaction() as tx:
            tx.add_instance(instance("web-r1-aaaa"), 42)
            rid = tx.start_rollout("web", "deploy", None, 1, 1.0)
            tx.set_rollout_gate(rid, gate)
            tx.record_crash("web", "exited with code 1", 3.0)
            tx.append_ledger(entry(1))
        records = (
            store.services(),
            store.releases("web"),
            store.instance("web-r1-aaaa"),
            store.rollout(rid),
            store.crashes("web"),
            store.ledger(),
        )
        again = reopen()
        if not self.persists:
            # Declared: this adapter keeps nothing across a restart.
            assert again.services() == {}
            assert again.ledger() == []
            assert again.instance("web-r1-aaaa") is None
            return
        assert (
            again.services(),
            again.releases("web"),
            again.instance("web-r1-aaaa"),
            again.rollout(rid),
            again.crashes("web"),
            again.ledger(),
        ) == records
        assert again.release("web", 1) == release
        assert again.rollout(rid).gate == gate
        with again.transaction() as tx:  # and it goes on where it stopped
            assert tx.add_release("web", IMAGE_B, "web-image", config(), 4.0).number == 2
            assert tx.append_ledger(entry(2)).seq == 2
        assert verify_chain(again.ledger()) == 2
