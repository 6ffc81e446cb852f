"""The sandbox's layout: one job per module, each small, the old import paths kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import airflow_provider_stopchurn.sandbox as sandbox_package
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

SANDBOX_FOLDER = Path(sandbox_package.__file__).resolve().parent
MAX_LINES = 500


@pytest.mark.parametrize("path", sorted(SANDBOX_FOLDER.glob("*.py")), ids=lambda p: p.name)
def test_sandbox_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"


def test_the_server_module_still_names_the_public_classes() -> None:
    from airflow_provider_stopchurn.sandbox import server

    assert server.SandboxServer is SandboxServer
    assert server.FaultConfig is FaultConfig
    assert sorted(server.__all__) == ["FaultConfig", "SandboxServer"]


def test_the_command_line_and_the_pytest_plugin_use_the_same_server() -> None:
    from airflow_provider_stopchurn.sandbox import __main__ as command_line
    from airflow_provider_stopchurn.sandbox import pytest_plugin

    assert command_line.SandboxServer is SandboxServer
    assert command_line.FaultConfig is FaultConfig
    assert pytest_plugin.SandboxServer is SandboxServer


def test_every_sandbox_module_imports_without_airflow() -> None:
    modules = sorted(f"{sandbox_package.__name__}.{path.stem}" for path in SANDBOX_FOLDER.glob("*.py"))
    modules = [name for name in modules if not name.endswith(("__init__", "pytest_plugin"))]
    code = (
        f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
