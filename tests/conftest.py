"""Test-wide rules.

``@pytest.mark.needs_root("why")``: a test that can only run as root. Off CI it is
skipped when not root; under CI it fails instead (see tests/requires.py).
"""

from __future__ import annotations

import pytest

from tests.requires import need_root


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_root(why): runs only as root; fails under CI")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("needs_root")
    if marker is not None:
        need_root(marker.args[0] if marker.args else "this test needs root")
