"""Which program an image's entrypoint really runs: the interpreter, recorded.

An image whose entrypoint is ``python3 app.py`` depends on a Python the image must
hold: instances run with the image as their root, so nothing of the host's is there.
``interpreter_of`` answers which file runs, resolving ``entrypoint[0]`` the way
instances start it, inside the image only:

- an absolute path is looked up inside the image (symlinks followed inside the image,
  as a container runtime would);
- a relative path (``./run.sh``) is relative to the image's workdir;
- a bare name (``python3``) is searched on the image's ``PATH``;
- a ``#!`` script is followed to its interpreter, and ``#!/usr/bin/env NAME`` to
  ``NAME`` on the image's ``PATH``.

A program the image lacks is an error naming it, with the fix: ``base: host-python``
puts this host's Python into the image (``graven.build.bases.host_python``), any
other base or ``copy`` step can bring another program.

The answer goes into the image's config labels at build time, so an image says which
interpreter it was built to run with, by content::

    dev.graven.interpreter.path     /usr/bin/python3.11
    dev.graven.interpreter.source   image
    dev.graven.interpreter.sha256   sha256:...   (the binary's content)
    dev.graven.interpreter.version  3.11.2       (only when a base maker knew it)

The host-python base holds a copy of a host's interpreter: rebuilt on a host with
another Python, the base and so the image get another digest. That is the point.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from graven.errors import NotFoundError, UsageError
from graven.model import Digest, Image, ImageConfig
from graven.store.base import ImageStore
from graven.store.tree_model import TreeEntry

LABEL_PREFIX = "dev.graven.interpreter."
LABEL_PATH = LABEL_PREFIX + "path"
LABEL_SOURCE = LABEL_PREFIX + "source"
LABEL_SHA256 = LABEL_PREFIX + "sha256"
LABEL_VERSION = LABEL_PREFIX + "version"

# The PATH a container runtime gives a process whose image sets none.
DEFAULT_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Linux reads this much of a file to find a "#!" line (BINPRM_BUF_SIZE).
_SHEBANG_BYTES = 256
# Linux follows at most 4 nested script interpreters; one more is already an error.
_MAX_SCRIPT_DEPTH = 5
_MAX_SYMLINK_HOPS = 40

# Always "image" now: instances see nothing of the host. Kept as a label so a reader
# of an image's config need not know when that changed.
Source = Literal["image"]


@dataclass(frozen=True)
class Interpreter:
    """The file an image's entrypoint runs: where it is, where from, what content.

    ``path`` is the file's real path (symlinks resolved) inside the image; ``sha256``
    is the file's content digest; ``version`` is set only when a base maker knew it."""

    path: str
    source: Source
    sha256: Digest
    version: str | None = None

    def labels(self) -> tuple[tuple[str, str], ...]:
        """The config labels that record this interpreter, sorted by name."""
        out = [
            (LABEL_PATH, self.path),
            (LABEL_SHA256, str(self.sha256)),
            (LABEL_SOURCE, self.source),
        ]
        if self.version:
            out.append((LABEL_VERSION, self.version))
        return tuple(sorted(out))

    def to_dict(self) -> dict[str, str | None]:
        return {
            "path": self.path,
            "source": self.source,
            "sha256": str(self.sha256),
            "version": self.version,
        }


@dataclass(frozen=True)
class _Located:
    """A program file found inside the image, with its first bytes."""

    path: str  # its real path, symlinks resolved
    digest: Digest
    head: bytes
    named: str = ""  # the path it was found at (argv[0] matters to multi-call binaries)


# --- public API -------------------------------------------------------------------------------


def interpreter_of(store: ImageStore, image: Image) -> Interpreter:
    """The interpreter ``image``'s entrypoint runs (see the module docstring).

    UsageError when the image has no entrypoint; NotFoundError when the program is
    not in the image, or a ``#!`` chain cannot be followed."""
    return resolve_interpreter(store, image.rootfs, image.config)


def resolve_interpreter(store: ImageStore, rootfs: Digest, config: ImageConfig) -> Interpreter:
    """``interpreter_of`` for an image not stored yet: its root tree and config."""
    if not config.entrypoint:
        raise UsageError("the image has no entrypoint: there is no interpreter to record")
    located = _locate_entrypoint(store, rootfs, config, config.entrypoint[0])
    for _ in range(_MAX_SCRIPT_DEPTH):
        shebang = _shebang(located.head)
        if shebang is None:
            return Interpreter(located.path, "image", located.digest, _version(located, config))
        located = _locate_script_interpreter(store, rootfs, config, located, *shebang)
    raise NotFoundError(
        f"entrypoint {config.entrypoint[0]!r}: more than {_MAX_SCRIPT_DEPTH - 1} nested "
        "'#!' interpreters (a loop?)",
        hint="Point the entrypoint (or the script's '#!' line) at a real interpreter.",
    )


def interpreter_labels(store: ImageStore, image: Image) -> tuple[tuple[str, str], ...]:
    """The ``dev.graven.interpreter.*`` labels for ``image``, sorted by name.

    Empty when there is nothing to record: no entrypoint, or a program the image lacks
    (the build says so: ``program_in_image``)."""
    try:
        return interpreter_of(store, image).labels()
    except (UsageError, NotFoundError):
        return ()


def with_interpreter_labels(
    store: ImageStore,
    rootfs: Digest,
    config: ImageConfig,
    interpreter: Interpreter | None = None,
) -> ImageConfig:
    """``config`` with its interpreter labels recorded afresh (sorted with the rest).

    Labels a base passed down are replaced: they described the base's entrypoint.
    ``interpreter`` overrides the resolution (a base maker that knows more, such as the
    version); otherwise it is resolved, leniently as ``interpreter_labels`` is."""
    if interpreter is not None:
        recorded = interpreter.labels()
    else:
        try:
            recorded = resolve_interpreter(store, rootfs, config).labels()
        except (UsageError, NotFoundError):
            recorded = ()
    kept = [kv for kv in config.labels if not kv[0].startswith(LABEL_PREFIX)]
    return replace(config, labels=tuple(sorted([*kept, *recorded])))


def resolve_in_image(store: ImageStore, rootfs: Digest, path: str) -> tuple[str, TreeEntry] | None:
    """The real path and entry of absolute ``path`` in tree ``rootfs``, symlinks
    followed inside the image (an absolute target restarts at the image's root, ``..``
    stops at it). None when something on the way is missing or not a directory, or the
    symlinks loop."""
    pending = deque(p for p in path.split("/") if p)
    real: list[str] = []
    hops = 0
    while pending:
        part = pending.popleft()
        if part == ".":
            continue
        if part == "..":
            if real:
                real.pop()
            continue
        entry = store.lookup(rootfs, "/" + "/".join([*real, part]))
        if entry is None:
            return None
        if entry.type == "symlink" and entry.target is not None:
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                return None
            if entry.target.startswith("/"):
                real = []
            pending.extendleft(reversed([p for p in entry.target.split("/") if p]))
            continue
        if pending and entry.type != "dir":
            return None
        real.append(part)
    final = "/" + "/".join(real)
    entry = store.lookup(rootfs, final)
    return (final, entry) if entry is not None else None


# --- locating programs --------------------------------------------------------------------------

HOST_PYTHON_HINT = (
    "Instances run with the image as their root, so the program must be in the image: "
    "start the recipe from 'base: host-python' for this host's Python, or bring the "
    "program in with another base or a 'copy' step."
)


def program_in_image(store: ImageStore, rootfs: Digest, config: ImageConfig) -> tuple[str, str]:
    """Where inside the image the program ``config``'s entrypoint starts is: the path
    it is found at (what a runtime execs, so a multi-call binary sees its name) and
    its real path (symlinks resolved inside the image). ``#!`` is not followed.
    NotFoundError naming the program and the fix when the image lacks it, or it is not
    executable."""
    if not config.entrypoint:
        raise UsageError("the image has no entrypoint: there is nothing to run")
    found = _locate_entrypoint(store, rootfs, config, config.entrypoint[0])
    resolved = resolve_in_image(store, rootfs, found.path)
    if resolved is None or not resolved[1].mode & 0o111:
        raise NotFoundError(
            f"entrypoint program {config.entrypoint[0]!r} ({found.path} in the image) is not "
            "executable",
            hint="Make it executable (chmod +x) before copying it, or run it through its "
            "interpreter ('python3 app.py').",
        )
    return found.named, found.path


def _locate_entrypoint(
    store: ImageStore, rootfs: Digest, config: ImageConfig, program: str
) -> _Located:
    if program.startswith("/"):
        found = _in_image(store, rootfs, program)
    elif "/" in program:
        found = _in_image(store, rootfs, str(PurePosixPath(config.workdir) / program))
    else:
        found = _by_name(store, rootfs, config, program)
    if found is None:
        where = "" if "/" in program else " (on the image's PATH)"
        raise NotFoundError(
            f"entrypoint program {program!r} is not in the image{where}",
            hint=HOST_PYTHON_HINT,
        )
    return found


def _locate_script_interpreter(
    store: ImageStore,
    rootfs: Digest,
    config: ImageConfig,
    script: _Located,
    interpreter: str,
    argument: str,
) -> _Located:
    if interpreter.startswith("/"):
        found = _in_image(store, rootfs, interpreter)
    else:
        found = _in_image(store, rootfs, str(PurePosixPath(config.workdir) / interpreter))
    if found is None:
        raise NotFoundError(
            f"{script.path} starts with '#!{interpreter}', which is not in the image",
            hint="Put that interpreter into the image (for Python: 'base: host-python'), "
            "or fix the script's '#!' line.",
        )
    if Path(found.path).name != "env" or not argument:
        return found
    name = _env_program(argument)
    if name is None:
        return found
    program = (
        _by_name(store, rootfs, config, name) if "/" not in name else _in_image(store, rootfs, name)
    )
    if program is None:
        raise NotFoundError(
            f"{script.path} runs '{name}' through env, but no {name!r} is on the image's PATH",
            hint="Put it into the image (for Python: 'base: host-python'), or name the "
            "interpreter by absolute path.",
        )
    return program


def _by_name(store: ImageStore, rootfs: Digest, config: ImageConfig, name: str) -> _Located | None:
    image_path = dict(config.env).get("PATH", DEFAULT_IMAGE_PATH)
    for directory in image_path.split(":"):
        if directory.startswith("/"):
            found = _in_image(store, rootfs, f"{directory.rstrip('/')}/{name}")
            if found is not None:
                return found
    return None


def _in_image(store: ImageStore, rootfs: Digest, path: str) -> _Located | None:
    resolved = resolve_in_image(store, rootfs, path)
    if resolved is None:
        return None
    real, entry = resolved
    if entry.type != "file" or entry.digest is None:
        return None
    with store.open_blob(entry.digest) as f:
        head = f.read(_SHEBANG_BYTES)
    return _Located(real, entry.digest, head, path)


# --- scripts ---------------------------------------------------------------------------------


def _shebang(head: bytes) -> tuple[str, str] | None:
    """The interpreter and its (single, kernel-style) argument of a ``#!`` script."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if not line:
        return None
    # As Linux splits it: the interpreter ends at the first blank; the rest is one argument.
    interpreter, *rest = line.split(None, 1)
    return interpreter, rest[0].strip() if rest else ""


def _env_program(argument: str) -> str | None:
    """The program ``env ARGUMENT`` runs: options and NAME=value assignments skipped."""
    words = argument.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-u", "--unset", "-C", "--chdir"):
            i += 2  # these take a value
            continue
        if word.startswith("-") or "=" in word:
            i += 1
            continue
        return word
    return None


def _version(located: _Located, config: ImageConfig) -> str | None:
    """The version when recorded already for this very file (a base maker knew it).
    Nothing in an image is ever run to ask."""
    labels = dict(config.labels)
    if (
        labels.get(LABEL_PATH) == located.path
        and labels.get(LABEL_SHA256) == located.digest
        and labels.get(LABEL_VERSION)
    ):
        return labels[LABEL_VERSION]
    return None
