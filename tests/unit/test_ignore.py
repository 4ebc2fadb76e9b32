""".gravenignore: gitignore-like patterns deciding what a directory copy leaves out."""

from __future__ import annotations

from pathlib import Path

import pytest

from graven.build.ignore import IgnoreRules
from graven.store.cas import ContentStore

RULES = IgnoreRules.parse(
    """\
# build output and caches
*.pyc
__pycache__/
/build
**/node_modules
docs/*.md
!docs/keep.md
logs/**
a/**/z
*.log
!keep.log
\\#literal
\\!bang
[abc]x.txt
[!0-9]y.txt
"""
    + "trailing\\ \n"  # an escaped trailing space is kept
)


@pytest.mark.parametrize(
    ("path", "is_dir", "ignored"),
    [
        ("main.py", False, False),
        ("main.pyc", False, True),
        ("pkg/deep/mod.pyc", False, True),
        ("pkg/__pycache__", True, True),
        ("pkg/__pycache__", False, False),  # dir-only pattern, and this is a file
        ("build", True, True),
        ("build", False, True),
        ("src/build", True, False),  # anchored to the root
        ("node_modules", True, True),
        ("web/app/node_modules", True, True),
        ("docs/guide.md", False, True),
        ("docs/sub/guide.md", False, False),  # '*' stops at '/'
        ("docs/keep.md", False, False),  # re-included
        ("logs", True, False),  # 'logs/**' is what is inside
        ("logs/a/b.txt", False, True),
        ("a/z", False, True),
        ("a/b/c/z", False, True),
        ("b/a/z", False, False),
        ("server.log", False, True),
        ("keep.log", False, False),
        ("#literal", False, True),
        ("!bang", False, True),
        ("trailing ", False, True),
        ("bx.txt", False, True),
        ("dx.txt", False, False),
        ("ay.txt", False, True),
        ("5y.txt", False, False),
        (".git", True, True),  # always
        ("sub/.graven", True, True),  # always
    ],
)
def test_patterns(path: str, is_dir: bool, ignored: bool) -> None:
    assert RULES.matches(path, is_dir=is_dir) is ignored


def test_nothing_inside_an_ignored_directory_comes_back() -> None:
    rules = IgnoreRules.parse("/build\n!build/keep.txt\n")
    assert rules.ignored("build/keep.txt", is_dir=False)
    assert not rules.matches("build/keep.txt", is_dir=False)  # by its own name it would
    assert rules.ignored("build/x/y", is_dir=False)
    assert not rules.ignored("src/build.txt", is_dir=False)


def test_comments_blanks_and_lone_negations_are_no_rules() -> None:
    rules = IgnoreRules.parse("\n# comment\n   \n!\n/\n")
    assert rules.rules == ()
    assert not rules.matches("anything", is_dir=False)


def test_rules_remember_their_line() -> None:
    rules = IgnoreRules.parse("# head\n\n*.tmp\n!a.tmp\n")
    assert [(r.line, r.pattern, r.negated) for r in rules.rules] == [
        (3, "*.tmp", False),
        (4, "!a.tmp", True),
    ]


def test_an_unclosed_class_is_a_literal() -> None:
    rules = IgnoreRules.parse("[ab\n")
    assert rules.matches("[ab", is_dir=False)
    assert not rules.matches("a", is_dir=False)


def test_a_class_never_matches_a_slash() -> None:
    rules = IgnoreRules.parse("a[!x]b\n")
    assert rules.matches("acb", is_dir=False)
    assert not rules.matches("a/b", is_dir=False)


def test_ingest_leaves_out_what_the_rules_match(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "pkg" / "__pycache__" / "m.cpython.pyc").write_bytes(b"x")
    (src / "pkg" / "m.py").write_text("m")
    (src / "pkg" / "m.pyc").write_bytes(b"x")
    (src / "keep.txt").write_text("k")
    (src / "link").symlink_to("pkg")  # a symlink to a directory is not a directory
    rules = IgnoreRules.parse("*.pyc\n__pycache__/\nlink/\n")
    store = ContentStore(tmp_path / "store")
    seen: list[tuple[str, bool]] = []

    def ignore(path: Path, is_dir: bool) -> bool:
        relative = path.relative_to(src).as_posix()
        seen.append((relative, is_dir))
        return rules.matches(relative, is_dir=is_dir)

    entry = store.ingest(src, ignore=ignore)

    assert entry.digest is not None
    assert store.lookup(entry.digest, "/pkg/m.py") is not None
    assert store.lookup(entry.digest, "/keep.txt") is not None
    assert store.lookup(entry.digest, "/link") is not None
    assert store.lookup(entry.digest, "/pkg/m.pyc") is None
    assert store.lookup(entry.digest, "/pkg/__pycache__") is None
    assert ("pkg/__pycache__", True) in seen
    assert ("link", False) in seen
    assert not any(p.startswith("pkg/__pycache__/") for p, _ in seen)  # never looked into
