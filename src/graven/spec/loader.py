"""Read ``graven.yaml`` into a validated ``Spec``, or explain every problem precisely.

This is the edge where untrusted text becomes trusted data, in three passes:

1. **YAML** (``graven.spec.yaml_tree``): plain data with the line of every key and
   value; duplicate keys, non-text keys, exotic tags and recursive aliases rejected.
2. **Shape** (``graven.spec.problems``): pydantic validates the data against
   ``graven.spec.models``; each of its errors becomes a ``SpecProblem`` with the key
   path and line, worded as expected vs got.
3. **Meaning** (``graven.spec.semantics``): cross references, cycles of base images,
   port clashes, copy sources and base layouts on disk, registry references.

All problems from all passes are reported at once, sorted by line, so one run of
``graven check`` shows everything to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from graven.errors import SpecError, SpecProblem
from graven.spec.models import Spec
from graven.spec.problems import ErrorTranslator
from graven.spec.semantics import semantic_problems
from graven.spec.yaml_tree import YamlTree, key_path_text, read_text


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
    text = read_text(path, file)
    tree = YamlTree.from_text(text, file)
    if not isinstance(tree.data, dict):  # unreadable YAML, or not a mapping at all
        raise SpecError(_sorted(tree.problems))

    problems = list(tree.problems)
    spec: Spec | None = None
    later: list[SpecProblem] = []
    try:
        spec = Spec.model_validate(tree.data)
    except ValidationError as exc:
        later.extend(ErrorTranslator(tree).problem(err) for err in exc.errors())
    later.extend(semantic_problems(tree, absolute.parent))
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


def _sorted(problems: list[SpecProblem]) -> list[SpecProblem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line is None, p.line or 0, p.key_path))
