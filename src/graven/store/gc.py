"""Garbage collection: keep what images, releases and instances need; delete the rest.

**Roots** (each kept with the reasons it is kept, reported by ``graven gc``):

- the image each name points at, and the newest ``keep_history`` digests of the
  name's history (the newest history entry may be a tag that was being written);
- the images of each service's last ``keep_releases`` releases, of its desired
  release and of a running rollout's two releases;
- the images of live instances (starting, healthy, unhealthy, draining);
- digests named by cache entries other than the builder's step results, such as the
  compressed layers the OCI exporter caches (``prune_cache`` lets them go);
- every blob younger than the grace period, and what it references: a build or
  import running right now may have written a tree that names an older blob.

Everything **reachable** from a root is kept: an image's layer snapshot trees and
rootfs, their subtrees and the file blobs they name.

**Collected**: unreachable blobs older than the grace period (default 10 minutes).
They are renamed into ``trash/`` first; then the roots are read again, anything that
became reachable meanwhile (a tag written by a concurrent build) is put back, and the
rest is deleted. A crash leaves blobs in ``trash/``, which the next run puts back and
judges again. Step cache entries naming a tree that is gone are deleted, so the cache
never answers with a missing tree; other cache entries go when a blob they name is
collected. Temp files older than the grace period, and checkouts under the state
dir's ``checkouts/`` that no live instance or desired release uses, are removed too.

If the walk meets a missing or corrupt tree or image inside something it must keep,
nothing is deleted: its blobs cannot be told apart from garbage. ``problems`` says
what, and ``graven store fsck`` says more. A root that is simply gone (the image of an
old release, collected when it fell out of retention) is only listed as ``missing``.

gc never writes the state database; it reads it (read-only) when it exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graven.errors import StoreError
from graven.model import Digest, is_valid_name
from graven.store.cas import ContentStore
from graven.store.cas.refs import parse_image
from graven.store.tree_model import EMPTY_TREE, parse_tree

GRACE_PERIOD = 600.0  # seconds: a concurrent build may be writing younger blobs
DEFAULT_KEEP_RELEASES = 10
DEFAULT_KEEP_HISTORY = 1
STEP_RESULT_SCHEMA = "graven.step-result/v1"  # graven.build.builder's cache entries

_DIGEST_IN_TEXT = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_CHECKOUT_TMP = re.compile(r"^\.tmp-[0-9a-f]{64}-")
_MAX_DOCUMENT = 64 << 20
# Longer than a run step may take (graven.build.sandbox.DEFAULT_TIMEOUT is an hour).
_TMP_DIR_AGE = 2 * 3600.0


# --- reachability ---------------------------------------------------------------------------


def _read_document(store: ContentStore, digest: Digest) -> bytes | None:
    """The blob's bytes if it could be a tree or image document (small JSON), else None.
    StoreError when it is missing or corrupt."""
    path = store.blob_path(digest)
    try:
        with path.open("rb") as f:
            if f.read(2) != b'{"' or os.fstat(f.fileno()).st_size > _MAX_DOCUMENT:
                return None
    except FileNotFoundError:
        raise StoreError(f"blob {digest} is missing") from None
    return store.read_blob(digest)


def reachable(
    store: ContentStore, roots: Iterable[Digest], problems: list[str] | None = None
) -> set[Digest]:
    """Every digest needed by ``roots``: images -> layer snapshot trees and rootfs ->
    subtrees -> file blobs. A root may be an image, a tree or any other blob.

    Needed digests that are missing or unreadable are in the set too (they are needed,
    whether or not the store has them) and described in ``problems`` when given; a
    missing *root* is not a problem, and not in the set."""
    seen: set[Digest] = set()
    found = problems if problems is not None else []
    for root in roots:
        if root in seen or not store.has(root):
            continue
        try:
            data = _read_document(store, root)
        except StoreError as e:
            found.append(f"root {root}: {e.message}")
            seen.add(root)
            continue
        if data is not None:
            with contextlib.suppress(ValueError):
                image = parse_image(root, data)
                seen.add(root)
                for tree in dict.fromkeys((*image.layers, image.rootfs)):
                    _walk_tree(store, tree, seen, found, f"image {root}")
                continue
            with contextlib.suppress(ValueError):
                parse_tree(data)
                _walk_tree(store, root, seen, found, f"tree {root}")
                continue
        seen.add(root)  # a plain blob
    return seen


def _walk_tree(
    store: ContentStore, root: Digest, seen: set[Digest], problems: list[str], owner: str
) -> None:
    stack = [root]
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            tree = parse_tree(store.read_blob(digest))
        except StoreError as e:
            problems.append(f"{owner}: tree {digest}: {e.message}")
            continue
        except ValueError as e:
            problems.append(f"{owner}: {digest} is not a valid tree: {e}")
            continue
        for entry in tree.entries:
            if entry.digest is None or entry.digest in seen:
                continue
            if entry.type == "dir":
                stack.append(entry.digest)
                continue
            seen.add(entry.digest)
            if not store.has(entry.digest):
                problems.append(f"{owner}: file {entry.name!r} ({entry.digest}) is missing")


# --- roots ------------------------------------------------------------------------------------


@dataclass
class Roots:
    """What must be kept and why: digest -> reasons, in the order found."""

    reasons: dict[Digest, list[str]] = field(default_factory=dict)
    checkouts: set[str] = field(default_factory=set)  # image digest hex in use

    def add(self, digest: Digest, reason: str) -> None:
        self.reasons.setdefault(digest, []).append(reason)


def ref_roots(store: ContentStore, roots: Roots, *, keep_history: int) -> None:
    """Ref heads and the newest ``keep_history`` entries of every name's history."""
    refs = store.root / "refs"
    names = sorted(p.name for p in refs.iterdir() if is_valid_name(p.name)) if refs.is_dir() else []
    for name in names:
        head: Digest | None = None
        with contextlib.suppress(OSError, ValueError):
            head = Digest((refs / name).read_text().strip())
        if head is not None:
            roots.add(head, f"ref {name}")
        history = store.history(name)
        for digest in reversed(history[-keep_history:] if keep_history > 0 else []):
            if digest != head:
                roots.add(digest, f"history of {name}")


def state_roots(db: Path, roots: Roots, *, keep_releases: int) -> None:
    """Images of retained releases and live instances, from the state database."""
    if not db.exists():
        return
    from graven.ledger.state import open_state_store

    state = open_state_store(db, read_only=True)
    try:
        for service, desired in sorted(state.services().items()):
            releases = [r.release for r in state.releases(service)]
            wanted = {r.number for r in (releases[-keep_releases:] if keep_releases else [])}
            rollout = state.running_rollout(service)
            for release in releases:
                if release.number == desired:
                    roots.add(release.image, f"release {release.id} (desired)")
                    roots.checkouts.add(release.image.hex)
                elif rollout is not None and release.number in (
                    rollout.from_release,
                    rollout.to_release,
                ):
                    roots.add(release.image, f"release {release.id} (rollout)")
                elif release.number in wanted:
                    roots.add(release.image, f"release {release.id} (last {keep_releases})")
        for instance in state.live_instances():
            roots.add(instance.image, f"instance {instance.id} ({instance.state})")
            roots.checkouts.add(instance.image.hex)
    finally:
        state.close()


def _cache_entries(store: ContentStore) -> Iterator[tuple[Path, str | None]]:
    """Every cache entry file and its text (None when unreadable)."""
    cache = store.root / "cache" / "sha256"
    if not cache.is_dir():
        return
    for fan in sorted(cache.iterdir()):
        if not fan.is_dir():
            continue
        for path in sorted(fan.iterdir()):
            try:
                yield path, path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                yield path, None


def _is_step_result(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("schema") == STEP_RESULT_SCHEMA


def cache_roots(store: ContentStore, roots: Roots) -> None:
    """Digests named by cache entries that are not step results (derived blobs, such
    as compressed OCI layers): kept, so exports and pushes need not rebuild them."""
    for _, text in _cache_entries(store):
        if text is None or _is_step_result(text):
            continue
        for match in dict.fromkeys(_DIGEST_IN_TEXT.findall(text)):
            digest = Digest(match)
            if store.has(digest):
                roots.add(digest, "cache entry")


# --- the blobs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    digest: Digest
    path: Path
    size: int
    mtime: float


def _blobs(store: ContentStore) -> Iterator[_Blob]:
    base = store.root / "blobs" / "sha256"
    for fan in sorted(base.iterdir()) if base.is_dir() else []:
        if not fan.is_dir() or len(fan.name) != 2:
            continue
        for path in sorted(fan.iterdir()):
            hex_ = fan.name + path.name
            if not _HEX64.match(hex_):
                continue  # a stray file: fsck reports it
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            yield _Blob(Digest("sha256:" + hex_), path, st.st_size, st.st_mtime)


def young_blobs(store: ContentStore, *, now: float, grace: float) -> list[Digest]:
    """Blobs written within the grace period (as of ``now``): kept, with what they
    reference, whether or not anything else needs them."""
    return [blob.digest for blob in _blobs(store) if now - blob.mtime < grace]


# --- the report -------------------------------------------------------------------------------


@dataclass
class GcReport:
    """What a collection kept, deleted (or, in a dry run, would delete) and why."""

    dry_run: bool
    kept: dict[Digest, list[str]] = field(default_factory=dict)  # roots present, with reasons
    missing: dict[Digest, list[str]] = field(default_factory=dict)  # roots not in the store
    objects_total: int = 0
    objects_kept: int = 0
    bytes_kept: int = 0
    objects_young: int = 0  # kept only for the grace period (young, or named by young)
    objects_deleted: int = 0
    bytes_freed: int = 0
    objects_restored: int = 0  # became reachable while being collected
    cache_entries_deleted: int = 0
    tmp_removed: int = 0
    checkouts_removed: list[str] = field(default_factory=list)
    checkout_bytes_freed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "objects_total": self.objects_total,
            "objects_kept": self.objects_kept,
            "bytes_kept": self.bytes_kept,
            "objects_young": self.objects_young,
            "objects_deleted": self.objects_deleted,
            "bytes_freed": self.bytes_freed,
            "objects_restored": self.objects_restored,
            "cache_entries_deleted": self.cache_entries_deleted,
            "tmp_removed": self.tmp_removed,
            "checkouts_removed": list(self.checkouts_removed),
            "checkout_bytes_freed": self.checkout_bytes_freed,
            "kept": [{"digest": str(d), "reasons": r} for d, r in self.kept.items()],
            "missing": [{"digest": str(d), "reasons": r} for d, r in self.missing.items()],
            "problems": list(self.problems),
        }


# --- collecting -------------------------------------------------------------------------------


@contextlib.contextmanager
def _gc_lock(store: ContentStore) -> Iterator[None]:
    locks = store.root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / "gc.lock").open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another 'graven gc' is running on {store.root}",
                hint="Wait for it to finish.",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _restore_trash(store: ContentStore) -> int:
    """Put back blobs a crashed collection left in ``trash/``; they are judged again."""
    trash = store.root / "trash"
    restored = 0
    for run in sorted(trash.iterdir()) if trash.is_dir() else []:
        for path in sorted(run.iterdir()) if run.is_dir() else []:
            if _HEX64.match(path.name):
                final = store.blob_path(Digest("sha256:" + path.name))
                if not final.exists():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    path.replace(final)
                    restored += 1
        shutil.rmtree(run, ignore_errors=True)
    return restored


def collect(
    store: ContentStore,
    *,
    keep: set[Digest],
    dry_run: bool,
    now: float | None = None,
    grace: float = GRACE_PERIOD,
    recheck: Callable[[], set[Digest]] | None = None,
    needed: set[Digest] | None = None,
    report: GcReport | None = None,
) -> GcReport:
    """Delete every blob not in ``keep`` and older than ``grace`` seconds (by mtime, as
    of ``now``), then the cache entries and temp files that are stale.

    Blobs are renamed into ``trash/`` first; ``recheck`` (the roots read again) is
    then asked what must be kept after all, and those are put back before the trash is
    deleted. ``dry_run`` deletes nothing and reports what would go. Blobs kept but not
    in ``needed`` (when given) are counted as kept for the grace period only."""
    now = time.time() if now is None else now
    report = report if report is not None else GcReport(dry_run=dry_run)
    doomed: list[_Blob] = []
    for blob in _blobs(store):
        report.objects_total += 1
        if blob.digest in keep and (needed is None or blob.digest in needed):
            report.objects_kept += 1
            report.bytes_kept += blob.size
        elif blob.digest in keep or now - blob.mtime < grace:
            report.objects_young += 1
        else:
            doomed.append(blob)
    deleted = _delete_blobs(store, doomed, dry_run, recheck, report)
    _collect_cache(store, deleted, dry_run, report)
    _collect_tmp(store, now, grace, dry_run, report)
    return report


def _delete_blobs(
    store: ContentStore,
    doomed: list[_Blob],
    dry_run: bool,
    recheck: Callable[[], set[Digest]] | None,
    report: GcReport,
) -> set[Digest]:
    if dry_run or not doomed:
        report.objects_deleted += len(doomed)
        report.bytes_freed += sum(b.size for b in doomed)
        return {b.digest for b in doomed}
    trash = store.root / "trash" / f"gc-{os.getpid()}-{time.time_ns()}"
    trash.mkdir(parents=True, mode=0o700)
    moved: dict[Digest, _Blob] = {}

    def put_back(blob: _Blob) -> None:
        with contextlib.suppress(FileNotFoundError):
            if not blob.path.exists():  # else rewritten meanwhile: the same bytes
                (trash / blob.digest.hex).replace(blob.path)

    try:
        for blob in doomed:
            try:
                blob.path.replace(trash / blob.digest.hex)
            except FileNotFoundError:
                continue  # deleted by someone else meanwhile
            moved[blob.digest] = blob
        # Read the roots again: what became reachable meanwhile goes back. A tree put
        # back can name more trashed blobs, visible to the walk only once it is back:
        # repeat until nothing more returns.
        while recheck is not None:
            back = [moved.pop(d) for d in recheck() & moved.keys()]
            if not back:
                break
            for blob in back:
                put_back(blob)
                report.objects_restored += 1
    except BaseException:
        for blob in moved.values():  # whatever went wrong, nothing is lost
            put_back(blob)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    for digest in moved:
        store.forget_verified(digest)
    report.objects_deleted += len(moved)
    report.bytes_freed += sum(b.size for b in moved.values())
    return set(moved)


def _collect_cache(
    store: ContentStore, deleted: set[Digest], dry_run: bool, report: GcReport
) -> None:
    """Drop cache entries that name a collected blob, and step results that name a tree
    that is not in the store at all (the builder would ignore them anyway)."""
    for path, text in _cache_entries(store):
        if text is None:
            continue
        named = {Digest(d) for d in _DIGEST_IN_TEXT.findall(text)}
        stale = bool(named & deleted)
        if not stale and _is_step_result(text):
            stale = any(not store.has(d) for d in named)
        if stale:
            report.cache_entries_deleted += 1
            if not dry_run:
                path.unlink(missing_ok=True)


def _collect_tmp(
    store: ContentStore, now: float, grace: float, dry_run: bool, report: GcReport
) -> None:
    """Temp files and run checkouts a crashed writer or build left behind."""
    for path in sorted(store.tmp_dir.iterdir()) if store.tmp_dir.is_dir() else []:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        # A directory is a run step's checkout, whose own mtime does not move while the
        # step runs: wait out the longest a step may run.
        limit = max(grace, _TMP_DIR_AGE) if stat.S_ISDIR(st.st_mode) else grace
        if now - st.st_mtime < limit:
            continue
        report.tmp_removed += 1
        if not dry_run:
            store.remove_checkout(path)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).lstat().st_size
    return total


def collect_checkouts(
    store: ContentStore,
    checkouts: Path,
    *,
    in_use: set[str],
    dry_run: bool,
    now: float | None = None,
    grace: float = GRACE_PERIOD,
    report: GcReport | None = None,
) -> GcReport:
    """Remove image checkouts (``<digest hex>`` directories and their markers) whose
    image is not in ``in_use``, and leftover temp checkouts, older than ``grace``.
    Anything else in the directory is left alone."""
    now = time.time() if now is None else now
    report = report if report is not None else GcReport(dry_run=dry_run)
    for path in sorted(checkouts.iterdir()) if checkouts.is_dir() else []:
        name = path.name
        is_checkout = bool(_HEX64.match(name)) and name not in in_use
        orphan_marker = (
            name.endswith(".tree")
            and bool(_HEX64.match(name[:-5]))
            and not os.path.lexists(checkouts / name[:-5])
        )
        if not (is_checkout or orphan_marker or _CHECKOUT_TMP.match(name)):
            continue
        marker = ContentStore.checkout_marker(path)
        try:
            stamp = (marker if marker.exists() else path).lstat().st_mtime
        except FileNotFoundError:
            continue
        if now - stamp < grace:
            continue
        if orphan_marker:
            if not dry_run:
                path.unlink(missing_ok=True)
            continue
        report.checkouts_removed.append(name)
        report.checkout_bytes_freed += _tree_bytes(path)
        if not dry_run:
            store.remove_checkout(path)
    return report


def gc_roots(
    store: ContentStore,
    state_db: Path | None,
    *,
    keep_releases: int,
    keep_history: int,
    prune_cache: bool,
) -> Roots:
    """Every root but young blobs, with its reasons (see the module docstring)."""
    roots = Roots()
    ref_roots(store, roots, keep_history=keep_history)
    if state_db is not None:
        state_roots(state_db, roots, keep_releases=keep_releases)
    if not prune_cache:
        cache_roots(store, roots)
    roots.add(EMPTY_TREE, "the empty tree")
    return roots


def run_gc(
    store: ContentStore,
    *,
    state_db: Path | None = None,
    checkouts: Path | None = None,
    keep_releases: int = DEFAULT_KEEP_RELEASES,
    keep_history: int = DEFAULT_KEEP_HISTORY,
    prune_cache: bool = False,
    dry_run: bool = False,
    now: float | None = None,
    grace: float = GRACE_PERIOD,
) -> GcReport:
    """One collection: roots, reachability, then blobs, cache, temp files and
    checkouts. Nothing is deleted when the walk finds damage (``report.problems``)."""
    if keep_releases < 0 or keep_history < 0:
        raise ValueError("keep_releases and keep_history must not be negative")
    now = time.time() if now is None else now
    report = GcReport(dry_run=dry_run)
    with _gc_lock(store):
        _restore_trash(store)  # a repair, not a deletion: a dry run does it too

        def mark(problems: list[str]) -> tuple[Roots, set[Digest], set[Digest]]:
            """Roots, what they need, and that plus what young blobs need."""
            roots = gc_roots(
                store,
                state_db,
                keep_releases=keep_releases,
                keep_history=keep_history,
                prune_cache=prune_cache,
            )
            needed = reachable(store, roots.reasons, problems)
            young = reachable(store, young_blobs(store, now=now, grace=grace), [])
            return roots, needed, needed | young

        def recheck() -> set[Digest]:
            # Roots too, present or not: a root being collected right now is in trash/.
            again, _, keep = mark([])
            return keep | again.reasons.keys()

        roots, needed, keep = mark(report.problems)
        for digest, reasons in roots.reasons.items():
            (report.kept if store.has(digest) else report.missing)[digest] = reasons
        if report.problems:
            return report
        collect(
            store,
            keep=keep,
            dry_run=dry_run,
            now=now,
            grace=grace,
            recheck=recheck,
            needed=needed,
            report=report,
        )
        if checkouts is not None:
            collect_checkouts(
                store,
                checkouts,
                in_use=roots.checkouts,
                dry_run=dry_run,
                now=now,
                grace=grace,
                report=report,
            )
    return report
