"""The Debian base maker: a Debian root file system, made once, offline.

``make_debian_base`` runs ``debootstrap`` against a Debian mirror (by default the one
apt on this machine uses) into a directory in the store's ``tmp/``, normalizes the tree,
stores it and tags it (``debian-bookworm``). It needs root (debootstrap creates device
nodes and chroots) and runs debootstrap in a private mount namespace, so the ``/proc``
and ``/sys`` it mounts inside the target vanish with it even when it is killed. The
image is remembered by its parameters (suite, variant, packages, mirror, architecture):
asking again reuses it without touching the network, unless ``refresh``.

Normalization makes two runs against the same mirror state give the same tree:

- removed: the downloaded ``.deb`` files and package lists (``/var/cache/apt``,
  ``/var/lib/apt/lists``: run ``apt-get update`` in a build step), every log under
  ``/var/log``, ``/etc/machine-id``, ldconfig's ``aux-cache`` (it holds file
  times), and what debootstrap copies from the host (``/etc/hostname``,
  ``/etc/resolv.conf``: runtimes provide their own);
- emptied: ``/dev`` (device nodes are no image content; runtimes mount ``/dev``),
  ``/run``, ``/tmp``, ``/var/tmp`` (directories stay);
- ``/etc/shadow``: the date of the last password change (days since 1970, written at
  install time) is cleared, which means "no password aging" (every account is locked).

What stays nondeterministic, and why:

- The mirror is an input that moves. ``deb.debian.org`` publishes new package versions
  (point releases, security fixes); the same parameters a week later give another tree.
  Pin a ``snapshot.debian.org/archive/debian/<time>`` mirror to rebuild bit for bit;
  the parameter cache exists so a base is not rebuilt (and silently changed) by accident.
- The debootstrap version (recorded in a label) decides the package set and order.
- Maintainer scripts may write the current time into files; minbase's do not (checked
  by building twice), but packages added with ``include`` might (fontconfig and man-db
  caches, for example). Byte-compiled Python files keep the source mtimes the packages
  ship, which are fixed.
- Owners, setuid bits and the sticky bit are not kept at all: the content store records
  only normalized modes (0644/0755), so ``/etc/shadow`` is world-readable and ``su`` is
  not setuid in the image. Run instances as the image's root user, or not at all.

The image records its interpreter in its labels (``graven.build.interpreter``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from graven.build.bases.common import BASE_LABEL, ProgressFn, say, store_base
from graven.build.interpreter import (
    DEFAULT_IMAGE_PATH,
    with_interpreter_labels,
)
from graven.errors import BuildError, StoreError, UsageError
from graven.model import Digest, Image, ImageConfig, canonical_json, is_valid_name
from graven.store.base import ImageStore

DEBIAN_CACHE_SCHEMA = "graven.base.debian/v1"
VARIANTS = ("minbase", "buildd", "default")  # "default": debootstrap's own (no --variant)
DEFAULT_SUITE = "bookworm"
DEBOOTSTRAP_TIMEOUT = 1800.0
MIRROR_TIMEOUT = 20.0

_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+\Z")
_MIRROR_SCHEMES = ("http", "https", "file")
# debootstrap's per-package lines; the rest are stages worth showing.
_PACKAGE_LINE = re.compile(
    r"^I: (?:Retrieving|Validating) \S+ \S+$"
    r"|^I: (?:Extracting|Unpacking|Configuring) [a-z0-9][a-z0-9+.:-]*\.\.\.$"
)
_RETRIEVING = re.compile(r"^I: Retrieving \S+ \S+$")
_PACKAGES_EVERY = 25
_OUTPUT_TAIL = 30

# Normalization (paths relative to the new root).
_FILES_REMOVED_BELOW = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    "dev",
    "run",
    "tmp",
    "var/tmp",
)
_FILES_REMOVED = (
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "var/cache/ldconfig/aux-cache",
    "etc/hostname",
    "etc/resolv.conf",
)
_SHADOW_FILES = ("etc/shadow", "etc/shadow-")
_SHADOW_FIELDS = 9
_SHADOW_LASTCHG = 2


# --- where the mirror is ------------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` source apt uses: a mirror URI, its suites and components."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str  # the file it was read from


def apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """The ``deb`` sources apt reads: ``sources.list`` and ``sources.list.d/*.list``
    (one-line format) and ``sources.list.d/*.sources`` (deb822), in apt's order.
    Disabled entries, ``deb-src`` and files apt ignores are left out."""
    files = [etc_apt / "sources.list"]
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    found: list[AptSource] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parse = parse_deb822_sources if path.suffix == ".sources" else parse_one_line_sources
        found += parse(text, str(path))
    return found


def parse_one_line_sources(text: str, origin: str = "") -> list[AptSource]:
    """``deb [options] URI SUITE [COMPONENT...]`` lines."""
    found: list[AptSource] = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            # Options may hold spaces: "[arch=amd64 signed-by=/k.gpg]".
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            found.append(AptSource(words[0], (words[1],), tuple(words[2:]), origin))
    return found


def parse_deb822_sources(text: str, origin: str = "") -> list[AptSource]:
    """deb822 stanzas (``Types: deb``, ``URIs:``, ``Suites:``, ``Components:``)."""
    found: list[AptSource] = []
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        suites = tuple(stanza.get("suites", "").split())
        components = tuple(stanza.get("components", "").split())
        found += [
            AptSource(uri, suites, components, origin) for uri in stanza.get("uris", "").split()
        ]
    return found


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif raw[0] in " \t" and key:
            current[key] += " " + raw.strip()  # a continuation line
        elif ":" in raw:
            name, _, value = raw.partition(":")
            key = name.strip().lower()
            current[key] = value.strip()
    return stanzas


def default_mirror(suite: str, etc_apt: Path = Path("/etc/apt")) -> str:
    """The mirror apt on this machine uses for ``suite``, else for Debian itself.

    First a source listing ``suite`` exactly, then the first source of a plain suite
    (not ``-updates``, ``-security`` or ``-backports``, which are other archives).
    UsageError when apt has none."""
    sources = [
        s for s in apt_sources(etc_apt) if urllib.parse.urlsplit(s.uri).scheme in _MIRROR_SCHEMES
    ]
    for source in sources:
        if suite in source.suites:
            return normalize_mirror(source.uri)
    for source in sources:
        if any("-" not in s and "/" not in s for s in source.suites):
            return normalize_mirror(source.uri)
    raise UsageError(
        f"found no Debian mirror for {suite!r} in {etc_apt}/sources.list or "
        f"{etc_apt}/sources.list.d",
        hint="Pass one: --mirror http://deb.debian.org/debian (or a local mirror or proxy).",
    )


def normalize_mirror(mirror: str) -> str:
    """``mirror`` checked (http, https or file URL) and without a trailing slash."""
    parsed = urllib.parse.urlsplit(mirror.strip())
    if parsed.scheme not in _MIRROR_SCHEMES or not (parsed.netloc or parsed.path):
        raise UsageError(
            f"invalid mirror {mirror!r}: expected an http://, https:// or file:// URL",
            hint="For example --mirror http://deb.debian.org/debian",
        )
    return mirror.strip().rstrip("/")


def check_mirror(mirror: str, suite: str, *, timeout: float = MIRROR_TIMEOUT) -> None:
    """Fail early, with a clear message, when debootstrap could not use ``mirror``:
    BuildError when it cannot be reached, UsageError when it has no such suite."""
    parsed = urllib.parse.urlsplit(mirror)
    names = ("InRelease", "Release")
    if parsed.scheme == "file":
        dists = Path(urllib.parse.unquote(parsed.path)) / "dists"
        if not dists.is_dir():
            raise BuildError(
                f"cannot use the Debian mirror {mirror}: {dists} is not a directory",
                hint="Pass --mirror with the URL of a Debian archive.",
            )
        if not any((dists / suite / n).is_file() for n in names):
            raise UsageError(
                f"the mirror {mirror} has no suite {suite!r} (no {dists / suite}/Release)"
            )
        return
    answers: list[str] = []
    for name in names:
        url = f"{mirror}/dists/{suite}/{name}"
        request = urllib.request.Request(url, headers={"User-Agent": "graven"})  # noqa: S310
        try:
            # The scheme is http(s): normalize_mirror checked it.
            with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
                reply.read(1)
        except urllib.error.HTTPError as e:
            answers.append(f"{url}: HTTP {e.code} {e.reason}")
            if e.code == 404:
                continue
            break
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise BuildError(
                f"cannot reach the Debian mirror {mirror}: {reason} (asked for {url})",
                hint="Check the network or proxy (http_proxy), or pass --mirror with a "
                "reachable mirror: a local one, or an apt proxy.",
            ) from None
        else:
            return
    if all("HTTP 404" in a for a in answers):
        raise UsageError(
            f"the mirror {mirror} has no suite {suite!r} ({'; '.join(answers)})",
            hint="Check --suite (bookworm, trixie, ...) and --mirror.",
        )
    raise BuildError(f"the Debian mirror {mirror} refused: {'; '.join(answers)}")


# --- running debootstrap ------------------------------------------------------------------


def _debootstrap_path(explicit: str | None) -> str:
    if explicit:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise UsageError(f"debootstrap {explicit!r} is not an executable file")
    # /usr/sbin is not on every user's PATH.
    for candidate in (shutil.which("debootstrap"), "/usr/sbin/debootstrap"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise UsageError(
        "debootstrap is not installed: it makes the Debian root file system",
        hint="Install it: 'apt-get install debootstrap'.",
    )


def _debootstrap_version(tool: str) -> str:
    try:
        done = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = done.stdout.split()
    return words[-1] if done.returncode == 0 and words else "unknown"


def debian_arch() -> str:
    """This host's Debian architecture name (``amd64``, ``arm64``, ...)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(
            ["dpkg", "--print-architecture"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "ppc64le": "ppc64el"}.get(
        machine, machine
    )


def debootstrap_argv(
    tool: str,
    *,
    suite: str,
    variant: str,
    include: Sequence[str],
    arch: str,
    target: Path,
    mirror: str,
    private_mounts: bool,
) -> list[str]:
    """The command line that makes the tree (pure: tested by exact strings)."""
    argv = [tool]
    if variant != "default":
        argv.append(f"--variant={variant}")
    argv.append(f"--arch={arch}")
    if include:
        argv.append("--include=" + ",".join(include))
    argv += [suite, str(target), mirror]
    if private_mounts:
        # Mounts made inside the target (proc, sys, dev binds) die with the namespace.
        argv = ["unshare", "--mount", "--propagation", "private", "--", *argv]
    return argv


def _run_debootstrap(
    argv: list[str], target: Path, on_progress: ProgressFn | None, timeout: float
) -> None:
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    path = env.get("PATH", "/usr/bin:/bin").split(":")
    env["PATH"] = ":".join([*path, *(d for d in ("/usr/sbin", "/sbin") if d not in path)])
    tail: deque[str] = deque(maxlen=_OUTPUT_TAIL)
    timed_out = threading.Event()
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        raise BuildError(f"cannot run {argv[0]}: {e}") from e

    def expire() -> None:
        timed_out.set()
        _kill_group(proc.pid)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    retrieved = 0
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            if _RETRIEVING.match(line):
                retrieved += 1
                if retrieved % _PACKAGES_EVERY == 0:
                    say(on_progress, f"  retrieved {retrieved} packages")
            elif line and not _PACKAGE_LINE.match(line):
                say(on_progress, "  " + line.removeprefix("I: "))
        code = proc.wait()
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise BuildError(f"debootstrap did not finish within {timeout:.0f}s and was stopped")
    if code != 0:
        log = _tail_of(target / "debootstrap" / "debootstrap.log", 15)
        raise BuildError(
            f"debootstrap failed (exit {code}):\n"
            + "\n".join(tail)
            + (f"\n--- debootstrap.log (end) ---\n{log}" if log else ""),
            hint="Check the suite, the packages in --include and the mirror.",
        )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail_of(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _mounts_below(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, outermost first."""
    top = os.path.realpath(directory)
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    found = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == top or point.startswith(top + "/"):
            found.append(point)
    return sorted(found, key=len)


def _remove_target(target: Path) -> None:
    """Delete the debootstrap directory, never reaching through a mount into the host."""
    for point in reversed(_mounts_below(target)):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    if left := _mounts_below(target):
        raise StoreError(
            f"{target} still has file systems mounted below it ({', '.join(left)}); "
            "not deleting it",
            hint=f"Unmount them ('umount -R {target}'), then delete the directory.",
        )
    shutil.rmtree(target, ignore_errors=True)


# --- normalizing the tree -----------------------------------------------------------------


def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it exists and no directory on the way is a symlink (else
    None). The last component may be a symlink: callers unlink it, never follow it.
    The tree's absolute symlinks must never lead a deletion out of it, into the host."""
    path = root
    *parents, name = relative.split("/")
    for part in parents:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return None
    path = path / name
    return path if os.path.lexists(path) else None


def _remove_files_below(directory: Path) -> None:
    with os.scandir(directory) as listing:
        for entry in listing:
            if entry.is_dir(follow_symlinks=False):
                _remove_files_below(Path(entry.path))
            else:
                os.unlink(entry.path)  # noqa: PTH108  (a DirEntry path: no Path needed)


def normalize_debian_tree(root: Path) -> list[str]:
    """Make a fresh debootstrap tree reproducible (see the module docstring); return
    what was changed, relative to ``root``. Never follows a symlink out of the tree."""
    changed: list[str] = []
    for relative in _FILES_REMOVED_BELOW:
        directory = _inside(root, relative)
        if directory is None or directory.is_symlink() or not directory.is_dir():
            continue  # a symlink stays as it is: emptying it would empty its target
        if any(directory.iterdir()):
            _remove_files_below(directory)
            changed.append(relative + "/")
    for relative in _FILES_REMOVED:
        path = _inside(root, relative)
        if path is not None and (path.is_symlink() or not path.is_dir()):
            path.unlink()
            changed.append(relative)
    for relative in _SHADOW_FILES:
        path = _inside(root, relative)
        if path is None or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        cleared = clear_shadow_dates(text)
        if cleared != text:
            path.write_text(cleared, encoding="utf-8", errors="surrogateescape")
            changed.append(relative)
    return changed


def clear_shadow_dates(text: str) -> str:
    """``/etc/shadow`` without the last-change dates (field 3): empty means no aging."""
    lines = []
    for line in text.split("\n"):
        fields = line.split(":")
        if len(fields) == _SHADOW_FIELDS:
            fields[_SHADOW_LASTCHG] = ""
        lines.append(":".join(fields))
    return "\n".join(lines)


# --- the base -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DebianParams:
    """Everything a Debian base is made from; the cache remembers a base by these."""

    suite: str
    variant: str
    include: tuple[str, ...]  # sorted, unique
    mirror: str
    arch: str

    def cache_key(self) -> str:
        doc = {
            "suite": self.suite,
            "variant": self.variant,
            "include": list(self.include),
            "mirror": self.mirror,
            "arch": self.arch,
        }
        return f"{DEBIAN_CACHE_SCHEMA} {canonical_json(doc).decode()}"


def debian_params(
    *, suite: str, variant: str, include: Iterable[str], mirror: str | None
) -> DebianParams:
    """Validated parameters; the mirror defaults to apt's (``default_mirror``)."""
    if not _SUITE_RE.match(suite):
        raise UsageError(f"invalid suite {suite!r}: expected a Debian codename such as bookworm")
    if variant not in VARIANTS:
        raise UsageError(f"invalid variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    packages = sorted({p.strip() for p in include if p.strip()})
    for package in packages:
        if not _PACKAGE_RE.match(package):
            raise UsageError(f"invalid package name {package!r} in include")
    return DebianParams(
        suite=suite,
        variant=variant,
        include=tuple(packages),
        mirror=normalize_mirror(mirror) if mirror else default_mirror(suite),
        arch=debian_arch(),
    )


def _cached_image(store: ImageStore, key: str) -> Image | None:
    value = store.cache_get(key)
    if value is None:
        return None
    try:
        return store.get_image(Digest(json.loads(value)["image"]))
    except (ValueError, KeyError, TypeError, StoreError):
        return None  # an unreadable entry or an image gc took: build again


def find_debian_base(
    store: ImageStore,
    *,
    suite: str = DEFAULT_SUITE,
    variant: str = "minbase",
    include: Iterable[str] = (),
    mirror: str | None = None,
) -> Image | None:
    """The Debian base made earlier with these parameters, if the store still has it."""
    params = debian_params(suite=suite, variant=variant, include=include, mirror=mirror)
    return _cached_image(store, params.cache_key())


def make_debian_base(
    store: ImageStore,
    *,
    suite: str = DEFAULT_SUITE,
    variant: str = "minbase",
    include: Iterable[str] = (),
    mirror: str | None = None,
    name: str | None = None,
    refresh: bool = False,
    on_progress: ProgressFn | None = None,
    debootstrap: str | None = None,
    timeout: float = DEBOOTSTRAP_TIMEOUT,
) -> Image:
    """A Debian root file system made by debootstrap, stored and tagged ``name``
    (default ``debian-SUITE``); made once per parameters unless ``refresh``.

    ``mirror`` defaults to apt's (``default_mirror``). ``on_progress`` receives
    debootstrap's stage lines. UsageError for bad parameters, a missing debootstrap or
    a non-root caller; BuildError when the mirror cannot be reached or debootstrap fails.
    """
    params = debian_params(suite=suite, variant=variant, include=include, mirror=mirror)
    name = name or f"debian-{suite}"
    if not is_valid_name(name):
        raise UsageError(
            f"invalid image name {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter"
        )
    mirror_url = params.mirror
    key = params.cache_key()
    if not refresh and (cached := _cached_image(store, key)) is not None:
        say(on_progress, f"reusing {cached.digest.short}: made earlier from {mirror_url}")
        store.tag(name, cached.digest)
        return replace(cached, name=name)
    if os.geteuid() != 0:
        raise UsageError(
            "making a Debian base needs root: debootstrap creates device nodes and chroots",
            hint="Run it as root (sudo graven base debian ...).",
        )
    tool = _debootstrap_path(debootstrap)
    version = _debootstrap_version(tool)
    say(on_progress, f"checking the mirror {mirror_url}")
    check_mirror(mirror_url, suite)
    target = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=store.tmp_dir))
    try:
        argv = debootstrap_argv(
            tool,
            suite=suite,
            variant=variant,
            include=params.include,
            arch=params.arch,
            target=target,
            mirror=mirror_url,
            private_mounts=shutil.which("unshare") is not None,
        )
        say(on_progress, f"debootstrap {version}: {suite} ({variant}) from {mirror_url}")
        _run_debootstrap(argv, target, on_progress, timeout)
        say(on_progress, "normalizing the tree")
        normalize_debian_tree(target)
        say(on_progress, "storing the tree")
        rootfs = store.ingest_tree(target)
    finally:
        _remove_target(target)
    labels = {
        BASE_LABEL + "kind": "debian",
        BASE_LABEL + "debian.suite": suite,
        BASE_LABEL + "debian.variant": variant,
        BASE_LABEL + "debian.mirror": mirror_url,
        BASE_LABEL + "debian.arch": params.arch,
        BASE_LABEL + "debian.debootstrap": version,
    }
    if params.include:
        labels[BASE_LABEL + "debian.include"] = ",".join(params.include)
    config = ImageConfig(
        entrypoint=("/bin/sh",),
        env=(("PATH", DEFAULT_IMAGE_PATH),),
        labels=tuple(sorted(labels.items())),
    )
    image = store_base(store, rootfs, with_interpreter_labels(store, rootfs, config), name)
    store.cache_put(key, canonical_json({"image": str(image.digest)}).decode())
    return image
