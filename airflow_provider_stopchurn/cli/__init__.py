"""``stopchurn``: the on-call commands for a snapshot store (also ``airflow stopchurn ...``).

::

    stopchurn status     URI --brand B --table T          committed snapshot, pending plan, lock, quarantine
    stopchurn history    URI --brand B --table T [-n N]   the last N runs, failed ones with their error
    stopchurn rejected   URI --brand B --table T [--export FILE.csv|FILE.json] [--all]
    stopchurn unlock     URI --brand B --table T [--force] [--yes]
    stopchurn settle     URI --brand B (--table T | --stream S) [--yes]
    stopchurn rebaseline URI --brand B --table T (--parquet FILE | --sql QUERY --sql-conn-id ID) [--key COL ...]
    stopchurn reconcile  URI --brand B --table T (--sql-conn-id ID | --duckdb PATH) (--adopt-state | --reset)
                         [--state-schema S] [--key-columns COL ...] [--yes]

``URI`` is the operator's ``snapshot_uri``: a local path, ``file://...``, or an object store URL (``s3://``,
``gs://``, ``memory://``, ...) read with universal_pathlib and the environment's credentials, or, with
``--conn-id``, through Airflow's ``ObjectStoragePath`` and that connection. Output is for people; ``--json``
prints one JSON document instead. A command that changes the store asks first, on a terminal, or needs
``--yes``. Exit codes: 0 done, 1 error (nothing changed unless the message says so), 2 usage.

This package imports no Airflow, and only the standard library at import time (Airflow imports it to list its
commands): the engine is imported when a command runs, and Airflow only for ``--conn-id``, ``--sql``,
``reconcile --sql-conn-id`` and :func:`airflow_cli_commands`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from airflow_provider_stopchurn.cli._common import (
    ERROR,
    OK,
    USAGE,
    Aborted,
    ArgSpec,
    CommandError,
    UsageError,
    store_root,
)
from airflow_provider_stopchurn.cli._run import run
from airflow_provider_stopchurn.cli.airflow_commands import airflow_cli_commands
from airflow_provider_stopchurn.cli.airflow_connections import read_sql, warehouse_of_connection
from airflow_provider_stopchurn.cli.parser import COMMANDS, build_parser

__all__ = [
    "COMMANDS",
    "ERROR",
    "OK",
    "USAGE",
    "Aborted",
    "ArgSpec",
    "CommandError",
    "UsageError",
    "airflow_cli_commands",
    "build_parser",
    "main",
    "read_sql",
    "run",
    "store_root",
    "warehouse_of_connection",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv`` without the program name) and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(stop.code or 0) if isinstance(stop.code, int | None) else USAGE
    logging.basicConfig(level=logging.WARNING, format="stopchurn: %(levelname)s: %(message)s", stream=sys.stderr)
    return run(args.command, args)
