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

import polars as pl
from polars._typing import PolarsDataType

from airflow_provider_stopchurn.store import CREATED_AT, HASH_1, HASH_2, META_COLUMNS

__all__ = [
    "BASE_ROW",
    "DIRTY_HASH",
    "DIRTY_INSERT",
    "DIRTY_UPDATE",
    "ROW_HASH",
    "TARGET_ROW",
    "ChangeSet",
    "SnapshotDiff",
    "data_columns",
    "diff_frames",
    "diff_snapshot",
    "first_load",
    "reconcile_ids",
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
#: Column of a change frame: the row's position in the base (committed) snapshot (updates and deletes).
BASE_ROW = "__sc_base_row"
#: A snapshot row whose first hash is ``DIRTY_HASH`` may differ from what StopChurn holds (its request was sent
#: but never acknowledged, or its values were converted across a schema change): the next diff always sends the
#: key's current state again. The second hash says how: ``DIRTY_UPDATE`` (StopChurn holds the key) or
#: ``DIRTY_INSERT`` (StopChurn may not hold it yet; sent as an insert).
DIRTY_HASH = 0
DIRTY_UPDATE = 0
DIRTY_INSERT = 1

_SEEDS = (0x5EED0001, 0x0BADC0DE)


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
        data.hash_rows(seed=_SEEDS[0]).alias(HASH_1),
        data.hash_rows(seed=_SEEDS[1]).alias(HASH_2),
    )


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
    def rows_with_keys(self, keys: pl.DataFrame) -> pl.DataFrame: ...

    @property
    def frame(self) -> pl.DataFrame: ...


def _join_keys(new: pl.DataFrame, old: pl.DataFrame, keys: Sequence[str]) -> tuple[list[pl.Expr], list[pl.Expr]]:
    """Join expressions for both sides.

    A key column whose type changed (``1`` -> ``"1"``) names other rows: StopChurn does not promise that ``1`` and
    ``"1"`` are one id, so no old key matches a new one (the old rows are deleted, the new ones inserted). The
    all-null key column of an empty snapshot matches nothing anyway.
    """
    new_exprs, old_exprs = [], []
    for i, k in enumerate(keys):
        name = f"__sc_k{i}"
        if new.schema[k] == old.schema[k]:
            new_exprs.append(pl.col(k).alias(name))
            old_exprs.append(pl.col(k).alias(name))
        else:  # tagged texts that cannot be equal
            new_exprs.append(pl.concat_str(pl.lit("n"), pl.col(k).cast(pl.String)).alias(name))
            old_exprs.append(pl.concat_str(pl.lit("o"), pl.col(k).cast(pl.String)).alias(name))
    return new_exprs, old_exprs


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


def _match(
    left: pl.DataFrame, old: pl.DataFrame, new_keys: pl.DataFrame, old_join: list[pl.Expr], join_names: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each source row with its old row (a left join, row-aligned with the source when the old keys are unique),
    and the old rows whose key the source lacks (with their join columns)."""
    right = old.select(
        *old_join,
        pl.col(BASE_ROW),
        pl.col(CREATED_AT).alias("__sc_old_created"),
        pl.col(HASH_1).alias("__sc_old_1"),
        pl.col(HASH_2).alias("__sc_old_2"),
    )
    matched = left.join(right, on=join_names, how="left", maintain_order="left")
    gone = old.with_columns(old_join).join(new_keys, on=join_names, how="anti")
    return matched, gone


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
    old = base.columns([*keys, CREATED_AT, HASH_1, HASH_2]).with_row_index(BASE_ROW)
    new_join, old_join = _join_keys(new_data, old, keys)
    join_names = [f"__sc_k{i}" for i in range(len(keys))]
    hashed = with_hashes(new_data)
    left = hashed.select(*new_join, pl.col(HASH_1), pl.col(HASH_2))
    matched, gone = _match(left, old, new_data.select(new_join), old_join, join_names)
    if matched.height != left.height or (gone.height and gone.select(join_names).is_duplicated().any()):
        # the snapshot holds a key twice (an older version committed it so): found by the joins' heights, which
        # costs nothing, instead of marking duplicates over the whole snapshot on every run
        old = _one_row_per_key(old, keys)
        matched, gone = _match(left, old, new_data.select(new_join), old_join, join_names)
    is_new = pl.col(BASE_ROW).is_null()
    dirty = (pl.col("__sc_old_1") == DIRTY_HASH) & (pl.col("__sc_old_2") == DIRTY_UPDATE)
    dirty_insert = (pl.col("__sc_old_1") == DIRTY_HASH) & (pl.col("__sc_old_2") == DIRTY_INSERT)
    if update_all:
        changed: pl.Expr = pl.lit(True)
    elif by_hash:
        changed = (pl.col(HASH_1) != pl.col("__sc_old_1")) | (pl.col(HASH_2) != pl.col("__sc_old_2"))
    else:
        pairs = matched.with_row_index(TARGET_ROW).filter(~is_new).select(TARGET_ROW, BASE_ROW)
        differ = _rows_differ(
            new_data.select(data_columns(new_data))[pairs.get_column(TARGET_ROW)],
            base.frame.select(data_columns(base.frame))[pairs.get_column(BASE_ROW)],
        )
        flags = pl.Series("__sc_differs", [False] * matched.height, dtype=pl.Boolean)
        flags = flags.scatter(pairs.get_column(TARGET_ROW).to_numpy(), differ)
        matched = matched.with_columns(flags)
        changed = pl.col("__sc_differs")
    state = matched.select(
        pl.when(is_new | dirty_insert).then(1).when(changed | dirty).then(2).otherwise(0).cast(pl.Int8).alias("state")
    ).to_series()
    created_at = created if created is not None else matched.get_column("__sc_old_created")
    columns = [*new_data.columns, CREATED_AT]
    target = hashed.with_columns(created_at.fill_null(run_ms).cast(pl.Int64).alias(CREATED_AT)).select(
        [*columns, HASH_1, HASH_2]
    )
    indexed = target.select(columns).with_row_index(TARGET_ROW).with_columns(matched.get_column(BASE_ROW))
    inserted = indexed.filter(state == 1).sort(keys)  # BASE_ROW: a dirty row a settle kept, else null
    updated = indexed.filter(state == 2).sort(keys)
    gone = gone.select([*keys, BASE_ROW])
    if gone.height:
        rows = base.rows_with_keys(gone.select(keys)).unique(subset=keys, keep="first", maintain_order=True)
        deleted = (
            rows.drop([c for c in (HASH_1, HASH_2) if c in rows.columns])
            .join(gone, on=keys, how="left", maintain_order="left")
            .sort(keys)
        )
    else:
        deleted = old.select(BASE_ROW).clear()
    unchanged = new_data.height - inserted.height - updated.height
    return SnapshotDiff(target=target, inserted=inserted, updated=updated, deleted=deleted, unchanged=unchanged)


ID = "id"


def reconcile_ids(diff: SnapshotDiff, base: BaseSnapshot, keys: Sequence[str]) -> tuple[SnapshotDiff, bool]:
    """The key diff made right for StopChurn, which keys rows by ``id``, when ``id`` is not the whole key.

    A key diff sends one update per changed key. With an ``id`` column of its own (key ``("tenant", "id")``, or
    ``user_key`` beside an ``id``), ids can move between keys, and what StopChurn must end with is decided by id:

    - a row whose ``id`` changed: its old id is deleted (a delete of its own base row, sent before any insert or
      update: see below) and its new id written, as an ``insert`` unless StopChurn holds that id after the plan's
      deletes;
    - a deleted key whose id a target row now holds sends no delete (a delete landing after the new row's update
      would remove it): the insert of a new key taking that id becomes an ``update`` of it, settled as replacing
      the deleted key's row (a row moving between tenants);
    - any other deleted key's id is deleted.

    Returns the diff and whether it deletes the old id of a row whose id changed. Such a plan is delivered deletes
    first (``deletes_first``): every delete is settled before any insert or update is sent, so a row's old id is
    never left behind by a plan stopped between the two, and no two requests in flight touch one id.
    Ids of another type than the base's (``1`` -> ``"1"``) are other ids.
    """
    keys = list(keys)
    target = diff.target
    if (
        keys == [ID]
        or ID not in target.columns
        or not (diff.inserted.height + diff.updated.height + diff.deleted.height)
    ):
        return diff, False
    base_ids = base.columns([ID]).with_row_index(BASE_ROW)
    row_dtype = base_ids.schema[BASE_ROW]
    same_type = base_ids.schema[ID] == target.schema[ID]
    updated = diff.updated.join(base_ids.rename({ID: _OLD_ID}), on=BASE_ROW, how="left", maintain_order="left")
    id_moved = updated.filter(pl.col(ID).ne_missing(pl.col(_OLD_ID))) if same_type else updated
    # a row a settle kept dirty as a maybe-insert (its insert may have landed) whose id changed since: its old id
    # may be at StopChurn too, so it is deleted like the old id of an updated row (the row stays an insert)
    kept = diff.inserted.filter(pl.col(BASE_ROW).is_not_null()).join(
        base_ids.rename({ID: _OLD_ID}), on=BASE_ROW, how="left", maintain_order="left"
    )
    kept_moved = kept.filter(pl.col(ID).ne_missing(pl.col(_OLD_ID))) if same_type else kept
    old_ids = pl.concat([id_moved.select(*keys, BASE_ROW, _OLD_ID), kept_moved.select(*keys, BASE_ROW, _OLD_ID)])
    deleted, inserted, merged = diff.deleted, diff.inserted, diff.inserted.clear()
    if old_ids.height:  # the old id of a row whose id changed: deleted as it was last delivered
        rows = base.rows_with_keys(old_ids.select(keys)).unique(subset=keys, keep="first", maintain_order=True)
        extra = (
            rows.drop([c for c in (HASH_1, HASH_2) if c in rows.columns])
            .join(old_ids.select(*keys, BASE_ROW), on=keys, how="left", maintain_order="left")
            .with_columns(pl.col(BASE_ROW).cast(row_dtype))
        )
    else:
        extra = None
    if same_type:
        sent_ids = target.select(ID).unique()
        if deleted.height:  # a deleted key whose id a target row now holds: no delete
            reused = deleted.join(sent_ids, on=ID, how="semi").get_column(BASE_ROW)
            deleted = deleted.join(sent_ids, on=ID, how="anti", maintain_order="left")
        else:
            reused = pl.Series(BASE_ROW, [], dtype=row_dtype)
        # the ids StopChurn holds once the plan's deletes landed; each once (a settled snapshot may hold an id on
        # two rows); the row of a deleted key is the one an insert of that id replaces
        gone_ids = old_ids.select(pl.col(_OLD_ID).alias(ID))
        if deleted.height:
            gone_ids = pl.concat([gone_ids, deleted.select(ID)])
        held = (
            base_ids.join(gone_ids, on=ID, how="anti")
            .sort(pl.col(BASE_ROW).is_in(reused.implode()), descending=True)
            .unique(subset=[ID], keep="first")
            .rename({BASE_ROW: _OWNER})
        )
        # an insert of an id another base row holds updates that id (replacing the deleted key's row)
        owned = inserted.join(held, on=ID, how="left", maintain_order="left")
        takes = pl.col(_OWNER).is_not_null() & pl.col(_OWNER).ne_missing(pl.col(BASE_ROW))
        merged = owned.filter(takes).with_columns(
            pl.when(pl.col(BASE_ROW).is_null() & pl.col(_OWNER).is_in(reused.implode()))
            .then(pl.col(_OWNER))
            .otherwise(pl.col(BASE_ROW))
            .cast(row_dtype)
            .alias(BASE_ROW)
        )
        inserted = owned.filter(~takes)
        to_insert = id_moved.filter(~pl.col(ID).is_in(held.get_column(ID).implode()))
    else:  # ids of another type are other ids: every old id goes, every new one is new
        to_insert = id_moved
    if extra is not None:
        deleted = extra if diff.deleted.height == 0 else pl.concat([deleted, extra.select(deleted.columns)])
    columns = diff.updated.columns
    stays = updated.join(to_insert.select(TARGET_ROW), on=TARGET_ROW, how="anti", maintain_order="left")
    return (
        SnapshotDiff(
            target=target,
            inserted=pl.concat([inserted.select(columns), to_insert.select(columns)]).sort(keys),
            updated=pl.concat([stays.select(columns), merged.select(columns)]).sort(keys),
            deleted=deleted.sort(keys) if deleted.height else deleted,
            unchanged=diff.unchanged,
        ),
        extra is not None,
    )


_OLD_ID = "__sc_old_id"
_OWNER = "__sc_owner"


def _one_row_per_key(old: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The snapshot's keys, each once. A snapshot that holds a key twice (committed by an older version, which
    could settle a retyped key into it) pairs each such key with its first row, marked dirty, so the key's
    current state is sent again and the next commit holds it once."""
    twice = old.select(keys).is_duplicated()
    if not twice.any():
        return old
    return (
        old.with_columns(twice.alias("__sc_twice"))
        .unique(subset=keys, keep="first", maintain_order=True)
        .with_columns(
            pl.when(pl.col("__sc_twice"))
            .then(pl.lit(DIRTY_HASH))
            .otherwise(pl.col(HASH_1))
            .cast(old.schema[HASH_1])
            .alias(HASH_1),
            pl.when(pl.col("__sc_twice"))
            .then(pl.lit(DIRTY_UPDATE))
            .otherwise(pl.col(HASH_2))
            .cast(old.schema[HASH_2])
            .alias(HASH_2),
        )
        .drop("__sc_twice")
    )


def first_load(new_data: pl.DataFrame, *, created: pl.Series | None, run_ms: int) -> pl.DataFrame:
    """The target snapshot of a first load (every row an insert, in source order)."""
    created_at = created.fill_null(run_ms) if created is not None else pl.lit(run_ms, dtype=pl.Int64)
    return with_hashes(new_data.with_columns(created_at.cast(pl.Int64).alias(CREATED_AT)))


_BOOKKEEPING = frozenset({*META_COLUMNS, TARGET_ROW, BASE_ROW})
