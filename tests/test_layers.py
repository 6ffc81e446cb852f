"""The layering rule: only hooks/, operators/ and the UI plugin import Airflow (the CLI only lazily); the engine is
usable without it.

The UI plugin is ``plugins/stopchurn.py`` (what Airflow loads) and ``plugins/app.py`` (its FastAPI app, imported by
the API server on the first request); ``plugins/page.py`` renders the page and stays Airflow-free.
"""

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


AIRFLOW_FOLDERS = ("hooks", "operators")
AIRFLOW_PLUGIN = ("plugins/stopchurn.py", "plugins/app.py")


def _may_import_airflow(path: Path) -> bool:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] in AIRFLOW_FOLDERS or relative.as_posix() in AIRFLOW_PLUGIN


AIRFLOW_FREE = sorted(
    _module(p)
    for p in PACKAGE.rglob("*.py")
    if not _may_import_airflow(p) and p.name not in ("__main__.py", "get_provider_info.py", "pytest_plugin.py")
)


def test_the_airflow_free_list_is_the_engine() -> None:
    for module in (
        "assets",
        "update.sync",
        "options",
        "update.plan",
        "update.deliver",
        "update.settle",
        "store",
        "store.lock",
        "update.diff",
        "encode.records",
        "api.client",
        "exceptions",
        "source.sql",
        "source.canonical",
        "api.contract",
        "plugins",
        "plugins.page",
        "events.engine",
        "export.engine",
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


#: modules that may import Airflow inside functions only (lazily, for an option that needs it), never at the top
LAZY_AIRFLOW = ("cli/airflow_connections.py", "cli/airflow_commands.py")


def _function_local_imports(tree: ast.AST) -> set[int]:
    """ids of the import statements that sit inside a function body."""
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            local |= {id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    return local


def test_the_plugin_files_exist() -> None:
    for name in AIRFLOW_PLUGIN:
        assert (PACKAGE / name).is_file(), name


def test_no_airflow_import_statement_outside_hooks_operators_and_the_plugin() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if _may_import_airflow(path):
            continue
        tree = ast.parse(path.read_text())
        allowed = _function_local_imports(tree) if path.relative_to(PACKAGE).as_posix() in LAZY_AIRFLOW else set()
        for node in ast.walk(tree):
            if id(node) in allowed:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "airflow" or n.startswith("airflow.")]
    assert offenders == []
