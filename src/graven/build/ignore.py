"""``.gravenignore``: what a directory ``copy`` leaves out. Pure: text in, answers out.

The file sits at the project root (beside ``graven.yaml``) and reads like
``.gitignore``: one pattern a line, matched against paths relative to the project
root, the last matching pattern deciding::

    # comments and blank lines are skipped
    *.pyc             any file or directory of that name, at any depth
    __pycache__/      a trailing '/' matches directories only
    /build            a '/' at the start or in the middle anchors to the project root
    docs/*.md         '*' and '?' never match '/'; [a-z] and [!a-z] are classes
    **/node_modules   '**' matches any number of directories: '**/x', 'a/**/b', 'a/**'
    !keep.txt         '!' re-includes what an earlier pattern left out
    \\#file, \\!file  a backslash makes the next character literal

As in git, nothing inside an ignored directory can be re-included: the directory is
never looked into. ``.graven`` (the state dir) and ``.git`` are always left out,
whatever the file says.

Only what ``copy`` picks up from *inside* a directory is filtered: a source the spec
names itself (``copy: build/app.whl``) is copied even if a pattern matches it, since
the spec asked for it by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

IGNORE_FILE = ".gravenignore"
ALWAYS_IGNORED = frozenset({".graven", ".git"})


@dataclass(frozen=True)
class IgnoreRule:
    """One pattern of the ignore file (``line`` is where it was written, 1-based)."""

    pattern: str
    line: int
    negated: bool
    dir_only: bool
    regex: re.Pattern[str]

    def matches(self, path: str, *, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True)
class IgnoreRules:
    """The rules of one ignore file; ``IgnoreRules()`` ignores only the built-ins."""

    rules: tuple[IgnoreRule, ...] = ()

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        """Rules from the text of an ignore file. Every line means something; none is
        an error (as in git, an unclosed '[' is a literal)."""
        rules = []
        for number, raw in enumerate(text.splitlines(), start=1):
            rule = _parse_line(raw, number)
            if rule is not None:
                rules.append(rule)
        return cls(tuple(rules))

    def matches(self, path: str, *, is_dir: bool) -> bool:
        """Whether ``path`` (relative, '/'-separated) is left out by its own name,
        parents not considered: what a walk that skips ignored directories asks."""
        path = _normalize(path)
        if not path:
            return False
        if PurePosixPath(path).name in ALWAYS_IGNORED:
            return True
        ignored = False
        for rule in self.rules:
            if rule.negated == ignored and rule.matches(path, is_dir=is_dir):
                ignored = not rule.negated
        return ignored

    def ignored(self, path: str, *, is_dir: bool) -> bool:
        """Whether ``path`` is left out, itself or through an ignored parent directory."""
        parts = _normalize(path).split("/")
        for depth in range(1, len(parts)):
            if self.matches("/".join(parts[:depth]), is_dir=True):
                return True
        return self.matches(path, is_dir=is_dir)


def _normalize(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def _parse_line(raw: str, number: int) -> IgnoreRule | None:
    line = _strip_trailing_spaces(raw)
    if not line or line.startswith("#"):
        return None
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    dir_only = line.endswith("/")
    body = line.rstrip("/")
    # A '/' at the start or in the middle anchors the pattern to the project root;
    # without one it matches a name at any depth.
    anchored = "/" in body
    body = body.lstrip("/")
    if not body:
        return None  # '/' or '!' alone: nothing to match
    regex = _translate(body.split("/"))
    if not anchored:
        regex = "(?:.*/)?" + regex
    return IgnoreRule(raw.strip(), number, negated, dir_only, re.compile(regex, re.DOTALL))


def _strip_trailing_spaces(raw: str) -> str:
    line = raw.rstrip("\r\n")
    stripped = line.rstrip(" ")
    # An escaped space ('\ ') at the end stays.
    if len(stripped) < len(line) and stripped.endswith("\\") and not stripped.endswith("\\\\"):
        return stripped + " "
    return stripped


def _translate(segments: list[str]) -> str:
    """Regex for '/'-separated glob segments, '**' spanning directories."""
    out = ""
    separator = False
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        lead = "/" if separator else ""
        if segment == "**":
            if index == last:
                out += lead + ".*"  # 'a/**': everything inside a
            else:
                out += lead + "(?:.*/)?"  # '**/' : zero or more directories
                separator = False
                continue
        else:
            out += lead + _translate_segment(segment)
        separator = True
    return out


def _translate_segment(segment: str) -> str:
    out = []
    i = 0
    n = len(segment)
    while i < n:
        c = segment[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(segment[i + 1]))
            i += 2
        elif c == "*":
            while i < n and segment[i] == "*":
                i += 1  # '**' inside a name is an ordinary '*'
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            klass, i = _translate_class(segment, i)
            out.append(klass)
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _translate_class(segment: str, start: int) -> tuple[str, int]:
    """``[...]`` at ``start`` -> (regex class, index after it); a '[' that never closes
    is a literal '['."""
    i = start + 1
    negate = i < len(segment) and segment[i] in "!^"
    if negate:
        i += 1
    members = []
    first = True
    while i < len(segment):
        c = segment[i]
        if c == "]" and not first:
            break
        if c == "\\" and i + 1 < len(segment):
            members.append(re.escape(segment[i + 1]))
            i += 2
        else:
            members.append("-" if c == "-" else re.escape(c))
            i += 1
        first = False
    else:
        return re.escape("["), start + 1
    body = "".join(members)
    # Like fnmatch with FNM_PATHNAME: a class never matches '/'.
    return (f"(?!/)[^{body}]" if negate else f"(?!/)[{body}]"), i + 1
