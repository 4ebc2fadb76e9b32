"""A service's environment as deploy sends it: plain values and secrets, resolved.

Three sources make a value a secret (see docs/guide.md, "Secrets"):

- ``env_file: PATH`` (or a list): dotenv-style ``KEY=VALUE`` lines, relative to
  graven.yaml; every key it sets is a secret;
- ``${VAR}`` inside an ``env`` value: taken from the environment of the ``graven``
  command that deploys (``$${`` is a literal ``${``);
- ``{secret_file: PATH}`` as an ``env`` value: the file's content, one trailing newline
  dropped.

Resolution happens in the CLI, at ``plan`` and ``deploy`` time; the controller keeps
the values in its secrets store and records only references (``<secret sha256:…>``).
Every problem names the file and line (and key path) it comes from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from graven.errors import SpecError, SpecProblem
from graven.spec.inputs import FileTooLarge, NotARegularFile, read_regular_file

# A secret is text in a process environment: bounded, and a file bigger than this is
# more likely the wrong file than a secret.
MAX_SECRET_FILE = 64 * 1024
MAX_ENV_FILE = 1024 * 1024

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REF_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_DOUBLE_QUOTED_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


@dataclass(frozen=True)
class EnvFileEntry:
    key: str
    value: str
    line: int


@dataclass(frozen=True)
class ServiceEnv:
    """``plain`` values go into the release as they are; ``secret`` ones never do."""

    plain: dict[str, str] = field(default_factory=dict)
    secret: dict[str, str] = field(default_factory=dict)


def _file_problem(shown: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{shown} does not exist"
    if isinstance(exc, PermissionError):
        return f"cannot read {shown}: permission denied"
    if isinstance(exc, NotARegularFile | FileTooLarge):
        return str(exc)
    return f"cannot read {shown}: {exc.strerror or exc}"


def parse_env_file(text: str, file: str) -> list[EnvFileEntry]:
    """``KEY=VALUE`` lines: ``#`` comments and blank lines skipped, an optional
    ``export`` prefix, values bare (an unquoted `` #`` starts a comment), in single
    quotes (taken as written) or in double quotes (``\\n \\t \\" \\\\`` escapes).

    Raises ``SpecError`` naming ``file:line`` for every line it cannot read."""
    entries: list[EnvFileEntry] = []
    problems: list[SpecProblem] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[len("export") :].lstrip()
        key, sep, rest = line.partition("=")
        key = key.rstrip()
        if not sep:
            # The line is not echoed: it may well be a secret missing its "KEY=".
            problems.append(SpecProblem(file, number, "", "expected KEY=VALUE, found no '='"))
            continue
        if not _KEY_RE.fullmatch(key):
            problems.append(
                SpecProblem(
                    file,
                    number,
                    "",
                    f"{_excerpt(key)} is not an environment variable name (letters, digits"
                    " and '_', not starting with a digit)",
                )
            )
            continue
        try:
            value = _value(rest.lstrip())
        except ValueError as exc:
            problems.append(SpecProblem(file, number, key, str(exc)))
            continue
        if "\0" in value:
            problems.append(SpecProblem(file, number, key, "a value cannot contain a NUL byte"))
            continue
        if key in seen:
            problems.append(
                SpecProblem(file, number, key, f"set twice (first on line {seen[key]})")
            )
            continue
        seen[key] = number
        entries.append(EnvFileEntry(key, value, number))
    if problems:
        raise SpecError(problems, hint="Fix the env file; each line is KEY=VALUE.")
    return entries


def _excerpt(text: str) -> str:
    # A key is a name, but on a mistyped line it may be part of a value: show it cut short.
    return repr(text[:20] + ("…" if len(text) > 20 else ""))


def _value(rest: str) -> str:
    if rest[:1] == "'":
        end = rest.find("'", 1)
        if end < 0:
            raise ValueError("the single-quoted value has no closing quote")
        _only_comment_after(rest[end + 1 :])
        return rest[1:end]
    if rest[:1] == '"':
        out: list[str] = []
        i = 1
        while i < len(rest):
            ch = rest[i]
            if ch == "\\" and i + 1 < len(rest):
                nxt = rest[i + 1]
                out.append(_DOUBLE_QUOTED_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            if ch == '"':
                _only_comment_after(rest[i + 1 :])
                return "".join(out)
            out.append(ch)
            i += 1
        raise ValueError("the double-quoted value has no closing quote")
    value = rest
    for marker in (" #", "\t#"):
        cut = value.find(marker)
        if cut >= 0:
            value = value[:cut]
    return value.rstrip()


def _only_comment_after(tail: str) -> None:
    tail = tail.strip()
    if tail and not tail.startswith("#"):
        raise ValueError("unexpected text after the closing quote")


def interpolate(template: str, environ: Mapping[str, str]) -> tuple[str, list[str], list[str]]:
    """``template`` with each ``${VAR}`` replaced from ``environ`` (``$${`` -> ``${``).

    Returns (value, names used, problems); a value that used any name is a secret."""
    used: list[str] = []
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$${":
            return "${"
        name = match.group(1)
        if name is None:
            problems.append("'${' has no closing '}' (write '$${' for a literal '${')")
            return text
        if not _KEY_RE.fullmatch(name):
            problems.append(f"${{{name}}} is not a variable name (letters, digits and '_')")
            return text
        if name not in environ:
            problems.append(
                f"${{{name}}} is not set in the environment of this command;"
                f" export {name} before running graven"
            )
            return text
        used.append(name)
        return environ[name]

    return _REF_RE.sub(replace, template), used, problems


def resolve_service_env(
    service: str,
    env: Mapping[str, object],
    env_files: list[str],
    root: Path,
    spec_file: str,
    line_of: Mapping[str, int],
    environ: Mapping[str, str],
) -> ServiceEnv:
    """Resolve one service's ``env`` and ``env_file`` into plain and secret values.

    ``env`` maps names to text (``${VAR}`` allowed) or to an object with a
    ``secret_file`` attribute; ``line_of`` maps key paths to graven.yaml lines.
    Raises ``SpecError`` with every problem found."""
    problems: list[SpecProblem] = []
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    from_files: dict[str, str] = {}  # key -> "FILE:LINE" that set it

    def spec_problem(key_path: str, message: str) -> None:
        problems.append(SpecProblem(spec_file, line_of.get(key_path), key_path, message))

    for index, name in enumerate(env_files):
        key_path = f"services.{service}.env_file" + (f"[{index}]" if len(env_files) > 1 else "")
        path = root / name
        try:
            data = read_regular_file(path, MAX_ENV_FILE)
        except OSError as exc:
            spec_problem(key_path, _file_problem(str(path), exc))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            spec_problem(key_path, f"{path} is not UTF-8 text")
            continue
        try:
            entries = parse_env_file(text, str(path))
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        for entry in entries:
            # A later file overrides an earlier one, as with Compose.
            secret[entry.key] = entry.value
            from_files[entry.key] = f"{path}:{entry.line}"

    for key, raw in env.items():
        key_path = f"services.{service}.env.{key}"
        if key in from_files:
            spec_problem(key_path, f"also set by env_file ({from_files[key]}); set it in one place")
            continue
        secret_file = getattr(raw, "secret_file", None)
        if isinstance(secret_file, str):
            path = root / secret_file
            try:
                data = read_regular_file(path, MAX_SECRET_FILE)
            except OSError as exc:
                spec_problem(f"{key_path}.secret_file", _file_problem(str(path), exc))
                continue
            try:
                value = data.decode("utf-8")
            except UnicodeDecodeError:
                spec_problem(f"{key_path}.secret_file", f"{path} is not UTF-8 text")
                continue
            value = value.removesuffix("\n").removesuffix("\r")
            if "\0" in value:
                spec_problem(f"{key_path}.secret_file", f"{path} contains a NUL byte")
                continue
            secret[key] = value
            continue
        if not isinstance(raw, str):
            spec_problem(key_path, "expected text or {secret_file: PATH}")
            continue
        if "${" not in raw:
            plain[key] = raw
            continue
        value, used, found = interpolate(raw, environ)
        for message in found:
            spec_problem(key_path, message)
        if found:
            continue
        if "\0" in value:
            spec_problem(key_path, "the value from the environment contains a NUL byte")
        elif used:
            secret[key] = value
        else:
            plain[key] = value  # only '$${' escapes: no secret in it
    if problems:
        raise SpecError(
            problems,
            hint="Secrets are read when plan or deploy runs: export the variables named and "
            "fix the files, then run the command again.",
        )
    return ServiceEnv(plain=plain, secret=secret)
