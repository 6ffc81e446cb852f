"""The layering rule: only hooks/ and operators/ import Airflow; the engine is usable without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "airflow_provider_stopchurn"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("airflow_provider_stopchurn", *parts))


AIRFLOW_FREE = sorted(
    _module(p)
    for p in PACKAGE.rglob("*.py")
    if p.relative_to(PACKAGE).parts[0] not in ("hooks", "operators")
    and p.name not in ("__main__.py", "get_provider_info.py", "pytest_plugin.py")
)


def test_the_airflow_free_list_is_the_engine() -> None:
    for module in (
        "assets",
        "sync",
        "options",
        "plan",
        "deliver",
        "settle",
        "snapshot",
        "snapshot.lock",
        "diff",
        "encoding",
        "client",
        "exceptions",
        "sources",
        "contract",
    ):
        assert f"airflow_provider_stopchurn.{module}" in AIRFLOW_FREE


@pytest.mark.parametrize("module", AIRFLOW_FREE)
def test_module_imports_without_airflow(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "leaked = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "assert not leaked, leaked\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_no_airflow_import_statement_outside_hooks_and_operators() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("hooks", "operators"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "airflow" or n.startswith("airflow.")]
    assert offenders == []
