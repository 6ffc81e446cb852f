"""Settling into the state table: a plan's acknowledged changes written with a new token, then ``CURRENT``
committed with the same token.

Settling writes the acknowledged changes to the state table (DELETE + INSERT in one transaction with the new
token, or a rewrite and swap where the warehouse has no transactions), then commits ``CURRENT`` with the token. A
crash between the two is recognised by the token (the state already holds the plan) and finished by the next run.
"""

from __future__ import annotations

import calendar
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.exceptions import SnapshotLockedError, SourceDataError
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import Plan, SnapshotStore
from airflow_provider_stopchurn.update.settle import (
    _NOT_APPLIED,
    APPLIED,
    Settled,
    _rejection_records,
    _status,
    count_unsent,
)
from airflow_provider_stopchurn.update.sync import SyncSummary
from airflow_provider_stopchurn.warehouse import rows as R
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.bulk import load_bytes
from airflow_provider_stopchurn.warehouse.changes import _CREATED, _HASH, _OP, _ROW, _op_counts
from airflow_provider_stopchurn.warehouse.databases import Warehouse
from airflow_provider_stopchurn.warehouse.source import DIFF_LOCATION, PLAN_FORMAT, ROW_HASH, _Run
from airflow_provider_stopchurn.warehouse.state import _first_line, _old_key_texts, holds_layouts, read_meta

# the logger name the warehouse sync has always logged under: users and tests filter on it
log = logging.getLogger("airflow_provider_stopchurn.warehouse.engine")

__all__ = ["row_layout", "settle_state", "token_order"]

_STAGING = "__stopchurn_staging"
_STAGING_PART = "__stopchurn_staging_part"
#: PostgreSQL's SQLSTATE of a statement that gave up waiting for a lock (``lock_timeout``)
_LOCK_NOT_AVAILABLE = "55P03"


_TOKEN = re.compile(r"(\d{8}T\d{6})(?:\.(\d{9}))?-[0-9a-f]+")


def token_order(token: str) -> int:
    """A state token's place in time (nanoseconds since the epoch, UTC). Reads both forms: tokens written before
    tokens were ordered (``20260101T000000-<hex>``, the second's start) and ordered ones
    (``20260101T000000.000000001-<hex>``)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise ValueError(f"{token!r} is not a state token")
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%S"))
    return seconds * 1_000_000_000 + int(match.group(2) or 0)


def _token(base: str | None) -> str:
    """A new state token, later than ``base`` (the token it replaces) whatever the clock says: the wall clock in
    nanoseconds, or one nanosecond after ``base`` when the clock is not past it (two runs in one tick, a clock
    set back, a worker behind another). ``reconcile`` tells an older state table from a newer one by this order;
    the fixed-width text sorts the same way. The random suffix keeps tokens of unrelated histories apart."""
    now = time.time_ns()
    if base is not None:
        try:
            now = max(now, token_order(base) + 1)
        except ValueError:  # a version this engine did not write (never expected): the clock alone
            log.warning("The state token %r is not in a known form; the new token follows the clock.", base)
    seconds, nanos = divmod(now, 1_000_000_000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}.{nanos:09d}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class _Commit:
    """A commit of the state table and the store: the new token, the one it replaces, the plan it finishes."""

    token: str
    base: str | None
    plan_id: str | None
    meta: Mapping[str, Any]


def row_layout(warehouse: Warehouse, state: S.StateTable, plan_meta: Mapping[str, Any]) -> R.RowLayout | None:
    """The layout the rows of a plan (``plan_meta``: its columns' kinds, in the frame's order) are kept by; None
    where rows are kept as JSON text: a warehouse without transactions (its state table and bookkeeping are
    swapped one after the other, so a crash between them could leave rows of a layout not yet recorded) or a
    bookkeeping table without the layouts' column."""
    if not warehouse.transactions or not holds_layouts(warehouse, state):
        return None
    meta = read_meta(warehouse, state)
    layouts = dict((meta.layouts if meta is not None else None) or {})
    try:
        nest = bool(plan_meta.get("nest_dotted_columns", True))
        texts = R.layout(list(plan_meta.get("kinds") or {}), nest_dotted_columns=nest)
    except SourceDataError:  # no JSON object of these columns could be written: nothing to keep either
        return None
    tag = R.tag_of(texts, layouts)
    return R.RowLayout(texts, tag, {**layouts, tag: texts})


def _commit(
    run: _Run,
    commit: _Commit,
    *,
    write_state: bool,
    statements: Sequence[str] = (),
    record: Any = None,
    layouts: str | bool | None = True,
) -> None:
    """Write ``statements`` and the new token into the warehouse (one transaction where it has them), then
    ``CURRENT`` with the same token. The bookkeeping row keeps every row layout it kept, and the plan's.

    :param layouts: the layouts' text (:func:`_layouts_text`) when the caller read it before loading a staging
        table (a failed probe would roll the staging table back on PostgreSQL); True: read here.
    """
    warehouse, state, lock = run.warehouse, run.state, run.lock
    if lock is not None:
        lock.check()
    if write_state:
        if layouts is True:
            layouts = _layouts_text(warehouse, state, row_layout(warehouse, state, commit.meta))
        bookkeeping = state.write_meta(
            token=commit.token,
            plan_id=commit.plan_id,
            columns=str(commit.meta["columns"]),
            rows_sql=state.count_rows(),
            transactions=warehouse.transactions,
            layouts=layouts or None,
        )
        if warehouse.transactions:
            warehouse.execute([*statements, *bookkeeping])
        else:
            if statements:
                warehouse.execute(statements)
            warehouse.execute(bookkeeping)
    found = read_meta(warehouse, state)
    run.store.commit(
        commit.token,
        base_version=commit.base,
        kinds=dict(commit.meta["kinds"]),
        key_columns=list(commit.meta["key_columns"]),
        rows=found.rows if found is not None else 0,
        plan_id=commit.plan_id,
        row_hash=ROW_HASH,
        lock=lock,
        run=record if record is not None else run.record(),
        state={"diff_location": DIFF_LOCATION, "state_table": str(commit.meta["state_table"])},
    )


def _layouts_text(warehouse: Warehouse, state: S.StateTable, layout: R.RowLayout | None) -> str | None:
    """The layouts' text the bookkeeping row is written with (None: no column for them, the JSON text rows)."""
    if layout is not None:
        return R.layouts_text(layout.layouts)
    if not warehouse.transactions or not holds_layouts(warehouse, state):
        return None
    meta = read_meta(warehouse, state)  # the plan's columns make no JSON object: the layouts already kept
    return R.layouts_text((meta.layouts if meta is not None else None) or {})


def settle_state(  # noqa: PLR0913 - the local settle's arguments plus the warehouse and its state table
    store: SnapshotStore,
    plan: Plan,
    acks: Mapping[int, Sequence[Mapping[str, Any]]],
    warehouse: Warehouse,
    state: S.StateTable,
    *,
    uncertain: Sequence[int] | set[int] | None = None,
    lock: Any = None,
    run: Any = None,
    frame: pl.DataFrame | None = None,
) -> Settled:
    """Write what StopChurn acknowledged of ``plan`` into the state table, then commit ``CURRENT``.

    Applied changes are written as sent; the rows of chunks sent but not acknowledged (``uncertain``; None: every
    recorded chunk not acknowledged, as after a crash) are marked dirty so the next run sends their current state;
    rejected rows and chunks never sent leave the state as it was.

    :param run: given what this settle delivered, the run record to keep in ``CURRENT``.
    """
    result = Settled(plan.plan_id, acked_chunks=len(acks))
    ctx = _Run(
        "",
        warehouse,
        state,
        store,
        SyncOptions(brand_id=store.brand_id, table_name=store.table_name),
        SyncSummary(store.table_name, store.brand_id),
        0,
        lock,
    )
    if plan.meta.get("plan_format") != PLAN_FORMAT:
        log.warning("Dropping the pending plan %s in %s: not a warehouse plan.", plan.plan_id, store.location)
        store.discard_plan(plan)
        return result
    commit = _Commit(plan.target_version, plan.base_version, plan.plan_id, plan.meta)
    if plan.meta.get("baseline"):
        return _settle_baseline(ctx, plan, commit, run(result) if run is not None else None, result)
    frame = frame if frame is not None else store.read_changes(plan)
    status = _status(plan, acks, uncertain)
    result.rejections = _rejection_records(acks)
    counts = _op_counts(frame.get_column(_OP).filter(pl.Series(status == APPLIED)))
    result.inserted, result.updated, result.deleted = (counts.get(o, 0) for o in ("insert", "update", "delete"))
    count_unsent(result, plan, acks, uncertain, status)
    result.quarantine_uri = store.write_quarantine(plan.plan_id, result.rejections)  # still rejected, always
    if not (status != _NOT_APPLIED).any():
        store.discard_plan(plan)
        return result
    record = run(result) if run is not None else None
    meta = read_meta(warehouse, state)
    already = meta is not None and meta.token == plan.target_version
    statements: list[str] = []
    layouts: str | bool | None = True
    if not already:
        keys = list(plan.meta["key_columns"])
        # before the staging table is loaded: nothing may roll it back before the statements that read it
        layout = row_layout(warehouse, state, plan.meta)
        layouts = _layouts_text(warehouse, state, layout)
        _load_staging(warehouse, frame, status, len(keys), layout)
        if "session_zone" not in plan.meta and warehouse.transactions:
            # planned before sessions were pinned to UTC: its zoned key texts are in the session's zone then
            texts = {k: S.key_text(i) for i, k in enumerate(keys)}
            statements += _old_key_texts(warehouse, state, S.q(_STAGING), S.columns_of(plan.meta.get("columns")), texts)
        statements += state.apply(_STAGING, transactions=warehouse.transactions)
    _commit(ctx, commit, write_state=not already, statements=statements, record=record, layouts=layouts)
    result.version = plan.target_version
    log.info(
        "Settled plan %s of %r into %s: %d of %d chunks acknowledged, %d rows rejected, %d updates sent without an "
        "acknowledgement and %d never sent (both sent again next run).",
        plan.plan_id,
        store.table_name,
        state.display,
        len(acks),
        len(plan.chunks),
        len(result.rejections),
        result.unacknowledged,
        result.never_sent,
    )
    return result


def _load_staging(
    warehouse: Warehouse, frame: pl.DataFrame, status: np.ndarray, keys: int, layout: R.RowLayout | None
) -> None:
    """Load a plan's staged rows (:func:`_staged`) into the staging table. Where the warehouse runs in the worker
    (DuckDB), a part of about one load's bytes (``bulk.py``) at a time, each appended to the table: staged whole,
    the plan's rows would be held twice more beside the plan (the staged copy, and DuckDB's scan of it)."""
    rows = frame.height
    if warehouse.dialect == "duckdb" and rows:
        rows = max(1, int(load_bytes(warehouse.dialect) * rows / max(1, frame.estimated_size())))
    if rows >= frame.height:
        warehouse.load(_STAGING, _staged(frame, status, keys, layout))
        return
    for offset in range(0, frame.height, rows):
        part = _staged(frame.slice(offset, rows), status[offset : offset + rows], keys, layout)
        if offset == 0:
            warehouse.load(_STAGING, part)
        else:
            warehouse.load(_STAGING_PART, part)
            warehouse.execute([f"INSERT INTO {S.q(_STAGING)} SELECT * FROM {S.q(_STAGING_PART)}"])
        del part  # the next part is staged once this one is in the warehouse
    warehouse.execute([f"DROP TABLE IF EXISTS {S.q(_STAGING_PART)}"])


def _staged(frame: pl.DataFrame, status: np.ndarray, keys: int, layout: R.RowLayout | None = None) -> pa.Table:
    """The state table's new rows (``upsert``) and removed keys (``delete``) for a plan's statuses.

    :param layout: the plan's row layout: each row is kept as its values (None: as its JSON text).
    """
    flags = pl.Series("__sc_status", status)
    marked = frame.with_columns(flags).filter(pl.col("__sc_status") != _NOT_APPLIED)
    applied = pl.col("__sc_status") == APPLIED
    is_delete = pl.col(_OP) == "delete"
    hash_ = (
        pl.when(applied)
        .then(pl.col(_HASH))
        .when(pl.col(_OP) == "insert")
        .then(pl.lit(S.DIRTY_INSERT))
        .otherwise(pl.lit(S.DIRTY_UPDATE))  # an update, or a delete that may not have happened
    )
    out = marked.select(
        *(pl.col(S.key_text(i)) for i in range(keys)),
        hash_.alias(S.HASH),
        pl.col(_CREATED).alias(S.CREATED),
        pl.col(_ROW).alias(S.ROW),
        pl.when(applied & is_delete).then(pl.lit("delete")).otherwise(pl.lit("upsert")).alias(S.ACTION),
    )
    if layout is not None:
        out = out.with_columns(R.compact(out.get_column(S.ROW), layout.texts, layout.tag))
    return out.to_arrow().cast(
        pa.schema(
            [
                *(pa.field(S.key_text(i), pa.string()) for i in range(keys)),
                pa.field(S.HASH, pa.string()),
                pa.field(S.CREATED, pa.int64()),
                pa.field(S.ROW, pa.string()),
                pa.field(S.ACTION, pa.string()),
            ]
        )
    )


def _settle_baseline(run: _Run, plan: Plan, commit: _Commit, record: Any, result: Settled) -> Settled:
    """A baseline a crash interrupted: committed if its swap happened (the state holds its token), else dropped."""
    meta = read_meta(run.warehouse, run.state)
    if meta is not None and meta.token == plan.target_version:
        _commit(run, commit, write_state=False, record=record)
        return result
    scratch = [run.state.next]
    if run.warehouse.transactions:  # the plan's own scratch table (or ..__next, when planned by an older version)
        scratch.append(run.state.for_plan(plan.plan_id).next)
    for table in scratch:  # first: once the plan is gone, no run would look for the plan's own table again
        try:
            run.warehouse.execute(run.state.drop_scratch_table(table))
        except Exception as err:
            if getattr(err, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise  # not a lock (a view depending on it, a privilege): its own error, and the plan stays
            raise SnapshotLockedError(
                f"Could not drop {table}, the scratch table of a baseline a crash interrupted: {_first_line(err)}\n"
                f"Another session may hold a lock on it (the run waited at most {S.LOCK_WAIT}). Nothing was sent; "
                "the next run drops it again, then goes on."
            ) from err
    run.store.discard_plan(plan)  # the swap never happened: the state table is as it was
    return result
