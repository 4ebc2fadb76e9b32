"""The builder: recipe -> image, cached per step, reproducible."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from graven.build.builder import BuildResult, StepOutcome, build_image
from graven.errors import BuildError
from graven.spec.recipe import Recipe
from graven.store.cas import ContentStore
from graven.testing.image_store import FakeImageStore

STEPS: list[dict[str, Any]] = [
    {"copy": "app", "to": "/app"},
    {"env": {"GREETING": "hello", "MODE": "prod"}},
    {"workdir": "/app"},
    {"run": "echo $GREETING > greeting.txt && mkdir -p out && cp main.py out/"},
    {"copy": "data.txt", "to": "/data/"},
    {"run": "wc -c < ../data/data.txt | tr -d ' ' > size.txt"},
    {"entrypoint": ["python", "main.py"]},
]


def recipe(steps: list[dict[str, Any]] | None = None) -> Recipe:
    return Recipe.model_validate({"steps": steps or STEPS})


def make_project(root: Path) -> Path:
    (root / "app" / "lib").mkdir(parents=True)
    (root / "app" / "main.py").write_text("print('hi')\n")
    (root / "app" / "lib" / "util.py").write_text("X = 1\n")
    (root / "app" / "run.sh").write_text("#!/bin/sh\n")
    (root / "app" / "run.sh").chmod(0o755)
    (root / "data.txt").write_text("twelve bytes")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def read(store: ContentStore, result: BuildResult, path: str) -> bytes:
    entry = store.lookup(result.image.rootfs, path)
    assert entry is not None and entry.digest is not None, path
    with store.open_blob(entry.digest) as f:
        return f.read()


def ran(result: BuildResult) -> list[int]:
    return [s.index for s in result.steps if not s.cached]


def test_build_bakes_and_tags_an_image(project: Path, store: ContentStore) -> None:
    seen: list[StepOutcome] = []
    result = build_image("web", recipe(), project, store, on_step=seen.append)
    assert seen == result.steps
    assert [s.kind for s in result.steps] == [
        "copy",
        "env",
        "workdir",
        "run",
        "copy",
        "run",
        "entrypoint",
    ]
    assert ran(result) == list(range(7))
    assert result.steps[3].summary.endswith("(isolated, host /usr read-only)")
    assert read(store, result, "/app/greeting.txt") == b"hello\n"
    assert read(store, result, "/app/out/main.py") == b"print('hi')\n"
    assert read(store, result, "/app/lib/util.py") == b"X = 1\n"
    assert read(store, result, "/data/data.txt") == b"twelve bytes"
    assert read(store, result, "/app/size.txt") == b"12\n"
    run_sh = store.lookup(result.image.rootfs, "/app/run.sh")
    assert run_sh is not None and run_sh.mode == 0o755
    config = result.image.config
    assert config.entrypoint == ("python", "main.py")
    assert config.env == (("GREETING", "hello"), ("MODE", "prod"))
    assert config.workdir == "/app"
    assert result.image.name == "web"
    assert store.resolve("web").digest == result.image.digest
    assert store.get_image(result.image.digest).rootfs == result.image.rootfs


def test_rebuild_runs_nothing(project: Path, store: ContentStore) -> None:
    first = build_image("web", recipe(), project, store)
    (project / "app" / "main.py").touch()  # a new mtime is not a change
    second = build_image("web", recipe(), project, store)
    assert ran(second) == []
    assert all(s.cached for s in second.steps)
    assert second.image.digest == first.image.digest
    assert [s.key for s in second.steps] == [s.key for s in first.steps]


def test_a_changed_file_reruns_its_copy_and_everything_after(
    project: Path, store: ContentStore
) -> None:
    first = build_image("web", recipe(), project, store)
    (project / "data.txt").write_text("now sixteen byte")
    second = build_image("web", recipe(), project, store)
    assert ran(second) == [4, 5, 6]
    assert read(store, second, "/app/size.txt") == b"16\n"
    assert second.image.digest != first.image.digest
    assert store.history("web") == [first.image.digest, second.image.digest]
    # and back: every step is cached again, and the old digest comes back
    (project / "data.txt").write_text("twelve bytes")
    third = build_image("web", recipe(), project, store)
    assert ran(third) == []
    assert third.image.digest == first.image.digest


def test_an_exec_bit_change_is_a_change(project: Path, store: ContentStore) -> None:
    build_image("web", recipe(), project, store)
    (project / "app" / "main.py").chmod(0o755)
    assert ran(build_image("web", recipe(), project, store)) == list(range(7))


def test_no_cache_runs_every_step(project: Path, store: ContentStore) -> None:
    first = build_image("web", recipe(), project, store)
    again = build_image("web", recipe(), project, store, no_cache=True)
    assert ran(again) == list(range(7))
    assert again.image.digest == first.image.digest


def test_failed_run_names_step_command_and_output(project: Path, store: ContentStore) -> None:
    command = "for i in $(seq 1 30); do echo line $i; done; echo oops >&2; exit 3"
    steps = [*STEPS[:3], {"run": command}, STEPS[-1]]
    with pytest.raises(BuildError) as e:
        build_image("web", recipe(steps), project, store)
    message = e.value.message
    assert message.startswith("images.web.steps[3]: command failed with exit code 3: ")
    assert command in message
    assert "| oops" in message
    assert "| line 30" in message
    assert "| line 12" in message
    assert "line 11" not in message  # only the last 20 lines
    assert e.value.hint is not None and "cached" in e.value.hint
    # the steps before the failure are cached; the failed one is not
    fixed = [*STEPS[:3], {"run": "true"}, STEPS[-1]]
    assert ran(build_image("web", recipe(fixed), project, store)) == [3, 4]
    assert not list(store.tmp_dir.iterdir())


def test_same_digest_from_another_directory_mtimes_and_umask(project: Path, tmp_path: Path) -> None:
    first = build_image("web", recipe(), project, ContentStore(tmp_path / "store-a"))
    old = os.umask(0o077)
    try:
        elsewhere = tmp_path / "some" / "other" / "place"
        shutil.copytree(project, elsewhere, copy_function=shutil.copy)
        for p in [elsewhere, *elsewhere.rglob("*")]:
            os.utime(p, (1_000_000, 1_000_000))
        second = build_image("web", recipe(), elsewhere, ContentStore(tmp_path / "store-b"))
    finally:
        os.umask(old)
    assert ran(second) == list(range(7))
    assert second.image.digest == first.image.digest
    assert [s.key for s in second.steps] == [s.key for s in first.steps]


def test_copy_semantics(project: Path, store: ContentStore) -> None:
    steps = [
        {"copy": "data.txt", "to": "/etc/data.conf"},  # file to an exact path
        {"copy": "data.txt", "to": "/etc"},  # existing directory: copied into it
        {"copy": "app/lib", "to": "/"},  # a directory's contents merge into to
        {"copy": "app", "to": "/srv/app/"},
        {"entrypoint": "x"},
    ]
    result = build_image("web", recipe(steps), project, store)
    assert read(store, result, "/etc/data.conf") == b"twelve bytes"
    assert read(store, result, "/etc/data.txt") == b"twelve bytes"
    assert read(store, result, "/util.py") == b"X = 1\n"
    assert read(store, result, "/srv/app/lib/util.py") == b"X = 1\n"


def test_copy_errors(project: Path, store: ContentStore, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"steps\[0\]: copy source 'nope' does not exist"):
        build_image("web", recipe([{"copy": "nope"}, {"entrypoint": "x"}]), project, store)
    steps = [{"copy": "data.txt", "to": "/x"}, {"copy": "app", "to": "/x"}, {"entrypoint": "x"}]
    with pytest.raises(BuildError, match=r"steps\[1\]: cannot copy directory 'app' onto /x"):
        build_image("web", recipe(steps), project, store)
    steps = [{"copy": "data.txt", "to": "/x"}, {"copy": "data.txt", "to": "/x/y"}, steps[-1]]
    with pytest.raises(BuildError, match=r"steps\[1\]: .*/x is a file"):
        build_image("web", recipe(steps), project, store)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("k")
    (project / "outside").symlink_to(tmp_path / "secret")
    steps = [{"copy": "outside/key"}, {"entrypoint": "x"}]
    with pytest.raises(BuildError, match="leaves the project through a symlink"):
        build_image("web", recipe(steps), project, store)


def test_copying_the_project_leaves_out_the_store_inside_it(project: Path) -> None:
    store = ContentStore(project / ".graven" / "store")
    result = build_image("web", recipe([{"copy": "."}, {"entrypoint": "x"}]), project, store)
    assert store.lookup(result.image.rootfs, "/.graven") is None  # always ignored
    assert read(store, result, "/data.txt") == b"twelve bytes"


def test_run_step_leaving_a_fifo_fails_clearly(project: Path, store: ContentStore) -> None:
    steps = [{"run": "mkfifo pipe"}, {"entrypoint": "x"}]
    with pytest.raises(BuildError, match=r"steps\[0\]: after 'mkfifo pipe': .*pipe is a fifo"):
        build_image("web", recipe(steps), project, store)


def test_env_order_is_part_of_the_image(project: Path, store: ContentStore) -> None:
    a = build_image(
        "web", recipe([{"env": {"A": "1", "B": "2"}}, {"entrypoint": "x"}]), project, store
    )
    b = build_image(
        "web", recipe([{"env": {"B": "2", "A": "1"}}, {"entrypoint": "x"}]), project, store
    )
    assert a.image.config.env == (("A", "1"), ("B", "2"))
    assert b.image.config.env == (("B", "2"), ("A", "1"))
    assert a.image.digest != b.image.digest


# --- config steps: cmd, user, expose, label --------------------------------------------------

CONFIG_STEPS: list[dict[str, Any]] = [
    {"copy": "app", "to": "/app"},
    {"entrypoint": ["python", "main.py"]},
    {"cmd": "--port 8080 --name 'my app'"},
    {"user": 1000},
    {"expose": [8080, 443]},
    {"expose": 8080},
    {"label": {"org.opencontainers.image.version": "1.0", "team": "web"}},
    {"label": {"team": "platform"}},
]


def test_config_steps_reach_the_image_config(project: Path, store: ContentStore) -> None:
    result = build_image("web", recipe(CONFIG_STEPS), project, store)

    config = store.get_image(result.image.digest).config
    assert config.entrypoint == ("python", "main.py")
    assert config.cmd == ("--port", "8080", "--name", "my app")
    assert config.user == "1000"
    assert config.ports == (443, 8080)  # a set: sorted, once each
    own = tuple(kv for kv in config.labels if not kv[0].startswith("dev.graven.interpreter."))
    assert own == (("org.opencontainers.image.version", "1.0"), ("team", "platform"))
    assert [s.kind for s in result.steps][2:] == [
        "cmd",
        "user",
        "expose",
        "expose",
        "label",
        "label",
    ]
    assert [s.summary for s in result.steps][2:6] == [
        "cmd --port 8080 --name 'my app'",
        "user 1000",
        "expose 443, 8080",
        "expose 8080",
    ]
    # metadata only: the files and their one layer are those of the copy
    assert result.image.layers == (result.image.rootfs,)


def test_config_steps_are_cached_and_a_change_reruns_from_there(
    project: Path, store: ContentStore
) -> None:
    first = build_image("web", recipe(CONFIG_STEPS), project, store)
    assert ran(build_image("web", recipe(CONFIG_STEPS), project, store)) == []

    changed = [*CONFIG_STEPS[:3], {"user": "app:app"}, *CONFIG_STEPS[4:]]
    second = build_image("web", recipe(changed), project, store)

    assert ran(second) == [3, 4, 5, 6, 7]
    assert second.image.config.user == "app:app"
    assert second.image.digest != first.image.digest
    assert second.image.rootfs == first.image.rootfs


def test_port_order_does_not_change_the_digest(project: Path, store: ContentStore) -> None:
    a = build_image("web", recipe([{"expose": [80, 443]}, {"entrypoint": "x"}]), project, store)
    b = build_image("web", recipe([{"expose": [443, 80]}, {"entrypoint": "x"}]), project, store)
    assert a.image.digest == b.image.digest


# --- isolated run steps -------------------------------------------------------------------------


def test_run_steps_are_isolated(project: Path, store: ContentStore) -> None:
    steps = [
        {"run": "touch /outside && test ! -e /root && test ! -e /proc/1/root/etc/hostname"},
        {"entrypoint": "x"},
    ]
    assert not os.path.lexists("/outside")

    result = build_image("web", recipe(steps), project, store)

    assert not os.path.lexists("/outside")
    assert store.lookup(result.image.rootfs, "/outside") is not None
    # nothing of the sandbox's own mounts reaches the image
    assert [e.name for e in store.read_tree(result.image.rootfs).entries] == ["outside"]
    assert result.steps[0].summary == (
        "run touch /outside && test ! -e /root && test ! -e /proc/1/root/etc/hostname "
        "(isolated, host /usr read-only)"
    )


def test_network_is_part_of_the_step(project: Path, store: ContentStore) -> None:
    offline = build_image("web", recipe([{"run": "true"}, {"entrypoint": "x"}]), project, store)
    online = build_image(
        "web", recipe([{"run": "true", "network": True}, {"entrypoint": "x"}]), project, store
    )
    assert offline.steps[0].key != online.steps[0].key
    assert online.steps[0].summary == "run true (isolated, host /usr read-only, network)"


def test_a_cached_run_step_keeps_its_note(project: Path, store: ContentStore) -> None:
    build_image("web", recipe([{"run": "true"}, {"entrypoint": "x"}]), project, store)
    again = build_image("web", recipe([{"run": "true"}, {"entrypoint": "x"}]), project, store)
    assert again.steps[0].cached
    assert again.steps[0].summary == "run true (isolated, host /usr read-only)"


def test_without_bubblewrap_run_fails_unless_the_host_is_allowed(
    project: Path, store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = [{"run": "touch made-here"}, {"entrypoint": "x"}]
    isolated = build_image("web", recipe(steps), project, store)
    monkeypatch.setenv("GRAVEN_BWRAP", str(tmp_path / "no" / "bwrap"))
    monkeypatch.delenv("GRAVEN_UNSAFE_HOST_RUN", raising=False)

    # cached: nothing needs to run, so nothing needs a sandbox
    assert ran(build_image("web", recipe(steps), project, store)) == []
    with pytest.raises(BuildError) as info:
        build_image("web", recipe(steps), project, store, no_cache=True)
    assert info.value.message.startswith("images.web.steps[0]: run steps are isolated with")
    assert info.value.hint is not None and "bubblewrap" in info.value.hint

    monkeypatch.setenv("GRAVEN_UNSAFE_HOST_RUN", "1")
    on_host = build_image("web", recipe(steps), project, store)
    assert ran(on_host) == [0, 1]  # a host result never answers for an isolated one
    assert on_host.steps[0].key != isolated.steps[0].key
    assert on_host.steps[0].summary == "run touch made-here (on the host, not isolated)"
    assert store.lookup(on_host.image.rootfs, "/made-here") is not None


def test_failed_run_reports_a_timeout(
    project: Path, store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graven.build.builder as builder

    monkeypatch.setattr(builder, "RUN_TIMEOUT", 0.3)
    with pytest.raises(BuildError, match=r"steps\[0\]: command timed out after 0.3s: sleep 5"):
        build_image("web", recipe([{"run": "sleep 5"}, {"entrypoint": "x"}]), project, store)


# --- .gravenignore ----------------------------------------------------------------------------


def test_gravenignore_filters_directory_copies(project: Path, store: ContentStore) -> None:
    (project / "app" / "__pycache__").mkdir()
    (project / "app" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0")
    (project / "app" / "debug.log").write_text("noise")
    (project / "app" / "keep.log").write_text("kept")
    (project / "build").mkdir()
    (project / "build" / "out.bin").write_bytes(b"\1")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / ".gravenignore").write_text("__pycache__/\n*.log\n!keep.log\n/build\n")
    steps = [{"copy": "."}, {"copy": "build/out.bin", "to": "/named/"}, {"entrypoint": "x"}]

    first = build_image("web", recipe(steps), project, store)

    def has(path: str) -> bool:
        return store.lookup(first.image.rootfs, path) is not None

    assert has("/app/main.py") and has("/app/keep.log") and has("/.gravenignore")
    assert not has("/app/__pycache__") and not has("/app/debug.log")
    assert not has("/build") and not has("/.git")
    assert has("/named/out.bin")  # named by the spec itself: copied

    # An ignored file changing is no change at all.
    (project / "app" / "debug.log").write_text("more noise")
    assert ran(build_image("web", recipe(steps), project, store)) == []

    # Rules that let more in change the tree, and so the key.
    (project / ".gravenignore").write_text("__pycache__/\n/build\n")
    again = build_image("web", recipe(steps), project, store)
    assert ran(again) == [0, 1, 2]
    assert store.lookup(again.image.rootfs, "/app/debug.log") is not None


def test_a_store_elsewhere_in_the_project_is_left_out_too(project: Path) -> None:
    store = ContentStore(project / "state" / "store")
    result = build_image("web", recipe([{"copy": "."}, {"entrypoint": "x"}]), project, store)
    assert store.lookup(result.image.rootfs, "/state") is not None
    assert store.lookup(result.image.rootfs, "/state/store") is None


def test_a_build_on_the_fake_store_gives_the_file_store_digest(
    project: Path, store: ContentStore, tmp_path: Path
) -> None:
    # The builder needs only the ImageStore port: the in-memory fake builds the same
    # image, step for step, and a second build finds every step cached there too.
    fake = FakeImageStore(tmp_path / "fake")
    on_files = build_image("web", recipe(), project, store)
    on_fake = build_image("web", recipe(), project, fake)
    assert on_fake.image.digest == on_files.image.digest
    assert fake.resolve("web").digest == on_files.image.digest
    assert ran(build_image("web", recipe(), project, fake)) == []
