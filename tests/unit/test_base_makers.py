"""Base makers and interpreter recording.

The host's Python becomes an image that runs under bubblewrap with the image as root;
interpreters are resolved the way instances start them (inside the image only);
a Debian base is made with a stand-in debootstrap (the real one runs in
tests/e2e/test_debian_base.py), so normalization, caching and failures are checked in
milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graven.build.bases import debian
from graven.build.bases.debian import (
    apt_sources,
    check_mirror,
    clear_shadow_dates,
    debootstrap_argv,
    default_mirror,
    find_debian_base,
    make_debian_base,
    parse_deb822_sources,
    parse_one_line_sources,
)
from graven.build.bases.host_python import ldd, make_host_python_base
from graven.build.interpreter import (
    LABEL_PATH,
    LABEL_SHA256,
    LABEL_SOURCE,
    LABEL_VERSION,
    Interpreter,
    interpreter_labels,
    interpreter_of,
    program_in_image,
    resolve_in_image,
    with_interpreter_labels,
)
from graven.errors import BuildError, NotFoundError, UsageError
from graven.model import Digest, Image, ImageConfig
from graven.store.cas import ContentStore
from graven.store.tree_model import EXEC_MODE, FILE_MODE, SYMLINK_MODE, Tree, TreeEntry

BWRAP = shutil.which("bwrap")
ROOT = os.geteuid() == 0


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def sha256_of(path: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest())


# --- synthetic images ------------------------------------------------------------------------


class Link(str):
    """A symlink target in a ``tree_of`` layout."""


def tree_of(store: ContentStore, layout: dict[str, bytes | Link]) -> Digest:
    """A root tree from ``{"/abs/path": content or Link(target)}``; files are executable."""
    root = store.put_tree(Tree())
    for path, value in sorted(layout.items()):
        name = Path(path).name
        if isinstance(value, Link):
            entry = TreeEntry(name, "symlink", SYMLINK_MODE, len(value.encode()), target=value)
        else:
            entry = TreeEntry(name, "file", EXEC_MODE, len(value), digest=store.put_bytes(value))
        root = store.place(root, path, entry)
    return root


def image_of(
    store: ContentStore,
    layout: dict[str, bytes | Link],
    entrypoint: tuple[str, ...],
    *,
    workdir: str = "/",
    env: tuple[tuple[str, str], ...] = (),
    labels: tuple[tuple[str, str], ...] = (),
) -> Image:
    config = ImageConfig(entrypoint=entrypoint, workdir=workdir, env=env, labels=labels)
    return store.put_image(tree_of(store, layout), config)


ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 64


# --- interpreter recording -------------------------------------------------------------------


def test_an_image_internal_binary_is_recorded_by_real_path_and_content(
    store: ContentStore,
) -> None:
    tool = ELF + b"tool"
    image = image_of(
        store,
        {"/usr/bin/tool": tool, "/bin": Link("usr/bin"), "/usr/local/bin/t": Link("/bin/tool")},
        ("/usr/local/bin/t", "--serve"),
    )

    found = interpreter_of(store, image)

    assert found == Interpreter("/usr/bin/tool", "image", Digest.of_bytes(tool))
    assert dict(interpreter_labels(store, image)) == {
        LABEL_PATH: "/usr/bin/tool",
        LABEL_SOURCE: "image",
        LABEL_SHA256: str(Digest.of_bytes(tool)),
    }


def test_a_bare_name_is_searched_on_the_image_path_first(store: ContentStore) -> None:
    own_sh = ELF + b"own sh"
    image = image_of(store, {"/opt/x/bin/sh": own_sh}, ("sh",), env=(("PATH", "/opt/x/bin"),))

    assert interpreter_of(store, image) == Interpreter(
        "/opt/x/bin/sh", "image", Digest.of_bytes(own_sh)
    )


def test_a_program_only_the_host_has_is_not_found(store: ContentStore) -> None:
    # Instances run with the image as their root: the host's sh or Python is not there.
    for entrypoint in (("sh", "-c", "true"), ("/bin/sh",), (sys.executable, "app.py")):
        image = image_of(store, {"/app/app.py": b"print('hi')\n"}, entrypoint)
        with pytest.raises(NotFoundError, match=f"{entrypoint[0]!r} is not in the image") as e:
            interpreter_of(store, image)
        assert "base: host-python" in (e.value.hint or "")
        assert interpreter_labels(store, image) == ()


def test_the_program_to_exec_keeps_the_name_it_was_found_by(store: ContentStore) -> None:
    busybox = ELF + b"busybox"
    layout: dict[str, bytes | Link] = {"/bin/busybox": busybox, "/bin/sh": Link("busybox")}
    image = image_of(store, layout, ("sh", "-c", "true"))

    assert program_in_image(store, image.rootfs, image.config) == ("/bin/sh", "/bin/busybox")


def test_a_shebang_script_in_the_image_is_followed_to_its_interpreter(
    store: ContentStore,
) -> None:
    python = ELF + b"python"
    layout: dict[str, bytes | Link] = {
        "/app/run": b"#!/usr/bin/python3 -u\nprint('hi')\n",
        "/usr/bin/python3": Link("python3.11"),
        "/usr/bin/python3.11": python,
    }

    found = interpreter_of(store, image_of(store, layout, ("/app/run",)))

    assert found == Interpreter("/usr/bin/python3.11", "image", Digest.of_bytes(python))


def test_env_shebangs_search_the_image_path_and_relative_entrypoints_the_workdir(
    store: ContentStore,
) -> None:
    node = ELF + b"node"
    layout: dict[str, bytes | Link] = {
        "/srv/app/start": b"#!/usr/bin/env -S NODE_ENV=production node --enable-x\n",
        "/usr/bin/env": ELF + b"env",
        "/usr/local/bin/node": node,
    }

    found = interpreter_of(store, image_of(store, layout, ("./start",), workdir="/srv/app"))

    assert found == Interpreter("/usr/local/bin/node", "image", Digest.of_bytes(node))


def test_a_script_whose_interpreter_the_image_lacks_is_not_found(
    store: ContentStore,
) -> None:
    image = image_of(store, {"/app/run.sh": b"#!/bin/sh\necho hi\n"}, ("/app/run.sh",))

    with pytest.raises(NotFoundError, match="'#!/bin/sh', which is not in the image"):
        interpreter_of(store, image)


def test_unresolvable_entrypoints_raise_but_labels_stay_empty(store: ContentStore) -> None:
    missing = image_of(store, {}, ("no-such-program-anywhere-graven",))
    relative = image_of(store, {}, ("./absent",))
    looping = image_of(store, {"/a": b"#!/b\n", "/b": b"#!/a\n"}, ("/a",))
    no_entrypoint = image_of(store, {}, ())

    for image in (missing, relative, looping):
        with pytest.raises(NotFoundError):
            interpreter_of(store, image)
        assert interpreter_labels(store, image) == ()
    with pytest.raises(UsageError, match="no entrypoint"):
        interpreter_of(store, no_entrypoint)
    assert interpreter_labels(store, no_entrypoint) == ()


def test_recording_replaces_labels_a_base_passed_down(store: ContentStore) -> None:
    app = ELF + b"app"
    rootfs = tree_of(store, {"/app/server": app})
    inherited = (
        ("a.team", "web"),
        (LABEL_PATH, "/usr/bin/dash"),
        (LABEL_SOURCE, "image"),
        (LABEL_VERSION, "old"),
    )
    config = ImageConfig(entrypoint=("/app/server",), labels=inherited)

    recorded = with_interpreter_labels(store, rootfs, config)

    assert recorded.labels == (
        ("a.team", "web"),
        (LABEL_PATH, "/app/server"),
        (LABEL_SHA256, str(Digest.of_bytes(app))),
        (LABEL_SOURCE, "image"),
    )
    cleared = with_interpreter_labels(store, rootfs, ImageConfig(entrypoint=(), labels=inherited))
    assert cleared.labels == (("a.team", "web"),)


def test_symlinks_resolve_inside_the_image_never_on_the_host(store: ContentStore) -> None:
    rootfs = tree_of(
        store,
        {
            "/usr/lib/x/libc.so.6": b"libc",
            "/lib": Link("usr/lib"),
            "/usr/lib64/ld.so": Link("/lib/x/libc.so.6"),
            "/up": Link("../../../usr/lib"),
            "/loop": Link("loop"),
        },
    )

    assert resolve_in_image(store, rootfs, "/usr/lib64/ld.so") is not None
    assert resolve_in_image(store, rootfs, "/usr/lib64/ld.so")[0] == "/usr/lib/x/libc.so.6"  # type: ignore[index]
    assert resolve_in_image(store, rootfs, "/up/x/libc.so.6")[0] == "/usr/lib/x/libc.so.6"  # type: ignore[index]
    assert resolve_in_image(store, rootfs, "/loop") is None
    assert resolve_in_image(store, rootfs, "/etc/passwd") is None  # the host has one


# --- the host's Python -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[ContentStore, Image, Path]:
    """The host-python base, built once for this module, and a read-only checkout."""
    top = tmp_path_factory.mktemp("host-python")
    store = ContentStore(top / "store")
    image = make_host_python_base(store)
    checkout = store.checkout(image.rootfs, top / "rootfs", read_only=True)
    return store, image, checkout


def bwrap(root: Path, *argv: str, tmpfs: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with ``root`` as '/', read-only; ``tmpfs``: an empty /tmp over it."""
    assert BWRAP is not None, "scripts/setup installs bubblewrap"
    return subprocess.run(
        [
            BWRAP,
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            str(root),
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            *(["--tmpfs", "/tmp"] if tmpfs else []),
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def host_closure_paths() -> tuple[str, list[str]]:
    """The base interpreter and every library ldd finds for it and its extension modules,
    computed here independently of the base maker."""
    probe = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            "import sys, sysconfig, json; print(json.dumps([sys._base_executable, "
            "sysconfig.get_path('stdlib'), sysconfig.get_path('platstdlib')]))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    executable, _stdlib, platstdlib = json.loads(probe.stdout)
    objects = [executable, *map(str, Path(platstdlib, "lib-dynload").glob("*.so"))]
    libraries: set[str] = set()
    for obj in objects:
        out = subprocess.run(["ldd", obj], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            words = line.split()
            if "=>" in words and len(words) > 2 and words[2].startswith("/"):
                libraries.add(words[2])
            elif words and words[0].startswith("/"):
                libraries.add(words[0])
    return executable, sorted(libraries)


def test_host_python_holds_the_interpreter_stdlib_and_every_ldd_dependency(
    host_python: tuple[ContentStore, Image, Path],
) -> None:
    store, image, checkout = host_python
    executable, libraries = host_closure_paths()
    stdlib = Path(os.__file__).parent

    assert image.config.entrypoint == (executable,)
    found = resolve_in_image(store, image.rootfs, executable)
    assert found is not None and found[1].digest == sha256_of(executable)
    for path in (stdlib / "os.py", stdlib / "json" / "__init__.py", stdlib / "lib-dynload"):
        assert resolve_in_image(store, image.rootfs, str(path)) is not None, path
    for left_out in ("test", "site-packages", "unittest/test", "__pycache__"):
        assert resolve_in_image(store, image.rootfs, str(stdlib / left_out)) is None, left_out
    # Each library resolves inside the image exactly as on the host (symlinks included),
    # checked by the kernel: stat from inside the sandbox.
    check = "import os, sys; print([p for p in sys.argv[1:] if not os.path.isfile(p)])"
    result = bwrap(checkout, executable, "-c", check, *libraries)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert len(libraries) > 3


def test_host_python_runs_under_bubblewrap_with_the_image_as_root(
    host_python: tuple[ContentStore, Image, Path], tmp_path: Path
) -> None:
    store, image, _ = host_python
    app = store.put_bytes(
        textwrap.dedent(
            """\
            import json, sqlite3, ssl, ctypes, threading, sys
            ssl.create_default_context()
            db = sqlite3.connect(":memory:")
            t = threading.Thread(target=lambda: None)
            t.start(); t.join()
            print(json.dumps({"sqlite": sqlite3.sqlite_version, "prefix": sys.prefix}))
            """
        ).encode()
    )
    size = len(store.read_blob(app))
    with_app = store.place(
        image.rootfs, "/app/app.py", TreeEntry("app.py", "file", FILE_MODE, size, app)
    )
    root = store.checkout(with_app, tmp_path / "app-rootfs")

    result = bwrap(root, *image.config.entrypoint, "/app/app.py")

    assert result.returncode == 0, result.stderr
    import sqlite3

    assert json.loads(result.stdout) == {
        "sqlite": sqlite3.sqlite_version,
        "prefix": sys.base_prefix,
    }
    # Nothing else of the host came along: no shell in the image.
    assert bwrap(root, "/bin/sh", "-c", "true").returncode != 0


def test_host_python_is_reproducible_and_records_its_interpreter(
    host_python: tuple[ContentStore, Image, Path], tmp_path: Path
) -> None:
    store, image, _ = host_python
    again = make_host_python_base(ContentStore(tmp_path / "other-store"))

    assert again.digest == image.digest
    labels = dict(image.config.labels)
    assert labels[LABEL_SOURCE] == "image"
    assert labels[LABEL_PATH] == os.path.realpath(image.config.entrypoint[0])
    assert labels[LABEL_SHA256] == sha256_of(image.config.entrypoint[0])
    assert labels[LABEL_VERSION] == f"Python {sys.version.split()[0]}"
    assert labels["dev.graven.base.kind"] == "host-python"
    assert interpreter_of(store, image).version == labels[LABEL_VERSION]
    assert store.resolve("host-python").digest == image.digest


def test_an_interpreter_named_through_a_symlink_keeps_the_symlink(
    host_python: tuple[ContentStore, Image, Path], tmp_path: Path
) -> None:
    _, base, _ = host_python
    real = os.path.realpath(base.config.entrypoint[0])
    link = tmp_path / "bin" / "python3"
    link.parent.mkdir()
    link.symlink_to(real)
    store = ContentStore(tmp_path / "store")

    image = make_host_python_base(store, python=str(link), name="linked")

    assert image.config.entrypoint == (str(link),)
    entry = store.lookup(image.rootfs, str(link))
    assert entry is not None and (entry.type, entry.target) == ("symlink", real)
    assert dict(image.config.labels)[LABEL_PATH] == real
    root = store.checkout(image.rootfs, tmp_path / "rootfs")
    # The link lives under pytest's /tmp: keep the image's /tmp visible.
    result = bwrap(root, str(link), "-c", "import sys; print(sys.executable)", tmpfs=False)
    assert (result.returncode, result.stdout.strip()) == (0, str(link)), result.stderr


def test_host_python_refuses_what_is_not_python(store: ContentStore) -> None:
    with pytest.raises(UsageError, match="not a usable Python"):
        make_host_python_base(store, python="/bin/true")
    with pytest.raises(UsageError, match="not an executable"):
        make_host_python_base(store, python="/nonexistent/python3")
    with pytest.raises(UsageError, match="invalid image name"):
        make_host_python_base(store, name="Not A Name")


def test_ldd_reports_the_loader_and_missing_libraries() -> None:
    found, missing = ldd(sys.executable)
    assert any("libc.so" in p for p in found)
    assert any("ld-linux" in p or "ld-" in Path(p).name for p in found)
    assert missing == []
    assert ldd("/nonexistent") == ([], [])


# --- Debian: mirrors -------------------------------------------------------------------------


DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: trixie
Components: main
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: trixie
"""


def test_deb822_and_one_line_sources_parse_as_apt_reads_them() -> None:
    parsed = parse_deb822_sources(DEB822, "debian.sources")
    assert [(s.uri, s.suites) for s in parsed] == [
        ("http://deb.debian.org/debian", ("bookworm", "bookworm-updates")),
        ("http://deb.debian.org/debian-security", ("bookworm-security",)),
    ]
    one_line = parse_one_line_sources(
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian trixie main contrib\n"
        "deb-src http://mirror.example/debian trixie main\n"
        "deb http://other.example/debian bookworm main # trailing\n"
    )
    assert [(s.uri, s.suites, s.components) for s in one_line] == [
        ("http://mirror.example/debian", ("trixie",), ("main", "contrib")),
        ("http://other.example/debian", ("bookworm",), ("main",)),
    ]


def test_the_default_mirror_is_apts(tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    (etc / "sources.list.d" / "old.list.disabled").write_text(
        "deb http://ignored.example/ x main\n"
    )
    (etc / "sources.list.d" / "extra.list").write_text(
        "deb http://trixie.example/debian/ trixie main\n"
    )

    assert default_mirror("bookworm", etc) == "http://deb.debian.org/debian"
    assert default_mirror("trixie", etc) == "http://trixie.example/debian"
    # A suite apt does not list: the plain archive, never -security or -updates.
    assert default_mirror("sid", etc) == "http://deb.debian.org/debian"
    assert [s.origin for s in apt_sources(etc)][-1].endswith("extra.list")
    with pytest.raises(UsageError, match="found no Debian mirror") as failure:
        default_mirror("bookworm", tmp_path / "empty")
    assert "--mirror" in (failure.value.hint or "")


def test_an_unreachable_mirror_fails_early_and_clearly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    with pytest.raises(BuildError, match=r"cannot reach the Debian mirror http://127\.0\.0\.1"):
        check_mirror(f"http://127.0.0.1:{port}/debian", "bookworm", timeout=5)
    mirror = tmp_path / "mirror"
    (mirror / "dists" / "bookworm").mkdir(parents=True)
    (mirror / "dists" / "bookworm" / "Release").write_text("Suite: bookworm\n")
    check_mirror(f"file://{mirror}", "bookworm")
    with pytest.raises(UsageError, match="no suite 'trixie'"):
        check_mirror(f"file://{mirror}", "trixie")
    with pytest.raises(BuildError, match="not a directory"):
        check_mirror(f"file://{tmp_path}/nothing", "bookworm")
    with pytest.raises(UsageError, match="invalid mirror"):
        make_debian_base(ContentStore(tmp_path / "s"), mirror="ftp://old.example/debian")


def test_debootstrap_command_lines() -> None:
    argv = debootstrap_argv(
        "/usr/sbin/debootstrap",
        suite="bookworm",
        variant="minbase",
        include=("ca-certificates", "curl"),
        arch="amd64",
        target=Path("/s/tmp/debootstrap-x"),
        mirror="http://deb.debian.org/debian",
        private_mounts=True,
    )
    assert argv == [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/usr/sbin/debootstrap",
        "--variant=minbase",
        "--arch=amd64",
        "--include=ca-certificates,curl",
        "bookworm",
        "/s/tmp/debootstrap-x",
        "http://deb.debian.org/debian",
    ]
    plain = debootstrap_argv(
        "debootstrap",
        suite="trixie",
        variant="default",
        include=(),
        arch="arm64",
        target=Path("/t"),
        mirror="file:///m",
        private_mounts=False,
    )
    assert plain == ["debootstrap", "--arch=arm64", "trixie", "/t", "file:///m"]


def test_shadow_dates_are_cleared() -> None:
    text = "root:*:20779:0:99999:7:::\nuser:$y$abc:19000:0:99999:7:::\nbroken line\n"
    assert clear_shadow_dates(text) == (
        "root:*::0:99999:7:::\nuser:$y$abc::0:99999:7:::\nbroken line\n"
    )


# --- Debian: a stand-in debootstrap ----------------------------------------------------------

FAKE_DEBOOTSTRAP = """\
#!/bin/sh
# Stand-in for debootstrap: prints its kind of progress and lays out a tiny Debian tree.
if [ "$1" = "--version" ]; then echo "debootstrap 9.9-fake"; exit 0; fi
echo run >> "$FAKE_COUNTER"
prev=""; for arg; do target=$prev; prev=$arg; done  # the target: the last but one
[ -n "$FAKE_FAIL" ] && { echo "E: Couldn't find these debs: nosuchpkg"; exit 1; }
echo "I: Retrieving InRelease"
i=0; while [ $i -lt 30 ]; do echo "I: Retrieving pkg$i 1.$i"; i=$((i+1)); done
echo "I: Unpacking libc6:amd64..."
echo "I: Configuring required packages..."
mkdir -p "$target/usr/bin" "$target/etc/apt" "$target/var/log/apt" "$target/var/lib/apt/lists/partial" \\
  "$target/var/cache/apt/archives/partial" "$target/var/cache/ldconfig" "$target/dev/pts" "$target/run/lock" \\
  "$target/proc" "$target/sys" "$target/tmp"
ln -s usr/bin "$target/bin"
printf '\\177ELF fake dash' > "$target/usr/bin/dash"; chmod 755 "$target/usr/bin/dash"
ln -s dash "$target/usr/bin/sh"
echo 12.99 > "$target/etc/debian_version"
echo "deb $prev bookworm main" > "$target/etc/apt/sources.list"
echo "root:*:20779:0:99999:7:::" > "$target/etc/shadow"
echo "host-name" > "$target/etc/hostname"
ln -s "$FAKE_OUTSIDE/resolv.conf" "$target/etc/resolv.conf"
ln -s "$FAKE_OUTSIDE" "$target/var/tmp"
date > "$target/var/log/dpkg.log"; date > "$target/var/log/apt/history.log"
date > "$target/var/lib/apt/lists/mirror_dists_bookworm_Release"
echo deb > "$target/var/cache/apt/archives/libc6.deb"
date > "$target/var/cache/ldconfig/aux-cache"
mkfifo "$target/dev/null"; mkfifo "$target/run/initctl"
echo "I: Base system installed successfully."
"""


@pytest.fixture
def fake_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    tool = tmp_path / "debootstrap"
    tool.write_text(FAKE_DEBOOTSTRAP)
    tool.chmod(0o755)
    mirror = tmp_path / "mirror"
    (mirror / "dists" / "bookworm").mkdir(parents=True)
    (mirror / "dists" / "bookworm" / "InRelease").write_text("Suite: bookworm\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (outside / "keep-me").write_text("host file\n")
    counter = tmp_path / "runs"
    monkeypatch.setenv("FAKE_COUNTER", str(counter))
    monkeypatch.setenv("FAKE_OUTSIDE", str(outside))
    return {"tool": tool, "mirror": mirror, "outside": outside, "counter": counter}


def runs(fake: dict[str, Path]) -> int:
    return len(fake["counter"].read_text().splitlines()) if fake["counter"].exists() else 0


needs_root = pytest.mark.needs_root("making a Debian base needs root")


@needs_root
def test_a_debian_base_is_normalized_labelled_and_made_once(
    store: ContentStore, fake_debian: dict[str, Path]
) -> None:
    progress: list[str] = []
    mirror = f"file://{fake_debian['mirror']}"

    image = make_debian_base(
        store, mirror=mirror, debootstrap=str(fake_debian["tool"]), on_progress=progress.append
    )

    assert image.name == "debian-bookworm"
    assert store.resolve("debian-bookworm").digest == image.digest
    root = image.rootfs
    for gone in (
        "/var/log/dpkg.log",
        "/var/log/apt/history.log",
        "/var/lib/apt/lists/mirror_dists_bookworm_Release",
        "/var/cache/apt/archives/libc6.deb",
        "/var/cache/ldconfig/aux-cache",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/dev/null",
        "/run/initctl",
    ):
        assert store.lookup(root, gone) is None, gone
    for kept in ("/var/log/apt", "/var/lib/apt/lists/partial", "/dev/pts", "/proc", "/tmp"):
        entry = store.lookup(root, kept)
        assert entry is not None and entry.type == "dir", kept
    shadow = store.lookup(root, "/etc/shadow")
    assert shadow is not None and shadow.digest is not None
    assert store.read_blob(shadow.digest) == b"root:*::0:99999:7:::\n"
    # The host's files behind the tree's symlinks were never touched.
    var_tmp = store.lookup(root, "/var/tmp")
    assert var_tmp is not None and var_tmp.type == "symlink"
    assert (fake_debian["outside"] / "resolv.conf").exists()
    assert (fake_debian["outside"] / "keep-me").exists()
    assert not list(store.tmp_dir.glob("debootstrap-*"))

    labels = dict(image.config.labels)
    assert labels["dev.graven.base.kind"] == "debian"
    assert labels["dev.graven.base.debian.suite"] == "bookworm"
    assert labels["dev.graven.base.debian.mirror"] == mirror
    assert labels["dev.graven.base.debian.debootstrap"] == "9.9-fake"
    assert labels[LABEL_PATH] == "/usr/bin/dash"
    assert labels[LABEL_SOURCE] == "image"
    assert image.config.entrypoint == ("/bin/sh",)
    assert dict(image.config.env)["PATH"].endswith("/usr/bin:/sbin:/bin")
    # Stages are shown; per-package lines are summed up.
    assert "  Retrieving InRelease" in progress
    assert "  retrieved 25 packages" in progress
    assert not any("pkg3 1.3" in p or "libc6:amd64" in p for p in progress)
    assert "  Base system installed successfully." in progress

    again = make_debian_base(store, mirror=mirror, debootstrap=str(fake_debian["tool"]), name="deb")
    assert (again.digest, again.name, runs(fake_debian)) == (image.digest, "deb", 1)
    assert store.resolve("deb").digest == image.digest
    found = find_debian_base(store, mirror=mirror + "/")
    assert found is not None and found.digest == image.digest

    fresh = make_debian_base(
        store, mirror=mirror, debootstrap=str(fake_debian["tool"]), refresh=True
    )
    assert (fresh.digest, runs(fake_debian)) == (image.digest, 2)  # reproducible
    other = make_debian_base(
        store,
        mirror=mirror,
        debootstrap=str(fake_debian["tool"]),
        include=["curl", "ca-certificates"],
    )
    assert runs(fake_debian) == 3
    assert dict(other.config.labels)["dev.graven.base.debian.include"] == "ca-certificates,curl"


@needs_root
def test_a_failing_debootstrap_says_why_and_leaves_nothing(
    store: ContentStore, fake_debian: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(BuildError, match="Couldn't find these debs: nosuchpkg") as failure:
        make_debian_base(
            store,
            mirror=f"file://{fake_debian['mirror']}",
            debootstrap=str(fake_debian["tool"]),
            include=["nosuchpkg"],
        )
    assert "exit 1" in failure.value.message
    assert not list(store.tmp_dir.glob("debootstrap-*"))
    assert store.list_images() == []


def test_debian_parameters_are_checked_before_anything_runs(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="invalid suite"):
        make_debian_base(store, suite="Bookworm; rm -rf /", mirror="http://m.example/debian")
    with pytest.raises(UsageError, match="invalid package name"):
        make_debian_base(store, include=["ok", "--root=/"], mirror="http://m.example/debian")
    with pytest.raises(UsageError, match="invalid variant"):
        make_debian_base(store, variant="huge", mirror="http://m.example/debian")
    with pytest.raises(UsageError, match="invalid image name"):
        make_debian_base(store, name="Debian", mirror="http://m.example/debian")
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        make_debian_base(store, mirror="http://m.example/debian")


def test_the_recipe_base_is_made_once_per_store_and_found_again(
    host_python: tuple[ContentStore, Image, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from graven.build.bases import host_python as maker

    store, made, _ = host_python
    first = maker.host_python_base(store)
    assert first.digest == made.digest  # the same host files, the same image
    assert first.config.entrypoint == made.config.entrypoint

    def must_not_run(*args: object, **kwargs: object) -> Image:
        raise AssertionError("the base was made again")

    monkeypatch.setattr(maker, "make_host_python_base", must_not_run)
    again = maker.host_python_base(store)
    assert again.digest == first.digest
    # The names people type find the interpreter inside the image.
    for name in ("python3", "python"):
        here = os.path.dirname(dict(made.config.labels)[LABEL_PATH])
        entry = store.lookup(made.rootfs, f"{here}/{name}")
        assert entry is not None and entry.type in ("symlink", "file"), name
