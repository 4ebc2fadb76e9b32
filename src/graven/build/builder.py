"""Recipe -> image: run a recipe's steps over file trees, never running a step twice.

The build threads a state through the steps: the root file tree (a tree digest in the
content store; ``scratch`` is the empty tree), the layer snapshots so far, the
environment (ordered), the working directory, the entrypoint, and the rest of the
image config (``cmd``, ``user``, exposed ports, labels). Each step has a cache key, the
sha256 over canonical JSON of the step's normalized definition, the previous step's
key (a chain back to the base), the state the step starts from, and, for ``copy``, the
Merkle entry of its source (after ``.gravenignore``); for ``run``, whether it is
isolated. A step whose key is cached is not run: the cache holds the state it produced.

**Bases.** A recipe starts from ``scratch`` or from an image (``resolve_base``): one of
the spec's images built before it, an image in the store by digest, an OCI layout
(imported once), or a registry image pinned by digest (pulled once). The first state
is the base's: its rootfs, its layer snapshots (so the image's layers are the base's
followed by its own, and exports share the base's layer blobs) and its config. The
base's image digest heads the key chain: a changed base reruns every step, the same
base finds them cached. An imported or pulled base is remembered in the store's cache
under its manifest digest (``graven.base-import/v1``), so a later build neither reads
the layout again nor touches the network; gc keeps what such an entry names (after
``gc --prune-cache`` the next build imports a layout again; a pulled base keeps its
own name).

``copy`` merges the source tree into the root tree on tree objects, without
materializing the root; a directory source leaves out what the project's
``.gravenignore`` names (``graven.build.ignore``). ``run`` checks the root out into a
writable temp directory, runs the command in a bubblewrap sandbox with that directory
as ``/`` (``graven.build.sandbox``: no network unless the step asks, host tools bound
read-only when the image has no shell of its own), and stores the tree it leaves.
The other steps only change the config.

Reproducible: trees hold no mtimes, owners or umask effects, and keys hold no
absolute paths, so the same recipe over the same source content gives the same image
digest wherever and whenever it is built (``run`` commands must be deterministic too).
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from graven.build import sandbox
from graven.build.bases.resolve import resolve_base
from graven.build.ignore import IGNORE_FILE, IgnoreRules
from graven.build.interpreter import program_in_image, with_interpreter_labels
from graven.errors import BuildError, GravenError, StoreError, UsageError
from graven.model import Digest, Image, ImageConfig, canonical_json, is_valid_name
from graven.spec.recipe import (
    SCRATCH,
    CmdStep,
    CopyStep,
    EntrypointStep,
    EnvStep,
    ExposeStep,
    ImageBase,
    LabelStep,
    Recipe,
    RunStep,
    Step,
    UserStep,
    WorkdirStep,
    step_kind,
)
from graven.store.base import ImageStore
from graven.store.layers import split
from graven.store.tree_model import EMPTY_TREE, Tree, TreeEntry, TreePathError

STEP_KEY_SCHEMA = "graven.step/v1"
STEP_RESULT_SCHEMA = "graven.step-result/v1"
_OUTPUT_TAIL_LINES = 20
RUN_TIMEOUT = sandbox.DEFAULT_TIMEOUT  # seconds a run step may take


@dataclass(frozen=True)
class StepOutcome:
    """What one step did. ``index`` is the step's position in the recipe (0-based, as in
    the spec's key path ``images.NAME.steps[INDEX]``); ``key`` its cache key."""

    index: int
    kind: str
    summary: str
    cached: bool
    seconds: float
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "summary": self.summary,
            "cached": self.cached,
            "seconds": round(self.seconds, 6),
            "key": self.key,
        }


@dataclass(frozen=True)
class BuildResult:
    """The image a build produced (named), what each step did, and the image it
    started from (None: scratch)."""

    image: Image
    steps: list[StepOutcome]
    base: Image | None = None

    @property
    def executed(self) -> int:
        """How many steps actually ran (were not answered by the cache)."""
        return sum(1 for s in self.steps if not s.cached)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.image.name,
            "digest": str(self.image.digest),
            "rootfs": str(self.image.rootfs),
            "base": str(self.base.digest) if self.base is not None else SCRATCH,
            "steps": [s.to_dict() for s in self.steps],
        }


@dataclass(frozen=True)
class BuildState:
    """What flows from step to step; a cache entry records the state a step produced."""

    rootfs: Digest
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    entrypoint: tuple[str, ...] = ()
    layers: tuple[Digest, ...] = ()  # snapshot after each layer so far
    cmd: tuple[str, ...] = ()
    user: str = ""
    ports: tuple[int, ...] = ()  # sorted, unique
    labels: tuple[tuple[str, str], ...] = ()  # sorted by name

    def to_dict(self) -> dict[str, Any]:
        return {
            "rootfs": str(self.rootfs),
            "layers": [str(d) for d in self.layers],
            "env": [list(kv) for kv in self.env],
            "workdir": self.workdir,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "user": self.user,
            "ports": list(self.ports),
            "labels": [list(kv) for kv in self.labels],
        }

    @classmethod
    def from_dict(cls, data: Any) -> BuildState:
        """Parse a cached state; ValueError/KeyError/TypeError when it is malformed."""
        env = tuple((str(k), str(v)) for k, v in data["env"])
        labels = tuple((str(k), str(v)) for k, v in data["labels"])
        entrypoint, cmd, ports = data["entrypoint"], data["cmd"], data["ports"]
        if (
            not all(isinstance(x, list) for x in (entrypoint, cmd, ports))
            or not isinstance(data["workdir"], str)
            or not isinstance(data["user"], str)
        ):
            raise TypeError("malformed build state")
        return cls(
            rootfs=Digest(data["rootfs"]),
            env=env,
            workdir=data["workdir"],
            entrypoint=tuple(str(a) for a in entrypoint),
            layers=tuple(Digest(d) for d in data["layers"]),
            cmd=tuple(str(a) for a in cmd),
            user=data["user"],
            ports=tuple(int(p) for p in ports),
            labels=labels,
        )

    @classmethod
    def of_base(cls, base: Image) -> BuildState:
        """The state a build on ``base`` starts from: its files, layers and config."""
        config = base.config
        layers = base.layers
        if not layers and base.rootfs != EMPTY_TREE:
            layers = (base.rootfs,)  # an image recorded without snapshots: one layer
        return cls(
            rootfs=base.rootfs,
            env=tuple(dict(config.env).items()),
            workdir=config.workdir,
            entrypoint=config.entrypoint,
            layers=layers,
            cmd=config.cmd,
            user=config.user,
            ports=tuple(sorted(set(config.ports))),
            labels=tuple(sorted(dict(config.labels).items())),
        )

    def config(self) -> ImageConfig:
        """The image config this state describes."""
        return ImageConfig(
            entrypoint=self.entrypoint,
            env=self.env,
            workdir=self.workdir,
            cmd=self.cmd,
            user=self.user,
            ports=self.ports,
            labels=self.labels,
        )


def build_image(
    name: str,
    recipe: Recipe,
    context_dir: Path,
    store: ImageStore,
    *,
    no_cache: bool = False,
    on_step: Callable[[StepOutcome], None] | None = None,
    allow_host_run: bool | None = None,
    built: Mapping[str, Image] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Bake ``recipe`` into an image named ``name``; tag it in ``store``.

    ``context_dir`` is the directory ``copy`` sources and base layouts are relative to
    (the spec file's directory, where ``.gravenignore`` is read). The recipe's base is
    found by ``resolve_base``; a base that is another image of the spec must be in
    ``built`` (``build_order`` says what to build first). Steps whose cache key is
    known are not run unless ``no_cache``, which runs every step and refreshes its
    cache entry (an imported base stays imported: it is named by content). ``on_step``
    is called after each step, ``on_progress`` with a line on slow base work (a pull, an
    import). ``allow_host_run`` lets ``run`` steps fall back to the unisolated host when
    bubblewrap is unusable (default: the ``GRAVEN_UNSAFE_HOST_RUN`` environment
    variable). BuildError when a step fails; it names the image, the step and the cause.
    """
    if not is_valid_name(name):
        raise UsageError(
            f"invalid image name {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter"
        )
    context = Path(context_dir).resolve()
    if not context.is_dir():
        raise BuildError(f"images.{name}: build context {context} is not a directory")

    ignore = _ignore_rules(context, name)
    on_host: bool | None = None  # decided at the first run step (probes bubblewrap)
    base = resolve_base(name, recipe, context, store, built=built, on_progress=on_progress)
    state = BuildState(rootfs=store.put_tree(Tree())) if base is None else BuildState.of_base(base)
    # The base's image digest heads the chain, so every step's key depends on it.
    head = SCRATCH if base is None else str(base.digest)
    key = Digest.of_bytes(
        canonical_json({"schema": STEP_KEY_SCHEMA, "base": head, "state": state.to_dict()})
    )
    outcomes: list[StepOutcome] = []
    for index, step in enumerate(recipe.steps):
        started = time.perf_counter()
        where = f"images.{name}.steps[{index}]"
        inputs: dict[str, Any] = {}
        source: TreeEntry | None = None
        if isinstance(step, CopyStep):
            source = _ingest_source(store, context, step, where, ignore)
            inputs["source"] = source.to_dict()
            if source.type == "dir":
                # Its contents are copied, never its name (for '.', the context
                # directory's name: it must not tie the key to where the project lives).
                inputs["source"]["name"] = ""
        elif isinstance(step, RunStep):
            if on_host is None:
                on_host = sandbox.runs_on_host(allow_host=allow_host_run)
            # A result made on the host may hold anything of the host's: never let it
            # answer for an isolated run, nor the other way round.
            inputs["isolation"] = "host" if on_host else "sandbox"
        # The starting state is in the key besides the chain: a rerun step that is not
        # deterministic then invalidates exactly the steps after it.
        key = Digest.of_bytes(
            canonical_json(
                {
                    "schema": STEP_KEY_SCHEMA,
                    "parent": str(key),
                    "state": state.to_dict(),
                    "step": _definition(step),
                    "inputs": inputs,
                }
            )
        )
        cached = None if no_cache else _cached_result(store, key)
        if cached is not None:
            state, note = cached
        else:
            state, note = _apply(step, state, source, store, where, allow_host_run)
            result: dict[str, Any] = {"schema": STEP_RESULT_SCHEMA, "state": state.to_dict()}
            if note:
                result["note"] = note
            store.cache_put(key, canonical_json(result).decode())
        outcome = StepOutcome(
            index=index,
            kind=_kind(step),
            summary=_summary(step, note),
            cached=cached is not None,
            seconds=time.perf_counter() - started,
            key=str(key),
        )
        outcomes.append(outcome)
        if on_step is not None:
            on_step(outcome)

    if not state.entrypoint:
        raise BuildError(
            f"images.{name}: the image has no entrypoint: neither its steps nor its base"
            " set one, so instances would not know what to run",
            hint="Add an 'entrypoint' step to the recipe.",
        )
    # Instances run with the image as their root: a program the image lacks never
    # runs. Said now; an image may still be meant for another root (a later base).
    try:
        program_in_image(store, state.rootfs, state.config())
    except GravenError as e:
        if on_progress is not None:
            on_progress(f"warning: images.{name}: {e.message}; instances will not start. {e.hint}")
    # The interpreter the entrypoint runs (hashed) is part of what the image is:
    # recorded in its labels, so in its digest.
    config = with_interpreter_labels(store, state.rootfs, state.config())
    image = store.put_image(state.rootfs, config, state.layers)
    store.tag(name, image.digest)
    return BuildResult(image=replace(image, name=name), steps=outcomes, base=base)


# --- build order --------------------------------------------------------------------------


def build_order(images: Mapping[str, Recipe], names: Sequence[str] = ()) -> list[str]:
    """The images to build for ``names`` (default: every image, by name), each after
    the spec image it starts from; bases not asked for are included.

    BuildError when a base names an image that is not in ``images`` or bases form a
    cycle (``graven.spec.loader`` reports both first, with lines)."""
    order: list[str] = []
    placed: set[str] = set()
    for start in names or sorted(images):
        chain: list[str] = []
        node: str | None = start
        while node is not None and node not in placed:
            if node in chain:
                cycle = [*chain[chain.index(node) :], node]
                raise BuildError(
                    f"images.{node}.base: base images form a cycle: {' -> '.join(cycle)}"
                )
            recipe = images.get(node)
            if recipe is None:
                where = f"images.{chain[-1]}.base.image" if chain else "images"
                raise BuildError(f"{where}: no image named {node!r} in the spec")
            chain.append(node)
            node = _spec_base(recipe)
        for name in reversed(chain):
            order.append(name)
            placed.add(name)
    return order


def spec_bases(images: Mapping[str, Recipe], name: str) -> list[str]:
    """The spec images ``name`` starts from, nearest first (its base, the base's base...)."""
    found: list[str] = []
    node = _spec_base(images[name])
    while node is not None and node not in found and node != name and node in images:
        found.append(node)
        node = _spec_base(images[node])
    return found


def _spec_base(recipe: Recipe) -> str | None:
    base = recipe.base
    return base.spec_image if isinstance(base, ImageBase) else None


# --- step description ----------------------------------------------------------------------


def _kind(step: Step) -> str:
    kind = step_kind(step)
    if kind is None:
        raise BuildError(f"unknown step {step!r}")
    return kind


def _definition(step: Step) -> dict[str, Any]:
    """The step as key material: explicit, so model changes never shift cache keys."""
    if isinstance(step, CopyStep):
        # Only the source's components matter ('app/' and './app' copy the same thing);
        # a trailing '/' on 'to' does matter (copy into vs copy as).
        return {"copy": "/".join(PurePosixPath(step.source).parts) or ".", "to": step.to}
    if isinstance(step, RunStep):
        return {"run": step.run, "network": step.network}
    if isinstance(step, EnvStep):
        return {"env": [[k, v] for k, v in step.env.items()]}  # order is meaningful
    if isinstance(step, WorkdirStep):
        return {"workdir": step.workdir}
    if isinstance(step, CmdStep):
        return {"cmd": list(step.cmd)}
    if isinstance(step, UserStep):
        return {"user": step.user}
    if isinstance(step, ExposeStep):
        return {"expose": sorted(set(step.expose))}
    if isinstance(step, LabelStep):
        return {"label": sorted([k, v] for k, v in step.label.items())}
    return {"entrypoint": list(step.entrypoint)}


def _summary(step: Step, note: str | None = None) -> str:
    if isinstance(step, CopyStep):
        return f"copy {step.source} -> {step.to}"
    if isinstance(step, RunStep):
        lines = step.run.strip().splitlines() or [""]
        more = " ..." if len(lines) > 1 else ""
        details = [note] if note else []
        if step.network:
            details.append("network")
        return f"run {lines[0]}{more}" + (f" ({', '.join(details)})" if details else "")
    if isinstance(step, EnvStep):
        return "env " + ", ".join(step.env)
    if isinstance(step, WorkdirStep):
        return f"workdir {step.workdir}"
    if isinstance(step, CmdStep):
        return "cmd " + shlex.join(step.cmd)
    if isinstance(step, UserStep):
        return f"user {step.user}"
    if isinstance(step, ExposeStep):
        return "expose " + ", ".join(str(p) for p in sorted(set(step.expose)))
    if isinstance(step, LabelStep):
        return "label " + ", ".join(sorted(step.label))
    return "entrypoint " + shlex.join(step.entrypoint)


# --- cache -----------------------------------------------------------------------------------


def _cached_result(store: ImageStore, key: Digest) -> tuple[BuildState, str | None] | None:
    """The state cached under ``key`` and the note its run left (how a ``run`` step was
    isolated); None when absent, malformed or a tree it names is gone (collected)."""
    text = store.cache_get(key)
    if text is None:
        return None
    try:
        doc = json.loads(text)
        if doc["schema"] != STEP_RESULT_SCHEMA:
            return None
        state = BuildState.from_dict(doc["state"])
        note = doc.get("note")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged entry only costs a rerun
    if not all(store.has(d) for d in {state.rootfs, *state.layers}):
        return None
    return state, note if isinstance(note, str) else None


# --- steps -----------------------------------------------------------------------------------


def _apply(
    step: Step,
    state: BuildState,
    source: TreeEntry | None,
    store: ImageStore,
    where: str,
    allow_host_run: bool | None,
) -> tuple[BuildState, str | None]:
    """Run one step: the state it leaves, and a note on how it ran (``run`` only)."""
    if isinstance(step, CopyStep) and source is not None:
        return _with_rootfs(store, state, _copy(store, state.rootfs, step, source, where)), None
    if isinstance(step, RunStep):
        rootfs, mode = _run(store, state, step, where, allow_host_run)
        return _with_rootfs(store, state, rootfs), str(mode)
    return _configure(step, state, where), None


def _configure(step: Step, state: BuildState, where: str) -> BuildState:
    """A metadata step: the state with its config changed, files untouched."""
    if isinstance(step, EnvStep):
        env = dict(state.env)
        env.update(step.env)  # a redefined variable keeps its first position
        return replace(state, env=tuple(env.items()))
    if isinstance(step, WorkdirStep):
        return replace(state, workdir=step.workdir)
    if isinstance(step, EntrypointStep):
        return replace(state, entrypoint=tuple(step.entrypoint))
    if isinstance(step, CmdStep):
        return replace(state, cmd=tuple(step.cmd))
    if isinstance(step, UserStep):
        return replace(state, user=step.user)
    if isinstance(step, ExposeStep):
        # Exposed ports are a set (OCI ExposedPorts is a map): sorted, so the order
        # they were declared in never changes the digest.
        return replace(state, ports=tuple(sorted({*state.ports, *step.expose})))
    if isinstance(step, LabelStep):
        labels = dict(state.labels)
        labels.update(step.label)
        return replace(state, labels=tuple(sorted(labels.items())))
    raise BuildError(f"{where}: unknown step {step!r}")


def _with_rootfs(store: ImageStore, state: BuildState, rootfs: Digest) -> BuildState:
    """A step changed the files: its changes become one layer, or several when large."""
    return replace(
        state, rootfs=rootfs, layers=state.layers + tuple(split(store, state.rootfs, rootfs))
    )


def _ignore_rules(context: Path, name: str) -> IgnoreRules:
    """The project's ``.gravenignore`` (none: only the built-in ``.graven``, ``.git``)."""
    path = context / IGNORE_FILE
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return IgnoreRules()
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(
            f"images.{name}: cannot read {path}: {getattr(e, 'strerror', None) or e}",
            hint=f"{IGNORE_FILE} must be a readable UTF-8 text file.",
        ) from e
    return IgnoreRules.parse(text)


def _ingest_source(
    store: ImageStore, context: Path, step: CopyStep, where: str, ignore: IgnoreRules
) -> TreeEntry:
    """Store the copy source (file, directory or symlink) and return its tree entry.

    What the source holds is filtered by ``ignore`` (paths relative to ``context``);
    the source itself is copied even when a pattern matches it: the spec named it."""
    parts = PurePosixPath(step.source).parts
    path = context.joinpath(*parts)
    if parts:
        try:
            parent = path.parent.resolve(strict=True)
        except OSError:
            parent = None
        if parent is not None and not parent.is_relative_to(context):
            raise BuildError(
                f"{where}: copy source {step.source!r} leaves the project through a symlink",
                hint="Copy only files inside the directory that holds graven.yaml.",
            )
        if parent is None or not os.path.lexists(parent / path.name):
            raise BuildError(
                f"{where}: copy source {step.source!r} does not exist in {context}",
                hint="Copy sources are relative to the directory that holds graven.yaml.",
            )
        path = parent / path.name

    def ignored(candidate: Path, is_dir: bool) -> bool:
        relative = candidate.relative_to(context).as_posix()
        return ignore.matches(relative, is_dir=is_dir)

    try:
        # The store may live inside the project (.graven/): never copy it into an image.
        return store.ingest(path, exclude=[store.root.resolve()], ignore=ignored)
    except StoreError as e:
        raise BuildError(f"{where}: {e.message}", hint=e.hint) from e


def _copy(
    store: ImageStore, rootfs: Digest, step: CopyStep, source: TreeEntry, where: str
) -> Digest:
    """Docker ``COPY`` semantics, on trees: a directory's contents merge into ``to``; a
    file lands at ``to``, or inside it when ``to`` ends with '/' or is a directory."""
    try:
        existing = store.lookup(rootfs, step.to)
        if source.type == "dir":
            if existing is not None and existing.type != "dir":
                raise BuildError(
                    f"{where}: cannot copy directory {step.source!r} onto {step.to}: "
                    f"it is a {existing.type} in the image"
                )
            return store.place(rootfs, step.to, source)
        into = step.to.endswith("/") or (existing is not None and existing.type == "dir")
        dest = f"{step.to.rstrip('/')}/{source.name}" if into else step.to
        return store.place(rootfs, dest, source)
    except TreePathError as e:
        raise BuildError(f"{where}: cannot copy {step.source!r} to {step.to}: {e.message}") from e


def _run(
    store: ImageStore, state: BuildState, step: RunStep, where: str, allow_host_run: bool | None
) -> tuple[Digest, sandbox.RunMode]:
    """Run the step's command in a sandbox over a writable checkout of the root; store
    the tree it leaves behind. Returns that tree and how the command was isolated."""
    parts = PurePosixPath(state.workdir).parts[1:]
    for depth in range(1, len(parts) + 1):
        # A symlink on the way could point the working directory out of the tree.
        entry = store.lookup(state.rootfs, "/" + "/".join(parts[:depth]))
        if entry is None:
            break
        if entry.type != "dir":
            raise BuildError(
                f"{where}: workdir {state.workdir} cannot be used: "
                f"/{'/'.join(parts[:depth])} is a {entry.type} in the image"
            )
    command = step.run
    work = Path(tempfile.mkdtemp(prefix="run-", dir=store.tmp_dir))
    root = work / "rootfs"
    try:
        store.checkout(state.rootfs, root, read_only=False)
        root.joinpath(*parts).mkdir(parents=True, exist_ok=True)  # as Docker's WORKDIR
        try:
            run = sandbox.run_step(
                root,
                state.workdir,
                state.env,
                command,
                network=step.network,
                timeout=RUN_TIMEOUT,
                allow_host=allow_host_run,
            )
        except BuildError as e:
            raise BuildError(f"{where}: {e.message}", hint=e.hint) from e
        if run.timed_out:
            raise BuildError(
                _failure_message(
                    where, command, run.returncode, run.output, f"timed out after {RUN_TIMEOUT:g}s"
                ),
                hint="Make the command finish sooner; the steps before it stay cached.",
            )
        if run.returncode != 0:
            raise BuildError(
                _failure_message(where, command, run.returncode, run.output),
                hint="Fix the command and build again; the steps before it stay cached.",
            )
        try:
            return store.ingest_tree(root), run.mode
        except StoreError as e:
            raise BuildError(f"{where}: after {command!r}: {e.message}", hint=e.hint) from e
    finally:
        store.remove_checkout(root)
        store.remove_checkout(work)


def _failure_message(
    where: str, command: str, returncode: int, output: bytes, status: str | None = None
) -> str:
    status = status or (
        f"was killed by signal {-returncode}"
        if returncode < 0
        else f"failed with exit code {returncode}"
    )
    lines = output.decode("utf-8", errors="replace").rstrip().splitlines()
    tail = lines[-_OUTPUT_TAIL_LINES:]
    text = f"{where}: command {status}: {command}"
    if not tail:
        return text + "\n  (no output)"
    if len(lines) > len(tail):
        text += f"\n  (last {len(tail)} of {len(lines)} lines of output)"
    return text + "".join(f"\n  | {line}" for line in tail)
