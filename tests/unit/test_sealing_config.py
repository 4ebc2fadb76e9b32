"""What a service says about sealing its instances: resources, volumes, tmpfs and
isolation, from graven.yaml through the release record and the API to the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graven.controller.api import BadRequest, service_config
from graven.errors import SpecError, SpecProblem, UsageError
from graven.model import (
    DEFAULT_TMPFS_SIZE,
    MIB,
    ConfigRecord,
    Digest,
    HealthCheck,
    Release,
    Resources,
    ServiceConfig,
    Tmpfs,
    Volume,
)
from graven.spec import load_spec

HEAD = """\
images:
  web:
    steps:
      - copy: app
        to: /app
      - entrypoint: python3 app.py
services:
  web:
    image: web
    port: 8080
"""
DIGEST = Digest("sha256:" + "a" * 64)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.py").write_text("print('hi')\n")
    return tmp_path


def config_of(project: Path, service_lines: str) -> ServiceConfig:
    path = project / "graven.yaml"
    path.write_text(HEAD + service_lines)
    return load_spec(path).spec.services["web"].to_config()


def problem_of(project: Path, service_lines: str) -> SpecProblem:
    path = project / "graven.yaml"
    path.write_text(HEAD + service_lines)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    problems = info.value.problems
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_a_service_declares_its_limits_and_writable_paths(project: Path) -> None:
    config = config_of(
        project,
        "    resources: {memory: 256Mi, pids: 64, cpu: 0.5}\n"
        "    volumes:\n"
        "      - {name: guestbook, path: /data}\n"
        "      - {host: /srv/shared, path: /shared, read_only: true}\n"
        "    tmpfs:\n"
        "      - /var/cache\n"
        "      - {path: /scratch, size: 1Mi}\n"
        "    isolation: required\n",
    )
    assert config.resources == Resources(memory=256 * MIB, pids=64, cpu=0.5)
    assert config.volumes == (
        Volume(path="/data", name="guestbook"),
        Volume(path="/shared", host_path="/srv/shared", read_only=True),
    )
    assert config.tmpfs == (Tmpfs("/var/cache", DEFAULT_TMPFS_SIZE), Tmpfs("/scratch", MIB))
    assert config.isolation == "required"


def test_a_service_that_says_nothing_is_unlimited_and_isolated_where_it_can_be(
    project: Path,
) -> None:
    config = config_of(project, "")
    assert not config.resources.limited
    assert (config.volumes, config.tmpfs, config.isolation) == ((), (), "auto")


@pytest.mark.parametrize(
    ("lines", "line", "key", "words"),
    [
        ("    resources: {memory: lots}\n", 11, "services.web.resources.memory", "256Mi"),
        ("    resources: {memory: 1Ki}\n", 11, "services.web.resources", "4Mi or more"),
        ("    resources: {pids: 0}\n", 11, "services.web.resources.pids", "from 1"),
        ("    volumes: [{path: data, name: d}]\n", 11, "services.web.volumes[0]", "absolute"),
        ("    volumes: [{path: /a/../b, name: d}]\n", 11, "services.web.volumes[0]", "'..'"),
        ("    volumes: [{path: /proc/x, name: d}]\n", 11, "services.web.volumes[0]", "runtime"),
        ("    volumes: [{path: /d}]\n", 11, "services.web.volumes[0]", "exactly one"),
        (
            "    volumes: [{path: /d, name: d, host: /srv}]\n",
            11,
            "services.web.volumes[0]",
            "exactly one",
        ),
        (
            "    volumes: [{path: /d, name: Data}]\n",
            11,
            "services.web.volumes[0].name",
            "lowercase",
        ),
        ("    tmpfs: [/]\n", 11, "services.web.tmpfs[0]", "runtime"),
        ("    tmpfs: [{path: /t, size: 10}]\n", 11, "services.web.tmpfs[0]", "4Ki"),
        (
            "    tmpfs: [/data]\n    volumes: [{path: /data, name: d}]\n",
            None,
            "services.web",
            "mounted twice",
        ),
        ("    isolation: strict\n", 11, "services.web.isolation", "required"),
    ],
)
def test_bad_sealing_settings_name_their_key(
    project: Path, lines: str, line: int | None, key: str, words: str
) -> None:
    problem = problem_of(project, lines)
    assert problem.key_path == key, str(problem)
    if line is not None:
        assert problem.line == line, str(problem)
    assert words in problem.message, str(problem)


def _config(**changes: object) -> ServiceConfig:
    base = ServiceConfig(replicas=1, port=8080, health=HealthCheck())
    return ServiceConfig(**{**base.__dict__, **changes})


def test_a_release_recorded_before_sealing_settings_existed_hashes_as_it_did() -> None:
    plain = _config()
    # The JSON form of a config with no sealing settings has none of their keys...
    doc = plain.to_dict()
    assert not {"memory_limit", "pids_limit", "cpu_limit", "volumes", "tmpfs", "isolation"} & set(
        doc
    )
    # ...so a row stored by an earlier graven reads back equal, and hashes the same.
    assert ServiceConfig.from_dict(doc) == plain
    assert Release.hash_of("web", DIGEST, ServiceConfig.from_dict(doc)) == Release.hash_of(
        "web",
        DIGEST,
        plain,
    )


def test_sealing_settings_round_trip_and_change_the_release_hash() -> None:
    sealed = _config(
        resources=Resources(memory=64 * MIB, pids=32, cpu=1.5),
        volumes=(
            Volume("/data", name="db"),
            Volume("/etc/app", host_path="/srv/cfg", read_only=True),
        ),
        tmpfs=(Tmpfs("/cache", 8 * MIB),),
        isolation="required",
    )
    doc = sealed.to_dict()
    assert ServiceConfig.from_dict(doc) == sealed
    assert (
        service_config(json.loads(json.dumps(doc))) == sealed
    )  # what the API accepts from a deploy request
    assert Release.hash_of("web", DIGEST, sealed) != Release.hash_of("web", DIGEST, _config())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"volumes": [["/data", "", "", False]]}, "exactly one"),
        ({"volumes": [["/data", "db"]]}, "must have 4 items"),
        ({"tmpfs": [["relative", 4096]]}, "absolute"),
        ({"memory_limit": -1}, "integer from 0"),
        ({"memory_limit": 1}, "4Mi or more"),
        ({"isolation": "none"}, "isolation: expected one of auto, required"),
    ],
)
def test_the_api_refuses_bad_sealing_settings_naming_the_key(
    change: dict[str, object], words: str
) -> None:
    doc = {**json.loads(json.dumps(_config().to_dict())), **change}
    with pytest.raises(BadRequest) as info:
        service_config(doc)
    assert words in info.value.message
    assert "config" in info.value.message


def test_a_volume_needs_a_source_and_an_absolute_path() -> None:
    with pytest.raises(UsageError, match="exactly one"):
        Volume("/data")
    with pytest.raises(UsageError, match="absolute"):
        Volume("data", name="d")
    with pytest.raises(UsageError, match="mounted twice"):
        _config(volumes=(Volume("/d", name="a"),), tmpfs=(Tmpfs("/d"),))


def test_config_record_keeps_every_setting() -> None:
    # A new ServiceConfig field must reach the stored record (or be derived from it).
    sealed = _config(resources=Resources(pids=5), isolation="required")
    assert ConfigRecord.of(sealed).to_config() == sealed
