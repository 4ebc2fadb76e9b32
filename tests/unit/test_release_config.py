"""A release's config: typed per strategy in memory, one flat JSON record on disk.

Release rows already in state databases hold the flat record, and content hashes were
computed over it: both must read (and hash) as before, or an unchanged spec would make
a new release after an upgrade."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from graven.errors import UsageError
from graven.ledger.sqlite import SqliteStateStore as StateStore
from graven.model import (
    AnalysisConfig,
    BlueGreenConfig,
    CanaryConfig,
    CanaryStep,
    ConfigRecord,
    Digest,
    HealthCheck,
    Release,
    ReleaseId,
    RollingConfig,
    ServiceConfig,
    release_id,
)

IMAGE = Digest("sha256:" + "ab" * 32)

# Rows as graven wrote them before strategies had types, with the content hash it
# computed for each (service 'web', image IMAGE).
OLD_ROWS: dict[str, tuple[str, str]] = {
    "rolling": (
        '{"analysis_window": 30.0, "auto_promote": true, "canary_steps": [], '
        '"drain_timeout": 10.0, "env": [], "health": {"command": [], "healthy_threshold": 1, '
        '"interval": 1.0, "kind": "http", "path": "/healthz", "start_timeout": 30.0, '
        '"timeout": 1.0, "unhealthy_threshold": 3}, "max_error_rate": 0.01, "max_p99": 1.0, '
        '"max_surge": 2, "max_unavailable": 1, "min_requests": 50, "port": 8080, '
        '"preview_port": 0, "progress_deadline": 600.0, "replicas": 2, '
        '"rollback_window": 300.0, "stop_grace": 10.0, "strategy": "rolling", '
        '"target": "local"}',
        "sha256:0b8bd8a4c61ba036acffdc681399d78a6741c28c6a0432934639fe06e7d13410",
    ),
    "blue-green": (
        '{"analysis_window": 20.0, "auto_promote": false, "canary_steps": [], '
        '"drain_timeout": 10.0, "env": [], "health": {"command": [], "healthy_threshold": 1, '
        '"interval": 1.0, "kind": "tcp", "path": "/healthz", "start_timeout": 30.0, '
        '"timeout": 1.0, "unhealthy_threshold": 3}, "max_error_rate": 0.05, "max_p99": null, '
        '"max_surge": 1, "max_unavailable": 0, "min_requests": 10, "port": 8081, '
        '"preview_port": 9081, "progress_deadline": 600.0, "replicas": 3, '
        '"rollback_window": 600.0, "stop_grace": 10.0, "strategy": "blue-green", '
        '"target": "local"}',
        "sha256:d6ed5ab680d4b6c3c34c7b4cc8881d4bd69da55d3f020aaa96cbe81f9dae4a54",
    ),
    "canary": (
        '{"analysis_window": 15.0, "auto_promote": true, '
        '"canary_steps": [[10, 30.0, true], [50, null, false]], "drain_timeout": 10.0, '
        '"env": [["A", "1"]], "health": {"command": ["true"], "healthy_threshold": 1, '
        '"interval": 1.0, "kind": "command", "path": "/healthz", "start_timeout": 30.0, '
        '"timeout": 1.0, "unhealthy_threshold": 3}, "max_error_rate": 0.01, "max_p99": 1.0, '
        '"max_surge": 1, "max_unavailable": 0, "min_requests": 50, "port": 8082, '
        '"preview_port": 0, "progress_deadline": 120.0, "replicas": 3, '
        '"rollback_window": 300.0, "stop_grace": 10.0, "strategy": "canary", '
        '"target": "local"}',
        "sha256:8f0e2bbaa0e831bc39d0366cfaef744ff7fe8fcf6b313a2342c02cb58c5ce86d",
    ),
}

EXPECTED = {
    "rolling": ServiceConfig(
        replicas=2, port=8080, health=HealthCheck(), strategy=RollingConfig(2, 1)
    ),
    "blue-green": ServiceConfig(
        replicas=3,
        port=8081,
        health=HealthCheck(kind="tcp"),
        strategy=BlueGreenConfig(
            preview_port=9081,
            auto_promote=False,
            rollback_window=600.0,
            analysis=AnalysisConfig(
                window=20.0, max_error_rate=0.05, max_p99=None, min_requests=10
            ),
        ),
    ),
    "canary": ServiceConfig(
        replicas=3,
        port=8082,
        health=HealthCheck(kind="command", command=("true",)),
        env=(("A", "1"),),
        strategy=CanaryConfig(
            steps=(CanaryStep(10, 30.0, True), CanaryStep(50, None, False)),
            analysis=AnalysisConfig(window=15.0),
        ),
        progress_deadline=120.0,
    ),
}


@pytest.mark.parametrize("strategy", sorted(OLD_ROWS))
def test_an_old_row_decodes_to_its_strategy_and_hashes_as_before(strategy: str) -> None:
    row, old_hash = OLD_ROWS[strategy]
    config = ServiceConfig.from_dict(json.loads(row))
    assert config == EXPECTED[strategy]
    assert config.strategy.name == strategy
    assert json.dumps(config.to_dict(), sort_keys=True) == row
    assert Release.hash_of("web", IMAGE, config) == old_hash


def test_a_row_from_the_first_schema_still_decodes() -> None:
    # Before health probe kinds and the blue-green and canary settings existed.
    row = {
        "replicas": 1,
        "port": 8080,
        "health": {
            "path": "/healthz",
            "interval": 1.0,
            "timeout": 1.0,
            "healthy_threshold": 1,
            "unhealthy_threshold": 3,
            "start_timeout": 30.0,
        },
        "env": [],
        "strategy": "rolling",
        "max_surge": 1,
        "max_unavailable": 0,
        "drain_timeout": 10.0,
        "stop_grace": 10.0,
        "target": "local",
    }
    config = ServiceConfig.from_dict(row)
    assert config == ServiceConfig(replicas=1, port=8080, health=HealthCheck())


def test_a_stored_setting_the_strategy_ignores_is_dropped_on_read_refused_on_request() -> None:
    data: dict[str, Any] = {**EXPECTED["rolling"].to_dict(), "rollback_window": 900.0}
    assert ServiceConfig.from_dict(data) == EXPECTED["rolling"]
    with pytest.raises(UsageError, match="rollback_window: strategy 'rolling' does not use it"):
        ConfigRecord.from_dict(data).to_config(strict=True)


def test_the_state_store_reads_a_release_row_written_in_the_old_shape(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateStore(path).close()  # creates the schema
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for number, strategy in enumerate(sorted(OLD_ROWS), start=1):
            row, old_hash = OLD_ROWS[strategy]
            db.execute(
                "INSERT INTO releases(service, number, image, image_name, config, "
                "content_hash, created_at) VALUES (?,?,?,?,?,?,?)",
                ("web", number, str(IMAGE), "web", row, old_hash, 1.0),
            )
    store = StateStore(path, read_only=True)
    try:
        for number, strategy in enumerate(sorted(OLD_ROWS), start=1):
            release = store.release("web", number)
            assert release.config == EXPECTED[strategy]
            assert release.content_hash == Release.hash_of("web", IMAGE, release.config)
    finally:
        store.close()


def test_release_ids_are_spelt_and_parsed_in_one_place() -> None:
    assert release_id("web", 7) == "web@r7" == str(ReleaseId("web", 7))
    for text in ("web@r7", "r7", "7"):
        assert ReleaseId.parse(text, service="web") == ReleaseId("web", 7)
    with pytest.raises(UsageError, match="web@r7 is a release of 'web', not of 'api'"):
        ReleaseId.parse("web@r7", service="api")
    for bad in ("", "r", "r0", "web@7x", "web@rr7", "Web@r7", "r-1", " 7"):
        with pytest.raises(UsageError, match="not a release"):
            ReleaseId.parse(bad, service="web")
