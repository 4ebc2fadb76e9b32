"""The host-Python base maker: an image of this host's Python runtime closure.

``make_host_python_base`` makes an image of the host's Python runtime closure: the
interpreter (a virtualenv's base interpreter), its standard library without test suites,
``site-packages`` and the static build kit, every shared library ``ldd`` finds for the
interpreter and each extension module (plus ``libgcc_s``, which glibc loads on demand to
unwind threads), and the dynamic loader, each at its own absolute path with the symlinks
on the way (``/lib -> usr/lib`` and so on). No ``/etc``: the libraries sit where the
loader looks without ``ld.so.cache``. The image's entrypoint is the interpreter, so
``python app.py`` runs with the image as root under bubblewrap or runc. Only file
content enters the store, so the same host files give the same digest.

The image records its interpreter in its labels (``graven.build.interpreter``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from graven.build.bases.common import BASE_LABEL, ProgressFn, say, store_base
from graven.build.interpreter import (
    DEFAULT_IMAGE_PATH,
    resolve_interpreter,
    with_interpreter_labels,
)
from graven.errors import BuildError, UsageError
from graven.model import Digest, Image, ImageConfig, is_valid_name
from graven.store.base import ImageStore
from graven.store.tree_model import DIR_MODE, SYMLINK_MODE, Tree, TreeEntry

# The closure.
_STDLIB_SKIP_ANYWHERE = frozenset({"test", "tests", "idle_test"})
_STDLIB_SKIP_TOP = frozenset({"site-packages", "dist-packages"})
_STDLIB_SKIP_TOP_PREFIX = "config-"  # libpythonX.Y.a and the Makefile: for building C code
_EMPTY_DIRS = ("dev", "proc", "sys", "tmp")  # mount points runtimes need in a read-only root
_LOADED_ON_DEMAND = ("libgcc_s.so.1",)  # dlopen()ed by glibc (pthread_exit, backtraces)
_ALIASES = ("python3", "python")  # names the interpreter answers to in the image
_LDD_TIMEOUT = 30.0
_PROBE_TIMEOUT = 30.0
_MAX_SYMLINK_HOPS = 40
_PROBE = (
    "import json, platform, sys, sysconfig\n"
    "print(json.dumps({"
    "'base_executable': getattr(sys, '_base_executable', '') or sys.executable,"
    "'version': platform.python_version(),"
    "'implementation': sys.implementation.name,"
    "'paths': [sysconfig.get_path('stdlib'), sysconfig.get_path('platstdlib'), *sys.path],"
    "}))"
)


@dataclass(frozen=True)
class PythonRuntime:
    """What a host interpreter says about itself (asked with ``-I -S``)."""

    executable: str  # the interpreter to copy (a virtualenv's base), as named
    version: str
    implementation: str
    library_dirs: tuple[str, ...]  # stdlib directories, none inside another


def probe_python(python: str) -> PythonRuntime:
    """Ask ``python`` where it and its standard library are. UsageError if it cannot say."""
    try:
        done = subprocess.run(
            [python, "-I", "-S", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        info = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        raise UsageError(f"{python} is not a usable Python interpreter: {e}") from None
    if not isinstance(info, dict):
        raise UsageError(
            f"{python} is not a usable Python interpreter: {done.stderr.strip()[-300:]}"
        )
    executable = str(info.get("base_executable") or python)
    if not (Path(executable).is_absolute() and Path(executable).is_file()):
        executable = python
    named = {posixpath.normpath(str(p)) for p in info.get("paths", []) if str(p).startswith("/")}
    dirs = sorted(d for d in named if Path(d).is_dir())
    outermost = [d for d in dirs if not any(d.startswith(o + "/") for o in dirs if o != d)]
    return PythonRuntime(
        executable=executable,
        version=str(info.get("version", "")),
        implementation=str(info.get("implementation", "")),
        library_dirs=tuple(outermost),
    )


class _HostClosure:
    """Host paths to copy into an image at the same absolute paths.

    Every symlink met on the way to a path is recorded as a symlink (``/lib ->
    usr/lib``) and followed, so each file or directory is placed at its real,
    symlink-free path and the image resolves the original path the way the host does.
    """

    def __init__(self) -> None:
        self.links: dict[str, str] = {}
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def add(self, path: str) -> str:
        """Plan ``path`` (with its symlinks); return its real path."""
        real = self._resolve(path)
        (self.dirs if Path(real).is_dir() else self.files).add(real)
        return real

    def _resolve(self, path: str) -> str:
        pending = deque(p for p in path.split("/") if p)
        real = "/"
        hops = 0
        while pending:
            part = pending.popleft()
            if part == ".":
                continue
            if part == "..":
                real = posixpath.dirname(real)
                continue
            candidate = posixpath.join(real, part)
            if Path(candidate).is_symlink():
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise BuildError(f"{path}: too many levels of symbolic links")
                target = os.readlink(candidate)  # noqa: PTH115  (the text, not normalized)
                self.links[candidate] = target
                if target.startswith("/"):
                    real = "/"
                pending.extendleft(reversed([p for p in target.split("/") if p]))
                continue
            if not os.path.lexists(candidate):
                raise BuildError(f"{path}: {candidate} does not exist on this host")
            real = candidate
        return real

    def tree(self, store: ImageStore, ignore: Callable[[Path, bool], bool]) -> Digest:
        """Store everything planned as one root tree; directories filtered by ``ignore``."""
        empty = store.put_tree(Tree())
        root = empty
        for name in _EMPTY_DIRS:
            root = store.place(root, "/" + name, TreeEntry(name, "dir", DIR_MODE, 0, empty))
        for directory in sorted(self.dirs):
            root = store.place(root, directory, store.ingest(Path(directory), ignore=ignore))
        for file in sorted(self.files):
            root = store.place(root, file, store.ingest(Path(file)))
        for link, target in sorted(self.links.items()):
            size = len(target.encode("utf-8"))
            entry = TreeEntry(Path(link).name, "symlink", SYMLINK_MODE, size, target=target)
            root = store.place(root, link, entry)
        return root


def _stdlib_filter(
    library_dirs: Sequence[str], include_bytecode: bool
) -> Callable[[Path, bool], bool]:
    tops = [Path(d) for d in library_dirs]

    def ignore(path: Path, is_dir: bool) -> bool:
        if not is_dir:
            return False
        name = path.name
        if name in _STDLIB_SKIP_ANYWHERE or (name == "__pycache__" and not include_bytecode):
            return True
        return path.parent in tops and (
            name in _STDLIB_SKIP_TOP or name.startswith(_STDLIB_SKIP_TOP_PREFIX)
        )

    return ignore


def _walk_kept(top: str, ignore: Callable[[Path, bool], bool]) -> Iterable[Path]:
    """Every file and symlink under ``top`` that the image keeps."""
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        kept = []
        for d in dirnames:
            sub = here / d
            if sub.is_symlink():
                yield sub
            elif not ignore(sub, True):
                kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            yield here / f


def ldd(path: str) -> tuple[list[str], list[str]]:
    """The shared libraries (and dynamic loader) ``path`` needs, as ldd resolves them on
    this host, and the names it cannot resolve. Empty for a static binary."""
    try:
        done = subprocess.run(
            ["ldd", path],
            capture_output=True,
            text=True,
            timeout=_LDD_TIMEOUT,
            env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            check=False,
        )
    except FileNotFoundError:
        raise UsageError("ldd is not installed", hint="Install libc-bin.") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"ldd {path} failed: {e}") from None
    found: list[str] = []
    missing: list[str] = []
    for raw in done.stdout.splitlines():
        line = raw.strip()
        if "=>" in line:
            soname, _, where = line.partition("=>")
            where = where.strip()
            if where.startswith("not found"):
                missing.append(soname.strip())
            elif where.startswith("/"):
                found.append(where.split(" (", 1)[0].strip())
        elif line.startswith("/"):
            found.append(line.split(" (", 1)[0].strip())  # the dynamic loader
    return found, missing


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _resolve_python(python: str | None) -> str:
    chosen = python or sys.executable
    if not chosen:
        raise UsageError("no Python interpreter given, and this one does not know its path")
    if "/" not in chosen:
        found = shutil.which(chosen)
        if found is None:
            raise UsageError(f"no {chosen!r} on PATH")
        chosen = found
    path = str(Path(chosen).absolute())
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise UsageError(f"{path} is not an executable file")
    return path


def make_host_python_base(
    store: ImageStore,
    *,
    python: str | None = None,
    name: str = "host-python",
    include_bytecode: bool = False,
    on_progress: ProgressFn | None = None,
) -> Image:
    """An image of this host's Python runtime closure, tagged ``name`` (see the module
    docstring); its entrypoint is the interpreter at its host path.

    ``python`` defaults to the running interpreter (a virtualenv's gives its base).
    ``include_bytecode`` keeps ``__pycache__``: off by default, because the store keeps
    no mtimes, so timestamp-checked ``.pyc`` files would be stale in every checkout."""
    if not is_valid_name(name):
        raise UsageError(
            f"invalid image name {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter"
        )
    runtime = probe_python(_resolve_python(python))
    say(on_progress, f"python {runtime.version} ({runtime.implementation}): {runtime.executable}")
    closure = _HostClosure()
    binary = closure.add(runtime.executable)
    library_dirs = [closure.add(d) for d in runtime.library_dirs]  # real paths
    ignore = _stdlib_filter(library_dirs, include_bytecode)

    # What the loader must find: the interpreter's libraries, and each extension module's.
    objects = [binary]
    for directory in library_dirs:
        for path in _walk_kept(directory, ignore):
            if path.is_symlink():
                target = os.path.realpath(path)
                if Path(target).exists() and not any(
                    target.startswith(d + "/") for d in library_dirs
                ):
                    closure.add(target)  # a link out of the stdlib (Debian's sitecustomize)
            elif ".so" in path.name and _is_elf(path):
                objects.append(str(path))
    found, missing = ldd(binary)
    if missing:
        raise BuildError(
            f"{binary} needs {', '.join(missing)}, which this host cannot find",
            hint="Repair the interpreter's installation (ldd shows what is missing).",
        )
    libraries = set(found)
    for module in objects[1:]:
        found, missing = ldd(module)
        libraries.update(found)
        if missing:
            say(
                on_progress,
                f"  warning: {Path(module).name} needs {', '.join(missing)}, missing on this "
                "host: that module will not import in the image either",
            )
    for library in sorted(libraries):
        real = closure.add(library)
        if Path(real).name.startswith("libc.so"):
            for extra in _LOADED_ON_DEMAND:
                candidate = Path(library).parent / extra
                if candidate.exists():
                    closure.add(str(candidate))
    say(
        on_progress,
        f"  {len(libraries)} shared libraries for {len(objects)} binaries; "
        f"{len(library_dirs)} library directories",
    )
    # 'python3 app.py' must find it by the names people use, whatever the host calls it.
    here, called = posixpath.split(binary)
    for alias in _ALIASES:
        link = posixpath.join(here, alias)
        if alias != called and link not in closure.files and link not in closure.links:
            closure.links[link] = called
    rootfs = closure.tree(store, ignore)
    labels = {
        BASE_LABEL + "kind": "host-python",
        BASE_LABEL + "python.version": runtime.version,
        BASE_LABEL + "python.implementation": runtime.implementation,
    }
    path_dirs = [posixpath.dirname(runtime.executable), here, *DEFAULT_IMAGE_PATH.split(":")]
    config = ImageConfig(
        entrypoint=(runtime.executable,),
        env=(("PATH", ":".join(dict.fromkeys(path_dirs))),),
        labels=tuple(sorted(labels.items())),
    )
    interpreter = resolve_interpreter(store, rootfs, config)
    if interpreter.source != "image":
        raise BuildError(f"{runtime.executable} did not end up in the image (an internal error?)")
    interpreter = replace(interpreter, version=f"Python {runtime.version}")
    config = with_interpreter_labels(store, rootfs, config, interpreter)
    return store_base(store, rootfs, config, name)


# --- the recipe base 'host-python': made once per store ----------------------------------------

HOST_BASE_SCHEMA = "graven.host-python-base/v1"
_DPKG_STATUS = "/var/lib/dpkg/status"  # changes whenever a package is installed or upgraded


def _stat_line(path: str) -> str:
    try:
        st = Path(path).stat()
    except OSError:
        return f"{path} missing"
    return f"{path} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def host_python_inputs() -> list[str]:
    """Host files whose change means the host-python base may be stale: what the no-op
    build check watches (two stat calls), besides the spec and the copy sources."""
    chosen = getattr(sys, "_base_executable", "") or sys.executable
    return [os.path.realpath(chosen), _DPKG_STATUS]


def host_python_key(python: str | None = None) -> str:
    """What the host-python base of ``python`` (default: the running interpreter's
    base) depends on, as cheaply as it can be known: the interpreter's and its
    standard library's identity (inode, size, times), and the package database's.
    An upgrade of Python or of any package changes it, and the base is made again."""
    import sysconfig

    chosen = python or getattr(sys, "_base_executable", "") or sys.executable
    paths = [os.path.realpath(chosen)]
    if python is None:
        paths += [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    paths.append(_DPKG_STATUS)
    lines = [HOST_BASE_SCHEMA, sys.version if python is None else "", *map(_stat_line, paths)]
    return f"{HOST_BASE_SCHEMA} " + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def host_python_base(store: ImageStore, *, on_progress: ProgressFn | None = None) -> Image:
    """The image the recipe base ``host-python`` names: this host's Python closure
    (``make_host_python_base`` of the interpreter graven runs on), made once and found
    again in ``store`` while the host's Python is unchanged (``host_python_key``)."""
    from graven.errors import GravenError

    key = host_python_key()
    text = store.cache_get(key)
    if text is not None:
        try:
            doc = json.loads(text)
            image = store.get_image(Digest(doc["image"]))
            if doc.get("schema") == HOST_BASE_SCHEMA and all(
                store.has(d) for d in {image.rootfs, *image.layers}
            ):
                return replace(image, name="host-python")
        except (ValueError, KeyError, TypeError, GravenError):
            pass  # a damaged or collected entry only costs making it again
    say(on_progress, "making the host-python base (once per state dir)")
    image = make_host_python_base(store, on_progress=on_progress)
    doc = {"schema": HOST_BASE_SCHEMA, "image": str(image.digest)}
    store.cache_put(key, json.dumps(doc, sort_keys=True))
    return image
