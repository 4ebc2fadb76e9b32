"""Pass 1 of reading a spec: bytes to text, text to plain data that remembers the line
of every key and value.

The file is composed into PyYAML nodes (which carry line numbers) and turned into plain
data by hand. Here duplicate keys, non-text keys, exotic tags and recursive aliases are
rejected; anchors, aliases and ``<<`` merge keys work as usual; and hostile input (an
alias bomb, absurd nesting) is refused within fixed bounds before it costs memory.

One YAML 1.1 trap is defused on purpose: where the spec always wants text (env
values, commands, paths) a plain scalar keeps its literal spelling, so
``VERSION: 1.10`` stays ``"1.10"`` (not ``"1.1"``) and ``COUNTRY: NO`` stays ``"NO"``
(not ``"false"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graven.errors import SpecError, SpecProblem
from graven.spec.inputs import MAX_SPEC_BYTES, FileTooLarge, NotARegularFile, read_regular_file
from graven.spec.locate import INIT_HINT, SPEC_FILENAME

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


def _quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- pass 0: bytes -> text ---------------------------------------------------------------


def read_text(path: Path, file: str) -> str:
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
class YamlTree:
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
    def from_text(cls, text: str, file: str) -> YamlTree:
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
            line, here, f"keys must be text, got {show(value)}; quote the key to mean the text"
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


# --- reading the data back ----------------------------------------------------------------


MISSING = object()  # what ``raw_at`` finds where the data has nothing


def raw_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        found = (isinstance(data, dict) and isinstance(part, str) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        )
        if not found:
            return MISSING
        data = data[part]
    return data


def show(value: Any) -> str:
    """How a YAML value reads back to its author."""
    if value is None or value is MISSING:
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
