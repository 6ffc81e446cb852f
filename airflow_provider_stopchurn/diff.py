"""Vectorised diff of two canonical tables by key: inserted / updated / deleted rows.

One full outer join on the key columns classifies every key; the rows present on both sides are compared
column by column with ``ne_missing`` (null equals null, NaN equals NaN), so change detection is exact (no
hashing). An Int64 column on one side and a Float64 column on the other (pandas turns an integer column with
missing values into floats) are compared numerically as Float64; a column missing on one side counts as all
null there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
from polars._typing import PolarsDataType

__all__ = ["ChangeSet", "diff_frames"]

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
