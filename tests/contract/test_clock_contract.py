"""The Clock port's contract against each adapter: FakeClock and RealClock."""

from __future__ import annotations

import pytest

from graven.clock import Clock, RealClock
from graven.testing.clock import FakeClock
from graven.testing.contracts.clock import ClockContract


class TestFakeClock(ClockContract):
    @pytest.fixture
    def clock(self) -> Clock:
        return FakeClock()


class TestRealClock(ClockContract):
    @pytest.fixture
    def clock(self) -> Clock:
        return RealClock()
