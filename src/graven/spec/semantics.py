"""Pass 3 of reading a spec: what the shape alone cannot say. Cross references (a
service's image and target, an image's base image), cycles of base images, port
clashes, copy sources and base layouts on disk, and registry references."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graven.errors import SpecProblem, UsageError
from graven.model import is_valid_name
from graven.spec.models import Spec
from graven.spec.recipe import base_kind, step_kind
from graven.spec.service import ServiceSpec
from graven.spec.yaml_tree import MISSING, KeyPath, YamlTree, key_path_text


def semantic_problems(tree: YamlTree, root: Path) -> list[SpecProblem]:
    data = tree.data if isinstance(tree.data, dict) else {}
    images = data.get("images")
    services = data.get("services")
    targets = data.get("targets", _default_targets())
    problems: list[SpecProblem] = []

    def add(path: KeyPath, message: str) -> None:
        line = tree.value_lines.get(path, tree.key_lines.get(path))
        problems.append(SpecProblem(tree.file, line, key_path_text(path), message))

    if isinstance(services, dict):
        ports: dict[int, str] = {}
        for name, service in services.items():
            if not isinstance(service, dict):
                continue
            here = ("services", name)
            if isinstance(images, dict | None):
                _check_reference(
                    add, (*here, "image"), service.get("image", MISSING), images, "image"
                )
            if isinstance(targets, dict):
                target = service.get("target", _default_service_target())
                _check_reference(add, (*here, "target"), target, targets, "target")
            port = service.get("port")
            if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
                if port in ports:
                    other = ports[port]
                    other_line = tree.value_lines.get(("services", other, "port"))
                    add(
                        (*here, "port"),
                        f"port {port} is already used by service {other!r}"
                        + (f" (line {other_line})" if other_line else "")
                        + "; each service needs its own port",
                    )
                else:
                    ports[port] = name

    if isinstance(images, dict):
        problems.extend(_base_problems(tree, images, root))
        for name, recipe in images.items():
            steps = recipe.get("steps") if isinstance(recipe, dict) else None
            if not isinstance(steps, list):
                continue
            for index, step in enumerate(steps):
                if step_kind(step) == "copy" and isinstance(step["copy"], str):
                    path = ("images", name, "steps", index, "copy")
                    message = _copy_source_problem(step["copy"], root)
                    if message:
                        problems.append(
                            SpecProblem(
                                tree.file,
                                tree.key_lines.get(path[:-1]),
                                key_path_text(path),
                                message,
                            )
                        )
    return problems


def _default_targets() -> dict[str, Any]:
    return dict.fromkeys(Spec.model_fields["targets"].get_default(call_default_factory=True))


def _default_service_target() -> str:
    return str(ServiceSpec.model_fields["target"].default)


def _check_reference(
    add: Callable[[KeyPath, str], None],
    path: KeyPath,
    name: Any,
    known: dict[str, Any] | None,
    what: str,
) -> None:
    if not isinstance(name, str):
        return  # missing or mistyped: pass 2 reports it
    names = list(known or {})
    if name in names:
        return
    message = f"unknown {what} {name!r}"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    elif names:
        message += f"; defined {what}s: {', '.join(names)}"
    else:
        message += f"; define it under '{what}s'"
    add(path, message)


def _copy_source_problem(source: str, root: Path) -> str | None:
    if not source or source.startswith("/") or "\x00" in source:
        return None  # pass 2 explains these
    if ".." in source.replace("\\", "/").split("/"):
        return None
    try:
        project = root.resolve()
        resolved = (root / source).resolve()
        if not resolved.is_relative_to(project):
            return (
                f"copy source {source!r} resolves to {resolved}, outside the project"
                f" directory {project}"
            )
        if not (root / source).exists():
            return f"copy source {source!r} does not exist in {root}"
    except (OSError, RuntimeError) as exc:
        # RuntimeError: a symlink loop, on Python versions that raise it.
        return f"copy source {source!r} cannot be read: {exc}"
    return None


def _base_problems(tree: YamlTree, images: dict[str, Any], root: Path) -> list[SpecProblem]:
    """Bases: a named image exists, bases form no cycle, a layout is a directory in the
    project, a registry reference parses (pass 2 has checked the shapes)."""
    problems: list[SpecProblem] = []

    def add(path: KeyPath, message: str) -> None:
        line = tree.value_lines.get(path, tree.key_lines.get(path))
        problems.append(SpecProblem(tree.file, line, key_path_text(path), message))

    edges: dict[str, str] = {}  # image -> the spec image it starts from
    for name, recipe in images.items():
        base = recipe.get("base") if isinstance(recipe, dict) else None
        if not isinstance(base, dict) or base_kind(base) is None:
            continue  # not a base pass 2 could read: it says why
        here = ("images", name, "base")
        image, layout, registry = base.get("image"), base.get("layout"), base.get("registry")
        if isinstance(image, str) and is_valid_name(image):
            if image in images:
                edges[name] = image
            else:
                add((*here, "image"), _unknown_base_text(image, list(images)))
        if isinstance(layout, str) and (message := _layout_problem(layout, root)):
            add((*here, "layout"), message)
        if isinstance(registry, str) and "@" in registry:
            from graven.reference import parse_reference  # only when a spec uses one

            try:
                parse_reference(registry)
            except UsageError as exc:
                add((*here, "registry"), exc.message)
    for cycle in _cycles(edges):
        lines = [tree.value_lines.get(("images", n, "base", "image")) for n in cycle]
        if len(cycle) == 1:
            message = f"image {cycle[0]!r} cannot be its own base"
        else:
            where = ", ".join(f"{n} on line {line}" for n, line in zip(cycle, lines, strict=True))
            message = (
                f"base images form a cycle: {' -> '.join([*cycle, cycle[0]])} (bases of {where});"
                " one of them must start from something else"
            )
        add(("images", cycle[0], "base", "image"), message)
    return problems


def _unknown_base_text(image: str, names: list[str]) -> str:
    message = f"unknown image {image!r}"
    close = difflib.get_close_matches(image, names, n=1, cutoff=0.6)
    if close:
        return f"{message} (did you mean {close[0]!r}?)"
    return (
        f"{message}: a base image is one under 'images'"
        + (f" ({', '.join(names)})" if names else "")
        + ", or one in the store pinned by digest, {image: NAME@sha256:...}"
    )


def _cycles(edges: dict[str, str]) -> list[list[str]]:
    """The cycles of a graph where each node has at most one successor, each listed
    once, from its node that comes first in ``edges``."""
    order = {name: i for i, name in enumerate(edges)}
    done: set[str] = set()
    cycles: list[list[str]] = []
    for start in edges:
        walk: list[str] = []
        node: str | None = start
        while node is not None and node not in done and node not in walk:
            walk.append(node)
            node = edges.get(node)
        if node is not None and node in walk:
            cycle = walk[walk.index(node) :]
            first = min(range(len(cycle)), key=lambda i: order[cycle[i]])
            cycles.append(cycle[first:] + cycle[:first])
        done.update(walk)
    return cycles


def _layout_problem(layout: str, root: Path) -> str | None:
    if not layout or layout.startswith("/") or "\x00" in layout:
        return None  # pass 2 explains these
    if ".." in layout.replace("\\", "/").split("/"):
        return None
    try:
        project = root.resolve()
        resolved = (root / layout).resolve()
        if not resolved.is_relative_to(project):
            return (
                f"layout {layout!r} resolves to {resolved}, outside the project directory {project}"
            )
        if not resolved.exists():
            return f"layout {layout!r} does not exist in {root}"
        if not resolved.is_dir():
            return f"layout {layout!r} is not a directory: a base is an OCI image layout directory"
        if not (resolved / "index.json").is_file():
            return f"layout {layout!r} has no index.json: is it an OCI image layout directory?"
    except (OSError, RuntimeError) as exc:
        return f"layout {layout!r} cannot be read: {exc}"
    return None
