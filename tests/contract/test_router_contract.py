"""The Router port's contract (``graven.testing.contracts.router``), run against every
adapter: FakeRouter, EmbeddedRouter and HAProxyRouter (a real haproxy, which
scripts/setup installs). The class name shows the adapter in each test id."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from graven.router.embedded import EmbeddedRouter
from graven.router.haproxy.adapter import HAProxyRouter
from graven.testing.contracts.router import (
    SERVICE,
    FakeHarness,
    ProcessHarness,
    RouterContract,
    RouterHarness,
    RouterTrafficContract,
)


class TestFakeRouter(RouterContract):
    @pytest.fixture
    def harness(self) -> Iterator[RouterHarness]:
        h = FakeHarness()
        try:
            yield h
        finally:
            h.close()


class TestEmbeddedRouter(RouterTrafficContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> Iterator[RouterHarness]:
        router = EmbeddedRouter(tmp_path / "state")
        h = ProcessHarness(router, lambda service: [router.pid(service)])
        try:
            yield h
        finally:
            h.close()
            # Long state dirs put admin sockets under /tmp; leave nothing behind there.
            parent = router.admin_socket(SERVICE).parent
            if parent.name.startswith("graven-") and parent.name.endswith("-routers"):
                with contextlib.suppress(OSError):
                    parent.rmdir()


class TestHAProxyRouter(RouterTrafficContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> Iterator[RouterHarness]:
        router = HAProxyRouter(tmp_path / "state")
        h = ProcessHarness(
            router, lambda service: [router.pid(service), router.collector_pid(service)]
        )
        try:
            yield h
        finally:
            h.close()
