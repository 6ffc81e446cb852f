"""DB-API rows -> Arrow batches, each column typed from the Python values the driver returned (no Airflow import).

The path of :func:`~airflow_provider_stopchurn.source.sql.read_dbapi` for a cursor without Arrow of its own:
``cursor.fetchmany()`` rows at a time become one batch each. A column is typed from its values as the pandas path
infers an object column: integers (with NULLs) stay exact integers, integers mixed with floats are floats, Decimals
keep their text, aware datetimes become UTC (naive ones are taken as UTC), ``time`` and UUID values become their
text, and dicts, lists or values of mixed types become canonical JSON text. Binary values are refused.
"""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import math
import uuid as _uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.arrow_values import JSON_TEXT_KIND, KIND_METADATA
from airflow_provider_stopchurn.source.frame import convert_mixed
from airflow_provider_stopchurn.source.values import _BYTES_TYPES

__all__ = ["rows_to_batch"]


def _fetched_batches(
    cursor: Any, names: list[str], batch_rows: int, json_columns: frozenset[str] = frozenset()
) -> Iterator[pa.RecordBatch]:
    seen = False
    while rows := cursor.fetchmany(batch_rows):
        seen = True
        yield rows_to_batch(rows, names, json_columns=json_columns)
    if not seen:
        yield pa.RecordBatch.from_arrays([pa.nulls(0) for _ in names], names=names)


def rows_to_batch(
    rows: Sequence[Any], names: Sequence[str], *, json_columns: frozenset[str] = frozenset()
) -> pa.RecordBatch:
    """DB-API rows (tuples, or mappings from dict cursors) -> one Arrow batch, each column typed from its values.

    The columns in ``json_columns`` hold JSON text (a database's JSON type): they become ``arrow.json`` arrays,
    parsed and written canonically by :mod:`~airflow_provider_stopchurn.source.canonical`."""
    if rows and isinstance(rows[0], Mapping):
        rows = [tuple(row.values()) for row in rows]
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    fields, arrays = [], []
    for name, values in zip(names, columns, strict=True):
        if name in json_columns:
            arrays.append(_json_array(list(values)))
            fields.append(pa.field(name, arrays[-1].type))
            continue
        array, is_json = _column_array(name, list(values))
        arrays.append(array)
        fields.append(pa.field(name, array.type, metadata={KIND_METADATA: JSON_TEXT_KIND} if is_json else None))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _json_array(values: list[Any]) -> pa.Array:
    """JSON texts (str, or bytes as some drivers return them) -> an ``arrow.json`` array."""
    texts = [bytes(v).decode() if isinstance(v, _BYTES_TYPES) else v for v in values]
    return pa.ExtensionArray.from_storage(pa.json_(pa.large_string()), pa.array(texts, type=pa.large_string()))


def _column_array(name: str, values: list[Any]) -> tuple[pa.Array, bool]:
    """One column of driver values -> (Arrow array, whether it holds canonical JSON text)."""
    kinds = {_value_kind(t) for t in set(map(type, values)) if t is not type(None)}
    if not kinds:
        return pa.nulls(len(values)), False
    if "bytes" in kinds:
        raise _binary_column(name)
    if len(kinds) == 1 or kinds == {"int", "float"}:
        (kind,) = kinds if len(kinds) == 1 else ("float",)
        if kind == "int":
            try:
                return pa.array(values, type=pa.int64()), False
            except (OverflowError, pa.ArrowInvalid) as exc:
                raise SourceDataError(
                    f"Column {name!r} has integers outside the signed 64-bit range; cast them to text or numeric "
                    "in the source."
                ) from exc
        simple = _SIMPLE_TYPES.get(kind)
        if simple is not None:
            return pa.array(values, type=simple, from_pandas=kind == "float"), False
        if kind in ("time", "uuid"):  # their text, as datetime.time.isoformat() and str(UUID) write it
            return pa.array([None if v is None else str(v) for v in values], type=pa.large_string()), False
        if kind == "decimal":
            text = pa.array([None if v is None else str(v) for v in values], type=pa.string())
            return pa.ExtensionArray.from_storage(_DECIMAL_TEXT, text), False
    objects = np.empty(len(values), dtype=object)
    objects[:] = values
    missing = np.fromiter(
        (v is None or (isinstance(v, float) and math.isnan(v)) for v in values), dtype=bool, count=len(values)
    )
    series, kind = convert_mixed(name, objects, missing)
    return series.to_arrow().cast(pa.large_string()), kind == "json"


_SIMPLE_TYPES = {
    "bool": pa.bool_(),
    "float": pa.float64(),
    "str": pa.large_string(),
    "datetime": pa.timestamp("us", tz="UTC"),  # aware values converted to UTC, naive ones taken as UTC
    "date": pa.date32(),
    "timedelta": pa.duration("us"),
}
#: Decimals as their exact text (Arrow's decimal types hold neither NaN nor unbounded precision).
_DECIMAL_TEXT = pa.opaque(pa.string(), type_name="decimal", vendor_name="Python")


#: The kind of a driver value by its type, the first that matches (bool before int: True is an int; datetime
#: before date: a datetime is a date).
_VALUE_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    ((bool, np.bool_), "bool"),
    ((int, np.integer), "int"),
    ((float, np.floating), "float"),
    (str, "str"),
    (_BYTES_TYPES, "bytes"),
    (_dt.datetime, "datetime"),
    (_dt.date, "date"),
    (_dt.time, "time"),
    (_dt.timedelta, "timedelta"),
    (_decimal.Decimal, "decimal"),
    (_uuid.UUID, "uuid"),
)


def _value_kind(t: type) -> str:
    return next((kind for types, kind in _VALUE_KINDS if issubclass(t, types)), "object")


def _binary_column(name: str) -> SourceDataError:
    return SourceDataError(
        f"Column {name!r} holds binary values (bytea/BLOB), which JSON cannot carry. Convert it in the SQL, e.g. "
        f"encode({name}, 'base64') AS {name} in PostgreSQL or hex({name}) in SQLite and MySQL, or leave the column "
        "out."
    )
