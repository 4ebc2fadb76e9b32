"""Secrets: env files, ${VAR} and secret_file resolution; the controller's secrets
store; the API sealing values into references; the state dir's modes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from graven.controller.api import Api, BadRequest
from graven.controller.paths import make_private
from graven.controller.secret_store import SecretMissing, SecretStore, is_secret_ref
from graven.errors import SpecError
from graven.spec.envfile import interpolate, parse_env_file, resolve_service_env
from graven.spec.loader import load_spec
from tests.unit.test_engine import World, config


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# --- env files ---------------------------------------------------------------------------


def test_env_file_lines() -> None:
    text = (
        "# database\n"
        "\n"
        "DB_PASSWORD=hunter2\n"
        "export API_TOKEN = 'a b #c'\n"
        'MULTI="line\\none \\"quoted\\""  # comment\n'
        "BARE=value # comment\n"
        "HASH=a#b\n"
        "EMPTY=\n"
        "EQ=a=b=c\n"
    )
    entries = parse_env_file(text, "s.env")
    assert [(e.key, e.value, e.line) for e in entries] == [
        ("DB_PASSWORD", "hunter2", 3),
        ("API_TOKEN", "a b #c", 4),
        ("MULTI", 'line\none "quoted"', 5),
        ("BARE", "value", 6),
        ("HASH", "a#b", 7),
        ("EMPTY", "", 8),
        ("EQ", "a=b=c", 9),
    ]


def test_env_file_errors_name_file_and_line_and_never_echo_a_value() -> None:
    text = (
        "OK=1\n"
        "no equals sign here but a long secret-looking text\n"
        "1BAD=x\n"
        "QUOTE='unterminated\n"
        'AFTER="x" y\n'
        "OK=2\n"
    )
    with pytest.raises(SpecError) as err:
        parse_env_file(text, "s.env")
    lines = str(err.value).splitlines()
    assert lines[0] == "s.env:2: expected KEY=VALUE, found no '='"
    assert "secret-looking" not in str(err.value)
    assert lines[1].startswith("s.env:3: '1BAD' is not an environment variable name")
    assert lines[2] == "s.env:4: QUOTE: the single-quoted value has no closing quote"
    assert lines[3] == "s.env:5: AFTER: unexpected text after the closing quote"
    assert lines[4] == "s.env:6: OK: set twice (first on line 1)"


def test_interpolate() -> None:
    env = {"A": "x", "EMPTY": ""}
    assert interpolate("${A}-${A}", env) == ("x-x", ["A", "A"], [])
    assert interpolate("$${A} $A ${EMPTY}", env) == ("${A} $A ", ["EMPTY"], [])
    _, _, problems = interpolate("${MISSING}", env)
    assert problems == [
        "${MISSING} is not set in the environment of this command; "
        "export MISSING before running graven"
    ]
    assert "no closing" in interpolate("${A", env)[2][0]
    assert "not a variable name" in interpolate("${1X}", env)[2][0]


SPEC = """\
images:
  app:
    steps:
      - entrypoint: app
services:
  web:
    image: app
    port: 8080
{env_file}    env:
      PLAIN: "1"
      ESCAPED: "$${{literal}}"
      FROM_VAR: "postgres://u:${{PW}}@db"
      FROM_FILE: {{secret_file: token.txt}}
"""


def _load(tmp_path: Path, env_file: str = "    env_file: s.env\n") -> Any:
    (tmp_path / "graven.yaml").write_text(SPEC.format(env_file=env_file))
    return load_spec(tmp_path / "graven.yaml")


def _resolve(loaded: Any, environ: dict[str, str]) -> Any:
    svc = loaded.spec.services["web"]
    return resolve_service_env(
        "web", svc.env, svc.env_file, loaded.root, str(loaded.path), loaded.lines, environ
    )


def test_service_env_splits_plain_and_secret(tmp_path: Path) -> None:
    (tmp_path / "s.env").write_text("DB_PASSWORD=hunter2\n")
    (tmp_path / "token.txt").write_text("tok\n")
    loaded = _load(tmp_path)
    env = _resolve(loaded, {"PW": "pa$$"})
    assert env.plain == {"PLAIN": "1", "ESCAPED": "${literal}"}
    assert env.secret == {
        "DB_PASSWORD": "hunter2",
        "FROM_VAR": "postgres://u:pa$$@db",
        "FROM_FILE": "tok",
    }
    # The release config carries the plain values only.
    assert dict(loaded.spec.services["web"].to_config().env) == {"PLAIN": "1"}


def test_service_env_problems_name_file_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "s.env").write_text("FROM_VAR=x\n")
    loaded = _load(tmp_path)
    with pytest.raises(SpecError) as err:
        _resolve(loaded, {})
    spec = str(tmp_path / "graven.yaml")
    problems = [str(p) for p in err.value.problems]
    assert problems == [
        f"{spec}:13: services.web.env.FROM_VAR: also set by env_file ({tmp_path / 's.env'}:1);"
        " set it in one place",
        f"{spec}:14: services.web.env.FROM_FILE.secret_file: {tmp_path / 'token.txt'}"
        " does not exist",
    ]
    (tmp_path / "s.env").write_text("# ok\nbroken\n")
    (tmp_path / "token.txt").write_text("tok")
    with pytest.raises(SpecError) as err:
        _resolve(loaded, {"PW": "x"})
    assert str(err.value) == f"{tmp_path / 's.env'}:2: expected KEY=VALUE, found no '='"


def test_unset_variable_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text("tok")
    loaded = _load(tmp_path, env_file="")
    with pytest.raises(SpecError) as err:
        _resolve(loaded, {})
    assert str(err.value) == (
        f"{tmp_path / 'graven.yaml'}:12: services.web.env.FROM_VAR: ${{PW}} is not set in the"
        " environment of this command; export PW before running graven"
    )


def test_env_file_must_be_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "s.env")  # would block a plain open() forever
    (tmp_path / "token.txt").write_text("tok")
    loaded = _load(tmp_path)
    with pytest.raises(SpecError) as err:
        _resolve(loaded, {"PW": "x"})
    assert str(err.value).endswith(
        f"services.web.env_file: {tmp_path / 's.env'} is a named pipe (FIFO), not a regular file"
    )


def test_a_bad_secret_file_value_is_a_spec_error(tmp_path: Path) -> None:
    (tmp_path / "graven.yaml").write_text(
        SPEC.format(env_file="").replace("{secret_file: token.txt}", "{secret_fil: token.txt}")
    )
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "graven.yaml")
    assert str(err.value) == (
        f"{tmp_path / 'graven.yaml'}:13: services.web.env.FROM_FILE: expected text or"
        " {secret_file: PATH}, got {'secret_fil': 'token.txt'}"
    )


# --- the secrets store ---------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_references_are_keyed_per_state_dir(tmp_path: Path) -> None:
    one, two = SecretStore(tmp_path / "a"), SecretStore(tmp_path / "b")
    ref = one.reference("hunter2")
    assert is_secret_ref(ref) and not is_secret_ref(ref + "\n")
    assert ref == one.reference("hunter2") == SecretStore(tmp_path / "a").reference("hunter2")
    assert ref != one.reference("hunter3")
    # Not a bare sha256: the same value elsewhere gives another reference.
    assert ref != two.reference("hunter2")
    assert "hunter2" not in ref


def test_put_keeps_private_files_and_reveal_returns_them(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    ref = store.put("hunter2")
    assert _mode(tmp_path / "secrets") == 0o700
    assert {_mode(p) for p in (tmp_path / "secrets").iterdir()} == {0o600}
    assert store.reveal_env((("A", "plain"), ("B", ref))) == (("A", "plain"), ("B", "hunter2"))
    (tmp_path / "secrets" / ref[15:-1]).unlink()
    with pytest.raises(SecretMissing, match="is missing from the secrets store") as err:
        store.reveal(ref)
    assert err.value.hint and "Deploy again" in err.value.hint


# --- the API seals, the engine reveals ------------------------------------------------------


def _body(world: World, secrets: dict[str, Any], env: list[list[str]] | None = None) -> Any:
    cfg = json.loads(json.dumps(config(replicas=1).to_dict()))  # as it travels
    cfg["env"] = env or [["PLAIN", "1"]]
    return {
        "service": "web",
        "image": str(world.v1),
        "image_name": "web",
        "config": cfg,
        "secrets": secrets,
        "actor": "ana@host",
        "message": "with a secret",
    }


def test_deploy_records_references_and_instances_get_values(world: World, tmp_path: Path) -> None:
    api = Api(world.engine, lambda: None)
    preview = asyncio.run(api.plan(_body(world, {"TOKEN": "hunter2"}), {}))
    assert preview.changed
    assert not (tmp_path / "secrets").exists() or [
        p.name for p in (tmp_path / "secrets").iterdir()
    ] == ["key"], "plan must store no value"

    asyncio.run(api.deploy(_body(world, {"TOKEN": "hunter2"}), {}))
    world.converge()
    assert world.serving() == [(1, "healthy")]
    assert dict(world.runtime.started[-1].env) == {"PLAIN": "1", "TOKEN": "hunter2"}
    recorded = dict(world.state.release("web", 1).config.env)
    assert is_secret_ref(recorded["TOKEN"])
    for path in tmp_path.glob("state.db*"):
        assert b"hunter2" not in path.read_bytes()

    # Same secret: same release. Another secret: a change plan shows by reference.
    same = asyncio.run(api.plan(_body(world, {"TOKEN": "hunter2"}), {}))
    assert not same.changed
    other = asyncio.run(api.plan(_body(world, {"TOKEN": "hunter3"}), {}))
    assert other.changed
    (change,) = other.changes
    new_ref = world.engine.secrets.reference("hunter3")
    assert change == f"env TOKEN: {recorded['TOKEN']!r} -> {new_ref!r}"


def test_a_restarted_controller_replaces_a_crashed_instance_with_its_secrets(
    world: World, tmp_path: Path
) -> None:
    asyncio.run(Api(world.engine, lambda: None).deploy(_body(world, {"TOKEN": "hunter2"}), {}))
    world.converge()
    (live,) = world.state.live_instances("web")
    world.runtime.kill(live.pid)
    world.engine = world.make_engine(tmp_path)  # no CLI around: only the state dir
    world.engine.adopt()
    world.converge()
    assert world.serving() == [(1, "healthy")]
    assert len(world.runtime.started) == 2
    assert dict(world.runtime.started[-1].env)["TOKEN"] == "hunter2"


def test_api_refuses_a_plain_value_shaped_like_a_reference(world: World) -> None:
    api = Api(world.engine, lambda: None)
    ref = world.engine.secrets.reference("x")
    with pytest.raises(BadRequest, match="reserved for secrets"):
        asyncio.run(api.plan(_body(world, {}, env=[["A", ref]]), {}))
    with pytest.raises(BadRequest, match="both plain and secret"):
        asyncio.run(api.plan(_body(world, {"PLAIN": "x"}), {}))
    for bad in ({"1X": "v"}, {"X": 1}, {"X": "a\0b"}):
        with pytest.raises(BadRequest, match="needs a variable name and a text value"):
            asyncio.run(api.plan(_body(world, bad), {}))


def test_a_missing_secret_fails_the_start_clearly(world: World, tmp_path: Path) -> None:
    api = Api(world.engine, lambda: None)
    asyncio.run(api.deploy(_body(world, {"TOKEN": "hunter2"}), {}))
    for path in (tmp_path / "secrets").iterdir():
        if path.name != "key":
            path.unlink()
    world.converge()
    rollout = world.state.last_rollout("web")
    assert rollout is not None and rollout.state == "failed"
    assert "is missing from the secrets store" in rollout.reason


# --- the state dir -------------------------------------------------------------------------


def test_make_private_creates_and_tightens(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert make_private(fresh) == []
    assert _mode(fresh) == 0o700

    old = tmp_path / "old"
    (old / "instances" / "web-r1-abcd").mkdir(parents=True)
    old.chmod(0o755)
    for name in ("state.db", "state.db-wal", "ledger.head", "controller.log", "controller.log.1"):
        (old / name).write_text("x")
        (old / name).chmod(0o644)
    (old / "instances" / "web-r1-abcd" / "log").write_text("x")
    (old / "instances" / "web-r1-abcd" / "log").chmod(0o644)
    changed = make_private(old)
    assert len(changed) == 7 and f"{old} 755 -> 700" in changed
    assert _mode(old) == 0o700
    assert _mode(old / "state.db") == 0o600
    assert _mode(old / "instances" / "web-r1-abcd" / "log") == 0o600
    assert make_private(old) == []
