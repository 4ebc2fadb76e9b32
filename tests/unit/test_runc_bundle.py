"""The runc bundle builder and image user resolution: pure, no runc needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from graven.errors import ControllerError, RuntimeFailure
from graven.model import Digest, Image, ImageConfig, Resources, Tmpfs, Volume
from graven.runtime.base import LaunchSpec
from graven.runtime.image_user import ImageUser, resolve_user
from graven.runtime.runc import container_id, describe_runc_exit
from graven.runtime.runc_bundle import (
    DENIED_SYSCALLS,
    INIT_PATH,
    Rlimit,
    VolumeMount,
    bundle_config,
)

IMAGE_DIGEST = Digest("sha256:" + "ab" * 32)
ROOTFS = Digest("sha256:" + "cd" * 32)
NOBODY = ImageUser(65534, 65534)


def make_spec(launch: dict[str, Any] | None = None, **config: Any) -> LaunchSpec:
    image_config = ImageConfig(
        entrypoint=config.pop("entrypoint", ("python3", "app.py")),
        **{"workdir": "/app", "env": (("PATH", "/usr/bin"), ("MODE", "image")), **config},
    )
    image = Image(IMAGE_DIGEST, ROOTFS, image_config)
    return LaunchSpec(
        "web-r3-00ab", "web", 3, image, (("MODE", "service"),), 41234, **(launch or {})
    )


def build(spec: LaunchSpec | None = None, **kw: Any) -> dict[str, Any]:
    return bundle_config(
        spec or make_spec(),
        kw.pop("user", NOBODY),
        root=Path("/state/checkouts/abab"),
        init=Path("/usr/bin/tini-static"),
        cgroups_path="/graven/0123-web-r3-00ab",
        rlimits=kw.pop("rlimits", (Rlimit("RLIMIT_NOFILE", 1024, 20000),)),
        **kw,
    )


def mount(config: dict[str, Any], destination: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in config["mounts"] if m["destination"] == destination]
    assert len(found) == 1, f"{destination}: {found}"
    return found[0]


# ---------------------------------------------------------------------- process


def test_the_process_is_the_init_then_entrypoint_and_cmd() -> None:
    config = build(make_spec(entrypoint=("python3", "app.py"), cmd=("--port", "1")))
    assert config["process"]["args"] == [INIT_PATH, "--", "python3", "app.py", "--port", "1"]
    assert config["process"]["cwd"] == "/app"
    assert config["process"]["terminal"] is False


def test_env_layers_image_then_service_then_graven() -> None:
    env = build()["process"]["env"]
    assert "PATH=/usr/bin" in env  # the image's PATH, not the controller's
    assert "MODE=service" in env and "MODE=image" not in env
    for entry in ("PORT=41234", "HOST=127.0.0.1", "GRAVEN_INSTANCE=web-r3-00ab"):
        assert entry in env
    assert "GRAVEN_RELEASE=web@r3" in env
    assert f"GRAVEN_IMAGE={IMAGE_DIGEST}" in env
    assert "HOME=/" in env


def test_the_image_has_a_default_path_when_it_names_none() -> None:
    env = build(make_spec(env=()))["process"]["env"]
    assert any(e.startswith("PATH=/usr/local/sbin:") for e in env)


def test_the_user_is_the_resolved_image_user() -> None:
    config = build(user=ImageUser(1000, 1001, (20, 30), "/home/app"))
    assert config["process"]["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [20, 30]}
    assert "HOME=/home/app" in config["process"]["env"]


def test_no_capability_in_any_set_and_no_new_privileges() -> None:
    process = build()["process"]
    assert process["noNewPrivileges"] is True
    assert set(process["capabilities"]) == {
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    }
    assert all(caps == [] for caps in process["capabilities"].values())


def test_rlimits_are_the_ones_given() -> None:
    config = build(rlimits=(Rlimit("RLIMIT_NOFILE", 512, 4096),))
    assert config["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 4096}]


# ---------------------------------------------------------------------- filesystem


def test_the_root_is_the_checkout_read_only() -> None:
    assert build()["root"] == {"path": "/state/checkouts/abab", "readonly": True}


def test_tmp_and_run_are_bounded_tmpfs_without_suid_or_devices() -> None:
    config = build(tmpfs_size=1 << 20)
    for place in ("/tmp", "/run", "/dev/shm"):
        tmp = mount(config, place)
        assert tmp["type"] == "tmpfs"
        assert {"nosuid", "nodev", f"size={1 << 20}"} <= set(tmp["options"])


def test_the_init_is_bound_read_only_inside_the_instance_dev() -> None:
    init = mount(build(), INIT_PATH)
    assert init["source"] == "/usr/bin/tini-static"
    assert {"bind", "ro", "nosuid", "nodev"} <= set(init["options"])
    assert mount(build(), "/dev")["type"] == "tmpfs"


def test_sys_is_read_only_and_proc_tunables_are_masked_or_read_only() -> None:
    config = build()
    assert "ro" in mount(config, "/sys")["options"]
    linux = config["linux"]
    assert {"/proc/kcore", "/proc/keys", "/sys/firmware"} <= set(linux["maskedPaths"])
    assert {"/proc/sys", "/proc/sysrq-trigger"} <= set(linux["readonlyPaths"])


# ---------------------------------------------------------------------- namespaces


def test_own_pid_mount_ipc_uts_namespaces_and_the_host_network() -> None:
    namespaces = build()["linux"]["namespaces"]
    assert sorted(n["type"] for n in namespaces) == ["ipc", "mount", "pid", "uts"]


def test_a_network_namespace_path_is_joined_when_given() -> None:
    namespaces = build(network_namespace=Path("/run/netns/blue"))["linux"]["namespaces"]
    assert {"type": "network", "path": "/run/netns/blue"} in namespaces


def test_seccomp_refuses_mounts_namespaces_and_new_user_namespaces() -> None:
    seccomp = build()["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {name for rule in seccomp["syscalls"] if "args" not in rule for name in rule["names"]}
    assert {"mount", "umount2", "unshare", "setns", "pivot_root", "bpf"} <= denied
    assert set(DENIED_SYSCALLS) <= denied
    clone = next(r for r in seccomp["syscalls"] if r["names"] == ["clone"])
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"


# ---------------------------------------------------------------------- cgroups


def test_without_limits_only_devices_are_restricted() -> None:
    resources = build()["linux"]["resources"]
    assert resources == {"devices": [{"allow": False, "access": "rwm"}]}
    assert build()["linux"]["cgroupsPath"] == "/graven/0123-web-r3-00ab"


def test_limits_become_cgroup_resources() -> None:
    limits = Resources(memory=64 << 20, pids=32, cpu=0.5)
    resources = build(make_spec({"resources": limits}))["linux"]["resources"]
    assert resources["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert resources["pids"] == {"limit": 32}
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}


def test_the_bundle_is_a_json_document() -> None:
    import json

    spec = make_spec({"resources": Resources(cpu=2.0)})
    assert json.loads(json.dumps(build(spec))) == build(spec)


# ---------------------------------------------------------------------- ids and exits


@pytest.mark.parametrize(
    ("instance_id", "expected"),
    [("web-r1-0001", "web-r1-0001"), ("a b/c", "a_b_c"), ("x.y_z+1", "x.y_z+1")],
)
def test_container_ids_keep_only_characters_runc_accepts(instance_id: str, expected: str) -> None:
    assert container_id(instance_id) == expected


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (0, "exited with code 0"),
        (3, "exited with code 3"),
        (137, "killed by SIGKILL"),
        (143, "killed by SIGTERM"),
        (128, "exited with code 128"),
        (255, "exited with code 255"),
    ],
)
def test_runc_exit_codes_tell_the_signal(code: int, reason: str) -> None:
    assert describe_runc_exit(code) == reason


# ---------------------------------------------------------------------- image users

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
app:x:1000:1001:App:/home/app:/bin/sh
# a comment
broken line
"""
GROUP = """\
root:x:0:
app:x:1001:
web:x:2000:app,other
audio:x:29:other
"""


def test_an_empty_user_is_the_default() -> None:
    assert resolve_user("", PASSWD, GROUP, default=NOBODY) == NOBODY


def test_a_name_resolves_against_the_image_files() -> None:
    assert resolve_user("app", PASSWD, GROUP, default=NOBODY) == ImageUser(
        1000, 1001, (2000,), "/home/app"
    )


def test_a_uid_with_a_passwd_entry_gets_its_group_and_home() -> None:
    assert resolve_user("1000", PASSWD, GROUP, default=NOBODY).gid == 1001


def test_a_uid_without_an_entry_gets_its_own_number_as_gid() -> None:
    assert resolve_user("4242", None, None, default=NOBODY) == ImageUser(4242, 4242)


@pytest.mark.parametrize(
    ("user", "ids"),
    [("app:web", (1000, 2000)), ("1000:29", (1000, 29)), ("5000:app", (5000, 1001))],
)
def test_a_group_resolves_by_name_or_number(user: str, ids: tuple[int, int]) -> None:
    found = resolve_user(user, PASSWD, GROUP, default=NOBODY)
    assert (found.uid, found.gid) == ids


@pytest.mark.parametrize(
    ("user", "missing"), [("ghost", "user 'ghost'"), ("app:ghosts", "group 'ghosts'")]
)
def test_a_name_the_image_lacks_is_a_clear_error(user: str, missing: str) -> None:
    with pytest.raises(RuntimeFailure, match=missing) as info:
        resolve_user(user, PASSWD, GROUP, default=NOBODY)
    assert "numeric" in (info.value.hint or "")


def test_a_name_in_an_image_without_passwd_is_a_clear_error() -> None:
    with pytest.raises(RuntimeFailure, match="not defined in the image's /etc/passwd"):
        resolve_user("app", None, None, default=NOBODY)


# ---------------------------------------------------------------------- the choice


def test_an_unknown_runtime_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graven.controller import daemon
    from graven.store.cas import ContentStore

    monkeypatch.setenv("GRAVEN_RUNTIME", "docker")
    with pytest.raises(ControllerError, match="'docker' is not a runtime") as info:
        daemon._runtime(tmp_path, ContentStore(tmp_path / "store"))
    assert "'process'" in (info.value.hint or "")
    assert not (tmp_path / "runtime").exists()


def test_the_default_runtime_is_process_and_the_choice_sticks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graven.controller import daemon
    from graven.runtime.process import ProcessRuntime
    from graven.store.cas import ContentStore

    monkeypatch.delenv("GRAVEN_RUNTIME", raising=False)
    store = ContentStore(tmp_path / "store")
    assert isinstance(daemon._runtime(tmp_path, store), ProcessRuntime)
    assert (tmp_path / "runtime").read_text() == "process"


def test_service_tmpfs_and_volumes_are_mounted_bounded_and_without_suid() -> None:
    spec = make_spec(
        {
            "tmpfs": (Tmpfs("/cache", size=1 << 20),),
            "volumes": (Volume("/data", name="db"), Volume("/seed", host_path="/srv/seed")),
        }
    )
    volumes = (
        VolumeMount(Path("/state/volumes/db"), "/data"),
        VolumeMount(Path("/srv/seed"), "/seed", read_only=True),
    )
    config = build(spec, volumes=volumes)
    cache = mount(config, "/cache")
    assert cache["type"] == "tmpfs" and f"size={1 << 20}" in cache["options"]
    data, seed = mount(config, "/data"), mount(config, "/seed")
    assert data["source"] == "/state/volumes/db" and seed["source"] == "/srv/seed"
    assert {"rw", "nosuid", "nodev"} <= set(data["options"])
    assert {"ro", "nosuid", "nodev"} <= set(seed["options"])
    (hook,) = config["hooks"]["createContainer"]
    assert "/state/checkouts/abab/cache" in hook["args"]


def test_a_hook_opens_tmp_and_run_to_the_instance_inside_its_namespace() -> None:
    # runc copies the covered directory's mode (0555 in a read-only checkout) onto a tmpfs.
    (hook,) = build()["hooks"]["createContainer"]
    assert hook["path"] == "/bin/chmod"
    assert hook["args"] == [
        "chmod",
        "1777",
        "/state/checkouts/abab/tmp",
        "/state/checkouts/abab/run",
    ]
