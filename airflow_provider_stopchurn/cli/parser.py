"""The command line, declared once for ``stopchurn`` and ``airflow stopchurn``."""

from __future__ import annotations

import argparse

from airflow_provider_stopchurn.cli._common import _EPILOG, ArgSpec


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --- the command line, declared once for ``stopchurn`` and ``airflow stopchurn`` ------------------------------
_TABLE: tuple[ArgSpec, ...] = (
    (("uri",), {"metavar": "URI", "help": "the snapshot_uri: a local path, file://..., or s3://, gs://, ..."}),
    (("--brand",), {"required": True, "type": int, "metavar": "B", "help": "the StopChurn brand id"}),
    (("--table",), {"required": True, "metavar": "T", "help": "the StopChurn table name"}),
    (
        ("--conn-id",),
        {"metavar": "ID", "help": "the Airflow connection of the object store (the operator's snapshot_conn_id)"},
    ),
    (("--json",), {"action": "store_true", "help": "print one JSON document instead of text"}),
)
_YES: ArgSpec = (("-y", "--yes"), {"action": "store_true", "help": "change the store without asking"})


def _columns(flag: str, help_text: str) -> ArgSpec:
    """An option naming a column, given once per column (``--key a --key b``)."""
    return ((flag,), {"action": "append", "metavar": "COL", "help": help_text})


COMMANDS: dict[str, tuple[str, tuple[ArgSpec, ...]]] = {
    "status": (
        "Show the committed snapshot, a pending plan, the lock and quarantined rows of a table.",
        _TABLE,
    ),
    "history": (
        "Show the last runs, failed ones with their error's first line (newest first).",
        (
            *_TABLE,
            (("-n", "--limit"), {"type": _positive, "default": 20, "metavar": "N", "help": "how many runs (20)"}),
        ),
    ),
    "rejected": (
        "Show the rows StopChurn rejected, with its reasons (the newest quarantine file).",
        (
            *_TABLE,
            (("--export",), {"metavar": "FILE", "help": "also write them to FILE (.csv or .json)"}),
            (("--all",), {"action": "store_true", "help": "read every quarantine file, not only the newest"}),
        ),
    ),
    "unlock": (
        "Break the table's lock. Refused while its run is alive (a running process of this host, or a fresh "
        "heartbeat from any host), unless --force.",
        (
            *_TABLE,
            _YES,
            (("--force",), {"action": "store_true", "help": "break it even though its run is alive (see the warning)"}),
        ),
    ),
    "settle": (
        "Commit what StopChurn acknowledged of a pending plan and drop the rest (what a run does first).",
        (
            # --table or, for the event operator's ledger, --stream (URI is then the operator's state_uri)
            *(
                (flags, {**spec, "required": False}) if flags == ("--table",) else (flags, spec)
                for flags, spec in _TABLE
            ),
            (
                ("--stream",),
                {"metavar": "S", "help": "an event stream (the event operator's stream_id) instead of --table"},
            ),
            _YES,
        ),
    ),
    "rebaseline": (
        "Record a source as delivered without sending anything (after a manual reload in StopChurn).",
        (
            *_TABLE,
            _YES,
            (("--parquet",), {"metavar": "FILE", "help": "the table as a Parquet file"}),
            (("--sql",), {"metavar": "QUERY", "help": "the table as a SQL query on --sql-conn-id"}),
            (("--sql-conn-id",), {"metavar": "ID", "help": "the Airflow SQL connection of --sql"}),
            _columns("--key", "a key column, repeated for a composite key (default: the snapshot's, else id)"),
            (("--created-at-column",), {"metavar": "COL", "help": "as the operator's created_at_column"}),
            (("--decimal-as-string",), {"action": "store_true", "help": "as the operator's decimal_as_string"}),
            _columns(
                "--json-column", "a text column holding JSON, repeated for several (as the operator's json_columns)"
            ),
        ),
    ),
    "reconcile": (
        "Repair a table diffed in the warehouse (diff_location='warehouse') whose state table and snapshot store "
        "disagree: --adopt-state keeps the state table, --reset drops both.",
        (
            *_TABLE,
            _YES,
            (
                ("--sql-conn-id",),
                {"metavar": "ID", "help": "the Airflow connection of the warehouse (the operator's sql_conn_id)"},
            ),
            (("--duckdb",), {"metavar": "PATH", "help": "the warehouse is this DuckDB database file (no Airflow)"}),
            (
                ("--state-schema",),
                {
                    "default": "stopchurn_state",
                    "metavar": "SCHEMA",
                    "help": "the schema of the state tables (the operator's state_schema; stopchurn_state)",
                },
            ),
            _columns(
                "--key-columns",
                "a key column, repeated (or comma-separated) for a composite key (default: the state "
                "table's, else the store's, else id)",
            ),
            (
                ("--adopt-state",),
                {
                    "action": "store_true",
                    "help": "the state table is right (it holds what StopChurn was sent): the store takes its token",
                },
            ),
            (
                ("--reset",),
                {
                    "action": "store_true",
                    "help": "drop the state table and the store's record; the next run is a first load "
                    "(initial_load='baseline' records the source without sending)",
                },
            ),
        ),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stopchurn",
        description="Status and recovery of StopChurn snapshot stores (the operator's snapshot_uri).",
        epilog=_EPILOG,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (text, specs) in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text, epilog=_EPILOG)
        for flags, kwargs in specs:
            sub.add_argument(*flags, **kwargs)
    return parser
