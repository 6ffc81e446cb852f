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

This module imports no Airflow, and only the standard library at import time (Airflow imports it to list its
commands): the engine is imported when a command runs, and Airflow only for ``--conn-id``, ``--sql``,
``reconcile --sql-conn-id`` and :func:`airflow_cli_commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

#: Exit codes.
OK, ERROR, USAGE = 0, 1, 2

ArgSpec = tuple[tuple[str, ...], dict[str, Any]]


class UsageError(Exception):
    """The command line cannot be acted on (exit code 2)."""


class CommandError(Exception):
    """The command cannot be done as asked (exit code 1)."""


class Aborted(Exception):
    """The person declined the confirmation (exit code 1; nothing changed)."""


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
            (
                ("--key",),
                {
                    "action": "append",
                    "metavar": "COL",
                    "help": "a key column, repeated for a composite key (default: the snapshot's, else id)",
                },
            ),
            (("--created-at-column",), {"metavar": "COL", "help": "as the operator's created_at_column"}),
            (("--decimal-as-string",), {"action": "store_true", "help": "as the operator's decimal_as_string"}),
            (
                ("--json-column",),
                {
                    "action": "append",
                    "metavar": "COL",
                    "help": "a text column holding JSON, repeated for several (as the operator's json_columns)",
                },
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
            (
                ("--key-columns",),
                {
                    "action": "append",
                    "metavar": "COL",
                    "help": "a key column, repeated (or comma-separated) for a composite key (default: the state "
                    "table's, else the store's, else id)",
                },
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

_EPILOG = "Exit codes: 0 done, 1 error (or declined), 2 usage."


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv`` without the program name) and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(stop.code or 0) if isinstance(stop.code, int | None) else USAGE
    logging.basicConfig(level=logging.WARNING, format="stopchurn: %(levelname)s: %(message)s", stream=sys.stderr)
    return run(args.command, args)


def run(command: str, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``command`` with parsed ``args``; one clear line on stderr for any error."""
    out = out if out is not None else sys.stdout
    try:
        with _logs_to_stderr():
            _HANDLERS[command](args, out)
    except UsageError as err:
        print(f"stopchurn {command}: {err}", file=sys.stderr)
        return USAGE
    except Aborted as err:
        print(f"stopchurn {command}: {err}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        print(f"stopchurn {command}: interrupted", file=sys.stderr)
        return ERROR
    except Exception as err:
        print(f"stopchurn {command}: error: {_one_line(err)}", file=sys.stderr)
        return ERROR
    return OK


@contextlib.contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """Keep stdout for the command's output (``--json`` is one document): logs go to stderr meanwhile.

    Airflow, once imported (``--conn-id``, ``--sql``, ``airflow stopchurn``), logs to stdout: its handlers that
    write there are pointed at stderr for the command, and one it sets up during the command finds stderr as
    ``sys.stdout``.
    """
    stdout = sys.stdout
    moved = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is stdout
    ]
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler in moved:
            handler.setStream(stdout)


def _one_line(err: BaseException) -> str:
    from airflow_provider_stopchurn.exceptions import StopChurnError

    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(err, StopChurnError | CommandError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --- the store -----------------------------------------------------------------------------------------------
def store_root(uri: str, conn_id: str | None = None) -> Any:
    """The snapshot root of ``uri``, as the operator resolves its ``snapshot_uri``.

    A path or ``file://`` URL is a local directory; another URL is a UPath, or with ``conn_id`` Airflow's
    ``ObjectStoragePath`` with that connection.
    """
    if not uri.strip():
        raise UsageError("URI is empty")
    if "://" not in uri:
        return Path(uri).expanduser()
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{uri!r} names a remote host; a file:// URL must be local (file:///path)")
        return Path(unquote(parts.path))
    if conn_id:
        return _object_storage_path(uri, conn_id)
    from upath import UPath

    return UPath(uri)


def _object_storage_path(uri: str, conn_id: str) -> Any:
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(uri, conn_id=conn_id)


def _store(args: argparse.Namespace, *, must_exist: bool = True) -> Any:
    from airflow_provider_stopchurn.snapshot import SnapshotStore

    if not args.table.strip():
        raise UsageError("--table is empty")
    store = SnapshotStore(store_root(args.uri, args.conn_id), args.brand, args.table)
    if must_exist and not store.backend.exists(""):
        raise CommandError(
            f"no StopChurn store for brand {args.brand} table {args.table!r} at {store.location} "
            "(check URI, --brand, --table and --conn-id)"
        )
    return store


def _confirm(args: argparse.Namespace, preview: str, question: str) -> None:
    """Go on with --yes, or after a "y" typed on a terminal; otherwise refuse (nothing changed)."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("changes the store: pass --yes, or run it on a terminal to confirm")
    # the preview and the question go to stderr, so --json output on stdout stays one document
    print(preview, file=sys.stderr)
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise Aborted("declined; nothing was changed")


def _emit_json(out: TextIO, data: Any) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


# --- text helpers --------------------------------------------------------------------------------------------
def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def _since(iso: Any) -> str:
    try:
        return _ago(time.time() - datetime.fromisoformat(str(iso)).timestamp())
    except (TypeError, ValueError):
        return "?"


def _size(n: Any) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _short_time(iso: Any) -> str:
    text = str(iso or "")
    return text[:19].replace("T", " ") if text else "?"


def _lock_text(lock: Mapping[str, Any] | None) -> str:
    if lock is None:
        return "free"
    if lock["state"] == "unreadable":
        return "a LOCK file that cannot be read (its writer died mid-write); the next run breaks it"
    state = {
        "alive": "its process is running on this host",
        "gone": "its process is gone from this host: the next run breaks it, or `stopchurn unlock`",
        "unknown": (
            f"on another host, alive: its heartbeat is fresh ({lock.get('heartbeat_age_s')} s ago)"
            if lock.get("heartbeat_fresh")
            else "on another host, its heartbeat stopped: dead or stalled"
        ),
    }.get(str(lock["state"]), str(lock["state"]))
    expiry = (
        f"expired at {lock['expires_at']}: the next run takes it over"
        if lock["expired"]
        else f"expires {lock['expires_at']}"
    )
    return (
        f"held by {lock['holder']!r} (host {lock['host']}, pid {lock['pid']}; {state}), acquired "
        f"{lock['acquired_at']} ({_ago(lock['age_s'])} ago), {expiry}"
    )


def _run_text(run: Mapping[str, Any]) -> str:
    text = (
        f"{run.get('kind')} {run.get('status')} at {run.get('finished_at')}: {run.get('inserted', 0)} inserted, "
        f"{run.get('updated', 0)} updated, {run.get('deleted', 0)} deleted, {run.get('rejected', 0)} rejected; "
        f"{run.get('chunks', 0)} chunks, {_size(run.get('bytes'))}, {run.get('duration_s', 0)}s"
    )
    if run.get("error"):
        text += f"\n              error: {run['error']}"
    return text


# --- commands ------------------------------------------------------------------------------------------------
def _status(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn import operate

    status = operate.table_status(_store(args))
    if args.json:
        _emit_json(out, status)
        return
    lines = [f"StopChurn brand {status['brand_id']} table {status['table_name']!r} at {status['location']}"]
    committed = status["committed"]
    if committed is None:
        lines.append("Committed:    nothing yet (the next run is a first load)")
    else:
        keys = committed["key_columns"]
        columns = ", ".join(
            f"{name} ({kind}{', key' if name in keys else ''})" for name, kind in committed["columns"].items()
        )
        lines += [
            f"Committed:    version {committed['version']}, {committed['rows']} rows, at "
            f"{committed['committed_at']} ({_since(committed['committed_at'])} ago)",
            f"Columns:      {columns}",
        ]
    plan = status["pending_plan"]
    if plan is None:
        lines.append("Pending plan: none")
    else:
        lines.append(
            f"Pending plan: {plan['plan_id']}, {plan['acknowledged_chunks']} of {plan['total_chunks']} chunks "
            f"acknowledged ({plan['updates']} updates, planned {plan['planned_at']}); the next run, or "
            "`stopchurn settle`, settles it"
        )
    lines.append(f"Lock:         {_lock_text(status['lock'])}")
    quarantine = status["quarantine"]
    if not quarantine["rows"]:
        lines.append("Quarantined:  0 rows")
    elif quarantine["current"]:
        lines.append(
            f"Quarantined:  {quarantine['rows']} rows rejected by the last committed plan {quarantine['plan_id']}; "
            "the next run sends them again (`stopchurn rejected` lists them)"
        )
    else:
        lines.append(
            f"Quarantined:  {quarantine['rows']} rows rejected by plan {quarantine['plan_id']}, before the last "
            "commit (`stopchurn rejected` lists them)"
        )
    last = status["last_run"]
    lines.append(f"Last run:     {_run_text(last) if last else 'none recorded'}")
    out.write("\n".join(lines) + "\n")


def _count(name: str) -> Callable[[Mapping[str, Any]], str]:
    """A count's cell: "-" when the record has none (another kind of run, or an older record)."""
    return lambda r: "-" if r.get(name) is None else str(r[name])


def _http_retries(r: Mapping[str, Any]) -> int:
    from airflow_provider_stopchurn.history import http_retries

    return http_retries(r)


def _try_text(r: Mapping[str, Any]) -> str:
    return "-" if r.get("try_number") is None else str(r["try_number"])


_HISTORY_COLUMNS: tuple[tuple[str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("finished (UTC)", lambda r: _short_time(r.get("finished_at"))),
    ("kind", lambda r: str(r.get("kind", ""))),
    ("status", lambda r: str(r.get("status", ""))),
    ("try", _try_text),
    ("ins", _count("inserted")),
    ("upd", _count("updated")),
    ("del", _count("deleted")),
    ("unch", _count("unchanged")),
    ("chunks", lambda r: str(r.get("chunks", 0))),
    ("settled", lambda r: str(r.get("settled_chunks") or 0)),
    ("bytes", lambda r: _size(r.get("bytes"))),
    ("req", lambda r: str(r.get("requests", 0))),
    ("http retries", lambda r: str(_http_retries(r))),
    ("rejected", _count("rejected")),
    ("duration", lambda r: f"{float(r.get('duration_s') or 0):.2f}s"),
    ("rows", lambda r: "" if r.get("rows") is None else str(r["rows"])),
    ("holder", lambda r: str(r.get("holder", ""))),
)


def _history_details(r: Mapping[str, Any]) -> list[str]:
    """The lines under a run's row: its error, what it left undone, an approved mass delete, its own counts."""
    lines = []
    if r.get("error"):
        lines.append(f"error: {r['error']}")
    if r.get("never_sent") or r.get("unacknowledged"):
        lines.append(
            f"not delivered: {r.get('unacknowledged') or 0} updates sent without an acknowledgement, "
            f"{r.get('never_sent') or 0} never sent (the next run sends them)"
        )
    approved = r.get("approved_deletes")
    if isinstance(approved, dict) and approved:
        lines.append(
            f"mass delete approved by run {approved.get('run_id')}: {approved.get('deletes')} of "
            f"{approved.get('rows_before')} rows"
        )
    if r.get("kind") == "events":
        lines.append(
            f"events: {r.get('events_sent') or 0} sent, {r.get('duplicates') or 0} duplicates, "
            f"{r.get('before_window') or 0} before the window, {r.get('held_future') or 0} held (future), "
            f"watermark {r.get('watermark') or '-'}, ledger {r.get('ledger_size') or 0} keys"
        )
    if r.get("kind") == "export":
        lines.append(
            f"export: {r.get('rows_exported') or 0} rows in {r.get('files') or 0} files, "
            f"{_size(r.get('bytes_exported'))}"
        )
    return lines


def _cell(show: Callable[[Mapping[str, Any]], Any], record: Mapping[str, Any], unreadable: Any = "?") -> Any:
    """``show(record)``, or ``unreadable`` when the record holds a field it cannot show (a record written by a
    newer version, or edited): one such record must not hide the rest of the history."""
    try:
        return show(record)
    except (TypeError, ValueError, AttributeError, KeyError):
        return unreadable


def _history(args: argparse.Namespace, out: TextIO) -> None:
    runs = _store(args).read_history(args.limit)
    if args.json:
        _emit_json(out, runs)
        return
    if not runs:
        out.write("No runs recorded yet (every run that ends is recorded, failed ones included).\n")
        return
    table = [[name for name, _ in _HISTORY_COLUMNS]] + [[_cell(cell, r) for _, cell in _HISTORY_COLUMNS] for r in runs]
    widths = [max(len(row[i]) for row in table) for i in range(len(_HISTORY_COLUMNS))]
    lines = []
    for index, row in enumerate(table):
        lines.append("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip())
        if index:
            lines += [f"    {line}" for line in _cell(_history_details, runs[index - 1], ["?"])]
    out.write("\n".join(lines) + "\n")


_EXPORT_COLUMNS = ("plan_id", "id", "reason", "position", "update")


def _export(rows: list[dict[str, Any]], target: str) -> None:
    suffix = Path(target).suffix.lower()
    if suffix == ".json":
        Path(target).write_text(json.dumps(rows, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    with Path(target).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(_EXPORT_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    json.dumps(row.get(c), default=str, ensure_ascii=False)
                    if c == "update"
                    else ("" if row.get(c) is None else row[c])
                    for c in _EXPORT_COLUMNS
                ]
            )


def _rejected(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn import operate

    if args.export and Path(args.export).suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--export {args.export!r}: give a file name ending in .csv or .json")
    rows = operate.rejected_rows(_store(args), all_files=args.all)
    if args.export:
        _export(rows, args.export)
    if args.json:
        _emit_json(out, {"count": len(rows), "rows": rows, "exported_to": args.export})
        return
    if not rows:
        out.write("No rejected rows.\n")
    else:
        which = "every quarantine file" if args.all else f"plan {rows[-1]['plan_id']}"
        lines = [f"{len(rows)} rows rejected by StopChurn ({which}):"]
        lines += [f"  id {row.get('id')!r}: {row.get('reason')}" for row in rows]
        out.write("\n".join(lines) + "\n")
    if args.export:
        out.write(f"Wrote {len(rows)} rows to {args.export}.\n")


def _unlock(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn import operate

    store = _store(args)
    lock = operate.lock_info(store.read_lock(), present=store.backend.exists("LOCK"))
    if lock is None:
        if args.json:
            _emit_json(out, {"unlocked": False, "lock": None})
        else:
            out.write(f"{store.brand_id}/{store.table_name} is not locked.\n")
        return
    live = lock["state"] == "alive" or bool(lock.get("heartbeat_fresh"))
    if lock["state"] == "alive" and not args.force:
        raise Aborted(
            f"refused: the lock holder {lock['holder']!r} (pid {lock['pid']}) is still running on this host; "
            "stop it first, or pass --force"
        )
    if live and not args.force:
        raise Aborted(operate.live_lock_refusal(store, lock))
    preview = f"Lock of {store.brand_id}/{store.table_name}: {_lock_text(lock)}"
    if live:
        preview += "\n" + operate.force_unlock_warning(lock)
        if args.yes:  # _confirm prints nothing then: the warning must still be said
            sys.stderr.write(preview + "\n")
    _confirm(args, preview, "Break this lock?")
    unlocked = operate.unlock(store, token=lock["token"], force=args.force)
    if args.json:
        _emit_json(out, {"unlocked": unlocked, "lock": lock})
    elif unlocked:
        out.write(f"Broke the lock of {store.brand_id}/{store.table_name} held by {lock['holder']!r}.\n")
    else:
        raise Aborted("the lock changed meanwhile (released, or taken by another run); nothing was removed")


def _refuse_warehouse_table(store: Any, command: str, repair: str) -> None:
    """``settle`` and ``rebaseline`` work on the worker diff's snapshot. A table diffed in the warehouse
    (``diff_location='warehouse'``) keeps its rows in the warehouse's state table: its pending plan is settled by
    its next run (a settle here would drop it unsettled), and ``stopchurn reconcile`` repairs it."""
    current = store.read_current() or {}
    plan = store.pending_plan(cleanup=False)
    if (current.get("state") or {}).get("diff_location") == "warehouse" or (
        plan is not None and plan.meta.get("diff_location") == "warehouse"
    ):
        raise CommandError(
            f"brand {store.brand_id} table {store.table_name!r} is diffed in the warehouse "
            f"(diff_location='warehouse'): `stopchurn {command}` does not apply to it; {repair}"
        )


def _settle(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn import events, operate

    if (args.table is None) == (args.stream is None):
        raise UsageError("give exactly one of --table T or --stream S (an event stream)")
    store = _settle_store(args)
    pending = store.pending_plan(cleanup=False)
    if args.stream is not None or (pending is not None and events.is_event_plan(pending.meta)):
        _settle_events(args, out, store)
        return
    _refuse_warehouse_table(store, "settle", "its next run settles the pending plan into the state table")
    plan = operate.preview_settle(store)
    if plan is None:
        if args.json:
            _emit_json(out, {"settled": False, "plan_id": None})
        else:
            out.write(f"No pending plan for {store.brand_id}/{store.table_name}: nothing to settle.\n")
        return
    _confirm(
        args,
        f"Pending plan {plan['plan_id']} of {store.brand_id}/{store.table_name}: {plan['acknowledged_chunks']} of "
        f"{plan['total_chunks']} chunks acknowledged. Settling commits those and drops the rest (the next run "
        "sends their rows again).",
        "Settle it?",
    )
    result = operate.settle_pending(store, holder=operate.operator_name("settle"))
    if args.json:
        _emit_json(out, result)
        return
    if not result["settled"]:
        out.write("The plan was finished meanwhile: nothing to settle.\n")
        return
    out.write(
        f"Settled plan {result['plan_id']}: {result['acknowledged_chunks']} of {result['total_chunks']} chunks "
        f"acknowledged ({result['inserted']} inserted, {result['updated']} updated, {result['deleted']} deleted, "
        f"{result['rejected']} rejected); the next run sends the rows of the other "
        f"{result['unacknowledged_chunks']} again. "
        + (
            f"Committed version {result['version']} ({result['rows']} rows).\n"
            if result["committed"]
            else "Nothing was acknowledged: the committed snapshot stays as it was.\n"
        )
    )


def _settle_store(args: argparse.Namespace) -> Any:
    """The store ``settle`` works on: a table's, or with ``--stream`` an event stream's under ``URI/events``."""
    if args.stream is None:
        return _store(args)
    from airflow_provider_stopchurn.events import event_store

    if not args.stream.strip():
        raise UsageError("--stream is empty")
    store = event_store(store_root(args.uri, args.conn_id), args.brand, args.stream)
    if not store.backend.exists(""):
        raise CommandError(
            f"no event ledger for brand {args.brand} stream {args.stream!r} at {store.location} "
            "(URI is the event operator's state_uri; check URI, --brand, --stream and --conn-id)"
        )
    return store


def _settle_events(args: argparse.Namespace, out: TextIO, store: Any) -> None:
    """``settle`` of an event plan: the acknowledged events join the ledger, the next run reads the rest again."""
    from airflow_provider_stopchurn import events, operate

    plan = operate.preview_settle(store)
    if plan is None:
        if args.json:
            _emit_json(out, {"settled": False, "plan_id": None})
        else:
            out.write(f"No pending event plan for {store.brand_id}/{store.table_name}: nothing to settle.\n")
        return
    _confirm(
        args,
        f"Pending event plan {plan['plan_id']} of {store.brand_id}/{store.table_name}: {plan['acknowledged_chunks']} "
        f"of {plan['total_chunks']} chunks acknowledged. Settling records those events as delivered and drops the "
        "rest (the next run reads the same window and sends them).",
        "Settle it?",
    )
    result = events.settle_pending_event_plan(store, holder=operate.operator_name("settle"))
    if args.json:
        _emit_json(out, {"settled": result is not None, **(dataclasses.asdict(result) if result else {})})
        return
    if result is None:
        out.write("The plan was finished meanwhile: nothing to settle.\n")
        return
    out.write(
        f"Settled event plan {result.plan_id}: {result.acknowledged_chunks} of {result.total_chunks} chunks "
        f"acknowledged ({result.recorded_events} events recorded in the ledger, never sent again); the next run "
        f"reads the same window and sends the other {result.unacknowledged_events} events the source still "
        "returns. "
        + (
            f"Committed the ledger ({result.ledger_keys} keys).\n"
            if result.committed
            else "Nothing was acknowledged: the ledger stays as it was.\n"
        )
    )


def read_sql(conn_id: str, sql: str) -> Any:
    """A SQL query's result as the engine's source: Arrow batches, read as the operator reads them."""
    from airflow_provider_stopchurn.operators._source import read_sql as read_connection

    return read_connection(conn_id, sql)


def _rebaseline_source(args: argparse.Namespace) -> tuple[Any, str]:
    if (args.parquet is None) == (args.sql is None):
        raise UsageError("give exactly one of --parquet FILE or --sql QUERY")
    if args.sql is not None:
        if not args.sql_conn_id:
            raise UsageError("--sql needs --sql-conn-id")
        return read_sql(args.sql_conn_id, args.sql), f"SQL on {args.sql_conn_id!r}"
    if args.sql_conn_id:
        raise UsageError("--sql-conn-id goes with --sql")
    import pandas as pd

    return pd.read_parquet(args.parquet), str(args.parquet)


def _rebaseline(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn import operate

    store = _store(args, must_exist=False)
    _refuse_warehouse_table(
        store, "rebaseline", "use `stopchurn reconcile --reset`, then a run with initial_load='baseline'"
    )
    frame, origin = _rebaseline_source(args)
    options = operate.rebaseline_options(
        store,
        args.key,
        created_at_column=args.created_at_column,
        decimal_as_string=args.decimal_as_string,
        json_columns=args.json_column or (),
        holder=operate.operator_name("rebaseline"),
    )
    canon = operate.canonical_source(frame, options)  # bad keys or values stop here, before any question
    preview = operate.preview_rebaseline(store, canon)
    change = preview["schema_change"]
    lines = [
        f"Rebaseline {store.brand_id}/{store.table_name} at {store.location} from {origin}: "
        f"{preview['rows']} rows, key {preview['key_columns']}, nothing is sent.",
        f"The committed snapshot ({preview['committed_rows']} rows) is replaced."
        if preview["committed_rows"] is not None
        else "No snapshot is committed yet.",
    ]
    if change:
        lines.append(f"Columns differ from the committed snapshot: {change}")
    if preview["pending_plan"] is not None:
        lines.append("A pending plan is settled first, as a run would.")
    _confirm(args, "\n".join(lines), "Record this source as what StopChurn holds?")
    result = operate.rebaseline(store, canon, options)
    if args.json:
        _emit_json(out, {**result, "source": origin})
        return
    out.write(
        f"Recorded {result['rows']} rows from {origin} as delivered to {store.brand_id}/{store.table_name}: "
        f"version {result['version']}; nothing was sent.\n"
    )


def warehouse_of_connection(conn_id: str) -> Any:
    """The warehouse of an Airflow connection, built as the operator builds it for ``diff_location='warehouse'``."""
    from airflow_provider_stopchurn.operators._warehouse import warehouse_for_connection

    return warehouse_for_connection(conn_id)


def _reconcile_warehouse(args: argparse.Namespace) -> tuple[Any, str]:
    if (args.sql_conn_id is None) == (args.duckdb is None):
        raise UsageError("give exactly one of --sql-conn-id ID or --duckdb PATH")
    if args.duckdb is not None:
        path = Path(args.duckdb).expanduser()
        if not path.is_file():  # DuckDB would create an empty database there
            raise CommandError(f"no DuckDB database at {str(path)!r}")
        from airflow_provider_stopchurn.pushdown import DuckDBWarehouse

        return DuckDBWarehouse(str(path)), f"DuckDB {str(path)!r}"
    return warehouse_of_connection(args.sql_conn_id), f"connection {args.sql_conn_id!r}"


def _key_columns(given: Sequence[str] | None, found: Sequence[str] | None) -> tuple[str, ...]:
    if given:
        keys = tuple(k.strip() for part in given for k in part.split(",") if k.strip())
        if not keys:
            raise UsageError("--key-columns names no column")
        return keys
    return tuple(found) if found else ("id",)


def _reconcile(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn import operate
    from airflow_provider_stopchurn.operators.commit_guard import record_key
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.pushdown import WarehouseSource, reconcile
    from airflow_provider_stopchurn.pushdown.engine import _meta

    if args.adopt_state == args.reset:
        raise UsageError("give exactly one of --adopt-state or --reset")
    if not args.state_schema.strip():
        raise UsageError("--state-schema is empty")
    action = "reset" if args.reset else "adopt-state"
    store = _store(args, must_exist=False)
    warehouse, origin = _reconcile_warehouse(args)
    try:
        current = store.read_current()
        pending = store.pending_plan(cleanup=False)
        # reconcile() reads no source: this query is never run
        source = WarehouseSource("SELECT 1", warehouse, state_schema=args.state_schema.strip())
        meta = _meta(warehouse, source.state(SyncOptions(brand_id=args.brand, table_name=args.table)))
        keys = _key_columns(args.key_columns, meta.key_columns if meta else (current or {}).get("key_columns"))
        if action == "adopt-state" and meta is not None and keys != meta.key_columns:
            raise CommandError(f"the state table is keyed by {list(meta.key_columns)}, not {list(keys)}")
        options = SyncOptions(
            brand_id=args.brand, table_name=args.table, key_columns=keys, holder=operate.operator_name("reconcile")
        )
        info, state_text, store_text = _reconcile_info(action, store, source.state(options), origin, meta, current)
        dropped = f" Its pending plan {pending.plan_id} is dropped unsettled." if pending is not None else ""
        info["pending_plan"] = None if pending is None else pending.plan_id
        if action == "adopt-state":
            if meta is None:
                raise CommandError(f"{state_text}: nothing to adopt; use --reset")
            if info["store_version"] == meta.token:  # no drift; a pending plan is the next run's to settle
                later = f" The next run settles the pending plan {pending.plan_id}." if pending is not None else ""
                message = f"{state_text} and {store_text} agree: nothing to do.{later}"
                _reconciled(args, out, {**info, "changed": False}, message)
                return
            preview = f"Adopt {state_text} as what StopChurn holds, in place of {store_text}.{dropped} Nothing is sent."
            question = "Record the state table as delivered?"
        else:
            preview = f"Reset {args.brand}/{args.table}: drop {state_text} and {store_text}.{dropped} Nothing is sent."
            question = "Drop both?"
        _confirm(args, preview, question)
        message = reconcile(source, store, options, action=action)
    finally:
        warehouse.close()
    record = record_key(args.brand, args.table)
    airflow_hint = (
        " If an Airflow task syncs this table, run it once with accept_missing_snapshot=True (or delete the Variable "
        f"{record!r}): Airflow's record of its last commit names a version the store no longer holds."
    )
    if action == "reset":
        message += (
            " The next run is a first load: with initial_load='baseline' it records the source as delivered without "
            "sending (StopChurn already holds the table), else it sends every row." + airflow_hint
        )
    elif info["store_version"] is not None and _older(str(info["state_token"]), info["store_version"]):
        message += " The state table is older than the store's record was." + airflow_hint
    _reconciled(args, out, {**info, "changed": True, "commit_record": record}, message)


def _older(token: str, than: str) -> bool:
    """Whether the state token ``token`` was written before ``than`` (tokens are ordered; see ``token_order``)."""
    from airflow_provider_stopchurn.pushdown.engine import token_order

    try:
        return token_order(token) < token_order(than)
    except ValueError:  # not a token this provider wrote: its text is the best order there is
        return token < than


def _reconcile_info(
    action: str, store: Any, state: Any, origin: str, meta: Any, current: Mapping[str, Any] | None
) -> tuple[dict[str, Any], str, str]:
    """What ``reconcile`` would change: a JSON summary, and the state table and the store's record in words."""
    from airflow_provider_stopchurn.pushdown.engine import DIFF_LOCATION

    version = None if current is None else str(current.get("version"))
    info: dict[str, Any] = {
        "action": action,
        "brand_id": store.brand_id,
        "table_name": store.table_name,
        "location": store.location,
        "warehouse": origin,
        "state_table": state.display,
        "state_token": None if meta is None else meta.token,
        "state_rows": None if meta is None else meta.rows,
        "store_version": version,
        "store_rows": None if current is None else current.get("rows"),
    }
    if meta is None:
        state_text = f"the state table {state.display} in {origin} (missing, or without its bookkeeping row)"
    else:
        state_text = f"the state table {state.display} in {origin} (token {meta.token}, {meta.rows} rows)"
    if current is None:
        return info, state_text, f"the store at {store.location} (no record)"
    diffed = (
        "in the warehouse" if (current.get("state") or {}).get("diff_location") == DIFF_LOCATION else "on the worker"
    )
    store_text = (
        f"the store's record at {store.location} (version {version}, {current.get('rows')} rows, diffed {diffed})"
    )
    return info, state_text, store_text


def _reconciled(args: argparse.Namespace, out: TextIO, info: dict[str, Any], message: str) -> None:
    if args.json:
        _emit_json(out, {**info, "message": message})
    else:
        out.write(message + "\n")


_HANDLERS: dict[str, Callable[[argparse.Namespace, TextIO], None]] = {
    "status": _status,
    "history": _history,
    "rejected": _rejected,
    "unlock": _unlock,
    "settle": _settle,
    "rebaseline": _rebaseline,
    "reconcile": _reconcile,
}


# --- airflow stopchurn ... -----------------------------------------------------------------------------------
def _airflow_action(command: str) -> Callable[[argparse.Namespace], None]:
    def action(args: argparse.Namespace) -> None:
        code = run(command, args)
        if code != OK:
            raise SystemExit(code)

    action.__name__ = f"stopchurn_{command}"
    return action


def airflow_cli_commands() -> list[Any]:
    """The ``airflow stopchurn`` command group, listed under ``cli`` in the provider info (Airflow 3.2+)."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand

    return [
        GroupCommand(
            name="stopchurn",
            help="Status and recovery of StopChurn snapshot stores",
            subcommands=[
                ActionCommand(
                    name=name,
                    help=text,
                    description=text,
                    epilog=_EPILOG,
                    func=_airflow_action(name),
                    args=[Arg(flags, **kwargs) for flags, kwargs in specs],
                )
                for name, (text, specs) in COMMANDS.items()
            ],
        )
    ]


if __name__ == "__main__":
    sys.exit(main())
