"""The Runtime port's contract (``graven.runtime.base.Runtime``).

Subclass ``RuntimeContract`` once per adapter and provide the ``runtime_harness``
fixture: a ``RuntimeHarness`` that makes launch specs for the adapter and can make
an instance end by itself, as an instance would. The base's tests then hold every
adapter, the fake included, to what the controller relies on::

    class TestProcessRuntime(RuntimeContract):
        @pytest.fixture
        def runtime_harness(self, tmp_path: Path) -> Iterator[RuntimeHarness]:
            harness = MyHarness(tmp_path)
            yield harness
            harness.close()

Every wait is a bounded poll (``WAIT`` seconds at most), never a fixed sleep.
"""

from __future__ import annotations

from typing import Protocol

import pytest

from graven.detached import wait_until
from graven.runtime.base import Handle, LaunchSpec, Runtime

WAIT = 30.0  # seconds: the most any check here waits for an instance to change
GRACE = 10.0  # a stop's grace for an instance that does end on SIGTERM


class RuntimeHarness(Protocol):
    """What the contract needs beside the runtime itself."""

    runtime: Runtime

    def spec(self, instance_id: str, *, ignores_sigterm: bool = False) -> LaunchSpec:
        """A launch spec for an instance that runs until stopped (or ``end``ed), and
        whose log mentions its instance id once it runs (after it set itself up).
        ``ignores_sigterm``: one that only SIGKILL stops."""
        ...

    def end(self, handle: Handle, code: int) -> None:
        """Make the instance exit by itself with ``code``."""
        ...

    def crash(self, handle: Handle) -> None:
        """Kill the instance with SIGKILL from outside, as the OOM killer would."""
        ...

    def restarted(self) -> Runtime:
        """A new adapter object on the same state: what a restarted controller makes."""
        ...


class RuntimeContract:
    """The tests every Runtime adapter passes. Subclasses provide ``runtime_harness``."""

    @pytest.fixture
    def runtime_harness(self) -> RuntimeHarness:
        raise NotImplementedError(
            f"{type(self).__name__} must provide the 'runtime_harness' fixture"
        )

    @pytest.fixture
    def runtime(self, runtime_harness: RuntimeHarness) -> Runtime:
        return runtime_harness.runtime

    @staticmethod
    def running(runtime: Runtime, harness: RuntimeHarness, instance_id: str, **kw: bool) -> Handle:
        """Start an instance and wait until it runs its own code (its log says so):
        ``start`` returns once the process exists, before it has set itself up."""
        handle = runtime.start(harness.spec(instance_id, **kw))
        assert wait_until(lambda: instance_id in runtime.log_tail(instance_id), WAIT), (
            f"{instance_id} never logged that it runs: {runtime.log_tail(instance_id)!r}"
        )
        return handle

    # ------------------------------------------------------------------ start, alive

    def test_start_returns_the_handle_of_a_live_instance(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = runtime.start(runtime_harness.spec("web-r1-0001"))
        assert isinstance(handle, Handle)
        assert handle.pid > 0
        assert runtime.alive(handle)
        assert wait_until(lambda: "web-r1-0001" in runtime.log_tail("web-r1-0001"), WAIT)

    def test_each_instance_gets_its_own_handle(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        a = self.running(runtime, runtime_harness, "web-r1-0001")
        b = self.running(runtime, runtime_harness, "web-r1-0002")
        assert a != b
        assert runtime.alive(a)
        assert runtime.alive(b)

    def test_a_handle_with_another_start_time_is_not_alive(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        # The pid may have been reused by another process: only the start time tells.
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        assert not runtime.alive(Handle(handle.pid, handle.pid_start + 1))
        assert runtime.alive(handle)

    # ------------------------------------------------------------------ stop

    def test_stop_ends_the_instance_with_sigterm(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime.stop(handle, grace=GRACE)
        assert not runtime.alive(handle)
        assert runtime.exit_reason(handle) == "killed by SIGTERM"

    def test_stop_is_idempotent(self, runtime: Runtime, runtime_harness: RuntimeHarness) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime.stop(handle, grace=GRACE)
        runtime.stop(handle, grace=GRACE)
        assert not runtime.alive(handle)

    def test_stop_of_an_instance_that_is_gone_is_a_no_op(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime_harness.crash(handle)
        assert wait_until(lambda: not runtime.alive(handle), WAIT)
        runtime.stop(handle, grace=GRACE)
        assert runtime.exit_reason(handle) == "killed by SIGKILL"

    def test_stop_of_a_reused_pid_leaves_that_process_alone(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime.stop(Handle(handle.pid, handle.pid_start + 1), grace=0.0)
        assert runtime.alive(handle)

    def test_stop_kills_an_instance_that_ignores_sigterm_after_the_grace(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001", ignores_sigterm=True)
        # Bounded: it returns once SIGKILL ended the instance, not when it chooses to.
        runtime.stop(handle, grace=0.2)
        assert not runtime.alive(handle)
        assert runtime.exit_reason(handle) == "killed by SIGKILL"

    # ------------------------------------------------------------------ exit, forget

    def test_a_live_instance_has_no_exit_reason(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        assert runtime.exit_reason(handle) == ""

    def test_exit_reason_tells_the_exit_code(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime_harness.end(handle, 3)
        assert wait_until(lambda: not runtime.alive(handle), WAIT)
        assert runtime.exit_reason(handle) == "exited with code 3"

    def test_exit_reason_tells_the_signal(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime_harness.crash(handle)
        assert wait_until(lambda: not runtime.alive(handle), WAIT)
        assert runtime.exit_reason(handle) == "killed by SIGKILL"

    def test_forget_drops_the_exit_reason(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime_harness.end(handle, 0)
        assert wait_until(lambda: not runtime.alive(handle), WAIT)
        assert runtime.exit_reason(handle) == "exited with code 0"
        runtime.forget(handle)
        assert runtime.exit_reason(handle) == ""
        runtime.forget(handle)  # twice is fine

    def test_forget_keeps_what_is_known_about_a_live_instance(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        runtime.forget(handle)
        assert runtime.alive(handle)
        runtime_harness.end(handle, 4)
        assert wait_until(lambda: not runtime.alive(handle), WAIT)
        assert runtime.exit_reason(handle) == "exited with code 4"

    # ------------------------------------------------------------------ orphans

    def test_orphans_are_the_running_instances_without_a_record(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        a = self.running(runtime, runtime_harness, "web-r1-0001")
        b = self.running(runtime, runtime_harness, "web-r1-0002")
        assert runtime.orphans({"web-r1-0001"}) == [("web-r1-0002", b)]
        assert sorted(runtime.orphans(set())) == sorted([("web-r1-0001", a), ("web-r1-0002", b)])
        assert runtime.orphans({"web-r1-0001", "web-r1-0002"}) == []

    def test_an_instance_that_is_gone_is_no_orphan(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        stopped = self.running(runtime, runtime_harness, "web-r1-0001")
        ended = self.running(runtime, runtime_harness, "web-r1-0002")
        runtime.stop(stopped, grace=GRACE)
        runtime_harness.end(ended, 1)
        assert wait_until(lambda: not runtime.alive(ended), WAIT)
        assert runtime.orphans(set()) == []

    # ------------------------------------------------------------------ logs

    def test_log_tail_shows_what_the_instance_wrote(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        self.running(runtime, runtime_harness, "web-r1-0001")
        assert wait_until(lambda: "web-r1-0001" in runtime.log_tail("web-r1-0001"), WAIT)
        assert len(runtime.log_tail("web-r1-0001", lines=1).splitlines()) <= 1

    def test_log_tail_of_an_unknown_instance_is_empty(self, runtime: Runtime) -> None:
        assert runtime.log_tail("web-r9-ffff") == ""

    # ------------------------------------------------------------------ adoption

    def test_a_new_adapter_on_the_same_state_adopts_running_instances(
        self, runtime: Runtime, runtime_harness: RuntimeHarness
    ) -> None:
        handle = self.running(runtime, runtime_harness, "web-r1-0001")
        after_restart = runtime_harness.restarted()
        assert after_restart.alive(handle)
        assert after_restart.orphans(set()) == [("web-r1-0001", handle)]
        assert after_restart.orphans({"web-r1-0001"}) == []
        after_restart.stop(handle, grace=GRACE)
        assert not after_restart.alive(handle)
        assert not runtime.alive(handle)
