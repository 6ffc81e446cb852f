"""docs/invariants.md names, for every engine, the tests that prove each invariant: every name must exist.

A renamed or removed test would otherwise leave the page pointing at nothing while it still reads as a proof.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "invariants.md"
ENGINES = ("Updates in the worker", "Updates inside the warehouse", "Events", "The historical export")
# `test_file.py` or `test_file.py::test_name[params]` inside backticks; `::name` alone continues the last file
_REF = re.compile(r"`(?:(test_[a-z0-9_]+\.py))?(?:::([A-Za-z0-9_]+))?(?:\[[^\]`]*\])?`")


def _defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def _references(text: str) -> list[tuple[str, str | None]]:
    refs: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        current: str | None = None
        for match in _REF.finditer(line):
            file, name = match.group(1), match.group(2)
            if file:
                current = file
            if current and (file or name):
                refs.append((current, name))
    return refs


def test_every_test_the_page_names_exists() -> None:
    refs = _references(DOC.read_text())
    assert len(refs) > 60  # the parser still reads the page
    missing = []
    for file, name in refs:
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif name and name not in _defined(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/invariants.md names tests that do not exist: {sorted(set(missing))}"


def test_every_engine_proves_all_six_invariants() -> None:
    text = DOC.read_text()
    sections = re.split(r"^### ", text, flags=re.MULTILINE)[1:]
    found = {section.splitlines()[0]: section for section in sections}
    for engine in ENGINES:
        section = next((body for title, body in found.items() if title.startswith(engine)), None)
        assert section is not None, f"no section for {engine}"
        rows = re.findall(r"^\| (\d) [a-z ]+\|(.*)\|$", section, flags=re.MULTILINE)
        assert [number for number, _ in rows] == ["1", "2", "3", "4", "5", "6"], engine
        for number, cell in rows:
            assert "`test_" in cell, f"{engine}: invariant {number} names no test"
