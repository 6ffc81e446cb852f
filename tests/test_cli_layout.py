"""The ``stopchurn`` command's code is a package split by command group, each module short enough to read whole,
and every name users and Airflow reach through ``airflow_provider_stopchurn.cli`` is still there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from airflow_provider_stopchurn import cli

CLI = Path(cli.__file__).resolve().parent

#: the command groups: reading a store, repairing it, the warehouse diff, and the Airflow side
GROUPS = ("show", "repair", "warehouse", "airflow_commands", "airflow_connections")


def test_the_cli_is_a_package_with_one_module_per_command_group() -> None:
    assert Path(cli.__file__).name == "__init__.py"
    assert {name for name in GROUPS if (CLI / f"{name}.py").is_file()} == set(GROUPS)


def test_every_cli_module_is_at_most_500_lines() -> None:
    lengths = {path.name: len(path.read_text().splitlines()) for path in CLI.glob("*.py")}
    assert lengths
    assert {name: n for name, n in lengths.items() if n > 500} == {}


def test_the_public_names_stay_on_the_package() -> None:
    for name in (
        "main",
        "run",
        "build_parser",
        "COMMANDS",
        "OK",
        "ERROR",
        "USAGE",
        "UsageError",
        "CommandError",
        "Aborted",
        "store_root",
        "read_sql",
        "warehouse_of_connection",
        "airflow_cli_commands",
    ):
        assert hasattr(cli, name), name
    assert set(cli.COMMANDS) == {"status", "history", "rejected", "unlock", "settle", "rebaseline", "reconcile"}


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "airflow_provider_stopchurn.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "reconcile" in proc.stdout
