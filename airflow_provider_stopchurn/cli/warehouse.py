"""The warehouse diff's repair: ``reconcile`` (a table diffed with ``diff_location='warehouse'``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from airflow_provider_stopchurn.cli._common import CommandError, UsageError, _confirm, _emit_json, _store
from airflow_provider_stopchurn.cli.airflow_connections import warehouse_of_connection


def _reconcile_warehouse(args: argparse.Namespace) -> tuple[Any, str]:
    if (args.sql_conn_id is None) == (args.duckdb is None):
        raise UsageError("give exactly one of --sql-conn-id ID or --duckdb PATH")
    if args.duckdb is not None:
        path = Path(args.duckdb).expanduser()
        if not path.is_file():  # DuckDB would create an empty database there
            raise CommandError(f"no DuckDB database at {str(path)!r}")
        from airflow_provider_stopchurn.warehouse import DuckDBWarehouse

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
    from airflow_provider_stopchurn.cli import operate
    from airflow_provider_stopchurn.operators.commit_guard import record_key
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.warehouse import WarehouseSource, reconcile
    from airflow_provider_stopchurn.warehouse.state import read_meta

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
        meta = read_meta(warehouse, source.state(SyncOptions(brand_id=args.brand, table_name=args.table)))
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
    from airflow_provider_stopchurn.warehouse.settle import token_order

    try:
        return token_order(token) < token_order(than)
    except ValueError:  # not a token this provider wrote: its text is the best order there is
        return token < than


def _reconcile_info(
    action: str, store: Any, state: Any, origin: str, meta: Any, current: Mapping[str, Any] | None
) -> tuple[dict[str, Any], str, str]:
    """What ``reconcile`` would change: a JSON summary, and the state table and the store's record in words."""
    from airflow_provider_stopchurn.warehouse.source import DIFF_LOCATION

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
