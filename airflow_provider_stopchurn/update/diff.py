"""Vectorised diff of two canonical tables by key: inserted / updated / deleted rows.

One full outer join on the key columns classifies every key; the rows present on both sides are compared
column by column with ``ne_missing`` (null equals null, NaN equals NaN), so change detection is exact (no
hashing). An Int64 column on one side and a Float64 column on the other (pandas turns an integer column with
missing values into floats) are compared numerically as Float64; a column missing on one side counts as all
null there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl
from polars._typing import PolarsDataType

from airflow_provider_stopchurn.store import CREATED_AT, HASH_1, HASH_2, META_COLUMNS
from airflow_provider_stopchurn.update.keys import (
    BASE_ROW,
    DIRTY_HASH,
    DIRTY_INSERT,
    DIRTY_UPDATE,
    KEY_SEED,
    match_keys,
    snapshot_states,
)

__all__ = [
    "BASE_ROW",
    "DIRTY_HASH",
    "DIRTY_INSERT",
    "DIRTY_UPDATE",
    "ROW_HASH",
    "TARGET_ROW",
    "ChangeSet",
    "SnapshotDiff",
    "change_states",
    "data_columns",
    "deleted_rows",
    "diff_frames",
    "diff_snapshot",
    "first_load",
    "like_chunks",
    "with_hashes",
]

_NEW_FLAG = "\x00in_new"
_BASE_FLAG = "\x00in_base"
_BASE_PREFIX = "\x00base\x00"


@dataclass(frozen=True)
class ChangeSet:
    """The difference between the last delivered table (``base``) and the current one (``new``).

    ``inserted`` and ``updated`` hold rows of ``new``, ``deleted`` rows of ``base`` as last delivered; each keeps
    the column order of its source frame and is sorted by the key columns.
    """

    inserted: pl.DataFrame
    updated: pl.DataFrame
    deleted: pl.DataFrame
    unchanged: int

    @property
    def changed(self) -> int:
        return self.inserted.height + self.updated.height + self.deleted.height


def _comparable(new_dtype: pl.DataType, base_dtype: pl.DataType) -> PolarsDataType | None:
    """The dtype both sides are cast to before comparing, or None when they already match."""
    if new_dtype == base_dtype:
        return None
    if new_dtype == pl.Null:
        return base_dtype
    if base_dtype == pl.Null:
        return new_dtype
    if new_dtype.is_numeric() and base_dtype.is_numeric():
        if new_dtype.is_integer() and base_dtype.is_integer():
            return pl.Int64
        return pl.Float64
    return pl.String


def diff_frames(base: pl.DataFrame | None, new: pl.DataFrame, key_columns: Sequence[str]) -> ChangeSet:
    """Diff ``new`` against ``base`` (``None`` or empty: every row of ``new`` is inserted)."""
    keys = [key_columns] if isinstance(key_columns, str) else list(key_columns)
    if not keys:
        raise ValueError("At least one key column is required.")
    for side, frame in (("new", new), ("base", base)):
        if frame is not None:
            absent = [k for k in keys if k not in frame.columns]
            if absent:
                raise ValueError(f"Key column(s) {absent!r} missing from the {side} frame.")

    if base is None or base.height == 0:
        return ChangeSet(
            inserted=new.sort(keys),
            updated=new.clear(),
            deleted=(base if base is not None else new).clear(),
            unchanged=0,
        )
    if new.height == 0:
        return ChangeSet(inserted=new.clear(), updated=new.clear(), deleted=base.sort(keys), unchanged=0)

    # Join keys must share a dtype.
    new_keys: list[pl.Expr] = []
    base_keys: list[pl.Expr] = []
    for k in keys:
        target = _comparable(new.schema[k], base.schema[k])
        new_keys.append(pl.col(k) if target is None else pl.col(k).cast(target))
        base_keys.append(pl.col(k) if target is None else pl.col(k).cast(target))

    value_columns = [c for c in new.columns if c not in keys]
    base_only = [c for c in base.columns if c not in keys and c not in new.columns]
    base_renamed = {c: f"{_BASE_PREFIX}{i}" for i, c in enumerate(base.columns) if c not in keys}

    new_lazy = new.lazy().with_columns(*new_keys)
    base_lazy = base.lazy().with_columns(*base_keys)

    diffs: list[pl.Expr] = []
    for c in value_columns:
        new_dtype = new.schema[c]
        if c in base_renamed:
            other = pl.col(base_renamed[c])
            target = _comparable(new_dtype, base.schema[c])
        else:
            other = pl.lit(None, dtype=new_dtype)
            target = None
        mine = pl.col(c)
        if target is not None:
            mine, other = mine.cast(target), other.cast(target)
        diffs.append(mine.ne_missing(other))
    diffs.extend(pl.col(base_renamed[c]).is_not_null() for c in base_only)
    changed = pl.any_horizontal(diffs) if diffs else pl.lit(False)

    key_order = [pl.col(k) for k in keys]
    inserted_q = new_lazy.join(base_lazy.select(keys), on=keys, how="anti", nulls_equal=True)
    deleted_q = base_lazy.join(new_lazy.select(keys), on=keys, how="anti", nulls_equal=True)
    updated_q = (
        new_lazy.join(base_lazy.rename(base_renamed), on=keys, how="inner", nulls_equal=True)
        .filter(changed)
        .select(new.columns)
    )
    inserted, deleted, updated = pl.collect_all([q.sort(key_order) for q in (inserted_q, deleted_q, updated_q)])
    inserted = inserted.cast(new.schema)
    updated = updated.cast(new.schema)
    deleted = deleted.cast(base.schema)
    matched = new.height - inserted.height
    return ChangeSet(
        inserted=inserted,
        updated=updated,
        deleted=deleted,
        unchanged=matched - updated.height,
    )


# --------------------------------------------------------------------------------------------------------------
# Row hashes and the snapshot diff (positions of every change in the base and target snapshots)
# --------------------------------------------------------------------------------------------------------------
#: Column of a change frame: the row's position in the target snapshot (inserts and updates).
TARGET_ROW = "__sc_target_row"
_SEEDS = (KEY_SEED, 0x0BADC0DE)


def _row_hash_id() -> str:
    """Name the row-hash function by what it computes on a fixed probe table.

    Polars promises stable hashes within one version only, and its hashers may differ between CPUs. A snapshot
    records this id; a worker whose hashes differ (another polars version, another platform) sees another id
    and compares the columns themselves instead of trusting the stored hashes.
    """
    probe = pl.DataFrame(
        {"i": [1, None, 2**62], "f": [1.5, None, -0.0], "s": ["x", None, "é"], "b": [True, None, False]}
    )
    values = [probe.hash_rows(seed=seed).to_list() for seed in _SEEDS]
    return f"polars-{pl.__version__}-" + hashlib.sha256(repr(values).encode()).hexdigest()[:16]


ROW_HASH = _row_hash_id()


def data_columns(frame: pl.DataFrame) -> list[str]:
    """The data columns of a snapshot or change frame (without createdAt, hashes and bookkeeping)."""
    return [c for c in frame.columns if c not in _BOOKKEEPING]


def with_hashes(frame: pl.DataFrame) -> pl.DataFrame:
    """Add two independent 64-bit hashes of each row's data columns (in name order: column order is free).

    Together they are 128 bits: a changed row keeping both hashes has a chance of about 2^-128. A run whose
    hash function differs (``ROW_HASH``) compares the columns themselves instead and rewrites the hashes.
    """
    data = frame.select(sorted(data_columns(frame)))
    return frame.drop([c for c in (HASH_1, HASH_2) if c in frame.columns]).with_columns(
        like_chunks(_hash_rows(data, _SEEDS[0]).alias(HASH_1), frame),
        like_chunks(_hash_rows(data, _SEEDS[1]).alias(HASH_2), frame),
    )


def like_chunks(series: pl.Series, frame: pl.DataFrame) -> pl.Series:
    """``series`` (as long as ``frame``) cut into the chunks of ``frame``'s columns, without a copy.

    A SQL source's canonical frame holds one chunk per batch. polars copies a frame whole at every lazy step
    (select, filter, with_columns) while its columns are chunked differently, so a column added to it (a row hash,
    createdAt, a position) is first cut like the others: zero-copy slices of its one chunk.
    """
    if not frame.width or frame.height != series.len():
        return series
    lengths = frame.get_column(frame.columns[0]).chunk_lengths()
    if series.chunk_lengths() == lengths:
        return series
    if len(lengths) <= 1:
        return series.rechunk()
    whole = series.rechunk()
    starts = np.cumsum([0, *lengths[:-1]])
    return pl.concat([whole.slice(int(start), n) for start, n in zip(starts, lengths, strict=True)], rechunk=False)


#: Rows hashed at a time: a row's hash depends on that row alone, and hashing a whole table at once holds
#: per-column temporaries of every row (about 90 MB above the table for 1M rows of 12 columns).
_HASH_BATCH = 100_000


def _hash_rows(data: pl.DataFrame, seed: int) -> pl.Series:
    if data.height <= _HASH_BATCH:
        return data.hash_rows(seed=seed)
    parts = [data.slice(i, _HASH_BATCH).hash_rows(seed=seed) for i in range(0, data.height, _HASH_BATCH)]
    return pl.concat(parts, rechunk=True)


@dataclass(frozen=True)
class SnapshotDiff:
    """A source against the committed snapshot, with each change's place in both snapshots.

    ``target`` is the snapshot to commit (the source + ``createdAt`` + row hashes, in source order). ``inserted``
    and ``updated`` are rows of ``target`` (with ``TARGET_ROW``; ``updated`` also ``BASE_ROW``), ``deleted`` rows of
    the committed snapshot as last delivered (with ``BASE_ROW``); each sorted by key. Positions let a partly
    delivered plan be settled whatever the dtypes of the two snapshots.
    """

    target: pl.DataFrame
    inserted: pl.DataFrame
    updated: pl.DataFrame
    deleted: pl.DataFrame
    unchanged: int


class BaseSnapshot(Protocol):
    """What the diff reads of the committed snapshot (``snapshot.Committed``)."""

    def columns(self, names: Sequence[str]) -> pl.DataFrame: ...
    def rows_at(self, positions: np.ndarray) -> pl.DataFrame: ...
    def rows_with_keys(self, keys: pl.DataFrame) -> pl.DataFrame: ...

    @property
    def frame(self) -> pl.DataFrame: ...


def _rows_differ(new: pl.DataFrame, base: pl.DataFrame) -> pl.Series:
    """Row-aligned exact comparison (null equals null): which rows differ in any data column."""
    new_cols, base_cols = data_columns(new), data_columns(base)
    diffs: list[pl.Series] = []
    for c in new_cols:
        mine = new.get_column(c)
        if c not in base_cols:
            diffs.append(mine.is_not_null())
            continue
        other = base.get_column(c)
        common = _comparable(mine.dtype, other.dtype)
        if common is not None:
            mine, other = mine.cast(common, strict=False), other.cast(common, strict=False)
        diffs.append(mine.ne_missing(other))
    diffs.extend(base.get_column(c).is_not_null() for c in base_cols if c not in new_cols)
    if not diffs:
        return pl.Series([False] * new.height, dtype=pl.Boolean)
    return pl.DataFrame(diffs).select(pl.any_horizontal(pl.all())).to_series()


def change_states(
    hashed: pl.DataFrame, old: pl.DataFrame, positions: pl.Series, flags: pl.Series | None, *, update_all: bool
) -> pl.DataFrame:
    """Each source row's ``state`` (0 unchanged, 1 insert, 2 update), its key's old createdAt and ``BASE_ROW``.

    The old rows' hashes are gathered one batch of source rows at a time, so no full-height copy of them is held.

    :param hashed: source rows with their row hashes (:func:`with_hashes`).
    :param old: the snapshot's createdAt and row hashes, by row (``snapshot_states``).
    :param positions: each of ``hashed``'s rows' row in the snapshot (``KeyMatch.positions``, or a slice of it).
    :param flags: the rows whose columns differ (an exact diff), or None to compare the hashes.
    :param update_all: every key the snapshot has counts as updated (a schema change being sent).
    """
    olds = old.select(
        pl.col(CREATED_AT).alias("__sc_old_created"),
        pl.col(HASH_1).alias("__sc_old_1"),
        pl.col(HASH_2).alias("__sc_old_2"),
    )
    is_new = pl.col(BASE_ROW).is_null()
    dirty = (pl.col("__sc_old_1") == DIRTY_HASH) & (pl.col("__sc_old_2") == DIRTY_UPDATE)
    dirty_insert = (pl.col("__sc_old_1") == DIRTY_HASH) & (pl.col("__sc_old_2") == DIRTY_INSERT)
    if update_all:
        changed: pl.Expr = pl.lit(True)
    elif flags is None:
        changed = (pl.col(HASH_1) != pl.col("__sc_old_1")) | (pl.col(HASH_2) != pl.col("__sc_old_2"))
    else:
        changed = pl.col("__sc_differs")
    state = pl.when(is_new | dirty_insert).then(1).when(changed | dirty).then(2).otherwise(0).cast(pl.Int8)
    parts = []
    for i in range(0, max(hashed.height, 1), _HASH_BATCH):
        rows = positions.slice(i, _HASH_BATCH)
        batch = [
            hashed.select(HASH_1, HASH_2).slice(i, _HASH_BATCH),
            olds.select(pl.all().gather(rows)),
            rows.alias(BASE_ROW).to_frame(),
        ]
        if flags is not None:
            batch.append(flags.slice(i, _HASH_BATCH).to_frame())
        part = pl.concat(batch, how="horizontal")
        parts.append(part.select(state.alias("state"), pl.col("__sc_old_created"), pl.col(BASE_ROW)))
    return pl.concat(parts, rechunk=True)


def diff_snapshot(
    new_data: pl.DataFrame,
    base: BaseSnapshot,
    keys: Sequence[str],
    *,
    created: pl.Series | None,
    run_ms: int,
    by_hash: bool,
    update_all: bool = False,
) -> SnapshotDiff:
    """Diff a canonical source against the committed snapshot ``base``.

    :param created: each source row's createdAt (epoch ms) from a named column, or None to keep the createdAt
        recorded for known keys (new keys get ``run_ms``).
    :param by_hash: compare the stored row hashes (the snapshot was hashed by this ``ROW_HASH`` and its kinds
        equal the source's); otherwise the data columns are compared exactly.
    :param update_all: every key present on both sides counts as updated (a schema change being sent).
    """
    keys = list(keys)
    match = match_keys(new_data, base.columns(keys), keys)
    positions, gone = match.positions, match.gone
    old = snapshot_states(base.columns([CREATED_AT, HASH_1, HASH_2]), match)
    hashed = with_hashes(new_data)
    flags = None
    if not (update_all or by_hash):
        pairs = pl.DataFrame([positions]).with_row_index(TARGET_ROW).filter(pl.col(BASE_ROW).is_not_null())
        differ = _rows_differ(
            new_data.select(data_columns(new_data))[pairs.get_column(TARGET_ROW)],
            base.frame.select(data_columns(base.frame))[pairs.get_column(BASE_ROW)],
        )
        flags = pl.Series("__sc_differs", [False] * new_data.height, dtype=pl.Boolean)
        flags = flags.scatter(pairs.get_column(TARGET_ROW).to_numpy(), differ)
    matched = change_states(hashed, old, positions, flags, update_all=update_all)
    state = matched.get_column("state")
    created_at = created if created is not None else matched.get_column("__sc_old_created")
    columns = [*new_data.columns, CREATED_AT]
    target = hashed.with_columns(
        like_chunks(created_at.fill_null(run_ms).cast(pl.Int64).alias(CREATED_AT), hashed)
    ).select([*columns, HASH_1, HASH_2])
    index = target.select(pl.first()).with_row_index(TARGET_ROW).get_column(TARGET_ROW)
    indexed = pl.DataFrame(
        [like_chunks(index, target), *target.select(columns).get_columns(), like_chunks(matched[BASE_ROW], target)]
    )
    inserted = indexed.filter(state == 1).sort(keys)  # BASE_ROW: a dirty row a settle kept, else null
    updated = indexed.filter(state == 2).sort(keys)
    deleted = deleted_rows(base, gone, keys)
    unchanged = new_data.height - inserted.height - updated.height
    return SnapshotDiff(target=target, inserted=inserted, updated=updated, deleted=deleted, unchanged=unchanged)


def deleted_rows(base: BaseSnapshot, gone: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The snapshot's rows of the keys no source row has, as last delivered, with ``BASE_ROW``; sorted.

    They are read at their positions (``BASE_ROW``), which the key match found: only the row groups holding them
    are decoded, and no column is read again to find them.

    :param base: the committed snapshot.
    :param gone: those keys, with their ``BASE_ROW`` (``KeyMatch.gone``: each key once).
    :param keys: the key columns.
    """
    gone = gone.select([*keys, BASE_ROW])
    if not gone.height:
        return gone.select(BASE_ROW)
    at = gone.get_column(BASE_ROW).sort()
    rows = base.rows_at(at.to_numpy())
    rows = rows.drop([c for c in (HASH_1, HASH_2) if c in rows.columns])
    return rows.with_columns(like_chunks(at.alias(BASE_ROW), rows)).sort(keys)


def first_load(new_data: pl.DataFrame, *, created: pl.Series | None, run_ms: int) -> pl.DataFrame:
    """The target snapshot of a first load (every row an insert, in source order)."""
    if created is not None:
        created_at = created.fill_null(run_ms).cast(pl.Int64)
    else:
        created_at = pl.repeat(run_ms, new_data.height, dtype=pl.Int64, eager=True)
    return with_hashes(new_data.with_columns(like_chunks(created_at.alias(CREATED_AT), new_data)))


_BOOKKEEPING = frozenset({*META_COLUMNS, TARGET_ROW, BASE_ROW})
