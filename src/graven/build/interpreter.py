"""Which program an image's entrypoint really runs: the interpreter, recorded.

An image whose entrypoint is ``python3 app.py`` depends on a Python the image may or
may not hold. ``interpreter_of`` answers which file runs, resolving ``entrypoint[0]``
the way instances start it:

- an absolute path is looked up inside the image (symlinks followed inside the image,
  as a container runtime would); when the image lacks it, the host's file at that path
  runs (the ``process`` runtime falls back to the host the same way);
- a relative path (``./run.sh``) is relative to the image's workdir, inside the image;
- a bare name (``python3``) is searched on the image's ``PATH`` inside the image first,
  then on the host ``PATH``;
- a ``#!`` script is followed to its interpreter, and ``#!/usr/bin/env NAME`` to
  ``NAME`` (on the image's ``PATH`` when that ``env`` is the image's, else the host's).

The answer goes into the image's config labels at build time, so an image says which
interpreter it was built to run with and whether that interpreter travels with it::

    dev.graven.interpreter.path     /usr/bin/python3.11
    dev.graven.interpreter.source   image | host
    dev.graven.interpreter.sha256   sha256:...   (the binary's content)
    dev.graven.interpreter.version  3.11.2       (only when cheap to know)

A host interpreter's digest ties the image to that host's file: rebuilt on a host with
another Python, the image gets another digest. That is the point (it is an input the
image depends on), and why base images that carry their interpreter are preferred.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from graven.errors import NotFoundError, UsageError
from graven.model import Digest, Image, ImageConfig
from graven.store.base import ImageStore
from graven.store.cas.blobs import CHUNK_SIZE
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
# Interpreters whose ``--version`` is harmless and fast; nothing else is ever run.
_VERSIONED = re.compile(r"^(python|pypy|node|nodejs|ruby|perl|bash)[0-9.]*\Z")
_VERSION_TIMEOUT = 5.0

Source = Literal["image", "host"]


@dataclass(frozen=True)
class Interpreter:
    """The file an image's entrypoint runs: where it is, where from, what content.

    ``path`` is the file's real path (symlinks resolved) inside the image for source
    ``image``, on the host for ``host``; ``sha256`` is the file's content digest;
    ``version`` is set only when cheap to learn (a known host interpreter's
    ``--version``, or what a base maker knows)."""

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
    """A program file found inside the image or on the host, with its first bytes."""

    path: str
    source: Source
    digest: Digest
    head: bytes


# --- public API -------------------------------------------------------------------------------


def interpreter_of(store: ImageStore, image: Image) -> Interpreter:
    """The interpreter ``image``'s entrypoint runs (see the module docstring).

    UsageError when the image has no entrypoint; NotFoundError when the program is
    neither in the image nor on the host, or a ``#!`` chain cannot be followed."""
    return resolve_interpreter(store, image.rootfs, image.config)


def resolve_interpreter(store: ImageStore, rootfs: Digest, config: ImageConfig) -> Interpreter:
    """``interpreter_of`` for an image not stored yet: its root tree and config."""
    if not config.entrypoint:
        raise UsageError("the image has no entrypoint: there is no interpreter to record")
    located = _locate_entrypoint(store, rootfs, config, config.entrypoint[0])
    for _ in range(_MAX_SCRIPT_DEPTH):
        shebang = _shebang(located.head)
        if shebang is None:
            return Interpreter(
                located.path, located.source, located.digest, _version(located, config)
            )
        located = _locate_script_interpreter(store, rootfs, config, located, *shebang)
    raise NotFoundError(
        f"entrypoint {config.entrypoint[0]!r}: more than {_MAX_SCRIPT_DEPTH - 1} nested "
        "'#!' interpreters (a loop?)",
        hint="Point the entrypoint (or the script's '#!' line) at a real interpreter.",
    )


def interpreter_labels(store: ImageStore, image: Image) -> tuple[tuple[str, str], ...]:
    """The ``dev.graven.interpreter.*`` labels for ``image``, sorted by name.

    Empty when there is nothing to record: no entrypoint, or a program found neither in
    the image nor on this host (it may exist where the image runs; starting it is the
    runtime's business, not the recorder's)."""
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


def _locate_entrypoint(
    store: ImageStore, rootfs: Digest, config: ImageConfig, program: str
) -> _Located:
    if program.startswith("/"):
        found = _in_image(store, rootfs, program) or _on_host(program)
    elif "/" in program:
        # Relative to the workdir, inside the image only: so the process runtime runs it.
        found = _in_image(store, rootfs, str(PurePosixPath(config.workdir) / program))
    else:
        found = _by_name(store, rootfs, config, program, image_first=True)
    if found is None:
        raise NotFoundError(
            f"entrypoint program {program!r} is neither in the image nor on this host's PATH",
            hint="Fix the recipe's 'entrypoint' step, or put the program into the image.",
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
    in_image = script.source == "image"
    if interpreter.startswith("/"):
        found = (_in_image(store, rootfs, interpreter) if in_image else None) or _on_host(
            interpreter
        )
    elif in_image:
        found = _in_image(store, rootfs, str(PurePosixPath(config.workdir) / interpreter))
    else:
        found = None
    if found is None:
        raise NotFoundError(
            f"{script.path} ({script.source}) starts with '#!{interpreter}', which is "
            "neither in the image nor on this host",
            hint="Install that interpreter in the image, or fix the script's '#!' line.",
        )
    if Path(found.path).name != "env" or not argument:
        return found
    name = _env_program(argument)
    if name is None:
        return found
    program = (
        _by_name(store, rootfs, config, name, image_first=found.source == "image")
        if "/" not in name
        else _in_image(store, rootfs, name) or _on_host(name)
    )
    if program is None:
        raise NotFoundError(
            f"{script.path} runs '{name}' through env, but no {name!r} is on the "
            f"{found.source}'s PATH",
            hint="Install it in the image, or name the interpreter by absolute path.",
        )
    return program


def _by_name(
    store: ImageStore, rootfs: Digest, config: ImageConfig, name: str, *, image_first: bool
) -> _Located | None:
    if image_first:
        image_path = dict(config.env).get("PATH", DEFAULT_IMAGE_PATH)
        for directory in image_path.split(":"):
            if directory.startswith("/"):
                found = _in_image(store, rootfs, f"{directory.rstrip('/')}/{name}")
                if found is not None:
                    return found
    host = shutil.which(name)
    return _on_host(host) if host is not None else None


def _in_image(store: ImageStore, rootfs: Digest, path: str) -> _Located | None:
    resolved = resolve_in_image(store, rootfs, path)
    if resolved is None:
        return None
    real, entry = resolved
    if entry.type != "file" or entry.digest is None:
        return None
    with store.open_blob(entry.digest) as f:
        head = f.read(_SHEBANG_BYTES)
    return _Located(real, "image", entry.digest, head)


def _on_host(path: str) -> _Located | None:
    real = os.path.realpath(path)
    h = hashlib.sha256()
    try:
        with Path(real).open("rb") as f:
            if not f.seekable():  # a fifo or device: not a program
                return None
            head = f.read(_SHEBANG_BYTES)
            h.update(head)
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)
    except OSError:  # missing, a directory, unreadable: not a program we can run
        return None
    return _Located(real, "host", Digest("sha256:" + h.hexdigest()), head)


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
    """The version, when cheap: recorded already for this very file (a base maker knew
    it), else asked of a well-known host interpreter. Never runs anything in an image."""
    labels = dict(config.labels)
    if (
        labels.get(LABEL_PATH) == located.path
        and labels.get(LABEL_SOURCE) == located.source
        and labels.get(LABEL_SHA256) == located.digest
        and labels.get(LABEL_VERSION)
    ):
        return labels[LABEL_VERSION]
    return _host_version(located.path) if located.source == "host" else None


def _host_version(path: str) -> str | None:
    """``--version`` of a well-known interpreter on the host; None for anything else."""
    if not _VERSIONED.match(Path(path).name):
        return None
    try:
        done = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            return line.strip()[:100]
    return None
