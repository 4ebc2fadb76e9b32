"""The no-op rebuild fast path: when neither the spec nor any file a ``copy`` step
reads has changed since the last build, the images are the ones that build made.

Knowing that costs a walk of ``lstat`` calls, like git's index: no hashing, no spec
parsing, no pydantic. A file's signature is (path, mode, size, mtime, ctime, inode);
any write changes mtime and ctime. Files modified within ``RACY_SECONDS`` of the
record are "racy" (a second write in the same clock tick could keep the signature),
so such a record is not trusted and the next build takes the full, cached path.

Standard library only: this module runs before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from graven.spec.inputs import MAX_SPEC_BYTES, read_regular_file

SCHEMA = "graven.fingerprint/v1"
RACY_SECONDS = 2.0
_ALWAYS_SKIPPED = frozenset({".git", ".graven"})
IGNORE_FILE = ".gravenignore"


def _walk(path: str, out: list[str], newest: list[float], skip: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        out.append(f"missing {path}")
        return
    newest[0] = max(newest[0], st.st_mtime, st.st_ctime)
    out.append(
        f"{path}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    )
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as it:
            children = sorted(
                e.path for e in it if e.name not in _ALWAYS_SKIPPED and e.path != skip
            )
        for child in children:
            _walk(child, out, newest, skip)


def signature(root: Path, sources: list[str], skip: Path) -> tuple[str, float]:
    """(signature of every file under ``sources``, newest mtime/ctime seen)."""
    lines: list[str] = []
    newest = [0.0]
    # The ignore file decides what a copy reads, so it is an input of every copy.
    for source in (IGNORE_FILE, *sources):
        _walk(os.path.join(root, source), lines, newest, str(skip))  # noqa: PTH118 - str paths are faster here
    digest = hashlib.sha256("\n".join(lines).encode(errors="surrogateescape")).hexdigest()
    return digest, newest[0]


def _record_path(state_dir: Path, spec_path: Path) -> Path:
    tag = hashlib.sha256(str(spec_path.resolve()).encode()).hexdigest()[:32]
    return state_dir / "fingerprints" / f"{tag}.json"


def unchanged_images(
    state_dir: Path, spec_path: Path, names: list[str]
) -> list[dict[str, Any]] | None:
    """The last build's images when nothing they depend on changed, else None."""
    try:
        record = json.loads(_record_path(state_dir, spec_path).read_bytes())
        # Not a plain read: a spec that is a FIFO must not block the lean build path.
        spec_bytes = read_regular_file(spec_path, MAX_SPEC_BYTES)
    except (OSError, ValueError):
        return None
    if record.get("schema") != SCHEMA:
        return None
    if record.get("spec") != hashlib.sha256(spec_bytes).hexdigest():
        return None
    images = record.get("images", {})
    wanted = names or sorted(images)
    if not wanted or any(n not in images for n in wanted):
        return None
    root = spec_path.resolve().parent
    out = []
    for name in wanted:
        entry = images[name]
        sig, _ = signature(root, entry["sources"], state_dir.resolve())
        if sig != entry["signature"]:
            return None
        ref = state_dir / "store" / "refs" / name
        try:
            if ref.read_text().strip() != entry["digest"]:
                return None
        except OSError:
            return None
        out.append({"name": name, "digest": entry["digest"], "steps": entry["steps"]})
    return out


def remember(
    state_dir: Path,
    spec_path: Path,
    spec_bytes: bytes,
    built: dict[str, tuple[str, int, list[str], str, float]],
) -> None:
    """Record a finished build: name -> (digest, step count, sources, signature, newest).

    Signatures must have been taken *before* the build read the files."""
    path = _record_path(state_dir, spec_path)
    try:
        record = json.loads(path.read_bytes())
        if (
            record.get("schema") != SCHEMA
            or record.get("spec") != hashlib.sha256(spec_bytes).hexdigest()
        ):
            raise ValueError("stale")
    except (OSError, ValueError):
        record = {"schema": SCHEMA, "spec": hashlib.sha256(spec_bytes).hexdigest(), "images": {}}
    now = time.time()
    for name, (digest, steps, sources, sig, newest) in built.items():
        if now - newest < RACY_SECONDS:
            record["images"].pop(name, None)  # racy: do not vouch for it
            continue
        record["images"][name] = {
            "digest": digest,
            "steps": steps,
            "sources": sources,
            "signature": sig,
        }
    from graven.atomic import write_atomic

    write_atomic(path, json.dumps(record, sort_keys=True).encode())
