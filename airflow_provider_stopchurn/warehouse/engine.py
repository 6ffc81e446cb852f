"""The pushdown sync: the diff runs inside the warehouse that holds the source; only changed rows leave it.

One run (``diff_location="warehouse"``), beside the local engine's
:func:`~airflow_provider_stopchurn.update.sync.run_sync`::

    lock (the snapshot store's, with a heartbeat) -> settle any plan an earlier try left (into the state table)
         -> check the state table against the store (drift) -> the source's columns (schema policy)
         -> key checks and counts in SQL (safeguards, before any row leaves) -> the changed rows as Arrow batches
         -> canonical rows and update JSON exactly as the local path makes them -> plan in the store
         -> deliver (deliver.py) -> settle: acknowledged changes into the state table, then CURRENT

**Where state lives.** The state table (``<state_schema>.b<brand>_<table>``) holds per key: the key columns as
text, the row hash (``warehouse/sql.py``), createdAt and the last delivered row as JSON text (a delete carries it).
Its bookkeeping table (``..__meta``) holds a token; the snapshot store's ``CURRENT`` holds the same token after every
commit. The plan (the changed rows with their update JSON), the acknowledgements and the rejected rows stay in the
snapshot store, exactly as on the local path, so a crash, a rejection or a retry is settled the same way.

**Settling** writes the acknowledged changes to the state table (DELETE + INSERT in one transaction with the new
token, or a rewrite and swap where the warehouse has no transactions), then commits ``CURRENT`` with the token. A
crash between the two is recognised by the token (the state already holds the plan) and finished by the next run.
Any other disagreement between the two is *drift*: the run stops before reading the source and names the
``stopchurn reconcile`` command that repairs it.
"""

from __future__ import annotations

import calendar
import json
import logging
import re
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from airflow_provider_stopchurn.encode.records import check_reserved_names, encode_rows, encode_updates
from airflow_provider_stopchurn.exceptions import SafeguardError, SnapshotError, SourceDataError, StopChurnConfigError
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import Committed, Plan, SnapshotStore
from airflow_provider_stopchurn.store.history import recorded
from airflow_provider_stopchurn.update.deliver import Sender
from airflow_provider_stopchurn.update.plan import (
    _window,
    approval,
    check_safeguards,
    describe,
    kind_changes,
    timestamp_column,
)
from airflow_provider_stopchurn.update.settle import (
    _APPLIED,
    _NOT_APPLIED,
    Settled,
    _rejection_records,
    _status,
    count_unsent,
)
from airflow_provider_stopchurn.update.sync import (
    SyncSummary,
    canonical_source,
    deliver_and_settle,
    summary_counts,
)
from airflow_provider_stopchurn.update.window import Window
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.databases import Warehouse

log = logging.getLogger(__name__)

__all__ = ["PLAN_FORMAT", "ROW_HASH", "StateDriftError", "WarehouseSource", "reconcile", "run_warehouse_sync"]

#: Names the row hash of a warehouse-diffed table in ``CURRENT`` (``row_hash``): the local engine never compares it.
ROW_HASH = "warehouse-md5-v1"
PLAN_FORMAT = "warehouse-1"
DIFF_LOCATION = "warehouse"
_STAGING = "__stopchurn_staging"
#: plan frame columns
_OP, _HASH, _CREATED, _UPDATED, _ROW = "op", "hash", "created_at", "updated_at", "row"
_RANK = {"delete": 0, "update": 1, "insert": 2}


class StateDriftError(SnapshotError):
    """The state table and the snapshot store disagree about what StopChurn holds (repair: ``stopchurn reconcile``)."""


@dataclass(frozen=True)
class WarehouseSource:
    """A SQL source diffed where it lives: ``sql`` (one SELECT) on ``warehouse``, state kept in ``state_schema``."""

    sql: str
    warehouse: Warehouse
    state_schema: str = "stopchurn_state"

    def state(self, options: SyncOptions) -> S.StateTable:
        return S.StateTable(
            self.state_schema,
            S.state_table_name(options.brand_id, options.table_name),
            tuple(options.key_columns),
            self.warehouse.dialect,
        )


@dataclass
class _Run:
    """What one run works with (keeps the helpers' argument lists short)."""

    query: str
    warehouse: Warehouse
    state: S.StateTable
    store: SnapshotStore
    options: SyncOptions
    summary: SyncSummary
    run_ms: int
    lock: Any = None

    def record(self, settled: Settled | None = None) -> dict[str, Any] | None:
        return self.summary.run_record(self.options.run_key, settled, self.summary.settled_chunks)


@dataclass
class _Meta:
    format: int
    token: str
    plan_id: str | None
    columns: dict[str, str]
    key_columns: tuple[str, ...]
    rows: int


# --------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------
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
            with (
                recorded(store, options, counts=lambda: summary_counts(summary)) as recording,  # however it ends
                store.lock(options.holder, ttl_s=options.lock_ttl_s, wait_s=options.lock_wait_s) as lock,
                lock.heartbeat(),
                recording.holding(lock),
            ):
                current = _current(store)
                summary.start_from(current.get("run") if current else None, options.run_key)
                delivered = summary.settled_chunks
                prepare_state(warehouse, state)  # before anything reads or writes the state table
                pending = store.pending_plan()
                if pending is not None:
                    acks = store.acks(pending)
                    log.warning(
                        "Settling the unfinished plan %s of %r into %s: %d of %d chunks were acknowledged.",
                        pending.plan_id,
                        options.table_name,
                        state.display,
                        len(acks),
                        len(pending.chunks),
                    )
                    summary.settled_chunks += len(acks)
                    summary.add(
                        settle_state(
                            store,
                            pending,
                            acks,
                            warehouse,
                            state,
                            lock=lock,
                            run=lambda s: summary.run_record(options.run_key, s, delivered),
                        )
                    )
                run.lock = lock
                _plan_and_deliver(run, sender)
    finally:
        warehouse.close()
    summary.duration_s = round(time.monotonic() - started, 3)
    log.info("%s", summary.line())
    return summary


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


def _meta(warehouse: Warehouse, state: S.StateTable) -> _Meta | None:
    """The state table's bookkeeping row, or None when the state table does not exist."""
    try:
        rows = warehouse.rows(state.read_meta())
    except Exception as err:  # the table is missing: every database says it differently
        log.debug("No state bookkeeping in %s: %s", state.display, err)
        return None
    if not rows:
        return None
    fmt, token, plan_id, columns, keys, count = rows[0]
    return _Meta(int(fmt), str(token), plan_id, dict(S.columns_of(columns)), tuple(str(keys).split(",")), int(count))


def _table_exists(warehouse: Warehouse, state: S.StateTable, name: str) -> bool:
    try:
        warehouse.rows(state.exists_sql(name))
    except Exception:
        return False
    return True


def check_state(
    warehouse: Warehouse, state: S.StateTable, store: SnapshotStore, current: Mapping[str, Any] | None
) -> _Meta | None:
    """The state table's bookkeeping row when it agrees with ``CURRENT``; else :class:`StateDriftError`."""
    meta = _meta(warehouse, state)
    if meta is not None and meta.format > S.STATE_FORMAT:
        raise StopChurnConfigError(
            f"The state table {state.display} has format {meta.format}, written by a newer version of this "
            f"provider (this one reads up to {S.STATE_FORMAT}). Upgrade the provider on every worker."
        )
    token = None if current is None else str(current["version"])
    if meta is None and token is None:
        return None
    if meta is not None and token == meta.token:
        return meta
    where = f"brand {store.brand_id} table {store.table_name!r}"
    if meta is None:
        problem = f"The snapshot store ({store.location}) records a sync of {where}, but its state table "
        problem += f"{state.display} is missing."
    elif token is None:
        problem = f"The state table {state.display} exists (written by plan {meta.plan_id}), but the snapshot "
        problem += f"store ({store.location}) has no record of {where}."
    else:
        problem = f"The state table {state.display} was last written with token {meta.token} (plan "
        problem += f"{meta.plan_id}); the snapshot store ({store.location}) committed {token}."
    raise StateDriftError(
        f"{problem} Nothing was read or sent.\n"
        "Repair it with `stopchurn reconcile` (docs: the diff in the warehouse): --adopt-state when the state table "
        "is right (it holds what StopChurn was sent), or --reset to drop both and start again with a run using "
        "initial_load='baseline' (records the source as delivered without sending) or a full first load."
    )


def prepare_state(warehouse: Warehouse, state: S.StateTable) -> None:
    """What every run does first, under the lock, before anything reads or writes the state table: finish a swap
    a crash interrupted, then bring an older state table to this version's format.

    The swap (warehouses without transactions: ``DROP`` the state table, ``RENAME`` ``..__next`` into its place)
    drops the old table only once ``..__next`` is complete. So a missing state table beside a ``..__next`` is a
    swap stopped between its two steps: ``..__next`` is the only copy, and it is renamed into place. Both present:
    ``..__next`` is an unfinished rewrite the next rewrite replaces (the state table is as it was). The bookkeeping
    table is swapped the same way (``..__meta_next``)."""
    if not warehouse.transactions:
        swaps = (
            (state.name, state.name + "__next", state.swap),
            (state.name + "__meta", state.name + "__meta_next", state.swap_meta),
        )
        for name, new, swap in swaps:
            if not _table_exists(warehouse, state, name) and _table_exists(warehouse, state, new):
                log.warning("Finishing the interrupted swap of %s.%s.", state.schema, name)
                warehouse.execute(swap()[1:])
    meta = _meta(warehouse, state)
    if meta is not None and meta.format < S.STATE_FORMAT:
        _migrate(warehouse, state, meta)


def _past_half_swaps(warehouse: Warehouse, state: S.StateTable) -> S.StateTable:
    """``state`` reading, for a swap a crash left half done (see :func:`prepare_state`), the complete new table
    the next real run renames into place: a dry run changes nothing, so it reads past the swap instead."""
    if warehouse.transactions:
        return state
    if not _table_exists(warehouse, state, state.name) and _table_exists(warehouse, state, state.name + "__next"):
        state = replace(state, state_suffix="__next")
    name = state.name + "__meta"
    if not _table_exists(warehouse, state, name) and _table_exists(warehouse, state, name + "_next"):
        state = replace(state, meta_suffix="__meta_next")
    return state


def _zoned(columns: Mapping[str, str], names: Sequence[str]) -> list[str]:
    """The columns among ``names`` that hold timestamps with a time zone (their text depends on the session's)."""
    return [c for c in names if "tz=" in columns.get(c, "")]


def _old_key_texts(
    warehouse: Warehouse, state: S.StateTable, table: str, columns: Mapping[str, str], keys: Mapping[str, str]
) -> list[str]:
    """Statements rewriting the key texts a format-1 session wrote into ``table`` (``keys``: key column -> its
    column there) as a format-2 session writes them. PostgreSQL: every date and timestamp key, read back in the
    database's own ``DateStyle`` (format-1 sessions used it: 'SQL, DMY' writes ``29/03/2026``); elsewhere the
    zoned keys, whose texts followed the session's zone."""
    if warehouse.dialect != "postgres":
        return [state.key_to_utc(table, keys[k]) for k in _zoned(columns, list(keys))]
    types = {k: _postgres_type(columns.get(k, "")) for k in keys}
    dated = [k for k in keys if types[k] is not None]
    if not dated:
        return []
    ((style,),) = warehouse.rows("SELECT reset_val FROM pg_settings WHERE name = 'DateStyle'")
    return [s for k in dated for s in state.retext_postgres(table, keys[k], str(types[k]), str(style))]


def _postgres_type(arrow: str) -> str | None:
    """PostgreSQL's type for a date or timestamp column's Arrow type text (None for any other)."""
    if arrow.startswith("date"):
        return "DATE"
    if arrow.startswith("timestamp["):
        return "TIMESTAMPTZ" if "tz=" in arrow else "TIMESTAMP"
    return None


def _migrate(warehouse: Warehouse, state: S.StateTable, meta: _Meta) -> None:
    """Format 1 -> 2: sessions are pinned to UTC (and, on PostgreSQL, to ISO dates) from format 2 on. A key column
    with a time zone was kept as text in the zone the session had; it is rewritten as the same instant in UTC
    (exact: the old text holds its offset). On PostgreSQL every date and timestamp key is read back in the
    database's own DateStyle first (:func:`_old_key_texts`). Row hashes cannot be recomputed without the source:
    rows with such a column are sent once more as updates where the session's zone (or style) was another. Spark
    sessions were expected in UTC already: only the format moves."""
    log.warning("Migrating the state table %s from format %d to %d.", state.display, meta.format, S.STATE_FORMAT)
    statements = []
    if warehouse.transactions:
        keys = {k: k for k in meta.key_columns}
        statements = _old_key_texts(warehouse, state, state.qualified, meta.columns, keys)
    bookkeeping = state.write_meta(
        token=meta.token,
        plan_id=meta.plan_id,
        columns=json.dumps(meta.columns),
        rows_sql=state.count_rows(),
        transactions=warehouse.transactions,
    )
    warehouse.execute([*statements, *bookkeeping])


def _instants(types: Mapping[str, str]) -> dict[str, str]:
    """Arrow types with every time zone named ``UTC``: a zoned timestamp is an instant whatever zone the reader
    named (DuckDB names its session's, ``Etc/UTC`` or ``UTC`` alike), so a zone name alone is no schema change."""
    return {name: _ZONE.sub("tz=UTC", text) for name, text in types.items()}


_ZONE = re.compile(r"tz=[^,\]\)]+")


def _source_schema(warehouse: Warehouse, state: S.StateTable, query: str, options: SyncOptions) -> pa.Schema:
    with closing(warehouse.batches(state.probe(query))) as batches:
        schema = next(iter(batches)).schema
    missing = [k for k in options.key_columns if k not in schema.names]
    if missing:
        raise StopChurnConfigError(
            f"Key column(s) {missing} are not in the source (columns: {schema.names}); set key_columns."
        )
    check_reserved_names(schema.names)  # the worker path's rule, with the worker path's error
    taken = [c for c in schema.names if c.startswith("_stopchurn_")]
    if taken:
        raise SourceDataError(
            f"Source column(s) {taken} start with '_stopchurn_', a prefix the warehouse diff reserves.\n"
            "Rename them in the query (SELECT ... AS other_name). Nothing was sent."
        )
    return schema


def _check_keys(warehouse: Warehouse, state: S.StateTable, query: str, options: SyncOptions) -> None:
    null_keys, repeated = warehouse.rows(state.key_check(query))[0]
    if null_keys:
        raise SafeguardError(
            f"{null_keys} source rows of {options.table_name!r} have a NULL in key column(s) "
            f"{list(options.key_columns)}; nothing was sent. Every row needs its key."
        )
    if repeated:
        examples = warehouse.rows(state.repeated_keys(query))
        raise SafeguardError(
            f"{repeated} keys of {options.table_name!r} are held by more than one source row (for example "
            f"{[tuple(r[:-1]) for r in examples]}); nothing was sent. Keys must be unique."
        )


@dataclass
class _Diff:
    update_all: bool
    baseline: bool
    schema_change: dict[str, Any] | None
    counts: dict[str, int]


def _decide(
    warehouse: Warehouse,
    state: S.StateTable,
    query: str,
    schema: pa.Schema,
    meta: _Meta | None,
    options: SyncOptions,
) -> _Diff:
    """Schema policy and counts (in SQL), and the safeguards on them."""
    columns = schema.names
    if meta is None:
        (total,) = warehouse.rows(state.r(f"SELECT COUNT(*) FROM {S.q(S.SOURCE)} AS s", query))[0]
        baseline = options.initial_load == "baseline"
        return _Diff(False, baseline, None, {"insert": 0 if baseline else int(total), "unchanged": int(total)})
    new_types = {f.name: str(f.type) for f in schema}
    change = kind_changes(_instants(meta.columns), _instants(new_types), meta.key_columns, tuple(options.key_columns))
    update_all = baseline = False
    schema_change = None
    if change:
        schema_change = {"policy": options.on_schema_change, **change}
        if options.on_schema_change == "fail" or ("key_columns" in change and options.on_schema_change != "rebaseline"):
            raise SafeguardError(
                f"The columns of brand {options.brand_id} table {options.table_name!r} changed; nothing was sent.\n"
                f"Source vs state table: {describe(change)}.\n"
                + (
                    "Key columns name the rows of the state table: only on_schema_change='rebaseline' can change them."
                    if "key_columns" in change
                    else "Set on_schema_change='update_all' to send every row with its new columns, or 'rebaseline' "
                    "to record the new table without sending."
                )
            )
        log.warning(
            "Schema change on %r (%s), policy on_schema_change=%r.",
            options.table_name,
            describe(change),
            options.on_schema_change,
        )
        baseline = options.on_schema_change == "rebaseline"
        update_all = not baseline
    if baseline:
        (total,) = warehouse.rows(state.r(f"SELECT COUNT(*) FROM {S.q(S.SOURCE)} AS s", query))[0]
        return _Diff(False, True, schema_change, {"unchanged": int(total)})
    raw = warehouse.rows(state.counts(query, columns, update_all=update_all))
    counts = {("unchanged" if op is None else str(op)): int(n) for op, n in raw}
    source_rows = counts.get("insert", 0) + counts.get("update", 0) + counts.get("unchanged", 0)
    committed = Committed(None, kinds={}, key_columns=options.key_columns, version=meta.token, rows=meta.rows)  # type: ignore[arg-type]
    check_safeguards(counts.get("delete", 0), source_rows, committed, options)
    return _Diff(update_all, False, schema_change, counts)


# --------------------------------------------------------------------------------------------------------------
# the changed rows, encoded as the local path encodes them
# --------------------------------------------------------------------------------------------------------------
def _change_batches(run: _Run, columns: Sequence[str], diff: _Diff, *, first: bool) -> Generator[pa.RecordBatch]:
    state = run.state
    sql = (
        state.first_load(run.query, columns) if first else state.changes(run.query, columns, update_all=diff.update_all)
    )
    yield from run.warehouse.batches(sql)


def _encode_batch(
    batch: pa.RecordBatch,
    columns: Sequence[str],
    options: SyncOptions,
    key_kinds: Mapping[str, str],
    run_ms: int,
) -> tuple[pl.DataFrame, dict[str, str]]:
    """One batch of changed rows -> plan rows (op, key texts, hash, createdAt, updatedAt, row JSON, sort keys)."""
    table = pa.Table.from_batches([batch])
    ops = table.column(S.OP)
    is_delete = pc.equal(ops, "delete")
    keys = list(options.key_columns)
    texts = [S.key_text(i) for i in range(len(keys))]
    parts: list[pl.DataFrame] = []
    kinds: dict[str, str] = {}
    upserts = table.filter(pc.invert(is_delete))
    if upserts.num_rows:
        canon = canonical_source(upserts.select(list(columns)), options)
        kinds = dict(canon.kinds)
        frame = canon.frame
        rows = encode_rows(  # every canonical column: the source's, and the id a composite key is given
            frame,
            {c: canon.kinds[c] for c in frame.columns},
            nest_dotted_columns=options.nest_dotted_columns,
            decimal_as_string=options.decimal_as_string,
        )
        meta = pl.from_arrow(upserts.select([*texts, S.NEW_HASH, S.OLD_CREATED, S.OP]))
        assert isinstance(meta, pl.DataFrame)
        created = timestamp_column(canon, options.created_at_column, "created_at")
        created_at = (created if created is not None else meta.get_column(S.OLD_CREATED).cast(pl.Int64)).fill_null(
            run_ms
        )
        if options.updated_at_column is not None:
            updated_at = frame.get_column(options.updated_at_column).cast(pl.Int64).fill_null(run_ms)
        else:
            updated_at = pl.repeat(run_ms, frame.height, dtype=pl.Int64, eager=True)
        parts.append(
            pl.DataFrame(
                [
                    meta.get_column(S.OP).cast(pl.String).alias(_OP),
                    *(meta.get_column(t).cast(pl.String) for t in texts),
                    meta.get_column(S.NEW_HASH).cast(pl.String).alias(_HASH),
                    created_at.cast(pl.Int64).alias(_CREATED),
                    updated_at.alias(_UPDATED),
                    rows.cast(pl.String).alias(_ROW),
                    *(_sort_key(frame.get_column(k), key_kinds.get(k, kinds[k]), i) for i, k in enumerate(keys)),
                ]
            )
        )
    deletes = table.filter(is_delete)
    if deletes.num_rows:
        meta = pl.from_arrow(deletes.select([*texts, S.OLD_CREATED, S.OLD_ROW]))
        assert isinstance(meta, pl.DataFrame)
        parts.append(
            pl.DataFrame(
                [
                    pl.repeat("delete", meta.height, dtype=pl.String, eager=True).alias(_OP),
                    *(meta.get_column(t).cast(pl.String) for t in texts),
                    pl.repeat(None, meta.height, dtype=pl.String, eager=True).alias(_HASH),
                    meta.get_column(S.OLD_CREATED).cast(pl.Int64).alias(_CREATED),
                    pl.repeat(run_ms, meta.height, dtype=pl.Int64, eager=True).alias(_UPDATED),
                    meta.get_column(S.OLD_ROW).cast(pl.String).alias(_ROW),
                    *(
                        _sort_key(meta.get_column(t), key_kinds.get(k, "string"), i)
                        for i, (t, k) in enumerate(zip(texts, keys, strict=True))
                    ),
                ]
            )
        )
    if not parts:
        return _empty_plan(len(keys)), kinds
    return pl.concat([p.select(_empty_plan(len(keys)).columns) for p in parts], how="vertical_relaxed"), kinds


def _sort_key(values: pl.Series, kind: str, i: int) -> pl.Series:
    """A key as the local path sorts it: integers as integers, everything else by its text."""
    name = f"__sc_sort_{i}"
    if kind == "int":
        return values.cast(pl.Int64).alias(name)
    return values.cast(pl.String).alias(name)


def _empty_plan(keys: int) -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            _OP: pl.String,
            **{S.key_text(i): pl.String for i in range(keys)},
            _HASH: pl.String,
            _CREATED: pl.Int64,
            _UPDATED: pl.Int64,
            _ROW: pl.String,
            **{f"__sc_sort_{i}": pl.String for i in range(keys)},
        }
    )


def _plan_frame(
    run: _Run, batches: Iterator[pa.RecordBatch], key_kinds: Mapping[str, str], first: bool
) -> pl.DataFrame:
    """Every changed row, in the local path's send order: a first load in source order; else deletes, updates,
    inserts, each by key."""
    frames = []
    kinds = dict(key_kinds)
    options = run.options
    columns: list[str] | None = None
    for batch in batches:
        if columns is None:
            columns = [c for c in batch.schema.names if not c.startswith("__sc_")]
        frame, batch_kinds = _encode_batch(batch, columns, options, kinds, run.run_ms)
        for k in options.key_columns:
            kinds.setdefault(k, batch_kinds.get(k, "string"))
        if frame.height:
            frames.append(frame)
    keys = len(options.key_columns)
    if not frames:
        return _empty_plan(keys).drop([f"__sc_sort_{i}" for i in range(keys)])
    frame = pl.concat(frames, how="vertical_relaxed")
    sort_columns = [f"__sc_sort_{i}" for i in range(keys)]
    if not first:
        rank = pl.col(_OP).replace_strict(_RANK, return_dtype=pl.Int8)
        frame = frame.with_columns(rank.alias("__sc_rank")).sort(["__sc_rank", *sort_columns], maintain_order=True)
        frame = frame.drop("__sc_rank")
    return frame.drop(sort_columns)


def windows(frame: pl.DataFrame, options: SyncOptions) -> Iterator[Window]:
    """The plan's updates, encoded and chunked ``window_rows`` at a time as the local path does."""
    for offset in range(0, frame.height, options.window_rows):
        part = frame.slice(offset, options.window_rows)
        updates = encode_updates(
            part.get_column(_OP),
            part.get_column(_ROW),
            part.get_column(_CREATED),
            part.get_column(_UPDATED),
            brand_id=options.brand_id,
            table_name=options.table_name,
        )
        yield _window(offset, [updates.alias("update")], options)


def _plan_meta(
    options: SyncOptions, state: S.StateTable, kinds: Mapping[str, str], schema: pa.Schema, run_ms: int
) -> dict[str, Any]:
    return {
        "plan_format": PLAN_FORMAT,
        "diff_location": DIFF_LOCATION,
        "brand_id": options.brand_id,
        "table_name": options.table_name,
        "state_table": state.display,
        "kinds": dict(kinds),
        "key_columns": list(options.key_columns),
        "columns": S.columns_text(schema),
        "run_ms": run_ms,
        "session_zone": S.SESSION_ZONE,
        # bounds the chunks a killed delivery can have had in flight (settle tells them from chunks never sent)
        "max_concurrent_requests": options.max_concurrent_requests,
    }


def _kinds(schema: pa.Schema, options: SyncOptions) -> dict[str, str]:
    """The source's kinds, as the canonical conversion names them for its (empty) result."""
    empty = pa.Table.from_batches([], schema=schema)
    try:
        return dict(canonical_source(empty, options).kinds)
    except Exception:  # an empty result may not satisfy every check (the user table's contract)
        return {f.name: "null" for f in schema}


def _plan_and_deliver(run: _Run, sender: Sender) -> None:
    store, warehouse, state, options, summary = run.store, run.warehouse, run.state, run.options, run.summary
    current = _current(store)
    meta = check_state(warehouse, state, store, current)
    schema = _source_schema(warehouse, state, run.query, options)
    _check_keys(warehouse, state, run.query, options)
    diff = _decide(warehouse, state, run.query, schema, meta, options)
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
        frame = _plan_frame(run, batches, key_kinds, meta is None)
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


def _key_kinds(kinds: Mapping[str, str], current: Mapping[str, Any] | None, options: SyncOptions) -> dict[str, str]:
    """The key columns' kinds as the local path sorts them (the committed ones win over an all-null source)."""
    key_kinds = {k: kinds.get(k, "string") for k in options.key_columns}
    committed = (current or {}).get("kinds") or {}
    key_kinds.update({k: v for k, v in committed.items() if k in options.key_columns and v != "null"})
    return key_kinds


def _check_plan(frame: pl.DataFrame, meta: _Meta, unchanged: int, options: SyncOptions) -> dict[str, int] | None:
    """The safeguards again, on the rows as read (the source may have moved since the counts); returns the
    approval of a mass delete ``allow_large_changes`` let through."""
    counted = _op_counts(frame.get_column(_OP))
    committed = Committed(None, kinds={}, key_columns=options.key_columns, version=meta.token, rows=meta.rows)  # type: ignore[arg-type]
    source_rows = counted.get("insert", 0) + counted.get("update", 0) + unchanged
    return check_safeguards(counted.get("delete", 0), source_rows, committed, options)


def _op_counts(ops: pl.Series) -> dict[str, int]:
    counts = ops.value_counts()
    return {
        str(k): int(v)
        for k, v in zip(counts.get_column(ops.name).to_list(), counts.get_column("count").to_list(), strict=True)
    }


def _deliver_and_settle(run: _Run, sender: Sender, plan: Plan, frame: pl.DataFrame) -> None:
    deliver_and_settle(
        run.store,
        plan,
        windows(frame, run.options),
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


def _commit(
    run: _Run, commit: _Commit, *, write_state: bool, statements: Sequence[str] = (), record: Any = None
) -> None:
    """Write ``statements`` and the new token into the warehouse (one transaction where it has them), then
    ``CURRENT`` with the same token."""
    warehouse, state, lock = run.warehouse, run.state, run.lock
    if lock is not None:
        lock.check()
    if write_state:
        bookkeeping = state.write_meta(
            token=commit.token,
            plan_id=commit.plan_id,
            columns=str(commit.meta["columns"]),
            rows_sql=state.count_rows(),
            transactions=warehouse.transactions,
        )
        if warehouse.transactions:
            warehouse.execute([*statements, *bookkeeping])
        else:
            if statements:
                warehouse.execute(statements)
            warehouse.execute(bookkeeping)
    found = _meta(warehouse, state)
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


# --------------------------------------------------------------------------------------------------------------
# settling into the state table
# --------------------------------------------------------------------------------------------------------------
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
    counts = _op_counts(frame.get_column(_OP).filter(pl.Series(status == _APPLIED)))
    result.inserted, result.updated, result.deleted = (counts.get(o, 0) for o in ("insert", "update", "delete"))
    count_unsent(result, plan, acks, uncertain, status)
    result.quarantine_uri = store.write_quarantine(plan.plan_id, result.rejections)  # still rejected, always
    if not (status != _NOT_APPLIED).any():
        store.discard_plan(plan)
        return result
    record = run(result) if run is not None else None
    meta = _meta(warehouse, state)
    already = meta is not None and meta.token == plan.target_version
    statements: list[str] = []
    if not already:
        keys = list(plan.meta["key_columns"])
        warehouse.load(_STAGING, _staged(frame, status, len(keys)))
        if "session_zone" not in plan.meta and warehouse.transactions:
            # planned before sessions were pinned to UTC: its zoned key texts are in the session's zone then
            texts = {k: S.key_text(i) for i, k in enumerate(keys)}
            statements += _old_key_texts(warehouse, state, S.q(_STAGING), S.columns_of(plan.meta.get("columns")), texts)
        statements += state.apply(_STAGING, transactions=warehouse.transactions)
    _commit(ctx, commit, write_state=not already, statements=statements, record=record)
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


def _staged(frame: pl.DataFrame, status: np.ndarray, keys: int) -> pa.Table:
    """The state table's new rows (``upsert``) and removed keys (``delete``) for a plan's statuses."""
    flags = pl.Series("__sc_status", status)
    marked = frame.with_columns(flags).filter(pl.col("__sc_status") != _NOT_APPLIED)
    applied = pl.col("__sc_status") == _APPLIED
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


# --------------------------------------------------------------------------------------------------------------
# baseline: record the source as delivered, nothing sent
# --------------------------------------------------------------------------------------------------------------
def _baseline(run: _Run, schema: pa.Schema, plan_meta: dict[str, Any], base: str | None, *, keep_created: bool) -> None:
    """Rebuild the state table from the source into a scratch table (every row encoded in the worker, a batch at
    a time), then swap it in with the new token. A plan marks the swap, so a crash is finished or dropped. Where
    the swap is one transaction the scratch table is the plan's own (``..__next_<plan>``): a run whose lease was
    taken meanwhile fills only its own, which the new owner dropped with its plan, never the new owner's."""
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
    with closing(warehouse.batches(state.baseline(run.query, columns, keep_created=keep_created))) as batches:
        for batch in batches:
            frame, _ = _encode_batch(batch, columns, options, kinds, run.run_ms)
            if frame.height:
                staged = _staged(frame, np.full(frame.height, _APPLIED, dtype=np.int8), len(options.key_columns))
                warehouse.load(_STAGING, staged)
                warehouse.execute([state.insert_next(_STAGING)])
    commit = _Commit(plan.target_version, plan.base_version, plan.plan_id, plan.meta)
    if warehouse.transactions:
        _commit(run, commit, write_state=True, statements=state.swap())
    else:
        warehouse.execute(state.swap())
        _commit(run, commit, write_state=True)


def _settle_baseline(run: _Run, plan: Plan, commit: _Commit, record: Any, result: Settled) -> Settled:
    """A baseline a crash interrupted: committed if its swap happened (the state holds its token), else dropped."""
    meta = _meta(run.warehouse, run.state)
    if meta is not None and meta.token == plan.target_version:
        _commit(run, commit, write_state=False, record=record)
        return result
    run.store.discard_plan(plan)  # the swap never happened: the state table is as it was
    scratch = [run.state.next]
    if run.warehouse.transactions:  # the plan's own scratch table (or ..__next, when planned by an older version)
        scratch.append(run.state.for_plan(plan.plan_id).next)
    run.warehouse.execute([run.state.r(f"DROP TABLE IF EXISTS {t}") for t in scratch])
    return result


# --------------------------------------------------------------------------------------------------------------
# dry run and repair
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
    frame, _ = _encode_batch(batch.slice(0, 5), schema.names, options, _key_kinds(kinds, current, options), run.run_ms)
    for window in windows(frame, options):
        summary.samples += [orjson.loads(u) for u in window.updates.to_list()]


def reconcile(source: WarehouseSource, store: SnapshotStore, options: SyncOptions, *, action: str) -> str:
    """Repair drift between the state table and the snapshot store (the ``stopchurn reconcile`` command).

    ``adopt-state``: the state table is right; ``CURRENT`` takes its token (any pending plan is dropped).
    ``reset``: drop the state table and the store's record; the next run is a first load (or, with
    ``initial_load='baseline'``, records the source without sending).
    """
    state = source.state(options)
    warehouse = source.warehouse
    try:
        with store.lock("stopchurn-reconcile", ttl_s=options.lock_ttl_s, wait_s=0) as lock:
            if action == "adopt-state":
                prepare_state(warehouse, state)
            pending = store.pending_plan(cleanup=False)
            if action == "adopt-state" and pending is not None:
                meta = _meta(warehouse, state)
                if meta is not None and meta.token == pending.target_version:
                    # the state table already holds that plan (a crash before CURRENT): finish it, nothing resent
                    settle_state(store, pending, store.acks(pending), warehouse, state, lock=lock)
                    return f"The state table {state.display} held plan {pending.plan_id}; it is now committed."
            if pending is not None:
                store.discard_plan(pending)
                if pending.meta.get("baseline") and warehouse.transactions:
                    warehouse.execute([state.r(f"DROP TABLE IF EXISTS {state.for_plan(pending.plan_id).next}")])
            if action == "reset":
                warehouse.execute(state.drop())
                current = store.read_current()
                if current is not None:
                    store.forget_current(lock=lock)
                return f"Dropped {state.display} and the store's record of {options.table_name!r}."
            meta = _meta(warehouse, state)
            if meta is None:
                raise StateDriftError(f"The state table {state.display} does not exist: nothing to adopt; use --reset.")
            current = store.read_current()
            store.commit(
                meta.token,
                base_version=None if current is None else str(current["version"]),
                kinds=(current or {}).get("kinds") or {},
                key_columns=list(meta.key_columns),
                rows=meta.rows,
                plan_id=meta.plan_id,
                row_hash=ROW_HASH,
                lock=lock,
                state={"diff_location": DIFF_LOCATION, "state_table": state.display},
            )
            return f"The store now records {state.display} (token {meta.token}, {meta.rows} rows) as delivered."
    finally:
        warehouse.close()
