"""The checks of a key column's values, shared by the pandas path (:mod:`~airflow_provider_stopchurn.source.frame`)
and the Arrow path (:mod:`~airflow_provider_stopchurn.source.canonical`): present, finite whole numbers for float
keys, and a kind a key can have (no Airflow import)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.values import listed

__all__ = ["as_key", "check_float_key", "check_missing_keys"]

_KEY_KINDS = frozenset({"int", "string", "timestamp", "date"})


def check_missing_keys(name: str, null_mask: np.ndarray, rows: pd.Index | np.ndarray) -> None:
    """Refuse a key column with missing values (:class:`SourceDataError` naming up to five of their rows).

    Shared by the pandas and Arrow paths, which check the raw values before conversion.

    :param name: the key column.
    :param null_mask: which values are missing (null, NaN, NaT).
    :param rows: each value's row label in the message (the DataFrame's index, or row numbers).
    """
    if null_mask.any():
        raise SourceDataError(
            f"Key column {name!r} has {int(null_mask.sum())} missing value(s) (null/NaN/NaT) at row(s) "
            f"{listed(rows[null_mask].tolist())}; every key must be present."
        )


def check_float_key(name: str, raw: np.ndarray, index: pd.Index | np.ndarray) -> None:
    """Refuse a float key column (nulls refused already) holding infinities or fractions.

    Shared by the pandas and Arrow paths: a float key becomes an integer key, so it must hold finite whole numbers.

    :param name: the key column.
    :param raw: its values as float64.
    :param index: each value's row label in the message.
    """
    inf_mask = np.isinf(raw)
    if inf_mask.any():
        raise SourceDataError(
            f"Key column {name!r} has infinite (non-finite) value(s) at row(s) {listed(index[inf_mask].tolist())}."
        )
    frac_mask = raw != np.floor(raw)
    if frac_mask.any():
        raise SourceDataError(
            f"Key column {name!r} is a float column with non-integral value(s) "
            f"{listed(raw[frac_mask].tolist())}; float keys must be whole numbers."
        )


def as_key(name: str, s: pl.Series, kind: str) -> tuple[pl.Series, str]:
    """A converted key column typed as a key (float keys as integers), and its kind; refuse kinds a key cannot have.

    Shared by the pandas and Arrow paths (and the Arrow path's check of kinds joined over batches).

    :param name: the key column.
    :param s: its canonical values.
    :param kind: their kind.
    """
    if s.null_count():  # e.g. infinities in an object column, null after conversion
        raise SourceDataError(f"Key column {name!r} has {s.null_count()} missing or non-finite value(s).")
    if kind == "float":
        values = s.to_numpy()
        if values.size and (np.abs(values) >= 2.0**63).any():
            raise SourceDataError(f"Key column {name!r} has float values beyond the 64-bit integer range.")
        return s.cast(pl.Int64), "int"
    if kind == "json":
        raise SourceDataError(
            f"Key column {name!r} mixes value types (e.g. 1 and '1') or holds JSON values (lists, objects); a key "
            "column must hold integers or strings of one type. Cast it in the source (e.g. CAST(... AS TEXT))."
        )
    if kind == "null" and s.len() == 0:
        return s, kind  # an empty source: no values to type the key by; compatible with any key kind
    if kind not in _KEY_KINDS:
        raise SourceDataError(
            f"Key column {name!r} has kind {kind!r}; key columns must hold integers or strings (or timestamps/dates)."
        )
    return s, kind
