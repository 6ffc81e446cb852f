"""The documentation's reference names every argument of the three operators, so that it cannot drift from the code.

Each keyword argument of ``StopChurnUpdateOperator``, ``StopChurnEventOperator`` and
``StopChurnHistoricalExportOperator`` (their ``__init__``, less ``**kwargs``, which are BaseOperator's) must appear
in its operator's reference page (docs/update-operator.md, docs/event-operator.md, docs/export-operator.md) as
inline code, `` `name` ``. The README and every page of docs/ also speak Airflow 3.3's words for its UI.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from airflow_provider_stopchurn.operators.stopchurn import (
    StopChurnEventOperator,
    StopChurnHistoricalExportOperator,
    StopChurnUpdateOperator,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OPERATORS = [StopChurnUpdateOperator, StopChurnEventOperator, StopChurnHistoricalExportOperator]
#: each operator's reference page, with its argument table
REFERENCE = {
    StopChurnUpdateOperator: ROOT / "docs" / "update-operator.md",
    StopChurnEventOperator: ROOT / "docs" / "event-operator.md",
    StopChurnHistoricalExportOperator: ROOT / "docs" / "export-operator.md",
}
#: the README and the documentation site's pages
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _arguments(operator: type) -> list[str]:
    parameters = inspect.signature(operator.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


@pytest.mark.parametrize("operator", OPERATORS, ids=lambda op: op.__name__)
def test_every_operator_argument_is_in_its_reference_page(operator: type) -> None:
    text = REFERENCE[operator].read_text()
    missing = [name for name in _arguments(operator) if f"`{name}`" not in text]
    assert not missing, f"{operator.__name__} arguments the README does not name: {missing}"


def test_stopchurn_conn_id_is_documented_for_every_operator() -> None:
    text = REFERENCE[StopChurnUpdateOperator].read_text()
    assert all("stopchurn_conn_id" in _arguments(op) for op in OPERATORS)
    assert "| `stopchurn_conn_id` |" in text  # a row of the operator's argument table


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
@pytest.mark.parametrize("words", ["w/ config", "form's Test", "form's **Test**", "Test button"])
def test_the_readme_speaks_airflow_3_3(words: str, document: Path) -> None:
    """Airflow 3.3 has one Trigger button whose dialog shows Run Parameters; Test is an icon on the connections
    list."""
    assert words not in document.read_text()


def _prose_paragraphs(text: str) -> list[str]:
    """A page's paragraphs outside code blocks, tables and lists, whitespace folded; a paragraph right after a
    code block may go on with the sentence that introduced it."""
    prose, fenced, after_code = [], False, False
    for block in text.split("\n\n"):
        if block.count("```") % 2:
            fenced, after_code = not fenced, fenced
            continue
        skip = fenced or after_code or "```" in block
        after_code = block.rstrip().endswith("```")
        if skip or block.lstrip().startswith(("|", "-", "*", "#", "1.", "2.", "3.", "<")):
            continue
        prose.append(" ".join(block.split()))
    return prose


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_no_paragraph_is_a_leftover_half(document: Path) -> None:
    """A paragraph starts as a sentence does, and no sentence of a section is written twice."""
    for paragraph in _prose_paragraphs(document.read_text()):
        assert not paragraph[:1].islower(), paragraph[:120]
    for section in document.read_text().split("\n## "):
        sentences = [s.strip() for s in " ".join(section.split()).split(". ") if len(s.strip()) > 30]
        tails = [s.split(" ", 3)[-1] for s in sentences]  # "... checks that <sentence>" repeats a sentence too
        repeated = {t for t in tails if len(t) > 30 and tails.count(t) > 1}
        assert not repeated, repeated
