"""The warehouse sync (``diff_location="warehouse"``): the diff runs inside the warehouse that holds the source;
only changed rows leave it.

One run, beside the local engine's :func:`~airflow_provider_stopchurn.update.sync.run_sync`::

    lock (the snapshot store's, with a heartbeat) -> settle any plan an earlier try left (into the state table)
         -> check the state table against the store (drift) -> the source's columns (schema policy)
         -> key checks and counts in SQL (safeguards, before any row leaves) -> the changed rows as Arrow batches
         -> canonical rows and update JSON exactly as the local path makes them -> plan in the store
         -> deliver (deliver.py) -> settle: acknowledged changes into the state table, then CURRENT

Where each step lives: the state table and the drift check in ``state.py``, the checks, counts and safeguards in
``plan.py``, the changed rows' encoding in ``changes.py``, settling in ``settle.py``, the repair in
``reconcile.py``. This module runs them, records a baseline (nothing sent) and makes a dry run's counts.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import closing
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import Plan, SnapshotStore
from airflow_provider_stopchurn.store.history import recorded_under_lock
from airflow_provider_stopchurn.update.deliver import Sender
from airflow_provider_stopchurn.update.plan import approval
from airflow_provider_stopchurn.update.settle import APPLIED
from airflow_provider_stopchurn.update.sync import SyncSummary, deliver_and_settle, settle_counted, summary_counts
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.bulk import NextWriter, load_bytes
from airflow_provider_stopchurn.warehouse.changes import (
    _encode_batch,
    _key_kinds,
    _kinds,
    _plan_frame,
    sized,
    windows,
)
from airflow_provider_stopchurn.warehouse.plan import (
    _change_batches,
    _check_keys,
    _check_plan,
    _decide,
    _keys_unique_as_text,
    _plan_meta,
    _source_schema,
)
from airflow_provider_stopchurn.warehouse.settle import (
    _STAGING,
    _Commit,
    _commit,
    _staged,
    _token,
    row_layout,
    settle_state,
)
from airflow_provider_stopchurn.warehouse.source import DIFF_LOCATION, WarehouseSource, _Run
from airflow_provider_stopchurn.warehouse.state import _past_half_swaps, _zoned, check_state, prepare_state

# the logger name the warehouse sync has always logged under: users and tests filter on it
log = logging.getLogger("airflow_provider_stopchurn.warehouse.engine")

__all__ = ["run_warehouse_sync"]

#: The row JSON of one delivery window where the warehouse runs in the worker (DuckDB): its update JSON and request
#: bodies are held beside the plan and DuckDB's own buffers, so a window of wide rows is cut short of
#: ``window_rows``. Elsewhere a window is ``window_rows`` rows, as on the local path.
WINDOW_BYTES = {"duckdb": 32 * 1024 * 1024}


def run_warehouse_sync(
    source: WarehouseSource,
    store: SnapshotStore,
    sender: Sender | None,
    options: SyncOptions,
    *,
    run_ms: int | None = None,
) -> SyncSummary:
    """Deliver the difference between the source query and the state table; see the module docstring."""
    started = time.monotonic()
    run_ms = run_ms if run_ms is not None else time.time_ns() // 1_000_000
    summary = SyncSummary(options.table_name, options.brand_id, dry_run=options.dry_run)
    summary.snapshot_uri = store.location
    summary.try_number = options.run_info.try_number
    state = source.state(options)
    query = S.source_query(source.sql)
    warehouse = source.warehouse
    run = _Run(query, warehouse, state, store, options, summary, run_ms)
    try:
        if options.dry_run:
            _dry_run(run)
        else:
            if sender is None:
                raise StopChurnConfigError("A sender is required unless dry_run=True.")
            with recorded_under_lock(store, options, counts=lambda: summary_counts(summary)) as lock:
                current = _current(store)
                summary.start_from(current.get("run") if current else None, options.run_key)
                delivered = summary.settled_chunks
                prepare_state(warehouse, state)  # before anything reads or writes the state table
                pending = store.pending_plan()
                if pending is not None:
                    _settle_pending(run, pending, lock, delivered)
                run.lock = lock
                _plan_and_deliver(run, sender)
    finally:
        warehouse.close()
    summary.duration_s = round(time.monotonic() - started, 3)
    log.info("%s", summary.line())
    return summary


def _settle_pending(run: _Run, pending: Plan, lock: Any, delivered: int) -> None:
    """Settle the plan an earlier run left into the state table, counted as the worker path counts it."""
    settle_counted(
        run.summary,
        run.options,
        pending,
        run.store.acks(pending),
        delivered,
        lambda acks, record: settle_state(run.store, pending, acks, run.warehouse, run.state, lock=lock, run=record),
        into=run.state.display,
        logger=log,
    )


def _current(store: SnapshotStore) -> dict[str, Any] | None:
    """``CURRENT``, checked to belong to a warehouse-diffed table."""
    current = store.read_current()
    if current is not None and (current.get("state") or {}).get("diff_location") != DIFF_LOCATION:
        raise StopChurnConfigError(
            f"The snapshot of brand {store.brand_id} table {store.table_name!r} in {store.location} was made by the "
            "worker diff (diff_location='worker'); it cannot be continued in the warehouse.\n"
            "To switch, record the table once in the warehouse without sending: run `stopchurn reconcile --reset` "
            "(docs: the diff in the warehouse), then one run with initial_load='baseline'."
        )
    return current


def _plan_and_deliver(run: _Run, sender: Sender) -> None:
    store, warehouse, state, options, summary = run.store, run.warehouse, run.state, run.options, run.summary
    current = _current(store)
    meta = check_state(warehouse, state, store, current)
    schema = _source_schema(warehouse, state, run.query, options)
    # the narrow diff's scratch table, named by this run: a killed try's is never read, and is dropped by the
    # next run (prepare_state)
    narrow = meta is not None and warehouse.transactions and warehouse.dialect in S.NARROW and _may_create(run)
    scratch = state.scratch(uuid.uuid4().hex[:12]) if narrow else None  # 12 hex digits: drop_scratch matches them
    # else the narrow diff checks the keys in its own pass (plan._decide), where a key's text is as unique as it is
    if scratch is None or not _keys_unique_as_text(schema, options.key_columns):
        _check_keys(warehouse, state, run.query, options)
    diff = None
    try:
        diff = _decide(warehouse, state, run.query, schema, meta, options, scratch)
        summary.schema_change = diff.schema_change
        kinds = _kinds(schema, options)
        plan_meta = _plan_meta(options, state, kinds, schema, run.run_ms)
        base = None if current is None else str(current["version"])
        if meta is None:
            warehouse.execute(state.create())
        if diff.baseline:
            summary.baseline = True
            summary.unchanged = diff.counts.get("unchanged", 0)
            same_keys = meta is not None and meta.key_columns == tuple(options.key_columns)
            _baseline(run, schema, plan_meta, base, keep_created=same_keys)  # other keys name other rows
            return
        key_kinds = _key_kinds(kinds, current, options)
        # closed at once on an error: an open read keeps its connection (and its locks) until garbage collection
        with closing(_change_batches(run, schema.names, diff, first=meta is None)) as batches:
            frame = _plan_frame(run, batches, key_kinds, meta is None, meta.layouts if meta is not None else None)
    finally:
        if scratch is not None and (diff is None or diff.scratch is not None):
            _drop(run, scratch)
    unchanged = diff.counts.get("unchanged", 0) if meta is not None else 0
    # the rows an earlier try of this DAG run delivered are unchanged to this try's diff, but not to the DAG run
    summary.unchanged = max(0, unchanged - summary.inserted - summary.updated)
    if meta is not None:
        summary.approved_deletes = approval(_check_plan(frame, meta, unchanged, options), options)
    token = _token(base)
    if frame.height == 0:
        if meta is None or diff.schema_change:
            _commit(run, _Commit(token, base, None, plan_meta), write_state=True)
        return
    plan = store.write_plan(
        target_version=token,
        base_version=base,
        changes=frame,
        chunks=[],
        meta={**plan_meta, "total_updates": frame.height},
    )
    _deliver_and_settle(run, sender, plan, frame)


def _may_create(run: _Run) -> bool:
    """Whether the run may make its scratch table in the state schema (a role that may only read and write the
    state table diffs in two queries, as every run did before the scratch table). A source the scratch table cannot
    hold (a column type the role has no USAGE on, too many columns, rows wider than a page) is found when the table
    is made, and diffs in two queries too (``plan._decide``)."""
    if run.warehouse.dialect != "postgres":  # DuckDB: no privileges (a read-only file never gets this far)
        return True
    sql = f"SELECT has_schema_privilege({S.lit(run.state.schema)}, 'CREATE')"
    return bool(run.warehouse.rows(sql)[0][0])


def _drop(run: _Run, scratch: str) -> None:
    """Drop this run's scratch table once its changed rows are read. A failure here only leaves it to the next
    run (which drops every one it finds) and must not hide the error the run may be raising."""
    try:
        run.warehouse.execute(run.state.drop_scratch_table(scratch))
    except Exception as err:
        log.warning("Could not drop the scratch table %s (the next run drops it): %s", scratch, err)


def _deliver_and_settle(run: _Run, sender: Sender, plan: Plan, frame: pl.DataFrame) -> None:
    deliver_and_settle(
        run.store,
        plan,
        windows(frame, run.options, WINDOW_BYTES.get(run.warehouse.dialect)),
        sender,
        run.options,
        run.summary,
        run.lock,
        lambda final, acks, uncertain: settle_state(
            run.store,
            final,
            acks,
            run.warehouse,
            run.state,
            uncertain=uncertain,
            lock=run.lock,
            run=run.record,
            frame=frame,
        ),
    )


# --------------------------------------------------------------------------------------------------------------
# baseline: record the source as delivered, nothing sent
# --------------------------------------------------------------------------------------------------------------
def _baseline(run: _Run, schema: pa.Schema, plan_meta: dict[str, Any], base: str | None, *, keep_created: bool) -> None:
    """Rebuild the state table from the source into a scratch table (every row encoded in the worker, a batch at
    a time, written in a few large loads), then swap it in with the new token. A plan marks the swap, so a crash is
    finished or dropped. Where the swap is one transaction the scratch table is the plan's own
    (``..__next_<plan>``): a run whose lease was taken meanwhile fills only its own, which the new owner dropped
    with its plan, never the new owner's."""
    warehouse, state = run.warehouse, run.state
    plan = run.store.write_plan(
        target_version=_token(base),
        base_version=base,
        changes=None,
        chunks=[],
        meta={**plan_meta, "baseline": True, "total_updates": 0},
    )
    if warehouse.transactions:  # the swap is one transaction: the scratch table may be this plan's own
        state = state.for_plan(plan.plan_id)
        run = replace(run, state=state)
    warehouse.execute(state.baseline_into_next())
    columns = schema.names
    options = replace(run.options, updated_at_column=None)
    kinds: dict[str, str] = {}
    layout = row_layout(warehouse, state, plan.meta)  # the same layout the commit below records
    sql = state.baseline(run.query, columns, keep_created=keep_created)
    # the rows are written in a few large loads (bulk.py)
    with NextWriter(warehouse, state, _STAGING) as writer, closing(warehouse.batches(sql)) as batches:
        for batch in sized(batches, load_bytes(warehouse.dialect)):  # wide rows a part at a time
            frame, _ = _encode_batch(batch, columns, options, kinds, run.run_ms, keep=layout)
            if frame.height:
                applied = np.full(frame.height, APPLIED, dtype=np.int8)
                writer.add(_staged(frame, applied, len(options.key_columns)))  # kept as the layout says already
        writer.finish()
    log.info("Baseline: %d rows written into %s in %d load(s).", writer.rows, state.display, writer.loads)
    commit = _Commit(plan.target_version, plan.base_version, plan.plan_id, plan.meta)
    if warehouse.transactions:
        _commit(run, commit, write_state=True, statements=state.swap())
    else:
        warehouse.execute(state.swap())
        _commit(run, commit, write_state=True)


# --------------------------------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------------------------------
def _dry_run(run: _Run) -> None:
    """Counts and sample updates from SQL; nothing is written anywhere."""
    store, warehouse, state, options, summary = run.store, run.warehouse, run.state, run.options, run.summary
    current = _current(store)
    if store.pending_plan(cleanup=False) is not None:
        log.warning("A plan of an earlier run is pending: the next real run settles it first; counts may differ.")
    state = _past_half_swaps(warehouse, state)
    run = replace(run, state=state)
    meta = check_state(warehouse, state, store, current)
    if meta is not None and meta.format < S.STATE_FORMAT:
        log.warning(
            "The state table %s has format %d: the next real run migrates it; counts may differ.",
            state.display,
            meta.format,
        )
        if warehouse.transactions:  # read its zoned key texts as the migration will write them
            state = replace(state, legacy_zoned_keys=tuple(_zoned(meta.columns, meta.key_columns)))
            run = replace(run, state=state)
    schema = _source_schema(warehouse, state, run.query, options)
    _check_keys(warehouse, state, run.query, options)
    diff = _decide(warehouse, state, run.query, schema, meta, options)
    summary.schema_change = diff.schema_change
    summary.baseline = diff.baseline
    summary.inserted = diff.counts.get("insert", 0)
    summary.updated = diff.counts.get("update", 0)
    summary.deleted = diff.counts.get("delete", 0)
    summary.unchanged = diff.counts.get("unchanged", 0) if meta is not None else 0
    if diff.baseline:
        return
    with closing(_change_batches(run, schema.names, diff, first=meta is None)) as batches:
        batch = next(iter(batches))
    kinds = _kinds(schema, options)
    key_kinds = _key_kinds(kinds, current, options)
    layouts = meta.layouts if meta is not None else None
    frame, _ = _encode_batch(batch.slice(0, 5), schema.names, options, key_kinds, run.run_ms, layouts)
    for window in windows(frame, options):
        summary.samples += [orjson.loads(u) for u in window.updates.to_list()]
