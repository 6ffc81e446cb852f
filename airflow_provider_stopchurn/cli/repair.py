"""The commands that repair a store: ``unlock``, ``settle`` (a table or an event stream), ``rebaseline``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, TextIO

from airflow_provider_stopchurn.cli._common import (
    Aborted,
    CommandError,
    UsageError,
    _confirm,
    _emit_json,
    _lock_text,
    _store,
    store_root,
)
from airflow_provider_stopchurn.cli.airflow_connections import read_sql


def _unlock(args: argparse.Namespace, out: TextIO) -> None:
    from airflow_provider_stopchurn.cli import operate

    store = _store(args)
    lock = operate.lock_info(store.read_lock(), present=store.backend.exists("LOCK"))
    if lock is None:
        _nothing_to_do(
            args, out, {"unlocked": False, "lock": None}, f"{store.brand_id}/{store.table_name} is not locked."
        )
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


def _nothing_to_do(args: argparse.Namespace, out: TextIO, document: dict[str, Any], text: str) -> None:
    """Say that a command found nothing to do: ``document`` with ``--json``, else the line ``text``."""
    if args.json:
        _emit_json(out, document)
    else:
        out.write(text + "\n")


def _confirmed_plan(args: argparse.Namespace, out: TextIO, store: Any, what: str, settling: str) -> bool:
    """Whether the store has a pending plan to settle and the user agreed (``Aborted`` when not); False: there is
    none, and that is said.

    :param what: the plan's name in the messages (``plan``, ``event plan``).
    :param settling: what settling it does, after "Settling".
    """
    from airflow_provider_stopchurn.cli import operate

    plan = operate.preview_settle(store)
    where = f"{store.brand_id}/{store.table_name}"
    if plan is None:
        _nothing_to_do(
            args, out, {"settled": False, "plan_id": None}, f"No pending {what} for {where}: nothing to settle."
        )
        return False
    _confirm(
        args,
        f"Pending {what} {plan['plan_id']} of {where}: {plan['acknowledged_chunks']} of {plan['total_chunks']} chunks "
        f"acknowledged. Settling {settling}.",
        "Settle it?",
    )
    return True


def _answered(args: argparse.Namespace, out: TextIO, document: dict[str, Any], *, settled: bool) -> bool:
    """Whether the answer of ``settle`` is written already: ``document`` with ``--json``, or that another run
    finished the plan meanwhile. False: the caller says what was settled."""
    if args.json:
        _emit_json(out, document)
        return True
    if not settled:
        out.write("The plan was finished meanwhile: nothing to settle.\n")
        return True
    return False


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
    from airflow_provider_stopchurn.cli import operate
    from airflow_provider_stopchurn.events.plan import is_event_plan

    if (args.table is None) == (args.stream is None):
        raise UsageError("give exactly one of --table T or --stream S (an event stream)")
    store = _settle_store(args)
    pending = store.pending_plan(cleanup=False)
    if args.stream is not None or (pending is not None and is_event_plan(pending.meta)):
        _settle_events(args, out, store)
        return
    _refuse_warehouse_table(store, "settle", "its next run settles the pending plan into the state table")
    if not _confirmed_plan(
        args, out, store, "plan", "commits those and drops the rest (the next run sends their rows again)"
    ):
        return
    result = operate.settle_pending(store, holder=operate.operator_name("settle"))
    if _answered(args, out, result, settled=result["settled"]):
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
    from airflow_provider_stopchurn.events.ledger import event_store

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
    from airflow_provider_stopchurn.cli import operate
    from airflow_provider_stopchurn.events.settle import settle_pending_event_plan

    settling = (
        "records those events as delivered and drops the rest (the next run reads the same window and sends them)"
    )
    if not _confirmed_plan(args, out, store, "event plan", settling):
        return
    result = settle_pending_event_plan(store, holder=operate.operator_name("settle"))
    document = {"settled": result is not None, **(dataclasses.asdict(result) if result else {})}
    if _answered(args, out, document, settled=result is not None) or result is None:
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
    from airflow_provider_stopchurn.cli import operate
    from airflow_provider_stopchurn.update.sync import canonical_source

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
    canon = canonical_source(frame, options)  # bad keys or values stop here, before any question
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
