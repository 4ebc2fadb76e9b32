"""Integrity of the content store: hash every blob, follow every tree and image, say
what is damaged and which images hold it, and (on repair) move it to
``quarantine/<run>/`` so the next build or pull writes it afresh. Nothing is deleted.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from graven.atomic import fsync_dir
from graven.errors import StoreError
from graven.model import Digest
from graven.store.cas.refs import RefStore, parse_image
from graven.store.tree_model import MAX_DOCUMENT, parse_tree


@dataclass(frozen=True)
class Damage:
    """One damaged object: ``corrupt`` (its bytes do not hash to its digest) or
    ``incomplete`` (a tree or image naming an object that is missing or damaged).
    ``images`` are the names whose current image holds it."""

    digest: Digest
    kind: Literal["corrupt", "incomplete"]
    images: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"digest": str(self.digest), "kind": self.kind, "images": list(self.images)}


@dataclass(frozen=True)
class FsckReport:
    """What ``ContentStore.check`` found (and, with ``quarantine``, moved away).

    ``names`` are the names whose image is missing or damaged (moved away on repair,
    so a rebuild or pull restores them); ``strays`` files in the blob store that are
    not blobs."""

    problems: tuple[str, ...]
    damaged: tuple[Damage, ...] = ()
    strays: tuple[Path, ...] = ()
    names: tuple[str, ...] = ()
    quarantine: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def images(self) -> tuple[str, ...]:
        """Every name whose image must be rebuilt or pulled again, sorted."""
        return tuple(sorted({*self.names, *(n for d in self.damaged for n in d.images)}))

    @property
    def next_step(self) -> str:
        """What to do about what was found, in one sentence ("" when the store is sound)."""
        if self.ok:
            return ""
        named = " ".join(self.images) or "IMAGE"
        restore = (
            f"rebuild the images built here ('graven build {named}') and pull again the ones "
            "pulled ('graven pull REF --name IMAGE')"
        )
        if self.quarantine is not None:
            return f"Now {restore}. Delete {self.quarantine} once you no longer need it."
        return (
            f"Run 'graven store fsck --repair' to quarantine what is damaged, then {restore}; "
            "'graven gc' never deletes damaged data."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "damaged": [d.to_dict() for d in self.damaged],
            "images": list(self.images),
            "names": list(self.names),
            "repaired": self.quarantine is not None,
            "quarantine": str(self.quarantine) if self.quarantine else None,
            "next": self.next_step,
        }


class FsckStore(RefStore):
    """Images and names plus the integrity check over everything."""

    def fsck(self) -> list[str]:
        """Problems found in the store: corrupt blobs, dangling references. Empty if sound."""
        return list(self.check().problems)

    def check(self, *, repair: bool = False) -> FsckReport:
        """Hash every blob and follow every tree and image: what is damaged, and which
        names' images hold it. Never uses remembered verifications.

        With ``repair``, every damaged object (corrupt blobs, stray files, and the
        trees and images naming a missing or damaged object, up to the images) is
        moved to ``quarantine/<run>/``, and every name pointing at such an image is
        moved there too (its history stays). Nothing is deleted. The next build or pull
        of those images then writes them afresh: no cache or no-op check can answer
        from a tree that is gone, and a name that is gone is no longer "unchanged".
        Repair while nothing else writes the store: a blob healed meanwhile may be
        moved as well (the next build or pull writes it again)."""
        problems: list[str] = []
        present: set[Digest] = set()
        corrupt: set[Digest] = set()
        strays: list[Path] = []
        for fan in sorted(self._blobs.iterdir()):
            for path in sorted(fan.iterdir()) if fan.is_dir() else [fan]:
                digest = self._digest_or_none(f"sha256:{fan.name}{path.name}")
                if digest is None or path.parent != fan or path.is_symlink() or not path.is_file():
                    problems.append(f"stray file in the blob store: {path}")
                    strays.append(path)
                elif not self.verify_blob(digest):
                    corrupt.add(digest)
                else:
                    present.add(digest)
        links = {d: found for d in sorted(present) if (found := self._links(d)) is not None}
        heads: dict[str, Digest] = {}
        unreadable: list[str] = []
        for name in self._names():
            try:
                head = self._read_ref(name)
            except StoreError as e:
                problems.append(e.message)
                unreadable.append(name)
                continue
            if head is not None:
                heads[name] = head
        damaged = _damaged(corrupt, present, links)
        holders = _holders(damaged | corrupt, links, heads)

        def held(digest: Digest) -> str:
            names = holders.get(digest, ())
            return f"; in images: {', '.join(names)}" if names else ""

        for digest in sorted(corrupt):
            problems.append(
                f"blob {digest}: content does not match its digest (corrupt){held(digest)}"
            )
        for digest, (kind, named) in links.items():
            for what, child in named:
                if child not in present:
                    state = "corrupt" if child in corrupt else "missing"
                    problems.append(f"{kind} {digest}: {what} {child} is {state}{held(digest)}")
        broken = list(unreadable)
        for name, head in heads.items():
            if head not in present:
                problems.append(f"ref {name!r} points at missing or corrupt image {head}")
            if head not in present or head in damaged:
                broken.append(name)
        report = FsckReport(
            problems=tuple(problems),
            damaged=tuple(
                Damage(d, "corrupt" if d in corrupt else "incomplete", holders.get(d, ()))
                for d in sorted(damaged | corrupt)
            ),
            strays=tuple(strays),
            names=tuple(sorted(broken)),
        )
        if repair and (report.damaged or strays or broken):
            return self._quarantine(report)
        return report

    def _links(self, digest: Digest) -> tuple[str, list[tuple[str, Digest]]] | None:
        """What a tree or image blob names: ("tree" or "image", [(what, digest)]), e.g.
        ``file 'app.py'`` or ``rootfs tree``; None for any other blob."""
        path = self.blob_path(digest)
        if path.stat().st_size > MAX_DOCUMENT:
            return None
        with path.open("rb") as f:
            data = f.read()
        if not data.startswith(b'{"'):
            return None
        with contextlib.suppress(ValueError):
            tree = parse_tree(data)
            return "tree", [
                (f"{e.type} {e.name!r}", e.digest) for e in tree.entries if e.digest is not None
            ]
        with contextlib.suppress(ValueError):
            image = parse_image(digest, data)
            named = [("rootfs tree", image.rootfs)]
            named += [("layer tree", d) for d in dict.fromkeys(image.layers) if d != image.rootfs]
            return "image", named
        return None

    def _quarantine(self, report: FsckReport) -> FsckReport:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=self._mkdir(self.root / "quarantine")))
        try:
            for damage in report.damaged:
                blobs = self._mkdir(run / "blobs" / "sha256")
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(damage.digest).replace(blobs / damage.digest.hex)
                self.forget_verified(damage.digest)
            for path in report.strays:
                stray = self._mkdir(run / "stray")
                with contextlib.suppress(FileNotFoundError):
                    path.replace(stray / f"{path.parent.name}-{path.name}")
            with self._lock("refs"):
                for name in report.names:
                    refs = self._mkdir(run / "refs")
                    with contextlib.suppress(FileNotFoundError):
                        self._ref_path(name).replace(refs / name)
            fsync_dir(run)
        except OSError as e:
            raise StoreError(
                f"cannot move damaged objects to {run}: {e.strerror or e}",
                hint="Check the permissions and free space of the state dir.",
            ) from e
        return replace(report, quarantine=run)


def _damaged(
    corrupt: set[Digest],
    present: set[Digest],
    links: dict[Digest, tuple[str, list[tuple[str, Digest]]]],
) -> set[Digest]:
    """The present documents that name, directly or through others, an object that is
    corrupt or missing: they can no longer be checked out, exported or pushed."""
    parents: dict[Digest, list[Digest]] = {}
    for digest, (_, named) in links.items():
        for _, child in named:
            parents.setdefault(child, []).append(digest)
    queue = [c for c in parents if c not in present or c in corrupt]
    damaged: set[Digest] = set()
    while queue:
        for parent in parents.get(queue.pop(), ()):
            if parent not in damaged:
                damaged.add(parent)
                queue.append(parent)
    return damaged


def _holders(
    damaged: set[Digest],
    links: dict[Digest, tuple[str, list[tuple[str, Digest]]]],
    heads: dict[str, Digest],
) -> dict[Digest, tuple[str, ...]]:
    """Damaged object -> the names whose current image holds it. Only damaged objects
    are walked: every object above a damaged one is damaged too."""
    found: dict[Digest, set[str]] = {}
    for name, head in heads.items():
        if head not in damaged:
            continue
        stack, seen = [head], {head}
        while stack:
            digest = stack.pop()
            found.setdefault(digest, set()).add(name)
            for _, child in links.get(digest, ("", []))[1]:
                if child in damaged and child not in seen:
                    seen.add(child)
                    stack.append(child)
    return {d: tuple(sorted(names)) for d, names in found.items()}
