"""A pandas DataFrame -> a :class:`Canonical` polars frame: the canonical columns, the key and ``id`` checks.

:func:`canonicalize` gives a frame whose every column has one of the :data:`KINDS`. The canonical frame is what the
snapshot stores and what the diff compares, so equal values always have equal canonical representations
(``Decimal("1.50")`` and ``Decimal("1.5")``, the same instant in two time zones, dicts with keys in another order).
:func:`canonical_columns` converts the columns alone (no key, no ``id``: events). The Arrow path,
:mod:`~airflow_provider_stopchurn.source.canonical`, reuses the checks here; both convert values by the rules of
:mod:`~airflow_provider_stopchurn.source.values`. All vectorised (no Python loop over rows, except ``orjson.dumps`` for
cells of JSON-kind columns, which hold arbitrary Python objects anyway); no Airflow import.

Canonical kinds and their polars dtypes (:mod:`~airflow_provider_stopchurn.encode.records` writes each as JSON):

========== ============ ==========================================================================
kind       dtype        meaning / JSON encoding
========== ============ ==========================================================================
int        Int64        exact integer
float      Float64      NaN and +/-inf are null; integral values encode as integers (``3``)
bool       Boolean      ``true`` / ``false``
string     String       JSON string (also UUIDs, ``datetime.time`` and durations as ISO-8601 text)
timestamp  Int64        epoch milliseconds, UTC (naive values are taken as UTC)
date       Int64        epoch milliseconds of UTC midnight
decimal    String       exact canonical decimal text, encoded as a raw JSON number
json       String       canonical JSON text (sorted keys), encoded raw: dicts, lists, numpy arrays, Arrow lists/structs
null       String       a column without values or type information; always ``null``
========== ============ ==========================================================================

The ``id`` column: StopChurn requires every row to carry ``id`` and keys rows by it, so the ``id`` sent must be
present and unique over the whole table. When the source has no ``id`` column, :func:`canonicalize` adds one as the
last column: a copy of the key column for a single key, or, for a composite key, a string made of the key parts'
canonical texts (timestamps and dates as their epoch milliseconds) joined with ``":"``, where a ``\\`` in a part is
written ``\\\\`` and a ``":"`` is written ``\\:`` (so the id tells the parts apart, and parts holding neither
character are joined as they are): key ``("brand", 42)`` -> ``"brand:42"``, ``("x:y", "z")`` -> ``"x\\:y:z"``,
``("x", "y:z")`` -> ``"x:y\\:z"``. When the source has an ``id`` column that is not the whole key (key
``("tenant", "id")``, or a key ``user_key`` beside an ``id``), that column is sent as it is and must hold strings or
numbers (no booleans, no fractions, no nulls), each value once.

JSON numbers: a decimal is sent as an exact number only when it is finite and its magnitude is at most
``1.7976931348623157e308`` (the largest double: parsers that read JSON numbers as doubles, JavaScript's among
them, turn anything larger into Infinity); anything else is refused, except that ``decimal_as_string=True`` sends
a decimal column's large values as their exact text (and NaN/Infinity as ``null``, as ever). Decimals inside JSON
values are always numbers. JSON object keys: dict keys that are not strings are written as text (``1`` -> ``"1"``,
``True`` -> ``"true"``); a dict with two keys written alike is refused.
"""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import uuid as _uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.arrow_values import convert_arrow_column
from airflow_provider_stopchurn.source.key_values import as_key, check_float_key, check_missing_keys
from airflow_provider_stopchurn.source.values import (
    _BYTES_TYPES,
    _JSON_CONTAINERS,
    _MAX_LISTED,
    _SECONDS_PER_UNIT,
    _decimal_column,
    _duration_text,
    _epoch_ms,
    _examples,
    _float_series,
    _from_arrow,
    _int64_array,
    _json_series,
    _raise_bytes,
    _with_nulls,
    listed,
)

__all__ = [
    "KINDS",
    "Canonical",
    "canonical_columns",
    "canonicalize",
    "check_names",
    "check_reserved_names",
    "finish",
    "with_derived_id",
]

#: The prefix of every column the engines add to a table (the store's meta columns, and the working columns of the
#: diff, plans and events): a source column may not start with it.
RESERVED_PREFIX = "__sc_"
KINDS = ("int", "float", "bool", "string", "timestamp", "date", "decimal", "json", "null")

_JSON_SCALARS = (str, int, float, bool, np.generic)
_JSON_CONVERTIBLE = (_dt.datetime, _dt.date, _dt.time, _dt.timedelta, _decimal.Decimal, _uuid.UUID)
#: Types of which no value is missing to ``pd.isna`` (exact types: a subclass may define its own NaN).
_NEVER_MISSING = frozenset({dict, list, tuple, str, int, bool})
#: Composite ids: the separator of the key parts, and the escape character written before one inside a part.
_ID_SEPARATOR, _ID_ESCAPE = ":", "\\"


@dataclass(frozen=True)
class Canonical:
    """A source table in canonical form: what the snapshot stores and the diff compares."""

    frame: pl.DataFrame
    kinds: dict[str, str]
    key_columns: tuple[str, ...]


def canonicalize(df: pd.DataFrame, *, key_columns: Sequence[str], decimal_as_string: bool = False) -> Canonical:
    """Validate ``df`` and convert it to a :class:`Canonical` frame.

    ``decimal_as_string=True`` gives Decimal columns the kind ``"string"`` (same canonical text, sent as a JSON
    string). Raises :class:`SourceDataError` for bad column names, unsupported values and invalid keys.
    """
    names = list(df.columns)
    keys = check_names(names, key_columns)
    series: list[pl.Series] = []
    kinds: dict[str, str] = {}
    for name in names:
        col = df[name]
        if name in keys:
            _check_key_values(name, col, df.index)
        converted, kind = _convert_column(name, col, decimal_as_string=decimal_as_string)
        if name in keys:
            converted, kind = as_key(name, converted, kind)
        series.append(converted.alias(name))
        kinds[name] = kind
    return finish(pl.DataFrame(series), kinds, keys)


def check_names(names: Sequence[Any], key_columns: Sequence[str] | str) -> tuple[str, ...]:
    """Check a source's column names and key columns; return the key columns as a tuple.

    Column names must be distinct strings, and the key columns (at least one, none repeated) must be among them.

    :param names: the source's column names, in order.
    :param key_columns: the key column, or the key columns.
    """
    keys = (key_columns,) if isinstance(key_columns, str) else tuple(key_columns)
    if not keys:
        raise SourceDataError("At least one key column is required.")
    _check_column_names(names)
    missing = [k for k in keys if k not in names]
    if missing:
        raise SourceDataError(
            f"Key column(s) {', '.join(map(repr, missing))} not found; available columns: "
            f"{', '.join(map(repr, names)) or '(none)'}."
        )
    if len(set(keys)) != len(keys):
        raise SourceDataError(f"Key columns are repeated: {keys!r}.")
    return keys


def finish(frame: pl.DataFrame, kinds: dict[str, str], keys: tuple[str, ...]) -> Canonical:
    """The checks over the whole table (unique keys, the ``id`` column), and the derived ``id`` where none is given.

    :param frame: the converted columns of every row, key columns already through ``as_key``.
    :param kinds: each column's kind; the derived ``id``'s is added to it.
    :param keys: the key columns (from :func:`check_names`).
    """
    _check_unique(frame, keys)
    if "id" not in kinds:
        frame, kinds["id"] = with_derived_id(frame, kinds, keys)
    elif keys != ("id",):  # the key checks cover an id that is the whole key
        _check_id(frame, kinds["id"], keys)
    return Canonical(frame=frame, kinds=kinds, key_columns=keys)


def with_derived_id(frame: pl.DataFrame, kinds: Mapping[str, str], keys: tuple[str, ...]) -> tuple[pl.DataFrame, str]:
    """``frame`` with the ``id`` derived from its keys (the source has none; see the module docstring), and its kind.

    :param frame: canonical rows holding the key columns, in their final kinds.
    :param kinds: the kinds of the key columns (at least).
    :param keys: the key columns.
    """
    if len(keys) == 1:
        return frame.with_columns(pl.col(keys[0]).alias("id")), kinds[keys[0]]
    return frame.with_columns(_composite_id(keys, kinds).alias("id")), "string"


def canonical_columns(df: pd.DataFrame, *, decimal_as_string: bool = False) -> tuple[pl.DataFrame, dict[str, str]]:
    """Every column of ``df`` in its canonical form, with no key checks and no ``id`` added (events have no key).

    The same conversion as :func:`canonicalize` (the same kinds, the same errors for unsupported values).
    """
    names = list(df.columns)
    _check_column_names(names)
    series: list[pl.Series] = []
    kinds: dict[str, str] = {}
    for name in names:
        converted, kind = _convert_column(name, df[name], decimal_as_string=decimal_as_string)
        series.append(converted.alias(name))
        kinds[name] = kind
    return pl.DataFrame(series), kinds


def _check_column_names(names: Sequence[Any]) -> None:
    bad_names = [repr(n) for n in names if not isinstance(n, str)]
    if bad_names:
        raise SourceDataError(
            f"Column names must be strings; got {', '.join(bad_names[:_MAX_LISTED])}. Rename the columns."
        )
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SourceDataError(f"Duplicate column names: {', '.join(map(repr, duplicated))}.")
    check_reserved_names(names)


def check_reserved_names(names: Sequence[str]) -> None:
    """Refuse column names the engines cannot carry: empty ones, and those starting with ``RESERVED_PREFIX``.

    Every path reading a source calls this before anything is sent (through :func:`canonicalize`, the Arrow path
    and :func:`canonical_columns`; the warehouse diff on the query's columns), so a fixed source works next run.
    """
    empty = [str(position) for position, name in enumerate(names, start=1) if name == ""]
    if empty:
        raise SourceDataError(
            f"Source column number {', '.join(empty)} has an empty name: give it one.\n"
            f"Every column becomes a field of the row StopChurn receives, which needs a name (in SQL: SELECT ... AS "
            f"some_name). Nothing was sent."
        )
    reserved = [name for name in names if name.startswith(RESERVED_PREFIX)]
    if reserved:
        shown = ", ".join(map(repr, reserved[:_MAX_LISTED])) + (" ..." if len(reserved) > _MAX_LISTED else "")
        raise SourceDataError(
            f"Source column {shown} starts with {RESERVED_PREFIX!r}, a prefix this provider reserves.\n"
            f"The engine names its own working columns so; rename the column in the source (in SQL: SELECT "
            f"{reserved[0]} AS {reserved[0][len(RESERVED_PREFIX) :] or 'other_name'}). Nothing was sent."
        )


def _composite_id(keys: Sequence[str], kinds: Mapping[str, str]) -> pl.Expr:
    """The id of a composite key: the parts' canonical texts joined with ``:``, ``\\`` and ``:`` escaped in parts.

    ``("a", 1)`` -> ``a:1`` (as ever, for parts holding neither character); ``("x:y", "z")`` -> ``x\\:y:z``;
    ``("x", "y:z")`` -> ``x:y\\:z``; ``("a\\", "b")`` -> ``a\\\\:b``. Escaping the escape character first makes
    the id tell the parts apart, so distinct keys have distinct ids.
    """
    parts = []
    for key in keys:
        text = pl.col(key).cast(pl.String)
        if kinds[key] in ("string", "null"):  # numbers and epoch milliseconds hold neither character
            text = text.str.replace_all(_ID_ESCAPE, _ID_ESCAPE * 2, literal=True).str.replace_all(
                _ID_SEPARATOR, _ID_ESCAPE + _ID_SEPARATOR, literal=True
            )
        parts.append(text)
    return pl.concat_str(parts, separator=_ID_SEPARATOR)


def _check_id(frame: pl.DataFrame, kind: str, keys: tuple[str, ...]) -> None:
    """The source's own ``id`` column (not the whole key) is what StopChurn keys rows by: check it over the table."""
    if frame.height == 0:
        return
    ids = frame.get_column("id")
    remedy = (
        f"StopChurn keys rows by 'id', so the column 'id' is what identifies a row there, not the key "
        f"{', '.join(map(repr, keys))}. Drop or rename the source's 'id' column (an id is then derived from the key), "
        "or make 'id' the key."
    )
    if kind == "bool":
        raise SourceDataError(f"Column 'id' holds booleans; StopChurn ids are strings or numbers. {remedy}")
    if kind == "json":
        raise SourceDataError(
            "Column 'id' holds JSON values or mixes value types (e.g. 1 and '1'); StopChurn ids are strings or "
            f"numbers, one type per table. {remedy}"
        )
    missing = ids.is_null()
    if missing.any():
        count = int(missing.sum())
        keyed = frame.filter(missing).select(keys).head(_MAX_LISTED).rows()
        shown = [row[0] if len(keys) == 1 else row for row in keyed]
        raise SourceDataError(
            f"Column 'id' has {count} missing value(s) (null/NaN/inf), in the row(s) with key "
            f"{_examples(shown, count)}; every row sent needs an id. {remedy}"
        )
    if kind in ("float", "decimal"):
        if kind == "float":
            fractional = ids != ids.floor()
        else:  # canonical decimal text: a point, or a negative exponent, means a fraction
            fractional = ids.str.contains(".", literal=True) | ids.str.contains("E-", literal=True)
        if fractional.any():
            bad = ids.filter(fractional).unique(maintain_order=True)
            raise SourceDataError(
                f"Column 'id' has non-integral value(s) {_examples(bad.head(_MAX_LISTED).to_list(), bad.len())}; "
                f"numeric ids must be whole numbers. {remedy}"
            )
    if ids.n_unique() != frame.height:
        dups = ids.filter(ids.is_duplicated()).unique(maintain_order=True)
        raise SourceDataError(
            f"Column 'id' has duplicate value(s) {_examples(dups.head(_MAX_LISTED).to_list(), dups.len())}: rows "
            f"with the same id would collapse into one row at StopChurn. {remedy}"
        )


def _check_key_values(name: str, col: pd.Series, index: pd.Index) -> None:
    """Checks that need the raw values (NaN and infinities become null in the canonical frame)."""
    check_missing_keys(name, np.asarray(col.isna(), dtype=bool), index)
    if pd.api.types.is_float_dtype(col.dtype):
        check_float_key(name, col.to_numpy(dtype="float64", na_value=np.nan), index)
    elif pd.api.types.is_object_dtype(col.dtype) and pd.api.types.infer_dtype(col, skipna=False) in (
        "floating",
        "mixed-integer-float",
    ):  # Python floats (with ints), which become a float column: the same checks, before the cast to integers
        check_float_key(name, np.asarray(col.to_numpy(dtype=object), dtype="float64"), index)


def _check_unique(frame: pl.DataFrame, keys: tuple[str, ...]) -> None:
    if frame.height == 0:
        return
    key_frame = frame.select(keys)
    # counting distinct keys costs half of marking duplicates (1M int keys: 23 vs 46 ms); mark only if needed
    distinct = key_frame.to_series().n_unique() if len(keys) == 1 else key_frame.n_unique()
    if distinct != frame.height:
        dup_mask = key_frame.is_duplicated()
        dups = key_frame.filter(dup_mask).unique(maintain_order=True)
        shown = [row[0] if len(keys) == 1 else row for row in dups.head(_MAX_LISTED).rows()]
        label = "key" if len(keys) == 1 else "composite key"
        raise SourceDataError(
            f"Duplicate {label} value(s) in {', '.join(map(repr, keys))}: {listed(shown)}"
            + (f" (and {dups.height - _MAX_LISTED} more)" if dups.height > _MAX_LISTED else "")
            + "; keys must be unique."
        )


def _convert_column(name: str, col: pd.Series, *, decimal_as_string: bool) -> tuple[pl.Series, str]:
    """One pandas column -> (canonical polars Series, kind)."""
    dtype = col.dtype
    try:
        if isinstance(dtype, pd.CategoricalDtype):
            return _convert_column(name, col.astype(object), decimal_as_string=decimal_as_string)
        if isinstance(dtype, pd.ArrowDtype):  # the Arrow types' rules live with the Arrow sources
            return convert_arrow_column(name, pa.array(col), decimal_as_string=decimal_as_string)
        if pd.api.types.is_object_dtype(dtype):
            return _convert_object(name, col, decimal_as_string=decimal_as_string)
        if pd.api.types.is_bool_dtype(dtype):
            return _from_arrow(pa.array(col, from_pandas=True, type=pa.bool_())), "bool"
        if pd.api.types.is_integer_dtype(dtype):
            return _from_arrow(_int64_array(name, pa.array(col, from_pandas=True))), "int"
        if pd.api.types.is_float_dtype(dtype):
            return _float_series(col.to_numpy(dtype="float64", na_value=np.nan)), "float"
        if pd.api.types.is_datetime64_any_dtype(dtype):
            return _timestamp_series(col), "timestamp"
        if pd.api.types.is_timedelta64_dtype(dtype):
            return _duration_series(col), "string"
        if pd.api.types.is_string_dtype(dtype):
            return _from_arrow(pa.array(col, from_pandas=True, type=pa.large_string())), "string"
    except SourceDataError:
        raise
    except (pa.ArrowException, OverflowError, ValueError, TypeError) as exc:
        raise SourceDataError(f"Column {name!r} (dtype {dtype}) cannot be converted: {exc}") from exc
    raise SourceDataError(
        f"Column {name!r} has unsupported dtype {dtype}; cast it in the source (e.g. CAST(... AS TEXT))."
    )


def _timestamp_series(col: pd.Series) -> pl.Series:
    """datetime64 (any unit, naive = UTC, or tz-aware) -> Int64 epoch ms (floored)."""
    if getattr(col.dt, "tz", None) is not None:
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
    values = col.to_numpy()
    unit, _count = np.datetime_data(values.dtype)
    if unit not in _SECONDS_PER_UNIT:
        values = values.astype("datetime64[s]")
        unit = "s"
    return _epoch_ms(values.view("int64"), unit, np.isnat(values))


def _duration_series(col: pd.Series) -> pl.Series:
    """timedelta64 -> ISO-8601 duration text, e.g. ``P1DT2H3M4.5S``, ``PT0S``, ``-PT1S``."""
    values = col.to_numpy()
    unit, _count = np.datetime_data(values.dtype)
    if unit not in _SECONDS_PER_UNIT:
        values = values.astype("timedelta64[s]")
        unit = "s"
    ints = _with_nulls(pl.Series("v", values.view("int64"), dtype=pl.Int64), np.isnat(values))
    return _duration_text(ints, unit)


def _convert_object(name: str, col: pd.Series, *, decimal_as_string: bool) -> tuple[pl.Series, str]:
    inferred = pd.api.types.infer_dtype(col, skipna=True)
    values = col.to_numpy(dtype=object)
    if inferred == "empty":
        return pl.Series(values=[None] * len(values), dtype=pl.String), "null"
    if inferred == "string":
        return _from_arrow(pa.array(values, from_pandas=True, type=pa.large_string())), "string"
    if inferred == "integer":
        try:
            arr = pa.array(values, from_pandas=True, type=pa.int64())
        except (OverflowError, pa.ArrowInvalid) as exc:
            raise SourceDataError(
                f"Column {name!r} has integers outside the signed 64-bit range; cast them to text or "
                "numeric in the source."
            ) from exc
        return _from_arrow(arr), "int"
    if inferred in ("floating", "mixed-integer-float"):
        return _float_series(pa.array(values, from_pandas=True, type=pa.float64()).to_numpy(False)), "float"
    if inferred == "boolean":
        return _from_arrow(pa.array(values, from_pandas=True, type=pa.bool_())), "bool"
    if inferred in ("datetime", "datetime64", "date"):
        stamps = pd.Series(pd.to_datetime(col, utc=True))
        return _timestamp_series(stamps), "date" if inferred == "date" else "timestamp"
    if inferred == "time":  # str(time) is time.isoformat(): HH:MM:SS[.ffffff][+HH:MM]
        return _text_of(values, np.asarray(col.isna(), dtype=bool)), "string"
    if inferred == "timedelta":
        return _duration_series(pd.Series(pd.to_timedelta(col))), "string"
    if inferred == "decimal":
        missing = np.asarray(col.isna(), dtype=bool)
        text = _text_of(values, missing)
        return _decimal_column(name, text, decimal_as_string=decimal_as_string)
    if inferred == "bytes":
        _raise_bytes(name)
    return convert_mixed(name, values)


def _text_of(values: np.ndarray, null_mask: np.ndarray) -> pl.Series:
    """``str()`` of every object (bulk, via pandas), null where ``null_mask``."""
    present = np.where(null_mask, "", values)
    text = pd.Series(present, dtype=object).astype(str)
    return _with_nulls(_from_arrow(pa.array(text, from_pandas=True, type=pa.large_string())), null_mask)


def convert_mixed(name: str, values: np.ndarray, mask: np.ndarray | None = None) -> tuple[pl.Series, str]:
    """Python objects of mixed or container types -> JSON (all UUIDs: their text), and the kind.

    Shared with the DB-API rows' conversion, which holds such values as Python objects too.

    :param name: the column (named in errors).
    :param values: the column's objects.
    :param mask: the missing values (default: pandas' view of missing, None/NaN/NaT).
    """
    if mask is None:
        types = set(map(type, values))
        if types <= _NEVER_MISSING:  # pd.isna holds none of them missing: skip its pass over every value
            mask = np.zeros(len(values), dtype=bool)
            present = values
        else:
            mask = np.asarray(pd.isna(values), dtype=bool)
            present = values[~mask]
            types = set(map(type, present))
    else:
        present = values[~mask]
        types = set(map(type, present))
    if any(issubclass(t, _BYTES_TYPES) for t in types):
        _raise_bytes(name)
    if types and all(issubclass(t, _uuid.UUID) for t in types):
        return _text_of(values, mask), "string"
    allowed = _JSON_SCALARS + _JSON_CONTAINERS + _JSON_CONVERTIBLE
    unknown = sorted({t.__qualname__ for t in types if not issubclass(t, allowed)})
    if unknown:
        raise SourceDataError(
            f"Column {name!r} holds values of unsupported Python type(s) {', '.join(unknown)}; convert them "
            "to text, numbers, booleans, dates or JSON objects in the source."
        )
    return _json_series(name, values, mask), "json"
