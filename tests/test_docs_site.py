"""The documentation site builds strictly, its operator reference names every argument, and the README's links
into it resolve.

The reference of each operator is generated from its docstring by mkdocstrings: an argument its ``:param:`` list
drops would be missing from the built page's parameter table, and this test names it. The build runs with
``--strict``, as ``make docs`` and CI do, so a broken link or anchor, a page outside the nav or a docstring
mkdocstrings cannot read fails here too.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_stopchurn import __version__
from airflow_provider_stopchurn.operators.stopchurn import (
    StopChurnEventOperator,
    StopChurnHistoricalExportOperator,
    StopChurnUpdateOperator,
)

ROOT = Path(__file__).resolve().parent.parent
#: each operator's reference page, as mkdocs builds it (docs/<page>.md -> <site>/<page>/index.html)
PAGES = {
    StopChurnUpdateOperator: "update-operator",
    StopChurnEventOperator: "event-operator",
    StopChurnHistoricalExportOperator: "export-operator",
}
# a row of the parameter table mkdocstrings renders from the docstring's `:param name:` fields
_PARAMETER_ROW = re.compile(r'<tr class="doc-section-item">\s*<td>\s*<code>([A-Za-z_][A-Za-z0-9_]*)</code>')
# [text](target) in Markdown, the target up to a space, a closing parenthesis or an anchor
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def _arguments(operator: type) -> list[str]:
    parameters = inspect.signature(operator.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed in this environment (it is in the dev set: requirements-dev.lock)")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    return out


def test_the_site_builds_with_warnings_as_errors(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "invariants" / "index.html").is_file()  # docs/invariants.md is in the nav
    design = (site / "design" / "index.html").read_text()
    assert 'class="mermaid"' in design  # the data-flow diagram is rendered by mermaid, not shown as code


@pytest.mark.parametrize(
    "operator",
    [
        StopChurnUpdateOperator,
        StopChurnEventOperator,
        StopChurnHistoricalExportOperator,
    ],
    ids=lambda op: op.__name__,
)
def test_the_generated_reference_names_every_argument(site: Path, operator: type) -> None:
    page = (site / PAGES[operator] / "index.html").read_text()
    documented = set(_PARAMETER_ROW.findall(page))
    missing = [name for name in _arguments(operator) if name not in documented]
    assert documented, f"no parameter table in the {PAGES[operator]} page"
    assert not missing, f"{operator.__name__} arguments the generated reference lacks: {missing}"


def test_the_readmes_links_into_the_repository_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    targets = [t for t in _LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]
    assert any(t.startswith("docs/") for t in targets)  # the README links into the documentation
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_the_install_page_installs_this_versions_wheel() -> None:
    """docs/install.md repeats the README's install lines and Dockerfile (tests/test_dist.py checks the README's):
    both name the wheel `make dist` builds for this version."""
    wheel = f"airflow_provider_stopchurn-{__version__}-py3-none-any.whl"
    text = (ROOT / "docs" / "install.md").read_text()
    assert f"WHEEL=dist/{wheel}" in text
    assert f"COPY --chown=airflow:root dist/{wheel} /tmp/" in text
    assert f'"/tmp/{wheel}[postgres]"' in text
