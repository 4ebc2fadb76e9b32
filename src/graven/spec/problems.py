"""Pass 2 of reading a spec: each pydantic validation error becomes a ``SpecProblem``
with the key path and line, worded as expected vs got, with a did-you-mean for
misspelt keys (the models' own constraints give the ranges and units)."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from graven.errors import SpecProblem
from graven.spec.fields import DAY, duration_text, parse_duration, parse_pause
from graven.spec.models import EXTENSION_PREFIX, Spec
from graven.spec.recipe import (
    BASE_KIND_ERROR,
    BASE_KINDS,
    STEP_KIND_ERROR,
    STEP_KINDS,
    Recipe,
    base_kind,
    step_kind,
)
from graven.spec.yaml_tree import MISSING, KeyPath, YamlTree, key_path_text, raw_at, show


@dataclass
class ErrorTranslator:
    """Turns one pydantic error into a located, plainly worded ``SpecProblem``."""

    tree: YamlTree

    def problem(self, err: ErrorDetails) -> SpecProblem:
        path, on_key = self._path(err["loc"])
        value = raw_at(self.tree.data, path)
        kind = err["type"]
        if kind == "missing":
            message = f"missing required key {path[-1]!r}"
            line = self._line(path[:-1], prefer_key=True)
        elif kind == "extra_forbidden":
            message = self._unknown_key(path)
            line = self._line(path, prefer_key=True)
        elif on_key:
            message = _value_error_text(err)
            line = self._line(path, prefer_key=True)
        else:
            got = err.get("input") if value is MISSING else value
            message = self._expected(err, path, got)
            scalar = not isinstance(value, dict | list)
            line = self._line(path, prefer_key=not scalar)
        return SpecProblem(self.tree.file, line, key_path_text(path), message)

    def _path(self, loc: tuple[int | str, ...]) -> tuple[KeyPath, bool]:
        path: list[str | int] = []
        parts = list(loc)
        while parts:
            part = parts.pop(0)
            if part == "[key]":
                return tuple(path), True
            path.append(part)
            # A tagged union puts the tag after the step index (or after 'base'); the
            # user never wrote it.
            if parts and parts[0] in _union_tags(path):
                parts.pop(0)
        return tuple(path), False

    def _line(self, path: KeyPath, *, prefer_key: bool) -> int | None:
        lines = self.tree
        while True:
            first, second = (
                (lines.key_lines, lines.value_lines)
                if prefer_key
                else (lines.value_lines, lines.key_lines)
            )
            for table in (first, second):
                if path in table:
                    return table[path]
            if not path:
                return self.tree.root_line
            path = path[:-1]

    def _unknown_key(self, path: KeyPath) -> str:
        key = str(path[-1])
        model = _model_at(path[:-1], self.tree.data)
        known = _keys_of(model) if model is not None else []
        if model is Spec:
            known = [k for k in known if not k.startswith(EXTENSION_PREFIX)]
        message = f"unknown key {key!r}"
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            return f"{message} (did you mean {close[0]!r}?)"
        if known:
            return f"{message}; expected one of: {', '.join(known)}"
        return message

    def _expected(self, err: ErrorDetails, path: KeyPath, got: Any) -> str:
        kind = err["type"]
        ctx = err.get("ctx") or {}
        info = _field_at(path, self.tree.data)
        shown = show(got)
        if isinstance(got, bool) and path in self.tree.spellings:
            # 'port: yes' reads as true in YAML 1.1: say both, or the message puzzles.
            shown = f"{self.tree.spellings[path]} (a YAML boolean)"
        if kind == STEP_KIND_ERROR:
            return _step_kind_text(got)
        if kind == BASE_KIND_ERROR:
            return _base_kind_text(got)
        number = _number_type(info) if info is not None else None
        if info is not None and number is int and _is_number_error(kind):
            return f"expected {_int_range_text(info)}, got {shown}"
        if info is not None and number is float and _is_number_error(kind):
            return f"expected {_float_range_text(info)}, got {shown}"
        if info is not None and _is_duration(info) and _is_number_error(kind):
            return f"expected {_duration_range_text(info)}, got {shown}"
        if kind == "value_error":
            return _value_error_text(err)
        if kind == "literal_error":
            return f"expected {ctx.get('expected', 'one of the allowed values')}, got {shown}"
        if kind in ("dict_type", "model_type", "model_attributes_type"):
            return f"expected a mapping, got {shown}"
        if kind == "list_type":
            return f"expected a list, got {shown}"
        if kind in ("string_type", "string_unicode"):
            return f"expected text, got {shown}"
        if kind == "string_too_short":
            return f"expected non-empty text, got {shown}"
        if kind == "string_pattern_mismatch":
            return f"expected text matching {ctx.get('pattern', '?')!r}, got {shown}"
        if kind == "too_short":
            least = ctx.get("min_length", 1)
            noun = "item" if least == 1 else "items"
            return f"expected at least {least} {noun}, got {_count(got)}"
        if kind in ("int_type", "int_parsing", "int_from_float"):
            return f"expected an integer, got {shown}"
        if kind in ("float_type", "float_parsing"):
            return f"expected a number, got {shown}"
        if kind in ("bool_type", "bool_parsing"):
            return f"expected true or false, got {shown}"
        return f"{_lower_first(err['msg'])}, got {shown}"


def _union_tags(path: list[str | int]) -> Mapping[str, object]:
    """The tags pydantic may put after ``path``: a step's kinds, a base's kinds."""
    if len(path) == 4 and path[0] == "images" and path[2] == "steps":
        return STEP_KINDS
    if len(path) == 3 and path[0] == "images" and path[2] == "base":
        return BASE_KINDS
    return {}


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _walk_types(path: KeyPath, data: Any) -> list[tuple[Any, FieldInfo | None]]:
    """The (type, field) reached by each part of ``path``, starting from ``Spec``.

    Shorter than ``path`` when the path leaves the models (an unknown key).
    """
    walked: list[tuple[Any, FieldInfo | None]] = []
    annotation: Any = Spec
    for depth, part in enumerate(path):
        annotation = _unwrap(annotation)
        info: FieldInfo | None = None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = _field_by_key(annotation, str(part))
            if info is None:
                break
            if annotation is Recipe and part == "base":
                # The base union: the base's own key says which model applies.
                kind = base_kind(raw_at(data, path[: depth + 1]))
                annotation = BASE_KINDS.get(kind or "", info.annotation)
            else:
                annotation = info.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif typing.get_origin(annotation) is list:
            annotation = _unwrap(typing.get_args(annotation)[0])
            if typing.get_origin(annotation) in (typing.Union, types.UnionType):
                # The step union: the step's own key says which model applies.
                kind = step_kind(raw_at(data, path[: depth + 1]))
                if kind is None:
                    break
                annotation = STEP_KINDS[kind]
        else:
            break
        walked.append((annotation, info))
    return walked


def _model_at(path: KeyPath, data: Any) -> type[BaseModel] | None:
    walked = _walk_types(path, data)
    if len(walked) != len(path):
        return None
    annotation = _unwrap(walked[-1][0]) if walked else Spec
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _field_at(path: KeyPath, data: Any) -> FieldInfo | None:
    walked = _walk_types(path, data)
    if not walked or len(walked) != len(path):
        return None
    return walked[-1][1]


def _field_by_key(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return info
    return None


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _metadata(info: FieldInfo) -> list[Any]:
    """The constraints and validators of a field, also those of the type inside an
    optional (``ShortDuration | None``)."""
    found = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        if typing.get_origin(arg) is typing.Annotated:
            found.extend(typing.get_args(arg)[1:])
    for meta in list(found):
        if isinstance(meta, FieldInfo):  # Field(le=...) inside Annotated
            found.extend(meta.metadata)
    return found


def _number_type(info: FieldInfo) -> type | None:
    """int or float for a field holding a plain number (or nothing), else None."""
    if _is_duration(info):
        return None
    annotation = _unwrap(info.annotation)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    numbers = [a for a in options if a is not type(None)]
    if len(numbers) == 1 and numbers[0] in (int, float):
        return typing.cast(type, numbers[0])
    return None


def _bounds(info: FieldInfo) -> tuple[Any, Any, Any, Any]:
    ge = gt = le = lt = None
    for meta in _metadata(info):
        ge = getattr(meta, "ge", ge)
        gt = getattr(meta, "gt", gt)
        le = getattr(meta, "le", le)
        lt = getattr(meta, "lt", lt)
    return ge, gt, le, lt


def _int_range_text(info: FieldInfo) -> str:
    ge, gt, le, lt = _bounds(info)
    low = ge if ge is not None else (gt + 1 if gt is not None else None)
    high = le if le is not None else (lt - 1 if lt is not None else None)
    if low is not None and high is not None:
        return f"an integer from {low} to {high}"
    if low is not None:
        return f"an integer of at least {low}"
    if high is not None:
        return f"an integer of at most {high}"
    return "an integer"


def _float_range_text(info: FieldInfo) -> str:
    ge, gt, le, lt = _bounds(info)
    low, high = (ge if ge is not None else gt), (le if le is not None else lt)
    if low is not None and high is not None:
        return f"a number from {low:g} to {high:g}"
    if low is not None:
        return f"a number of at least {low:g}"
    if high is not None:
        return f"a number of at most {high:g}"
    return "a number"


def _duration_range_text(info: FieldInfo) -> str:
    ge, gt, le, _ = _bounds(info)
    # Every duration of the spec has an upper bound, a day unless the field says less.
    most = f"at most {duration_text(le if le is not None else DAY)}"
    example = "(such as 2s or 500ms)"
    if gt is not None:
        text = f"a duration greater than {gt:g}s and {most} {example}"
    elif ge is not None and ge > 0:
        text = f"a duration of at least {ge:g}s and {most} {example}"
    else:
        text = f"a duration of {most} {example}"
    if any(getattr(meta, "func", None) is parse_pause for meta in _metadata(info)):
        text += ", or 'manual'"
    return text


def _is_duration(info: FieldInfo) -> bool:
    return any(
        getattr(meta, "func", None) in (parse_duration, parse_pause) for meta in _metadata(info)
    )


def _is_number_error(kind: str) -> bool:
    return kind.startswith(("int_", "float_", "greater_than", "less_than")) or kind in (
        "value_error",
        "finite_number",
    )


def _value_error_text(err: ErrorDetails) -> str:
    # pydantic prefixes our own ValueError messages; they are already worded for users.
    return err["msg"].removeprefix("Value error, ")


def _step_kind_text(got: Any) -> str:
    kinds = ", ".join(STEP_KINDS)
    if not isinstance(got, dict):
        return f"expected a step: a mapping with one of {kinds}; got {show(got)}"
    present = [k for k in got if k in STEP_KINDS]
    if len(present) > 1:
        both = " and ".join(repr(k) for k in present)
        return f"a step has exactly one kind, got {both}; split it into separate steps"
    message = f"expected a step with one of {kinds}"
    if not got:
        return f"{message}; got an empty mapping"
    message += f"; got {', '.join(repr(str(k)) for k in got)}"
    for key in got:
        close = difflib.get_close_matches(str(key), list(STEP_KINDS), n=1, cutoff=0.6)
        if close:
            return f"{message} (did you mean {close[0]!r}?)"
    return message


def _base_kind_text(got: Any) -> str:
    kinds = ", ".join(BASE_KINDS)
    expected = f"expected 'scratch', 'host-python' or a mapping with one of {kinds}"
    if isinstance(got, str):
        kind, colon, rest = got.partition(":")
        if colon and kind.strip() in BASE_KINDS and rest.strip():
            return f"{expected}; got {show(got)} (did you mean {{{kind.strip()}: {rest.strip()}}}?)"
        return f"{expected}, such as {{image: NAME}}; got {show(got)}"
    if not isinstance(got, dict):
        return f"{expected}; got {show(got)}"
    present = [k for k in got if k in BASE_KINDS]
    if len(present) > 1:
        both = " and ".join(repr(k) for k in present)
        return f"a base has exactly one of {kinds}, got {both}"
    if not got:
        return f"{expected}; got an empty mapping"
    message = f"{expected}; got {', '.join(repr(str(k)) for k in got)}"
    for key in got:
        close = difflib.get_close_matches(str(key), list(BASE_KINDS), n=1, cutoff=0.6)
        if close:
            return f"{message} (did you mean {close[0]!r}?)"
    return message


def _count(value: Any) -> str:
    if isinstance(value, list | dict | str):
        return "none" if not value else str(len(value))
    return show(value)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
