"""Planning the diff in the warehouse: the source's columns and keys checked, the schema policy, the counts in
SQL and the safeguards on them (all before any row leaves the database), then the query of the changed rows and
the plan's bookkeeping."""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.exceptions import SafeguardError, SourceDataError, StopChurnConfigError
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.source.frame import check_reserved_names
from airflow_provider_stopchurn.store import Committed
from airflow_provider_stopchurn.update.plan import check_safeguards, describe, kind_changes
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.changes import _OP, _op_counts
from airflow_provider_stopchurn.warehouse.databases import Warehouse
from airflow_provider_stopchurn.warehouse.source import DIFF_LOCATION, PLAN_FORMAT, _Run
from airflow_provider_stopchurn.warehouse.sqlparts import key_index_valid
from airflow_provider_stopchurn.warehouse.state import _first_line, _Meta

# the logger name the warehouse sync has always logged under: users and tests filter on it
log = logging.getLogger("airflow_provider_stopchurn.warehouse.engine")


def _instants(types: Mapping[str, str]) -> dict[str, str]:
    """Arrow types with every time zone named ``UTC``: a zoned timestamp is an instant whatever zone the reader
    named (DuckDB names its session's, ``Etc/UTC`` or ``UTC`` alike), so a zone name alone is no schema change."""
    return {name: _ZONE.sub("tz=UTC", text) for name, text in types.items()}


#: SQLSTATEs of a scratch table that cannot hold the source's rows: a row wider than a page or too many columns
#: (program limits), a column type the role has no USAGE on; the run then diffs in two queries.
_SCRATCH_CANNOT_HOLD = frozenset({"54000", "54011", "42501"})
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


def _keys_unique_as_text(schema: pa.Schema, key_columns: Sequence[str]) -> bool:
    """Whether every value of the key columns has a text of its own (the narrow diff groups the key texts, the key
    check the values): not floats (0.0 and -0.0 are one key, two texts), decimals (PostgreSQL: 1.0 and 1.00) or
    intervals (1 day and 24 hours), whose keys only :func:`_check_keys` compares as the warehouse does."""
    inexact = (pa.types.is_floating, pa.types.is_decimal, pa.types.is_interval, pa.types.is_duration)
    return not any(test(schema.field(k).type) for k in key_columns for test in inexact)


def _check_keys(warehouse: Warehouse, state: S.StateTable, query: str, options: SyncOptions) -> None:
    """Refuse a source with a NULL key or a key of more than one row (a query of its own; the narrow diff finds
    both in its own pass, and calls this only to name them)."""
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
    #: the scratch table the narrow diff was written into (None: the counts came from a query of their own)
    scratch: str | None = None


def _decide(
    warehouse: Warehouse,
    state: S.StateTable,
    query: str,
    schema: pa.Schema,
    meta: _Meta | None,
    options: SyncOptions,
    scratch: str | None = None,
) -> _Diff:
    """Schema policy and counts (in SQL), and the safeguards on them. ``scratch``: the table to write the narrow
    diff into and count from (a run that may write; a dry run counts with one query and writes nothing); the key
    checks are then made here, in the narrow diff's own pass where it runs (else the caller made them)."""
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
            if scratch is not None:  # a source with bad keys is refused for them first, as it always was
                _check_keys(warehouse, state, query, options)
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
        if scratch is not None:  # no narrow diff follows: the keys are checked as they always were
            _check_keys(warehouse, state, query, options)
        (total,) = warehouse.rows(state.r(f"SELECT COUNT(*) FROM {S.q(S.SOURCE)} AS s", query))[0]
        return _Diff(False, True, schema_change, {"unchanged": int(total)})
    counts = None
    if scratch is not None:
        try:
            counts = _narrow_counts(warehouse, state, scratch, query, columns, update_all=update_all, options=options)
        except Exception as err:
            if getattr(err, "sqlstate", None) not in _SCRATCH_CANNOT_HOLD:
                raise
            # rows no table can store here (wider than a page, of a type the role may not use): the two queries
            log.warning(
                "The narrow diff's scratch table cannot hold this source (%s); diffing in two queries.",
                _first_line(err),
            )
            scratch = None
            _check_keys(warehouse, state, query, options)
    if counts is None:
        raw = warehouse.rows(state.counts(query, columns, update_all=update_all))
        counts = {("unchanged" if op is None else str(op)): int(n) for op, n in raw}
    source_rows = counts.get("insert", 0) + counts.get("update", 0) + counts.get("unchanged", 0)
    committed = Committed(None, kinds={}, key_columns=options.key_columns, version=meta.token, rows=meta.rows)  # type: ignore[arg-type]
    check_safeguards(counts.get("delete", 0), source_rows, committed, options)
    return _Diff(update_all, False, schema_change, counts, scratch)


def _narrow_counts(
    warehouse: Warehouse,
    state: S.StateTable,
    scratch: str,
    query: str,
    columns: Sequence[str],
    *,
    update_all: bool,
    options: SyncOptions,
) -> dict[str, int]:
    """Write the narrow diff into ``scratch``, check the source's keys on it, and count it.

    Keys are unique in the state table (its making), so the state's rows are those in the narrow diff with their
    key in the state table (changed or deleted) and the unchanged ones. Each unchanged source row matches one
    state row, so more unchanged source rows than that, like a changed key of more than one row, is a key held by
    more than one source row; a NULL key has an op of its own (:meth:`~.sql.StateTable.diff_into`). Either is
    refused with the message of :func:`_check_keys`, which names the keys (its query runs only then)."""
    warehouse.execute(state.diff_into(scratch, query, columns, update_all=update_all))
    counts: dict[str, int] = {}
    in_state = unchanged_rows = 0
    repeated = False
    for op, known, keys, n in warehouse.rows(state.narrow_counts(scratch)):
        if op is None:  # the unchanged rows: one group
            unchanged_rows = int(n)
            continue
        counts[str(op)] = counts.get(str(op), 0) + int(n)
        in_state += int(n) if int(known) else 0
        repeated = repeated or (op != "delete" and int(n) > int(keys))  # a changed key of more than one row
    ((state_rows,),) = warehouse.rows(state.count_rows())
    unchanged = int(state_rows) - in_state
    if counts.pop(S.NULL_KEY, 0) or repeated or unchanged_rows > unchanged:
        _check_keys(warehouse, state, query, options)
        # the source moved between the two reads: its keys are refused all the same (the next run reads it again)
        raise SafeguardError(
            f"Source rows of {options.table_name!r} had a NULL or repeated key while they were diffed; nothing was "
            "sent. Every row needs its own key; the next run reads the source again."
        )
    if unchanged:
        counts["unchanged"] = unchanged
    return counts


def _change_batches(run: _Run, columns: Sequence[str], diff: _Diff, *, first: bool) -> Generator[pa.RecordBatch]:
    state = run.state
    if first:
        sql = state.first_load(run.query, columns)
    else:
        indexed = True
        if diff.scratch is not None and state.dialect in S.ONE_PASS:  # a role that may not add it runs without
            index = f"{S.q(state.schema)}.{S.q(state.short() + '__key')}"
            indexed = bool(run.warehouse.rows(key_index_valid(index))[0][0])
        sql = state.changes(run.query, columns, update_all=diff.update_all, among=diff.scratch, indexed=indexed)
    yield from run.warehouse.batches(sql)


def _plan_meta(
    options: SyncOptions, state: S.StateTable, kinds: Mapping[str, str], schema: pa.Schema, run_ms: int
) -> dict[str, Any]:
    return {
        "plan_format": PLAN_FORMAT,
        "diff_location": DIFF_LOCATION,
        "brand_id": options.brand_id,
        "table_name": options.table_name,
        # tells the settle of a killed try whether it was this DAG run's (counted with it) or another run's
        "run_key": options.run_key,
        "state_table": state.display,
        "kinds": dict(kinds),
        "key_columns": list(options.key_columns),
        "columns": S.columns_text(schema),
        # with the kinds (the frame's columns, in order), the constant text of every row's JSON (warehouse/rows.py)
        "nest_dotted_columns": options.nest_dotted_columns,
        "run_ms": run_ms,
        "session_zone": S.SESSION_ZONE,
        # bounds the chunks a killed delivery can have had in flight (settle tells them from chunks never sent)
        "max_concurrent_requests": options.max_concurrent_requests,
    }


def _check_plan(frame: pl.DataFrame, meta: _Meta, unchanged: int, options: SyncOptions) -> dict[str, int] | None:
    """The safeguards again, on the rows as read (the source may have moved since the counts); returns the
    approval of a mass delete ``allow_large_changes`` let through."""
    counted = _op_counts(frame.get_column(_OP))
    committed = Committed(None, kinds={}, key_columns=options.key_columns, version=meta.token, rows=meta.rows)  # type: ignore[arg-type]
    source_rows = counted.get("insert", 0) + counted.get("update", 0) + unchanged
    return check_safeguards(counted.get("delete", 0), source_rows, committed, options)
