"""The commands that read a store and change nothing: ``status``, ``history``, ``rejected``."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from airflow_provider_stopchurn.cli._common import (
    UsageError,
    _emit_json,
    _lock_text,
    _short_time,
    _since,
    _size,
    _store,
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


def _status(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn.cli import operate

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
    from airflow_provider_stopchurn.store.history import http_retries

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
    from airflow_provider_stopchurn.cli import operate

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
