"""Matching the source's keys with the committed snapshot's: each source row's row in the snapshot, and the
snapshot's keys the source no longer has (the first step of every worker-path diff; no Airflow import)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from airflow_provider_stopchurn.store import HASH_1, HASH_2

__all__ = [
    "BASE_ROW",
    "DIRTY_HASH",
    "DIRTY_INSERT",
    "DIRTY_UPDATE",
    "KEY_SEED",
    "KeyMatch",
    "match_keys",
    "snapshot_states",
]

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
    right = old.select(*old_join)
    names = new_keys.columns
    parts = -(-max(new_keys.height, right.height) // _JOIN_PART)
    if parts <= 1:
        return new_keys.join(right.with_row_index(_POS), on=names, how="left", maintain_order="left").get_column(_POS)
    new_part, old_part = _part_of(new_keys, parts), _part_of(right, parts)
    found = np.full(new_keys.height, _NONE, dtype=np.uint32)  # positions fit the row index (32 bits)
    extra = 0
    for part in range(parts):
        rows = np.flatnonzero(new_part == part)
        olds = np.flatnonzero(old_part == part)
        joined = new_keys[rows].join(
            right[olds].with_columns(pl.Series(_POS, olds, dtype=pl.UInt32)),
            on=names,
            how="left",
            maintain_order="left",
        )
        if joined.height != rows.size:  # a key held twice: the caller takes the snapshot's keys once each
            extra += joined.height - rows.size
            continue
        found[rows] = joined.get_column(_POS).fill_null(_NONE).to_numpy()
    del new_part, old_part
    found_s = pl.Series(_POS, found)
    index = pl.get_index_type()
    positions = found_s.to_frame().select(pl.when(found_s != _NONE).then(found_s).cast(index)).to_series()
    return positions.extend_constant(None, extra) if extra else positions


#: ``_positions``' mark of a source row whose key the snapshot does not have
_NONE = np.iinfo(np.uint32).max


def _part_of(keys: pl.DataFrame, parts: int) -> np.ndarray:
    """Each row's join part (its keys' hash modulo ``parts``), hashed a slice at a time: 2 bytes a row."""
    out = np.empty(keys.height, dtype=np.uint16 if parts <= 2**16 else np.uint32)
    for start in range(0, keys.height, _JOIN_PART * 4):
        piece = keys.slice(start, _JOIN_PART * 4).hash_rows(seed=KEY_SEED) % parts
        out[start : start + piece.len()] = piece.to_numpy()
    return out


@dataclass(frozen=True)
class KeyMatch:
    """The source's keys matched with the committed snapshot's (:func:`match_keys`)."""

    #: each source row's row in the snapshot (``BASE_ROW``; null: a key the snapshot does not have)
    positions: pl.Series
    #: the snapshot's keys no source row has, each once, with ``BASE_ROW``
    gone: pl.DataFrame
    #: the rows (``BASE_ROW``) of the keys the snapshot holds twice, kept for them; None when every key is once
    twice: pl.Series | None


def match_keys(new_data: pl.DataFrame, old: pl.DataFrame, keys: Sequence[str]) -> KeyMatch:
    """Find each source row's key in the committed snapshot, and the snapshot's keys the source no longer has.

    Only the keys go through it: the snapshot's other columns are read afterwards, by row (:func:`snapshot_states`).

    :param new_data: the source's rows (its key columns at least).
    :param old: the snapshot's key columns, in snapshot order.
    :param keys: the key columns.
    """
    keys = list(keys)
    new_join, old_join = _join_keys(new_data, old, keys)
    new_keys = new_data.select(new_join)
    positions = _positions(new_keys, old, old_join)
    gone = _gone(old, positions)
    if positions.len() == new_data.height and not (gone.height and gone.select(keys).is_duplicated().any()):
        return KeyMatch(positions=positions.alias(BASE_ROW), gone=gone, twice=None)
    # the snapshot holds a key twice (an older version committed it so): told by the join's height and the few
    # unmatched keys, instead of marking repeated keys over the whole snapshot on every run
    once, twice = _one_row_per_key(old.with_row_index(BASE_ROW), keys)
    positions = _positions(new_keys, once, old_join)
    gone = _gone(once, positions)
    return KeyMatch(positions=once.get_column(BASE_ROW).gather(positions), gone=gone, twice=twice)


def _gone(old: pl.DataFrame, positions: pl.Series) -> pl.DataFrame:
    """The old rows no source row matched, found by position (no second join over every source key), with their
    ``BASE_ROW`` (their row in ``old`` unless it has the column already)."""
    kept = np.ones(old.height, dtype=bool)
    kept[positions.drop_nulls().to_numpy()] = False
    rows = np.flatnonzero(kept)
    gone = old[rows] if rows.size else old.clear()
    if BASE_ROW in gone.columns:
        return gone
    return gone.with_columns(pl.Series(BASE_ROW, rows, dtype=pl.get_index_type()))


def _one_row_per_key(old: pl.DataFrame, keys: list[str]) -> tuple[pl.DataFrame, pl.Series]:
    """The snapshot's keys, each once (their first row), and the rows kept for the keys held twice.

    A snapshot that holds a key twice was committed by an older version, which could settle a retyped key into
    it. Each such key is paired with its first row, marked dirty (:func:`snapshot_states`), so the key's current
    state is sent again and the next commit holds it once.
    """
    marked = old.with_columns(old.select(keys).is_duplicated().alias("__sc_twice"))
    once = marked.unique(subset=keys, keep="first", maintain_order=True)
    return once.drop("__sc_twice"), once.filter(pl.col("__sc_twice")).get_column(BASE_ROW)


def snapshot_states(states: pl.DataFrame, match: KeyMatch) -> pl.DataFrame:
    """The snapshot's createdAt and row hashes by row (``BASE_ROW``), the rows kept for keys held twice dirty.

    :param states: the snapshot's ``CREATED_AT``, ``HASH_1`` and ``HASH_2`` columns, in snapshot order.
    :param match: the keys matched (:func:`match_keys`).
    """
    if match.twice is None or not match.twice.len():
        return states
    dirty = np.zeros(states.height, dtype=bool)
    dirty[match.twice.to_numpy()] = True
    marked = pl.Series(dirty)
    return states.with_columns(
        pl.when(marked).then(pl.lit(DIRTY_HASH)).otherwise(pl.col(HASH_1)).cast(states.schema[HASH_1]).alias(HASH_1),
        pl.when(marked).then(pl.lit(DIRTY_UPDATE)).otherwise(pl.col(HASH_2)).cast(states.schema[HASH_2]).alias(HASH_2),
    )
