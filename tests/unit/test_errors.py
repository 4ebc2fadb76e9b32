"""The exception tree drawn in graven.errors is the one that exists: every GravenError
subclass anywhere in graven is in the drawing, under its real base class; and broken
invariants surface as InternalError, never as a builtin exception."""

from __future__ import annotations

import importlib
import pkgutil
import re

import click
import pytest

import graven
from graven import errors
from graven.cli.context import app_context
from graven.errors import GravenError, InternalError, UsageError

_NODE_RE = re.compile(r"^    (?P<indent>(?:│   |    )*)(?:├── |└── )?(?P<name>[A-Z][A-Za-z]+)\b")


def drawn_tree() -> dict[str, str | None]:
    """Each class of the docstring's drawing, mapped to the class drawn above it."""
    assert errors.__doc__ is not None
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in errors.__doc__.splitlines():
        m = _NODE_RE.match(line)
        if m is None or not line.strip().startswith(("GravenError", "├", "└", "│")):
            continue
        depth = len(m.group("indent")) // 4 + (0 if m.group("name") == "GravenError" else 1)
        del path[depth:]
        parents[m.group("name")] = path[-1] if path else None
        path.append(m.group("name"))
    return parents


def graven_errors() -> dict[str, type[GravenError]]:
    """Every GravenError subclass defined in graven, by name."""
    for module in pkgutil.walk_packages(graven.__path__, "graven."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: dict[str, type[GravenError]] = {}
    todo: list[type[GravenError]] = [GravenError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("graven."):
            assert cls.__name__ not in found, f"two error classes named {cls.__name__}"
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_the_drawing_holds_every_error_under_its_base() -> None:
    tree = drawn_tree()
    classes = graven_errors()
    assert tree["GravenError"] is None
    assert sorted(tree) == sorted(classes), "the tree in graven.errors is out of date"
    for name, cls in classes.items():
        if cls is not GravenError:
            assert tree[name] == cls.__mro__[1].__name__, f"{name} is drawn under the wrong base"


def test_usage_errors_exit_2_and_the_others_1() -> None:
    for cls in graven_errors().values():
        assert cls.exit_code == (2 if issubclass(cls, UsageError) else 1), cls


def test_a_context_without_graven_s_root_is_a_broken_invariant() -> None:
    with pytest.raises(InternalError, match="did not set up its context") as info:
        app_context(click.Context(click.Command("orphan")))
    assert info.value.hint is not None and "please report" in info.value.hint
