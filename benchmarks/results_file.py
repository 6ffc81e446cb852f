"""Results files: a regenerated report keeps the dated sections written into the file it replaces, and the scale
table is appended as one dated section per run."""

from __future__ import annotations

import re
from pathlib import Path

#: a section someone wrote into a results file by hand (findings, before/after of a change): ``## 2026-12-07 ...``
DATED = re.compile(r"^## \d{4}-\d{2}-\d{2}\b")


def dated_sections(text: str) -> list[str]:
    """The dated sections of ``text``, each from its heading to the next heading of its level or above."""
    sections: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(("# ", "## ")):
            if current is not None:
                sections.append("\n".join(current).rstrip())
            current = [line] if DATED.match(line) else None
        elif current is not None:
            current.append(line)
    if current is not None:
        sections.append("\n".join(current).rstrip())
    return sections


def keep_dated_sections(old: str, new: str) -> str:
    """``new`` with the dated sections of ``old`` it lacks, placed before its first section (after the header that
    says how it was measured), in their order; a regenerated report does not erase what was written beside it."""
    kept = [s for s in dated_sections(old) if s not in new]
    if not kept:
        return new
    lines = new.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    head = "\n".join(lines[:at]).rstrip()
    tail = "\n".join(lines[at:])
    parts = [head, *kept] + ([tail] if tail else [])
    return "\n\n".join(parts).rstrip() + "\n"


def write_report(path: Path, text: str) -> None:
    """Write a regenerated report to ``path``, keeping the dated sections the file held."""
    old = path.read_text() if path.exists() else ""
    path.write_text(keep_dated_sections(old, text))


def append_section(path: Path, title: str, section: str) -> None:
    """Append ``section`` to ``path`` (created with ``title`` as its heading); earlier sections stay as they are."""
    old = path.read_text() if path.exists() else f"# {title}\n"
    path.write_text(old.rstrip() + "\n\n" + section.strip() + "\n")
