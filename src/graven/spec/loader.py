"""Read ``graven.yaml`` into a validated ``Spec``, or explain every problem precisely.

This is the edge where untrusted text becomes trusted data, in three passes:

1. **YAML.** The file is composed into PyYAML nodes (which carry line numbers) and
   turned into plain data by hand, recording the line of every key and value. Here
   duplicate keys, non-text keys, exotic tags and recursive aliases are rejected.
   Anchors, aliases and ``<<`` merge keys work as usual.
2. **Shape.** pydantic validates the data against ``graven.spec.models``; each of its
   errors becomes a ``SpecProblem`` with the key path and line, worded as expected vs
   got, with a did-you-mean for misspelt keys.
3. **Meaning.** Cross references (a service's image and target, an image's base
   image), cycles of base images, port clashes, copy sources and base layouts on disk,
   and registry references are checked.

All problems from all passes are reported at once, sorted by line, so one run of
``graven check`` shows everything to fix.

One YAML 1.1 trap is defused on purpose: where the spec always wants text (env
values, commands, paths) a plain scalar keeps its literal spelling, so
``VERSION: 1.10`` stays ``"1.10"`` (not ``"1.1"``) and ``COUNTRY: NO`` stays ``"NO"``
(not ``"false"``).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from graven.errors import SpecError, SpecProblem, UsageError
from graven.model import is_valid_name
from graven.spec.inputs import MAX_SPEC_BYTES, FileTooLarge, NotARegularFile, read_regular_file
from graven.spec.locate import INIT_HINT, SPEC_FILENAME
from graven.spec.models import (
    BASE_KIND_ERROR,
    BASE_KINDS,
    DAY,
    EXTENSION_PREFIX,
    STEP_KIND_ERROR,
    STEP_KINDS,
    Recipe,
    ServiceSpec,
    Spec,
    base_kind,
    duration_text,
    parse_duration,
    parse_pause,
    step_kind,
)

try:
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]


# A spec is a page of YAML; these bounds only stop hostile input (a huge file, an
# alias bomb, absurd nesting) from exhausting memory or the stack. MAX_SPEC_BYTES
# (in graven.spec.inputs) applies before parsing.
MAX_VALUES = 100_000
MAX_DEPTH = 64

KeyPath = tuple[str | int, ...]
_Entry = tuple[yaml.Node, yaml.Node]  # a mapping's key node and value node

_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _TAG + "merge"
_CONSTRUCTED_TAGS = {_TAG + t for t in ("null", "bool", "int", "float", "str")}
# Nothing in a spec is a date, and '=' (the YAML 'value' type) means nothing here:
# both stay as the text that was written.
_LITERAL_TAGS = {_TAG + "timestamp", _TAG + "value"}

# Places where the spec always wants text ('*' any key, '#' any list index).
_TEXT_SLOTS: tuple[tuple[str, ...], ...] = (
    ("services", "*", "env", "*"),
    ("services", "*", "env", "*", "secret_file"),
    ("services", "*", "env_file"),
    ("services", "*", "env_file", "#"),
    ("images", "*", "steps", "#", "env", "*"),
    ("images", "*", "steps", "#", "run"),
    ("images", "*", "steps", "#", "copy"),
    ("images", "*", "steps", "#", "to"),
    ("images", "*", "steps", "#", "workdir"),
    ("images", "*", "steps", "#", "entrypoint"),
    ("images", "*", "steps", "#", "entrypoint", "#"),
    ("services", "*", "health", "command"),
    ("services", "*", "health", "command", "#"),
    ("images", "*", "steps", "#", "cmd"),
    ("images", "*", "steps", "#", "cmd", "#"),
    ("images", "*", "steps", "#", "user"),
    ("images", "*", "steps", "#", "label", "*"),
    ("images", "*", "base", "image"),
    ("images", "*", "base", "layout"),
    ("images", "*", "base", "ref"),
    ("images", "*", "base", "registry"),
)

_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and where it came from.

    ``lines`` maps key paths (``services.web.port``, ``images.web.steps[0]``) to the
    line that defines them, so later stages (build, deploy) can point at the file too.
    """

    spec: Spec
    path: Path
    root: Path
    lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def line_of(self, key_path: str) -> int | None:
        """The line defining ``key_path``, or None if the file does not spell it out."""
        return self.lines.get(key_path)


def load_spec(path: Path) -> LoadedSpec:
    """Read, validate and cross-check the spec at ``path``.

    Raises ``SpecError`` listing every problem found, each with line and key path.
    """
    file = str(path)
    absolute = path.absolute()
    text = _read_text(path, file)
    tree = _YamlTree.from_text(text, file)
    if not isinstance(tree.data, dict):  # unreadable YAML, or not a mapping at all
        raise SpecError(_sorted(tree.problems))

    problems = list(tree.problems)
    spec: Spec | None = None
    later: list[SpecProblem] = []
    try:
        spec = Spec.model_validate(tree.data)
    except ValidationError as exc:
        later.extend(_ErrorTranslator(tree).problem(err) for err in exc.errors())
    later.extend(_semantic_problems(tree, absolute.parent))
    # A later pass would trip over what an earlier one reported (a value dropped for
    # its YAML tag is then the wrong type; a copy source rejected by the model is
    # then not found): keep the first word on each key.
    reported = {key_path_text(path) for path in tree.dropped}
    for problem in later:
        if problem.key_path not in reported:
            reported.add(problem.key_path)
            problems.append(problem)
    if problems or spec is None:
        raise SpecError(_sorted(problems))
    lines = {key_path_text(k): line for k, line in tree.key_lines.items()}
    return LoadedSpec(spec=spec, path=absolute, root=absolute.parent, lines=lines)


def key_path_text(path: KeyPath) -> str:
    """``('images', 'web', 'steps', 2, 'copy')`` -> ``images.web.steps[2].copy``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY_RE.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{_quote(part)}]"
    return out


# --- pass 0: bytes -> text ---------------------------------------------------------------


def _read_text(path: Path, file: str) -> str:
    def fail(message: str, line: int | None = None, hint: str | None = None) -> SpecError:
        return SpecError([SpecProblem(file, line, "", message)], hint=hint)

    try:
        # Before any parsing: a FIFO or device is refused without blocking, and a huge
        # file without reading more than the limit.
        data = read_regular_file(path, MAX_SPEC_BYTES)
    except FileNotFoundError:
        raise fail("file not found", hint=INIT_HINT) from None
    except (IsADirectoryError, NotARegularFile) as exc:
        kind = exc.kind if isinstance(exc, NotARegularFile) else "a directory"
        raise fail(
            f"is {kind}, not a spec file; graven reads the spec from a regular file",
            hint=f"Pass the path of a YAML file (such as {SPEC_FILENAME}) with -f.",
        ) from None
    except FileTooLarge:
        raise fail(
            f"file is larger than {MAX_SPEC_BYTES // (1024 * 1024)} MiB; is it a spec?"
        ) from None
    except PermissionError:
        raise fail("cannot read the file: permission denied") from None
    except OSError as exc:
        raise fail(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        # utf-8-sig: editors on Windows like to prepend a byte-order mark.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise fail(
            f"file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded;"
            " save the file as UTF-8",
            line,
        ) from None


# --- pass 1: text -> plain data with lines ----------------------------------------------


class _TooBig(Exception):
    """Unwinds the node walk once the value budget is spent."""


@dataclass
class _YamlTree:
    """Plain data built from YAML, with the line of every key and value."""

    file: str
    data: Any = None
    root_line: int = 1
    last_line: int = 1
    key_lines: dict[KeyPath, int] = field(default_factory=dict)
    value_lines: dict[KeyPath, int] = field(default_factory=dict)
    problems: list[SpecProblem] = field(default_factory=list)
    dropped: set[KeyPath] = field(default_factory=set)  # values replaced by None
    # YAML 1.1 booleans spelt otherwise than true/false (yes, off, ...), as written.
    spellings: dict[KeyPath, str] = field(default_factory=dict)
    _budget: int = MAX_VALUES
    _merged: dict[int, tuple[list[_Entry], list[_Entry]]] = field(default_factory=dict)
    _constructor: yaml.constructor.SafeConstructor = field(
        default_factory=yaml.constructor.SafeConstructor
    )

    @classmethod
    def from_text(cls, text: str, file: str) -> _YamlTree:
        tree = cls(file, last_line=max(1, len(text.splitlines())))
        root = tree._compose(text)
        if tree.problems:
            return tree
        if root is None:
            tree._problem(
                1, (), "the file is empty; expected a mapping with 'images' and 'services'"
            )
            return tree
        tree.root_line = root.start_mark.line + 1
        if not isinstance(root, yaml.MappingNode):
            what = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            tree._problem(
                tree.root_line,
                (),
                f"expected a mapping with 'images' and 'services' at the top level, got {what}",
            )
            return tree
        try:
            tree.data = tree._value(root, (), frozenset())
        except _TooBig:
            tree._problem(tree.root_line, (), _too_many_values_text(through_aliases=True))
        return tree

    def _compose(self, text: str) -> yaml.Node | None:
        try:
            # Composing is recursive (libyaml's composer crashes the process on a few
            # thousand nested brackets) and builds a node per value (a few megabytes of
            # '[1,1,1,...' make millions), so nesting and values are measured on the
            # flat event stream first, which is dropped as it goes.
            if self._too_much(yaml.parse(text, Loader=_YamlLoader)):
                return None
            return yaml.compose(text, Loader=_YamlLoader)
        except yaml.composer.ComposerError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            if exc.context and "single document" in exc.context:
                message = "invalid YAML: a spec is a single document; remove the '---' line"
            else:
                message = f"invalid YAML: {exc.problem or exc.context}"
            self._problem(line, (), message)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = f"invalid YAML: {exc.problem or exc.context or 'syntax error'}"
            if exc.problem and exc.context:
                message += f" ({exc.context}"
                if exc.context_mark is not None and exc.context_mark is not mark:
                    message += f" starting on line {exc.context_mark.line + 1}"
                message += ")"
            self._problem(mark.line + 1 if mark is not None else None, (), message)
        except yaml.reader.ReaderError as exc:
            # libyaml reports a byte offset, the pure reader a character offset: find
            # the character itself instead (its first occurrence is the offender).
            char = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
            at = text.find(char)
            line = text.count("\n", 0, at) + 1 if at >= 0 else None
            self._problem(
                line,
                (),
                f"invalid YAML: character U+{ord(char[:1] or ' '):04X} is not allowed"
                f" ({exc.reason})",
            )
        except yaml.YAMLError as exc:
            self._problem(None, (), f"invalid YAML: {exc}")
        return None

    def _too_much(self, events: Iterable[yaml.Event]) -> bool:
        """Report (and say True) when the events nest deeper than ``MAX_DEPTH`` or hold
        more than ``MAX_VALUES`` values; stops reading at the first excess."""
        # One entry per open collection: -1 for a list, else how many keys and values
        # of the mapping came so far (even: the next node is a key, not a value).
        open_collections: list[int] = []
        values = 0
        for event in events:
            if isinstance(event, yaml.CollectionEndEvent):
                open_collections.pop()
                continue
            if not isinstance(event, yaml.NodeEvent):
                continue  # stream and document events
            is_key = (
                bool(open_collections)
                and open_collections[-1] >= 0
                and (open_collections[-1] % 2 == 0)
            )
            if open_collections and open_collections[-1] >= 0:
                open_collections[-1] += 1
            mark = event.start_mark
            line = mark.line + 1 if mark is not None else None
            if not is_key:
                values += 1
                if values > MAX_VALUES:
                    self._problem(line, (), _too_many_values_text())
                    return True
            if isinstance(event, yaml.CollectionStartEvent):
                open_collections.append(0 if isinstance(event, yaml.MappingStartEvent) else -1)
                if len(open_collections) > MAX_DEPTH:
                    self._problem(line, (), f"nested deeper than {MAX_DEPTH} levels")
                    return True
        return False

    def _problem(self, line: int | None, path: KeyPath, message: str) -> None:
        if line is not None:
            # At end of input YAML marks point one line past the last: say the last.
            line = max(1, min(line, self.last_line))
        self.problems.append(SpecProblem(self.file, line, key_path_text(path), message))

    def _drop(self, line: int, path: KeyPath, message: str) -> None:
        """Report a value that cannot be read; it stands as None from here on."""
        self._problem(line, path, message)
        self.dropped.add(path)

    def _value(self, node: yaml.Node, path: KeyPath, ancestors: frozenset[int]) -> Any:
        self._budget -= 1
        if self._budget < 0:
            raise _TooBig
        line = node.start_mark.line + 1
        self.value_lines.setdefault(path, line)
        if id(node) in ancestors:
            return self._drop(line, path, "an alias refers to a collection containing itself")
        if len(path) > MAX_DEPTH:
            return self._drop(line, path, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                return self._drop(line, path, f"unsupported YAML tag {_short_tag(node.tag)}")
            items = []
            for index, item in enumerate(node.value):
                self.key_lines.setdefault((*path, index), item.start_mark.line + 1)
                items.append(self._value(item, (*path, index), inner))
            return items
        if isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                return self._drop(line, path, f"unsupported YAML tag {_short_tag(node.tag)}")
            return self._mapping(node, path, inner)
        return self._drop(line, path, f"unsupported YAML node {type(node).__name__}")

    def _mapping(
        self, node: yaml.MappingNode, path: KeyPath, ancestors: frozenset[int]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        explicit, merged = self._entries(node, path, ancestors)
        for key_node, value_node in explicit:
            key = self._key(key_node, path)
            if key is None:
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                self._problem(
                    line,
                    (*path, key),
                    f"duplicate key {key!r} (first defined on line {first_line[key]});"
                    " remove one of them",
                )
                continue
            first_line[key] = line
            self.key_lines[(*path, key)] = line
            out[key] = self._value(value_node, (*path, key), ancestors)
        # Merged keys fill in what the mapping does not set itself; among several
        # merged mappings the first wins, as YAML specifies.
        for key_node, value_node in merged:
            key = self._key(key_node, path)
            if key is None or key in out:
                continue
            self.key_lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = self._value(value_node, (*path, key), ancestors)
        return out

    def _entries(
        self, node: yaml.MappingNode, path: KeyPath, ancestors: frozenset[int]
    ) -> tuple[list[_Entry], list[_Entry]]:
        """Own entries and, separately, entries brought in through ``<<`` merge keys."""
        # Computed once per mapping node: anchors merged into anchors merged into
        # anchors would otherwise take exponential time (a merge bomb).
        cached = self._merged.get(id(node))
        if cached is not None:
            return cached
        explicit: list[_Entry] = []
        merged: list[_Entry] = []
        seen: set[int] = set()  # key nodes already merged
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                explicit.append((key_node, value_node))
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for source in sources:
                line = source.start_mark.line + 1
                if not isinstance(source, yaml.MappingNode):
                    self._problem(line, path, "'<<' merges a mapping or a list of mappings")
                elif id(source) in ancestors or source is node:
                    self._problem(line, path, "'<<' merges a mapping containing itself")
                else:
                    own, inherited = self._entries(source, path, ancestors | {id(node)})
                    for entry in own + inherited:
                        if id(entry[0]) not in seen:
                            seen.add(id(entry[0]))
                            merged.append(entry)
        self._merged[id(node)] = (explicit, merged)
        return explicit, merged

    def _key(self, node: yaml.Node, path: KeyPath) -> str | None:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.ScalarNode):
            self._problem(line, path, "keys must be text, got a mapping or list")
            return None
        # Read as if in the key's own place, so keys of text maps (env) stay text too.
        here = (*path, str(node.value))
        value = self._scalar(node, here)
        if isinstance(value, str):
            return value
        self._problem(
            line, here, f"keys must be text, got {_show(value)}; quote the key to mean the text"
        )
        return None

    def _scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        tag = node.tag
        line = node.start_mark.line + 1
        if tag in _LITERAL_TAGS:
            return node.value
        if tag not in _CONSTRUCTED_TAGS:
            return self._drop(line, path, f"unsupported YAML tag {_short_tag(tag)}")
        if tag not in (_TAG + "str", _TAG + "null") and _is_text_slot(path):
            return node.value
        try:
            value = self._constructor.construct_object(node)
        except (ValueError, KeyError, IndexError, yaml.YAMLError):
            # Only an explicit tag on a value that does not fit it gets here (!!int x).
            return self._drop(line, path, f"{node.value!r} is not a valid {_short_tag(tag)}")
        if isinstance(value, bool) and node.value not in ("true", "false"):
            self.spellings[path] = node.value
        return value


def _too_many_values_text(*, through_aliases: bool = False) -> str:
    how = "expands to" if through_aliases else "holds"
    why = " (through aliases?)" if through_aliases else ""
    return f"the spec {how} more than {MAX_VALUES} values{why}; a spec this large is not supported"


def _short_tag(tag: str) -> str:
    """``tag:yaml.org,2002:int`` -> ``!!int``, as the user would write it."""
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _is_text_slot(path: KeyPath) -> bool:
    for pattern in _TEXT_SLOTS:
        if len(pattern) == len(path) and all(
            (p == "#" and isinstance(k, int)) or (p == "*" and isinstance(k, str)) or (p == k)
            for p, k in zip(pattern, path, strict=True)
        ):
            return True
    return False


# --- pass 2: pydantic errors -> problems -------------------------------------------------


_MISSING = object()


@dataclass
class _ErrorTranslator:
    """Turns one pydantic error into a located, plainly worded ``SpecProblem``."""

    tree: _YamlTree

    def problem(self, err: ErrorDetails) -> SpecProblem:
        path, on_key = self._path(err["loc"])
        value = _raw_at(self.tree.data, path)
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
            got = err.get("input") if value is _MISSING else value
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
        shown = _show(got)
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


def _raw_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        found = (isinstance(data, dict) and isinstance(part, str) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        )
        if not found:
            return _MISSING
        data = data[part]
    return data


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
                kind = base_kind(_raw_at(data, path[: depth + 1]))
                annotation = BASE_KINDS.get(kind or "", info.annotation)
            else:
                annotation = info.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif typing.get_origin(annotation) is list:
            annotation = _unwrap(typing.get_args(annotation)[0])
            if typing.get_origin(annotation) in (typing.Union, types.UnionType):
                # The step union: the step's own key says which model applies.
                kind = step_kind(_raw_at(data, path[: depth + 1]))
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
        return f"expected a step: a mapping with one of {kinds}; got {_show(got)}"
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
    expected = f"expected 'scratch' or a mapping with one of {kinds}"
    if isinstance(got, str):
        kind, colon, rest = got.partition(":")
        if colon and kind.strip() in BASE_KINDS and rest.strip():
            return (
                f"{expected}; got {_show(got)} (did you mean {{{kind.strip()}: {rest.strip()}}}?)"
            )
        return f"{expected}, such as {{image: NAME}}; got {_show(got)}"
    if not isinstance(got, dict):
        return f"{expected}; got {_show(got)}"
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


def _show(value: Any) -> str:
    """How a YAML value reads back to its author."""
    if value is None or value is _MISSING:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _count(value: Any) -> str:
    if isinstance(value, list | dict | str):
        return "none" if not value else str(len(value))
    return _show(value)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- pass 3: meaning ---------------------------------------------------------------------


def _semantic_problems(tree: _YamlTree, root: Path) -> list[SpecProblem]:
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
                    add, (*here, "image"), service.get("image", _MISSING), images, "image"
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


def _base_problems(tree: _YamlTree, images: dict[str, Any], root: Path) -> list[SpecProblem]:
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


def _sorted(problems: list[SpecProblem]) -> list[SpecProblem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line is None, p.line or 0, p.key_path))
