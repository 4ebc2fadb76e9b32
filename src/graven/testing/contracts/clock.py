"""The Clock port's contract (``graven.clock.Clock``).

Subclass ``ClockContract`` once per adapter and provide the ``clock`` fixture. The
tests run the clock's coroutines on a fresh event loop each (no plugin needed) and
wait at most a few milliseconds of the clock's own time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from graven.clock import Clock

T = TypeVar("T")

STEP = 0.005  # seconds: each sleep here; a real clock sleeps that long
SLACK = 1e-6  # a real event loop may wake up within its clock's resolution of a deadline


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class ClockContract:
    """The tests every Clock adapter passes. Subclasses provide ``clock``."""

    @pytest.fixture
    def clock(self) -> Clock:
        raise NotImplementedError(f"{type(self).__name__} must provide the 'clock' fixture")

    def test_monotonic_never_goes_back(self, clock: Clock) -> None:
        async def readings() -> list[float]:
            seen = [clock.monotonic()]
            for _ in range(5):
                await clock.sleep(STEP)
                seen.append(clock.monotonic())
                seen.append(clock.monotonic())
            return seen

        seen = run(readings())
        assert seen == sorted(seen)

    def test_sleep_advances_at_least_the_duration(self, clock: Clock) -> None:
        async def slept(seconds: float) -> tuple[float, float]:
            mono, wall = clock.monotonic(), clock.now()
            await clock.sleep(seconds)
            return clock.monotonic() - mono, clock.now() - wall

        for seconds in (0.0, STEP, 2 * STEP):
            mono, wall = run(slept(seconds))
            assert mono >= seconds - SLACK
            # The wall clock moves along, give or take its own resolution.
            assert wall >= seconds - 0.001

    def test_sleep_lets_other_tasks_run(self, clock: Clock) -> None:
        async def both() -> list[str]:
            order: list[str] = []

            async def other() -> None:
                order.append("other")

            task = asyncio.create_task(other())
            await clock.sleep(STEP)
            order.append("sleeper")
            await task
            return order

        assert run(both()) == ["other", "sleeper"]

    def test_wall_time_is_seconds_since_the_epoch(self, clock: Clock) -> None:
        now = clock.now()
        assert isinstance(now, float)
        assert math.isfinite(now)
        # After 1970 and before 2200: seconds, not milliseconds or ticks.
        assert 0 < now < 7.3e9

    def test_wait_returns_at_once_for_a_set_event(self, clock: Clock) -> None:
        async def waited() -> tuple[bool, float]:
            event = asyncio.Event()
            event.set()
            start = clock.monotonic()
            ok = await clock.wait(event, 30)
            return ok, clock.monotonic() - start

        ok, took = run(waited())
        assert ok
        assert took < 30

    def test_wait_times_out_after_the_timeout(self, clock: Clock) -> None:
        async def waited() -> tuple[bool, float]:
            event = asyncio.Event()
            start = clock.monotonic()
            ok = await clock.wait(event, STEP)
            return ok, clock.monotonic() - start

        ok, took = run(waited())
        assert not ok
        assert took >= STEP - SLACK

    def test_wait_sees_an_event_set_while_waiting(self, clock: Clock) -> None:
        async def waited() -> bool:
            event = asyncio.Event()
            asyncio.get_running_loop().call_soon(event.set)
            return await clock.wait(event, 30)

        assert run(waited())
