"""Matching the source's keys with the committed snapshot's: each source row's row in the snapshot, and the
snapshot's keys the source no longer has (the first step of every worker-path diff; no Airflow import)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from airflow_provider_stopchurn.store import HASH_1, HASH_2

__all__ = ["BASE_ROW", "DIRTY_HASH", "DIRTY_INSERT", "DIRTY_UPDATE", "KEY_SEED", "KeyMatch", "match_keys"]

#: Column of a change frame: the row's position in the base (committed) snapshot (updates and deletes).
BASE_ROW = "__sc_base_row"
#: A snapshot row whose first hash is ``DIRTY_HASH`` may differ from what StopChurn holds (its request was sent
#: but never acknowledged, or its values were converted across a schema change): the next diff always sends the
#: key's current state again. The second hash says how: ``DIRTY_UPDATE`` (StopChurn holds the key) or
#: ``DIRTY_INSERT`` (StopChurn may not hold it yet; sent as an insert).
DIRTY_HASH = 0
DIRTY_UPDATE = 0
DIRTY_INSERT = 1
#: Seed of the hash that splits keys into join parts (the row hashes' first seed).
KEY_SEED = 0x5EED0001
_POS = "__sc_pos"
#: Keys joined at a time (see :func:`_positions`).
_JOIN_PART = 250_000


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


def _positions(new_keys: pl.DataFrame, old: pl.DataFrame, old_join: list[pl.Expr]) -> pl.Series:
    """Each source row's position in ``old`` (null: a new key); longer than the source when ``old`` holds a key
    twice that the source has.

    Only keys and positions go through the join, and a large table is joined in parts split by the keys' hash
    (a key's rows on both sides fall in the same part), so the join's tables are those of one part, not of every
    key at once. The old rows' values are gathered by position afterwards.
    """
    right = old.select(*old_join).with_row_index(_POS)
    names = new_keys.columns
    parts = -(-max(new_keys.height, right.height) // _JOIN_PART)
    if parts <= 1:
        return new_keys.join(right, on=names, how="left", maintain_order="left").get_column(_POS)
    new_part = (new_keys.hash_rows(seed=KEY_SEED) % parts).to_numpy()
    old_part = (right.select(names).hash_rows(seed=KEY_SEED) % parts).to_numpy()
    found = np.full(new_keys.height, -1, dtype=np.int64)
    extra = 0
    for part in range(parts):
        rows = np.flatnonzero(new_part == part)
        joined = new_keys[rows].join(
            right[np.flatnonzero(old_part == part)], on=names, how="left", maintain_order="left"
        )
        if joined.height != rows.size:  # a key held twice: the caller takes the snapshot's keys once each
            extra += joined.height - rows.size
            continue
        found[rows] = joined.get_column(_POS).fill_null(-1).to_numpy()
    found_s = pl.Series(_POS, found)
    positions = found_s.to_frame().select(pl.when(found_s >= 0).then(found_s).cast(right.schema[_POS])).to_series()
    return positions.extend_constant(None, extra) if extra else positions


@dataclass(frozen=True)
class KeyMatch:
    """The source's keys matched with the committed snapshot's (:func:`match_keys`)."""

    #: the snapshot's rows that were read, with ``BASE_ROW``; each key once
    old: pl.DataFrame
    #: each source row's position in ``old`` (null: a key the snapshot does not have)
    positions: pl.Series
    #: the rows of ``old`` whose key no source row has
    gone: pl.DataFrame


def match_keys(new_data: pl.DataFrame, old: pl.DataFrame, keys: Sequence[str]) -> KeyMatch:
    """Find each source row's key in the committed snapshot, and the snapshot's keys the source no longer has.

    :param new_data: the source's rows (its key columns at least).
    :param old: the snapshot's key columns and whatever else the caller needs of its rows, in snapshot order.
    :param keys: the key columns.
    """
    keys = list(keys)
    old = old.with_row_index(BASE_ROW)
    new_join, old_join = _join_keys(new_data, old, keys)
    new_keys = new_data.select(new_join)
    positions = _positions(new_keys, old, old_join)
    gone = _gone(old, positions)
    if positions.len() != new_data.height or (gone.height and gone.select(keys).is_duplicated().any()):
        # the snapshot holds a key twice (an older version committed it so): told by the join's height and the
        # few unmatched keys, instead of marking repeated keys over the whole snapshot on every run
        old = _one_row_per_key(old, keys)
        positions = _positions(new_keys, old, old_join)
        gone = _gone(old, positions)
    return KeyMatch(old=old, positions=positions, gone=gone)


def _gone(old: pl.DataFrame, positions: pl.Series) -> pl.DataFrame:
    """The old rows no source row matched, found by position (no second join over every source key)."""
    kept = np.ones(old.height, dtype=bool)
    kept[positions.drop_nulls().to_numpy()] = False
    return old.filter(pl.Series(kept))


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
