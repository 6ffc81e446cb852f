"""The changed rows read from the warehouse, encoded as the local path encodes them: the plan frame (one row per
change, with its update's parts), in the local path's send order, and its updates chunked into windows."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from airflow_provider_stopchurn.encode.records import encode_rows, encode_updates, json_fragment
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.source.sql import BATCH_ROWS
from airflow_provider_stopchurn.update.plan import encoded_window, timestamp_column
from airflow_provider_stopchurn.update.sync import canonical_source
from airflow_provider_stopchurn.update.window import Window
from airflow_provider_stopchurn.warehouse import rows as R
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.bulk import load_bytes
from airflow_provider_stopchurn.warehouse.source import _Run

# the logger name the warehouse sync has always logged under: users and tests filter on it
log = logging.getLogger("airflow_provider_stopchurn.warehouse.engine")

__all__ = ["windows"]

#: plan frame columns
_OP, _HASH, _CREATED, _UPDATED, _ROW = "op", "hash", "created_at", "updated_at", "row"
_RANK = {"delete": 0, "update": 1, "insert": 2}


def _encode_batch(
    batch: pa.RecordBatch,
    columns: Sequence[str],
    options: SyncOptions,
    key_kinds: Mapping[str, str],
    run_ms: int,
    layouts: Mapping[str, Sequence[str]] | None = None,
    keep: R.RowLayout | None = None,
) -> tuple[pl.DataFrame, dict[str, str]]:
    """One batch of changed rows -> plan rows (op, key texts, hash, createdAt, updatedAt, row JSON, sort keys).

    :param layouts: the state table's row layouts, which rebuild a deleted row's JSON from its values.
    :param keep: the rows go to the state table only (a baseline): each row is written as the state table keeps
        it by this layout, not as JSON.
    """
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
        rows = (
            encode_rows(  # every canonical column: the source's, and the id a composite key is given
                frame,
                {c: canon.kinds[c] for c in frame.columns},
                nest_dotted_columns=options.nest_dotted_columns,
                decimal_as_string=options.decimal_as_string,
            )
            if keep is None
            else _kept_rows(frame, canon.kinds, options, keep)
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
                    R.expand(meta.get_column(S.OLD_ROW).cast(pl.String), layouts or {}).alias(_ROW),
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


def _kept_rows(frame: pl.DataFrame, kinds: Mapping[str, str], options: SyncOptions, keep: R.RowLayout) -> pl.Series:
    """Each row of a canonical ``frame`` as the state table keeps it by ``keep``, written from its values' JSON
    texts (no row JSON is made). A row whose values hold a separator, or a batch whose JSON is not written by
    this layout (checked on its first row), is kept as its JSON text."""
    nest, decimals = options.nest_dotted_columns, options.decimal_as_string
    every = {c: kinds[c] for c in frame.columns}

    def as_json(part: pl.DataFrame) -> pl.Series:
        return encode_rows(part, every, nest_dotted_columns=nest, decimal_as_string=decimals)

    if R.layout(frame.columns, nest_dotted_columns=nest) != keep.texts or frame.height == 0:
        return as_json(frame)
    names = R.holes(frame.columns, nest_dotted_columns=nest)
    values = [json_fragment(c, kinds[c], frame.schema[c], decimal_as_string=decimals) for c in names]
    kept = frame.select(R.kept_values(values, keep.tag).alias("row")).to_series()
    clean = kept.str.count_matches("[\x1e\x1f]") == len(names)  # RS once, US between the values
    first = clean.arg_true()
    if first.is_empty():
        return as_json(frame)
    i = int(first[0])
    if R.expand(kept.slice(i, 1), {keep.tag: keep.texts}).to_list() != as_json(frame.slice(i, 1)).to_list():
        log.warning("The state table keeps these rows as JSON text: their JSON is not written by its layout.")
        return as_json(frame)
    if bool(clean.all()):
        return kept
    return frame.select(pl.when(clean).then(kept).otherwise(as_json(frame)).alias("row")).to_series()


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
    run: _Run,
    batches: Iterator[pa.RecordBatch],
    key_kinds: Mapping[str, str],
    first: bool,
    layouts: Mapping[str, Sequence[str]] | None = None,
) -> pl.DataFrame:
    """Every changed row, in the local path's send order: a first load in source order; else deletes, updates,
    inserts, each by key.

    :param layouts: the state table's row layouts (a deleted row's JSON is rebuilt with them).
    """
    frames = []
    kinds = dict(key_kinds)
    options = run.options
    columns: list[str] | None = None
    for batch in sized(batches, load_bytes(run.warehouse.dialect)):
        if columns is None:
            columns = [c for c in batch.schema.names if not c.startswith("__sc_")]
        frame, batch_kinds = _encode_batch(batch, columns, options, kinds, run.run_ms, layouts)
        for k in options.key_columns:
            kinds.setdefault(k, batch_kinds.get(k, "string"))
        if frame.height:
            frames.append(frame)
    keys = len(options.key_columns)
    sort_columns = [f"__sc_sort_{i}" for i in range(keys)]
    if not frames:
        return _empty_plan(keys).drop(sort_columns)
    # the batches' frames as the chunks of one frame (no copy), and the list let go: each column below is then
    # held by that frame alone, and freed once it is copied into its final order
    frame = pl.concat(frames, how="vertical_relaxed", rechunk=False)
    frames.clear()
    if first:  # source order: the frame as read
        return frame.drop(sort_columns)
    return _sorted(frame, sort_columns)


def _sorted(frame: pl.DataFrame, sort_columns: Sequence[str]) -> pl.DataFrame:
    """``frame`` in the send order (deletes, updates, inserts, each by key), without its sort columns.

    The order is found on the narrow columns alone (op rank and sort keys); then one column at a time is copied
    into it and dropped from ``frame``, so the worker holds the plan once plus one column in flight, not the plan
    two or three times (the changed rows of a 100M-row table are about 1M: 343 MB each copy)."""
    rank = pl.col(_OP).replace_strict(_RANK, return_dtype=pl.Int8)
    order = (
        frame.select(rank.alias("__sc_rank"), *sort_columns)
        .with_row_index("__sc_at")
        .sort(["__sc_rank", *sort_columns], maintain_order=True)
        .get_column("__sc_at")
    )
    frame = frame.drop(sort_columns)
    columns: dict[str, pl.Series] = {}
    for name in list(frame.columns):
        columns[name] = frame.get_column(name).gather(order)
        frame = frame.drop(name)  # the unsorted column's buffers go with its last reference
    return pl.DataFrame(list(columns.values()))


def sized(batches: Iterable[pa.RecordBatch], size: int, rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """``batches`` re-cut to about ``size`` bytes and at most ``rows`` rows each, in order: a batch of wide rows
    is sliced (zero-copy), consecutive small ones of one schema (types and field metadata) are joined. So the
    encoding's own copies of a batch stay about ``size``, whatever the rows' width, and narrow rows are still
    encoded ``rows`` at a time (each encoding has a fixed cost)."""
    held: list[pa.RecordBatch] = []
    held_bytes = held_rows = 0
    for batch in batches:
        step = max(1, min(rows, int(size * batch.num_rows / max(1, batch.nbytes)))) if batch.num_rows else 1
        for offset in range(0, max(batch.num_rows, 1), step):
            part = batch.slice(offset, step) if step < batch.num_rows else batch
            # a batch of other types (a DB-API batch's types come from its own rows) starts a batch of its own;
            # so does one of other field metadata (a DB-API column of JSON values is marked so in its batch
            # only: joined, the rows of one batch would be encoded as the other's kind)
            full = held_bytes + part.nbytes > size or held_rows + part.num_rows > rows
            if held and (full or not part.schema.equals(held[0].schema, check_metadata=True)):
                yield held[0] if len(held) == 1 else pa.concat_batches(held)
                held, held_bytes, held_rows = [], 0, 0
            held.append(part)
            held_bytes += part.nbytes
            held_rows += part.num_rows
    if held:
        yield held[0] if len(held) == 1 else pa.concat_batches(held)


def window_rows(frame: pl.DataFrame, options: SyncOptions, size: int | None) -> int:
    """The rows of one window: ``window_rows``, or fewer so that a window's rows hold about ``size`` bytes of
    row JSON (a multiple of ``chunk_size``, at least one chunk): the window's update JSON and request bodies are
    what delivery holds beside the plan."""
    rows = options.window_rows
    if size is None or frame.height == 0:
        return rows
    row_bytes = int(frame.get_column(_ROW).str.len_bytes().sum() or 0)
    if row_bytes <= size:
        return rows
    fit = int(size * frame.height / row_bytes) // options.chunk_size * options.chunk_size
    return min(rows, max(options.chunk_size, fit))


def windows(frame: pl.DataFrame, options: SyncOptions, size: int | None = None) -> Iterator[Window]:
    """The plan's updates, encoded and chunked a window at a time as the local path does: ``window_rows`` rows,
    or fewer where ``size`` bounds a window's bytes (:func:`window_rows`)."""
    rows = window_rows(frame, options, size)
    offset = 0
    while offset < frame.height:
        # never across a window of the local path (its chunks end there)
        end = min(offset + rows, (offset // options.window_rows + 1) * options.window_rows, frame.height)
        part = frame.slice(offset, end - offset)
        updates = encode_updates(
            part.get_column(_OP),
            part.get_column(_ROW),
            part.get_column(_CREATED),
            part.get_column(_UPDATED),
            brand_id=options.brand_id,
            table_name=options.table_name,
        ).alias("update")
        window = encoded_window(offset, [updates], options)
        first, last = window.chunks[0][0], window.chunks[-1][0]
        if end < frame.height and end % options.window_rows and last > first and end - last < options.chunk_size:
            # cut short of the local path's window, its last chunk short of chunk_size: the local path may make
            # it longer (chunks cut by max_chunk_bytes), so it starts the next window and the bodies stay the
            # local path's
            start = last - offset
            window = encoded_window(offset, [updates.slice(0, start)], options)
        yield window
        offset = window.chunks[-1][1] if window.chunks else end


def _kinds(schema: pa.Schema, options: SyncOptions) -> dict[str, str]:
    """The source's kinds, as the canonical conversion names them for its (empty) result."""
    empty = pa.Table.from_batches([], schema=schema)
    try:
        return dict(canonical_source(empty, options).kinds)
    except Exception:  # an empty result may not satisfy every check (the user table's contract)
        return {f.name: "null" for f in schema}


def _key_kinds(kinds: Mapping[str, str], current: Mapping[str, Any] | None, options: SyncOptions) -> dict[str, str]:
    """The key columns' kinds as the local path sorts them (the committed ones win over an all-null source)."""
    key_kinds = {k: kinds.get(k, "string") for k in options.key_columns}
    committed = (current or {}).get("kinds") or {}
    key_kinds.update({k: v for k, v in committed.items() if k in options.key_columns and v != "null"})
    return key_kinds


def _op_counts(ops: pl.Series) -> dict[str, int]:
    counts = ops.value_counts()
    return {
        str(k): int(v)
        for k, v in zip(counts.get_column(ops.name).to_list(), counts.get_column("count").to_list(), strict=True)
    }
