"""docs/SECURITY.md and docs/FORMAT.md cite tests by name: every cited test must exist.

A claim whose test was renamed or deleted would silently lose its evidence;
this keeps the documents and the suite in step.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TESTS = Path(__file__).parent
DOCS = ["docs/SECURITY.md", "docs/FORMAT.md"]

# ``test_x.py::test_y`` anywhere, or a bare ``test_y`` after a ``test_x.py`` in the same
# parenthesis or table cell ("... (`test_x.py::test_y`, also `test_z`)").
CITATION = re.compile(r"(?:tests/)?(test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)")


def defined_tests(module: str) -> set[str]:
    tree = ast.parse((TESTS / module).read_text("utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def citations(doc: str) -> list[tuple[str, str]]:
    text = (ROOT / doc).read_text("utf-8")
    found = CITATION.findall(text)
    # Bare names in a cell or parenthesis that already cited a module: same module.
    for chunk in re.split(r"\n\||\)\.|\n\n", text):
        modules = re.findall(r"(test_[a-z0-9_]+\.py)", chunk)
        if len(set(modules)) == 1:
            for name in re.findall(r"`(test_[a-z0-9_]+)`", chunk):
                found.append((modules[0], name))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_test_exists(doc: str) -> None:
    cited = citations(doc)
    assert cited, f"{doc} cites no tests"
    missing = sorted({f"{m}::{t}" for m, t in cited if t not in defined_tests(m)})
    assert not missing, f"{doc} cites tests that do not exist: {missing}"


def test_format_doc_cites_the_vector_tests() -> None:
    text = (ROOT / "docs/FORMAT.md").read_text("utf-8")
    for name in sorted(defined_tests("test_format.py")):
        if name.startswith(("test_vector", "test_codec", "test_local_kms")):
            assert f"`{name}`" in text, f"docs/FORMAT.md does not mention {name}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_test_exists_somewhere(doc: str) -> None:
    everywhere = set().union(*(defined_tests(p.name) for p in TESTS.glob("test_*.py")))
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", (ROOT / doc).read_text("utf-8")))
    assert not named - everywhere, f"{doc} names unknown tests: {sorted(named - everywhere)}"
