"""graven.yaml -> Spec, and every way a spec can be wrong, located to the line."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from graven.errors import SpecError, SpecProblem, UsageError
from graven.spec import LoadedSpec, Spec, find_spec, load_spec

GOOD = """\
version: 1
images:
  web:
    steps:
      - copy: app
        to: /app
      - run: echo built > /app/BUILT
      - env:
          MODE: production
      - workdir: /app
      - entrypoint: [python3, app.py]
services:
  web:
    image: web
    replicas: 3
    port: 8080
    health:
      path: /healthz
      interval: 500ms
      timeout: 2
      start_timeout: 1m
    strategy:
      max_surge: 2
      max_unavailable: 1
    env:
      VERSION: v1
    drain_timeout: 5s
    stop_grace: 1.5
"""

# Every malformed case below starts from this image, so service lines start at 7.
IMAGE = """\
images:
  web:
    steps:
      - copy: app
        to: /app
      - entrypoint: python3 app.py
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.py").write_text("print('hi')\n")
    return tmp_path


def write(project: Path, text: str | bytes) -> Path:
    path = project / "graven.yaml"
    if isinstance(text, str):
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def problems_of(project: Path, text: str | bytes) -> list[SpecProblem]:
    path = write(project, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    for problem in info.value.problems:
        assert problem.file == str(path)
    return info.value.problems


# --- the happy path -------------------------------------------------------------------


def test_good_spec_loads(project: Path) -> None:
    path = write(project, GOOD)
    loaded = load_spec(path)

    assert isinstance(loaded, LoadedSpec)
    assert loaded.path == path.absolute()
    assert loaded.root == project.absolute()
    spec = loaded.spec
    assert isinstance(spec, Spec)
    web = spec.services["web"]
    assert (web.image, web.replicas, web.port) == ("web", 3, 8080)
    assert web.health.interval == 0.5
    assert web.health.timeout == 2.0
    assert web.health.start_timeout == 60.0
    assert web.drain_timeout == 5.0
    assert web.stop_grace == 1.5
    assert (web.strategy.max_surge, web.strategy.max_unavailable) == (2, 1)
    assert web.target == "local"
    assert set(spec.targets) == {"local"}
    assert [type(s).__name__ for s in spec.images["web"].steps] == [
        "CopyStep",
        "RunStep",
        "EnvStep",
        "WorkdirStep",
        "EntrypointStep",
    ]
    config = web.to_config()
    assert config.env == (("VERSION", "v1"),)
    assert config.health.interval == 0.5


def test_lines_of_keys_are_kept_for_later_stages(project: Path) -> None:
    loaded = load_spec(write(project, GOOD))

    assert loaded.line_of("services.web.port") == 16
    assert loaded.line_of("images.web.steps[2]") == 8
    assert loaded.line_of("images.web.steps[4].entrypoint") == 11
    assert loaded.line_of("services.nope") is None


def test_text_values_keep_their_spelling(project: Path) -> None:
    # YAML 1.1 would read these as 1.1, false, 493 and 10.
    text = (
        IMAGE.replace("entrypoint: python3 app.py", "entrypoint: [sleep, 10]")
        + """\
services:
  web:
    image: web
    port: 8080
    env:
      VERSION: 1.10
      COUNTRY: NO
      UMASK: 0755
      ON: yes
"""
    )
    spec = load_spec(write(project, text)).spec

    assert spec.services["web"].env == {
        "VERSION": "1.10",
        "COUNTRY": "NO",
        "UMASK": "0755",
        "ON": "yes",
    }
    entry = spec.images["web"].steps[-1]
    assert entry.model_dump() == {"entrypoint": ["sleep", "10"]}


def test_entrypoint_string_splits_like_a_shell(project: Path) -> None:
    text = IMAGE.replace("entrypoint: python3 app.py", """entrypoint: python3 -c "print('a b')\"""")
    spec = load_spec(write(project, text)).spec

    assert spec.images["web"].steps[-1].model_dump() == {
        "entrypoint": ["python3", "-c", "print('a b')"]
    }


def test_anchors_merge_keys_and_extension_keys(project: Path) -> None:
    text = (
        IMAGE
        + """\
x-defaults: &defaults
  image: web
  replicas: 2
  health: &health
    path: /ready
services:
  web:
    <<: *defaults
    port: 8080
  api:
    <<: *defaults
    replicas: 4
    port: 8081
    health: *health
"""
    )
    loaded = load_spec(write(project, text))
    services = loaded.spec.services

    assert (services["web"].replicas, services["api"].replicas) == (2, 4)
    assert services["web"].image == services["api"].image == "web"
    assert services["api"].health.path == "/ready"
    # Merged keys point at the line where they are written.
    assert loaded.line_of("services.web.replicas") == 9


def test_byte_order_mark_is_accepted(project: Path) -> None:
    path = write(project, b"\xef\xbb\xbf" + GOOD.encode())
    assert load_spec(path).spec.services["web"].port == 8080


def test_empty_mapping_is_a_valid_spec(project: Path) -> None:
    spec = load_spec(write(project, "{}\n")).spec
    assert spec.services == {}


# --- malformed specs: one problem each, at the exact line -----------------------------

SERVICE = """\
services:
  web:
    image: web
    port: 8080
"""

CASES: list[tuple[str, str | bytes, int | None, str, str]] = [
    (
        "yaml-syntax",
        IMAGE + "services:\n  web:\n    image: web\n   port: 8080\n",
        10,
        "",
        "invalid YAML",
    ),
    (
        "yaml-unclosed-flow",
        IMAGE + "services:\n  web: {image: web, port: 8080\n",
        8,
        "",
        "invalid YAML",
    ),
    (
        "duplicate-key",
        IMAGE + SERVICE + "    replicas: 2\n    replicas: 3\n",
        12,
        "services.web.replicas",
        "duplicate key 'replicas' (first defined on line 11)",
    ),
    (
        "unknown-key-suggestion",
        IMAGE + SERVICE + "    replica: 2\n",
        11,
        "services.web.replica",
        "unknown key 'replica' (did you mean 'replicas'?)",
    ),
    (
        "unknown-top-level-key",
        IMAGE + SERVICE.replace("services:", "service:"),
        7,
        "service",
        "unknown key 'service' (did you mean 'services'?)",
    ),
    (
        "wrong-type-mapping",
        IMAGE + SERVICE + "    health: fast\n",
        11,
        "services.web.health",
        "expected a mapping, got 'fast'",
    ),
    (
        "wrong-type-text",
        IMAGE + SERVICE.replace("image: web", "image: [web]"),
        9,
        "services.web.image",
        "expected text, got a list",
    ),
    (
        "replicas-not-a-number",
        IMAGE + SERVICE + "    replicas: three\n",
        11,
        "services.web.replicas",
        "expected an integer from 1 to 100, got 'three'",
    ),
    (
        "replicas-out-of-range",
        IMAGE + SERVICE + "    replicas: 0\n",
        11,
        "services.web.replicas",
        "expected an integer from 1 to 100, got 0",
    ),
    (
        "port-out-of-range",
        IMAGE + SERVICE.replace("8080", "70000"),
        10,
        "services.web.port",
        "expected an integer from 1 to 65535, got 70000",
    ),
    (
        "bad-duration",
        IMAGE + SERVICE + "    health:\n      interval: 2 weeks\n",
        12,
        "services.web.health.interval",
        "expected a duration greater than 0s and at most 1h (such as 2s or 500ms), got '2 weeks'",
    ),
    (
        "negative-duration",
        IMAGE + SERVICE + "    drain_timeout: -1s\n",
        11,
        "services.web.drain_timeout",
        "got '-1s'",
    ),
    (
        "missing-port",
        IMAGE + "services:\n  web:\n    image: web\n    replicas: 2\n",
        8,
        "services.web.port",
        "missing required key 'port'",
    ),
    (
        "unknown-image",
        IMAGE + SERVICE.replace("image: web", "image: wbe"),
        9,
        "services.web.image",
        "unknown image 'wbe' (did you mean 'web'?)",
    ),
    (
        "unknown-target",
        IMAGE + SERVICE + "    target: prod\n",
        11,
        "services.web.target",
        "unknown target 'prod'; defined targets: local",
    ),
    (
        "same-port-twice",
        IMAGE + SERVICE + "  api:\n    image: web\n    port: 8080\n",
        13,
        "services.api.port",
        "port 8080 is already used by service 'web' (line 10)",
    ),
    (
        "strategy-cannot-move",
        IMAGE + SERVICE + "    strategy:\n      max_surge: 0\n      max_unavailable: 0\n",
        11,
        "services.web.strategy",
        "max_surge and max_unavailable cannot both be 0",
    ),
    (
        "unknown-step-kind",
        IMAGE.replace("- copy: app\n        to: /app", "- cpy: app"),
        4,
        "images.web.steps[0]",
        "got 'cpy' (did you mean 'copy'?)",
    ),
    (
        "step-with-two-kinds",
        IMAGE.replace("to: /app", "run: make"),
        4,
        "images.web.steps[0]",
        "a step has exactly one kind, got 'copy' and 'run'",
    ),
    (
        "step-unknown-field",
        IMAGE.replace("to: /app", "too: /app"),
        5,
        "images.web.steps[0].too",
        "unknown key 'too' (did you mean 'to'?)",
    ),
    (
        "copy-source-missing",
        IMAGE.replace("copy: app", "copy: nothing-here"),
        4,
        "images.web.steps[0].copy",
        "copy source 'nothing-here' does not exist",
    ),
    (
        "copy-escapes-with-dotdot",
        IMAGE.replace("copy: app", "copy: app/../../etc"),
        4,
        "images.web.steps[0].copy",
        "must not leave the project with '..'",
    ),
    (
        "relative-workdir",
        IMAGE + "      - workdir: app\n",
        7,
        "images.web.steps[2].workdir",
        "expected an absolute path inside the image, got 'app'",
    ),
    (
        "no-entrypoint",
        "images:\n  web:\n    steps:\n      - copy: app\n",
        2,
        "images.web",
        "a recipe needs an 'entrypoint' step",
    ),
    (
        "empty-steps",
        "images:\n  web:\n    steps: []\n",
        3,
        "images.web.steps",
        "expected at least 1 item, got none",
    ),
    (
        "bad-service-name",
        IMAGE + SERVICE.replace("  web:", "  Web:"),
        8,
        "services.Web",
        "expected a name of lowercase letters",
    ),
    (
        "bad-env-name",
        IMAGE + SERVICE + "    env:\n      BAD-NAME: 1\n",
        12,
        "services.web.env.BAD-NAME",
        "expected an environment variable name",
    ),
    (
        "env-value-null",
        IMAGE + SERVICE + "    env:\n      VERSION:\n",
        12,
        "services.web.env.VERSION",
        "expected text, got nothing (null)",
    ),
    (
        "version-unknown",
        "version: 2\n" + IMAGE,
        1,
        "version",
        "expected 1, got 2",
    ),
    (
        "top-level-list",
        "- images\n- services\n",
        1,
        "",
        "expected a mapping with 'images' and 'services' at the top level, got a list",
    ),
    (
        "top-level-scalar",
        "\n# a comment\nhello\n",
        3,
        "",
        "got a single value",
    ),
    ("empty-file", "", 1, "", "the file is empty"),
    ("only-comments", "# nothing yet\n", 1, "", "the file is empty"),
    (
        "not-utf8",
        IMAGE.encode() + b"services:\n  web:\n    image: caf\xe9\n",
        9,
        "",
        "file is not UTF-8 text: byte 0xe9",
    ),
    (
        "control-character",
        IMAGE + "services:\n  web:\n    image: w\x01b\n",
        9,
        "",
        "character U+0001 is not allowed",
    ),
    (
        "non-text-key",
        IMAGE + SERVICE + "    8080: 1\n",
        11,
        "services.web.8080",
        "keys must be text, got 8080",
    ),
    (
        "two-documents",
        IMAGE + "---\n" + SERVICE,
        7,
        "",
        "a spec is a single document",
    ),
    (
        "unsupported-tag",
        IMAGE + SERVICE + "    replicas: !!python/object:os.system 1\n",
        11,
        "services.web.replicas",
        "unsupported YAML tag !!python/object:os.system",
    ),
    (
        "explicit-tag-mismatch",
        IMAGE + SERVICE + "    replicas: !!int many\n",
        11,
        "services.web.replicas",
        "'many' is not a valid !!int",
    ),
    (
        "recursive-alias",
        "x-loop: &loop\n  - *loop\n",
        1,
        "x-loop[0]",
        "an alias refers to a collection containing itself",
    ),
    (
        "too-deep",
        "x-deep: " + "[" * 80 + "]" * 80 + "\n",
        1,
        "",
        "nested deeper than 64 levels",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "key_path", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_malformed_spec_is_located(
    project: Path, text: str | bytes, line: int | None, key_path: str, message: str
) -> None:
    problems = problems_of(project, text)

    assert len(problems) == 1, [str(p) for p in problems]
    (problem,) = problems
    assert (problem.line, problem.key_path) == (line, key_path), str(problem)
    assert message in problem.message


def test_copy_source_symlink_escaping_the_project(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (project / "sneaky").symlink_to(outside)

    (problem,) = problems_of(project, IMAGE.replace("copy: app", "copy: sneaky"))

    assert (problem.line, problem.key_path) == (4, "images.web.steps[0].copy")
    assert "outside the project directory" in problem.message


def test_copy_source_symlink_inside_the_project_is_fine(project: Path) -> None:
    (project / "current").symlink_to("app")
    load_spec(write(project, IMAGE.replace("copy: app", "copy: current")))


def test_every_problem_is_reported_at_once_in_line_order(project: Path) -> None:
    text = (
        IMAGE.replace("copy: app", "copy: gone")
        + SERVICE.replace("image: web", "image: api")
        + "    replica: 2\n"
        + "    health:\n      timeout: soon\n"
        + "    replica: 3\n"
        + "    true: 1\n"
        + "    1.5: 2\n"
    )
    problems = problems_of(project, text)

    assert [(p.line, p.key_path) for p in problems] == [
        (4, "images.web.steps[0].copy"),
        (9, "services.web.image"),
        (11, "services.web.replica"),
        (13, "services.web.health.timeout"),
        (14, "services.web.replica"),
        (15, "services.web.true"),
        (16, 'services.web["1.5"]'),
    ]
    assert "duplicate key 'replica' (first defined on line 11)" in problems[4].message


def test_alias_bomb_is_refused(project: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    text = "x-bomb:\n" + "".join(f"  {line}\n" for line in lines)

    (problem,) = problems_of(project, text)

    assert "more than 100000 values" in problem.message


def test_problems_render_as_file_line_key(project: Path) -> None:
    path = write(project, IMAGE + SERVICE + "    replicas: three\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)

    assert str(info.value) == (
        f"{path}:11: services.web.replicas: expected an integer from 1 to 100, got 'three'"
    )
    assert info.value.exit_code == 2
    assert info.value.to_dict()["problems"] == [
        {
            "file": str(path),
            "line": 11,
            "key_path": "services.web.replicas",
            "message": "expected an integer from 1 to 100, got 'three'",
        }
    ]


def test_missing_file_suggests_init(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "graven.yaml")

    (problem,) = info.value.problems
    assert problem.message == "file not found"
    assert info.value.hint is not None
    assert "graven init" in info.value.hint


def test_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


# --- find_spec ----------------------------------------------------------------------------


def test_find_spec_prefers_the_explicit_path(tmp_path: Path) -> None:
    explicit = tmp_path / "elsewhere.yaml"
    assert find_spec(tmp_path, explicit) == explicit


def test_find_spec_explicit_directory_means_its_graven_yaml(tmp_path: Path) -> None:
    assert find_spec(None, tmp_path) == tmp_path / "graven.yaml"


def test_find_spec_walks_up_to_the_nearest(tmp_path: Path) -> None:
    (tmp_path / "graven.yaml").write_text("{}\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)

    assert find_spec(deep, None) == tmp_path / "graven.yaml"

    (tmp_path / "a" / "graven.yaml").write_text("{}\n")
    assert find_spec(deep, None) == tmp_path / "a" / "graven.yaml"


def test_find_spec_defaults_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "graven.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)

    assert find_spec(None, None) == Path(os.getcwd()) / "graven.yaml"


def test_find_spec_without_a_spec_suggests_init(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        find_spec(tmp_path, None)

    assert info.value.hint == "Run 'graven init' to create one."


def test_merging_one_anchor_many_times_stays_linear(project: Path) -> None:
    keys = ", ".join(f"k{i}: {i}" for i in range(10))
    lines = [f"m0: &m0 {{{keys}}}"]
    lines += [f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 10) + "]}" for i in range(1, 9)]
    text = "x-merges:\n" + "".join(f"  {line}\n" for line in lines)

    assert load_spec(write(project, text)).spec.services == {}


# --- config steps: cmd, user, expose, label -----------------------------------------------


def test_config_steps_load(project: Path) -> None:
    text = IMAGE + (
        "      - cmd: --port 8080 --name 'my app'\n"
        "      - user: 1000\n"
        "      - expose: [8080, 9090]\n"
        "      - expose: 443\n"
        "      - label: {org.opencontainers.image.source: 'https://example.com/x', tier: 2}\n"
        "      - run: make\n"
        "        network: true\n"
        "      - cmd: [serve, --port, 8080]\n"
    )
    steps = load_spec(write(project, text)).spec.images["web"].steps
    dumped = [s.model_dump(by_alias=True) for s in steps[2:]]
    assert dumped == [
        {"cmd": ["--port", "8080", "--name", "my app"]},
        {"user": "1000"},
        {"expose": [8080, 9090]},
        {"expose": [443]},
        {"label": {"org.opencontainers.image.source": "https://example.com/x", "tier": "2"}},
        {"run": "make", "network": True},
        {"cmd": ["serve", "--port", "8080"]},
    ]


@pytest.mark.parametrize(
    ("step", "line", "key_path", "message"),
    [
        (
            "      - expose: [8080, 70000]\n",
            7,
            "images.web.steps[2].expose",
            "expected a port number from 1 to 65535, got 70000 (item 2)",
        ),
        (
            "      - expose:\n          - 0\n",
            7,
            "images.web.steps[2].expose",
            "expected a port number from 1 to 65535, got 0 (item 1)",
        ),
        (
            "      - expose: http\n",
            7,
            "images.web.steps[2].expose",
            "expected a port number from 1 to 65535, got 'http'",
        ),
        (
            "      - user: 'app user'\n",
            7,
            "images.web.steps[2].user",
            "expected a user name or uid",
        ),
        ("      - cmd: []\n", 7, "images.web.steps[2].cmd", "expected at least 1 item"),
        ("      - label: {}\n", 7, "images.web.steps[2].label", "expected at least 1 item"),
        (
            "      - run: make\n        network: maybe\n",
            8,
            "images.web.steps[2].network",
            "expected true or false",
        ),
    ],
)
def test_malformed_config_steps_are_located(
    project: Path, step: str, line: int, key_path: str, message: str
) -> None:
    (problem,) = problems_of(project, IMAGE + step)
    assert (problem.line, problem.key_path) == (line, key_path), str(problem)
    assert message in problem.message


def test_new_step_values_keep_their_text(project: Path) -> None:
    text = (
        "images:\n  web:\n    steps:\n"
        "      - label: {version: 1.10, ok: NO}\n"
        "      - user: 1000:10\n"
        "      - cmd: [--port, 08080]\n"
        "      - entrypoint: /bin/app\n"
    )
    spec = load_spec(write(project, text)).spec
    steps = spec.images["web"].steps
    assert steps[0].label == {"version": "1.10", "ok": "NO"}  # type: ignore[union-attr]
    assert steps[1].user == "1000:10"  # type: ignore[union-attr]
    assert steps[2].cmd == ["--port", "08080"]  # type: ignore[union-attr]
