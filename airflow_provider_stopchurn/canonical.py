"""Arrow sources -> canonical frames, without pandas (no Airflow import).

:func:`canonicalize_arrow` gives, for Arrow data (a ``pyarrow.Table``, a ``RecordBatch``, a ``RecordBatchReader``
or any iterable of record batches), exactly the :class:`~airflow_provider_stopchurn.encoding.Canonical` frame that
:func:`~airflow_provider_stopchurn.encoding.canonicalize` gives for the same values in a pandas DataFrame: the same
kinds, dtypes and canonical values (see the kinds table in :mod:`~airflow_provider_stopchurn.encoding`), the same
key and ``id`` checks, the same errors. It reuses the pandas path's helpers, so both follow one set of rules.
:func:`canonicalize_source` takes any supported source (pandas, polars, Arrow, a callable returning one) and
picks the path; the engine calls it.

Batches are converted one by one and vectorised (Python runs per value only where the pandas path also does: to
write JSON values, and to read JSON text). Batches may type a column differently (a column whose first batch
holds only NULLs, integers in one batch and floats in the next): the kinds are then joined as the pandas path
would infer them over the whole column (``null`` + any kind = that kind; ``int`` + ``float`` = ``float``; any
other mix = ``json``, each value written as JSON), and the earlier batches' columns follow.

Arrow types beyond those a DataFrame holds, as ADBC drivers deliver them:

* ``arrow.opaque`` ``numeric`` (PostgreSQL's NUMERIC, as exact text): decimals;
* ``arrow.json`` (json/jsonb, as their text): JSON values, parsed and written canonically (sorted keys). A number
  with a fraction or an exponent is read as a float when the float is exactly the written value (so ``1.0`` and
  ``0.1`` stay what a float gives), else as the exact decimal: no digit is lost;
* ``arrow.uuid``: the UUID's text; ``time32``/``time64``: ``HH:MM:SS[.ffffff]`` as ``datetime.time.isoformat``;
  PostgreSQL's ``timetz`` (opaque bytes): the same with its offset;
* ``duration``: ISO-8601 as for timedeltas; ``month_day_nano_interval`` (PostgreSQL's interval): months kept as
  ``nYnM`` before the days and time (``P1Y2M3DT4H``; ``-P1M``; mixed signs as PostgreSQL writes them,
  ``P1M-1D``);
* PostgreSQL ``real`` (``float4``, marked in the field metadata): the float's shortest decimal text read as a
  double (``0.1``, as PostgreSQL prints it and as psycopg reads it), not the widened float32;
* binary types are refused; PostgreSQL ``money`` (integer cents without the currency's scale) and other opaque
  types are refused with a hint to cast them in SQL.
"""

from __future__ import annotations

import decimal as _decimal
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import GeneratorType
from typing import Any, TypeAlias

import numpy as np
import orjson
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from airflow_provider_stopchurn.encoding import (
    _MS_PER_DAY,
    _SECONDS_PER_UNIT,
    Canonical,
    _as_key,
    _check_float_key,
    _check_missing_keys,
    _check_names,
    _decimal_column,
    _decimal_text,
    _duration_text,
    _epoch_ms,
    _finish,
    _float_series,
    _from_arrow,
    _int64_array,
    _json_series,
    _raise_bytes,
    canonicalize,
)
from airflow_provider_stopchurn.exceptions import SourceDataError

__all__ = [
    "JSON_TEXT_KIND",
    "KIND_METADATA",
    "Source",
    "SourceData",
    "canonicalize_arrow",
    "canonicalize_batch",
    "canonicalize_source",
    "convert_arrow_column",
    "merge_batches",
    "parse_json_columns",
]

SourceData: TypeAlias = (
    pd.DataFrame
    | pl.DataFrame
    | pl.LazyFrame
    | pa.Table
    | pa.RecordBatch
    | pa.RecordBatchReader
    | Iterable[pa.RecordBatch]
)
#: What the engine accepts: the data, or a callable returning it (called once, when the run reads its source).
Source: TypeAlias = SourceData | Callable[[], SourceData]

#: Field metadata a source may set on a string column: ``{KIND_METADATA: JSON_TEXT_KIND}`` says the column holds
#: canonical JSON text already (``sources.py`` writes mixed and JSON columns of DB-API rows so): taken as it is.
KIND_METADATA = b"stopchurn:kind"
JSON_TEXT_KIND = b"json"
#: ADBC PostgreSQL names each column's database type in its field metadata.
_PG_TYPE = b"POSTGRESQL:type"
#: ``arrow.opaque`` type names whose string storage holds decimal text (PostgreSQL's numeric; DB-API Decimals).
_DECIMAL_OPAQUE = frozenset({"numeric", "decimal"})
_CANONICAL_DTYPES: Mapping[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "bool": pl.Boolean(),
    "timestamp": pl.Int64(),
    "date": pl.Int64(),
    "string": pl.String(),
    "decimal": pl.String(),
    "json": pl.String(),
    "null": pl.String(),
}
#: JSON numbers with a fraction or an exponent (and text inside strings that looks like one: checked too, harmless).
_FRACTIONAL_NUMBER = r"[0-9]+(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)"
#: An integer of 19 digits or more, which orjson may read as a float (beyond 64 bits).
_LONG_INTEGER = r"[0-9]{19}"
_JSON_PARSE_BATCH = 100_000
_NS_PER_DAY = 86_400 * 10**9


# --------------------------------------------------------------------------------------------------------------
# any source
# --------------------------------------------------------------------------------------------------------------
def canonicalize_source(source: Source, *, key_columns: Sequence[str], decimal_as_string: bool = False) -> Canonical:
    """Read ``source`` (calling it first if it is a callable) and canonicalize it.

    pandas DataFrames take :func:`~airflow_provider_stopchurn.encoding.canonicalize`; polars DataFrames and
    LazyFrames (collected), pyarrow Tables, RecordBatches, RecordBatchReaders and iterables of RecordBatches take
    :func:`canonicalize_arrow`, with no pandas conversion. A reader or generator is consumed and closed.
    """
    data = source() if callable(source) else source
    try:
        if isinstance(data, pd.DataFrame):
            return canonicalize(data, key_columns=key_columns, decimal_as_string=decimal_as_string)
        if isinstance(data, pl.LazyFrame):
            data = data.collect()
        if isinstance(data, pl.DataFrame):
            return canonicalize_arrow(
                _polars_to_arrow(data), key_columns=key_columns, decimal_as_string=decimal_as_string
            )
        if isinstance(data, pa.Table | pa.RecordBatch | pa.RecordBatchReader) or _is_batch_iterable(data):
            return canonicalize_arrow(data, key_columns=key_columns, decimal_as_string=decimal_as_string)
    finally:
        if isinstance(data, GeneratorType | pa.RecordBatchReader):
            data.close()  # a SQL source's generator releases its connection
    raise _not_a_source(_type_name(data))


def _is_batch_iterable(data: Any) -> bool:
    """An iterator (any items: checked as they come), or a list/tuple of record batches or tables."""
    if isinstance(data, Iterator):
        return True
    return isinstance(data, list | tuple) and all(isinstance(item, pa.RecordBatch | pa.Table) for item in data)


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _not_a_source(got: str) -> SourceDataError:
    return SourceDataError(
        "The source must be a pandas DataFrame, a polars DataFrame or LazyFrame, a pyarrow Table, RecordBatch or "
        "RecordBatchReader, or an iterator of pyarrow RecordBatches (or a callable returning one of these); got "
        f"{got}."
    )


def _polars_to_arrow(frame: pl.DataFrame) -> pa.Table:
    objects = [name for name, dtype in frame.schema.items() if dtype == pl.Object]
    if objects:
        raise SourceDataError(
            f"The polars DataFrame's column(s) {', '.join(map(repr, objects))} have the dtype Object, which has no "
            "Arrow form; give them a typed dtype (String, Struct, List...)."
        )
    # polars writes an empty column name as "column_1" in Arrow: keep the source's names, checked like any other
    return frame.to_arrow().rename_columns(frame.columns)


# --------------------------------------------------------------------------------------------------------------
# Arrow data
# --------------------------------------------------------------------------------------------------------------
def canonicalize_arrow(
    data: pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch],
    *,
    key_columns: Sequence[str],
    decimal_as_string: bool = False,
) -> Canonical:
    """Validate Arrow ``data`` and convert it to a :class:`Canonical` frame, batch by batch.

    Raises :class:`SourceDataError` for bad column names, unsupported types or values and invalid keys, with the
    same messages as the pandas path (rows are counted from 0 over all batches).
    """
    keys: tuple[str, ...] | None = None
    names: list[str] | None = None
    parts: list[tuple[pl.DataFrame, dict[str, str]]] = []
    offset = 0
    for batch in _record_batches(data):
        if names is None:
            names = batch.schema.names
            keys = _check_names(names, key_columns)
        elif batch.schema.names != names:
            raise SourceDataError(
                f"The source's record batches have different columns: {names!r}, then {batch.schema.names!r}."
            )
        assert keys is not None
        parts.append(canonicalize_batch(batch, keys=keys, offset=offset, decimal_as_string=decimal_as_string))
        offset += batch.num_rows
    if keys is None:  # no batch and no schema: a source without columns
        keys = _check_names([], key_columns)
    frame, kinds = merge_batches(parts, keys)
    return _finish(frame, kinds, keys)


def _record_batches(data: Any) -> Iterator[pa.RecordBatch]:
    """The record batches of ``data``; at least one (empty) when the data has a schema but no rows."""
    if isinstance(data, pa.RecordBatch):
        yield data
        return
    if isinstance(data, pa.Table | pa.RecordBatchReader):
        schema = data.schema
        items: Iterable[Any] = data.to_batches() if isinstance(data, pa.Table) else data
    else:
        schema, items = None, data
    seen = False
    for item in items:
        if isinstance(item, pa.Table):  # an iterator of tables (e.g. a driver's Arrow batches)
            if item.num_rows == 0 and not seen:
                schema = item.schema
            yield from item.to_batches()
            seen = seen or item.num_rows > 0
            continue
        if not isinstance(item, pa.RecordBatch):
            raise _not_a_source(f"an iterator yielding {_type_name(item)}")
        seen = True
        yield item
    if not seen and schema is not None:
        yield pa.RecordBatch.from_pylist([], schema=schema)


def canonicalize_batch(
    batch: pa.RecordBatch, *, keys: tuple[str, ...], offset: int = 0, decimal_as_string: bool = False
) -> tuple[pl.DataFrame, dict[str, str]]:
    """One record batch -> its canonical columns and their kinds (``offset``: the batch's first row in the table).

    The key columns are checked (present, finite, whole numbers for floats) and typed as keys; the checks over
    the whole table (unique keys, ``id``) are :func:`merge_batches`'s caller's (see :func:`canonicalize_arrow`).
    """
    series: list[pl.Series] = []
    kinds: dict[str, str] = {}
    for field, column in zip(batch.schema, batch.columns, strict=True):
        name = field.name
        if name in keys:
            _check_arrow_key(name, column, offset)
        converted, kind = convert_arrow_column(name, column, decimal_as_string=decimal_as_string, field=field)
        if name in keys:
            converted, kind = _as_key(name, converted, kind)
        series.append(converted.alias(name))
        kinds[name] = kind
    return pl.DataFrame(series), kinds


def merge_batches(
    parts: Sequence[tuple[pl.DataFrame, dict[str, str]]], keys: tuple[str, ...]
) -> tuple[pl.DataFrame, dict[str, str]]:
    """Join canonical batches into one frame: kinds joined as over one whole column, columns converted to them."""
    if not parts:
        return pl.DataFrame(), {}
    kinds = dict(parts[0][1])
    for _frame, batch_kinds in parts[1:]:
        for name, kind in batch_kinds.items():
            kinds[name] = _join_kinds(kinds[name], kind)
    for key in keys:  # a key whose batches disagree (integers, then strings) is refused as a mixed column is
        if kinds[key] == "json":
            _as_key(key, pl.Series(key, [], dtype=pl.String), "json")
    frames = [_retyped(frame, batch_kinds, kinds) for frame, batch_kinds in parts]
    return (frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")), kinds


def _join_kinds(a: str, b: str) -> str:
    """The kind of a column whose values are of kind ``a`` in some rows and ``b`` in others (pandas' inference)."""
    if b in (a, "null"):
        return a
    if a == "null":
        return b
    if {a, b} == {"int", "float"}:
        return "float"
    return "json"


def _retyped(frame: pl.DataFrame, have: Mapping[str, str], want: Mapping[str, str]) -> pl.DataFrame:
    changed = [name for name in frame.columns if have[name] != want[name]]
    if not changed:
        return frame
    columns = []
    for name in changed:
        column = frame.get_column(name)
        if want[name] == "json":
            columns.append(_as_json_text(name, column, have[name]).alias(name))
        else:  # null -> any kind, int -> float
            columns.append(column.cast(_CANONICAL_DTYPES[want[name]]))
    return frame.with_columns(columns)


def _as_json_text(name: str, column: pl.Series, kind: str) -> pl.Series:
    """Canonical values of ``kind`` -> the JSON text each value has inside a mixed (``json``) column."""
    if kind in ("int", "timestamp", "date", "decimal"):  # epoch ms and decimal text are JSON numbers already
        return column.cast(pl.String)
    if kind == "null":
        return pl.Series(name, [None] * column.len(), dtype=pl.String)
    if kind == "bool":
        return column.replace_strict({True: "true", False: "false"}, return_dtype=pl.String)
    values = np.fromiter(column.to_list(), dtype=object, count=column.len())
    return _json_series(name, values, np.asarray(column.is_null().to_numpy(), dtype=bool))


def _check_arrow_key(name: str, column: pa.Array, offset: int) -> None:
    """The pandas path's checks of raw key values: no nulls (NaN counts as missing), floats finite and whole."""
    column = _plain(column)
    missing = np.asarray(pc.is_null(column, nan_is_null=True).to_numpy(zero_copy_only=False), dtype=bool)
    rows = np.arange(offset, offset + len(column))
    _check_missing_keys(name, missing, rows)
    if pa.types.is_floating(column.type):
        _check_float_key(name, np.asarray(column.to_numpy(zero_copy_only=False), dtype="float64"), rows)


def _plain(column: pa.Array) -> pa.Array:
    """Dictionary-encoded values decoded, extension arrays as their storage."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if isinstance(column.type, pa.BaseExtensionType):
        column = column.storage
    return column


# --------------------------------------------------------------------------------------------------------------
# one column
# --------------------------------------------------------------------------------------------------------------
def convert_arrow_column(
    name: str, column: pa.Array | pa.ChunkedArray, *, decimal_as_string: bool = False, field: pa.Field | None = None
) -> tuple[pl.Series, str]:
    """One Arrow column -> (canonical polars Series, kind); ``field`` carries a driver's metadata, if any."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    try:
        return _convert(name, column, decimal_as_string=decimal_as_string, field=field)
    except SourceDataError:
        raise
    except (pa.ArrowException, OverflowError, ValueError, TypeError) as exc:
        raise SourceDataError(f"Column {name!r} (Arrow type {column.type}) cannot be converted: {exc}") from exc


def _convert(name: str, column: pa.Array, *, decimal_as_string: bool, field: pa.Field | None) -> tuple[pl.Series, str]:
    t = column.type
    metadata = (field.metadata if field is not None else None) or {}
    if pa.types.is_dictionary(t):
        return _convert(name, column.dictionary_decode(), decimal_as_string=decimal_as_string, field=None)
    if isinstance(t, pa.BaseExtensionType):
        return _convert_extension(name, column, decimal_as_string=decimal_as_string)
    if metadata.get(_PG_TYPE) == b"money":
        raise SourceDataError(
            f"Column {name!r} is PostgreSQL money, which arrives as integer cents without the currency's scale; "
            f"cast it in the SQL, e.g. {name}::numeric AS {name}."
        )
    if pa.types.is_null(t):
        return pl.Series(values=[None] * len(column), dtype=pl.String), "null"
    if pa.types.is_boolean(t):
        return _from_arrow(column), "bool"
    if pa.types.is_integer(t):
        return _from_arrow(_int64_array(name, column)), "int"
    if pa.types.is_floating(t):
        if pa.types.is_float32(t) and metadata.get(_PG_TYPE) == b"float4":
            column = column.cast(pa.string()).cast(pa.float64())  # the shortest text of the float32, as a double
        return _float_series(column.to_numpy(zero_copy_only=False)), "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        if metadata.get(KIND_METADATA) == JSON_TEXT_KIND:
            return _from_arrow(column.cast(pa.large_string())), "json"
        return _from_arrow(column.cast(pa.large_string())), "string"
    if _is_binary(t):
        _raise_bytes(name)
    if pa.types.is_timestamp(t):  # any unit; with a time zone the values are UTC instants already
        unit = t.unit
        missing = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        ints = column.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        return _epoch_ms(ints, unit, missing), "timestamp"
    if pa.types.is_date(t):
        days = _from_arrow(column.cast(pa.date32()).cast(pa.int32())).cast(pl.Int64)
        return days * _MS_PER_DAY, "date"
    if pa.types.is_time(t):
        ints = column.view(pa.int32() if pa.types.is_time32(t) else pa.int64())
        return _time_text(_from_arrow(ints), t.unit), "string"
    if pa.types.is_duration(t):
        return _duration_text(_from_arrow(column.view(pa.int64())), t.unit), "string"
    if t == pa.month_day_nano_interval():
        return _interval_text(column), "string"
    if pa.types.is_decimal(t):
        return _decimal_column(name, _from_arrow(column.cast(pa.large_string())), decimal_as_string=decimal_as_string)
    if _is_container(t):
        return _container_column(name, column), "json"
    raise SourceDataError(
        f"Column {name!r} has unsupported Arrow type {t}; cast it in the source (e.g. CAST(... AS TEXT))."
    )


def _is_binary(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _is_container(t: pa.DataType) -> bool:
    """Arrow lists (of any layout), structs and maps: JSON arrays and objects."""
    return bool(
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
        or pa.types.is_struct(t)
        or pa.types.is_map(t)
    )


def _convert_extension(name: str, column: pa.Array, *, decimal_as_string: bool) -> tuple[pl.Series, str]:
    t = column.type
    storage = column.storage
    if isinstance(t, pa.JsonType):
        return _json_text_column(name, storage), "json"
    if isinstance(t, pa.UuidType):
        return _uuid_text(storage), "string"
    if isinstance(t, pa.OpaqueType):
        if t.type_name in _DECIMAL_OPAQUE and _is_text(storage.type):
            return _decimal_column(
                name, _from_arrow(storage.cast(pa.large_string())), decimal_as_string=decimal_as_string
            )
        if t.type_name == "timetz" and t.vendor_name == "PostgreSQL":
            return _timetz_text(storage), "string"
    raise _unsupported_extension(name, t)


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _unsupported_extension(name: str, t: pa.DataType) -> SourceDataError:
    if isinstance(t, pa.OpaqueType):
        what = f"the {t.vendor_name} type {t.type_name!r}, which its driver hands over as opaque bytes"
    else:
        what = f"the Arrow extension type {t}"
    return SourceDataError(f"Column {name!r} has {what}; cast it in the source, e.g. CAST({name} AS TEXT).")


# --- time and intervals ---------------------------------------------------------------------------------------
def _time_text(ints: pl.Series, unit: str) -> pl.Series:
    """Times of day in ``unit`` since midnight -> ``datetime.time.isoformat()`` text (``13:45:30``,
    ``13:45:30.500000``); nine fraction digits when there are nanoseconds."""
    ns_per_unit = 10**9 // _SECONDS_PER_UNIT[unit]
    v = pl.col("v").cast(pl.Int64) * ns_per_unit
    seconds, ns = v // 10**9, v % 10**9

    def two(value: pl.Expr) -> pl.Expr:
        return value.cast(pl.String).str.zfill(2)

    fraction = (
        pl.when(ns == 0)
        .then(pl.lit(""))
        .when(ns % 1000 == 0)
        .then("." + (ns // 1000).cast(pl.String).str.zfill(6))
        .otherwise("." + ns.cast(pl.String).str.zfill(9))
    )
    text = pl.concat_str(
        [two(seconds // 3600), pl.lit(":"), two(seconds // 60 % 60), pl.lit(":"), two(seconds % 60), fraction]
    )
    return pl.DataFrame([ints.alias("v")]).select(text.alias("v")).to_series()


def _timetz_text(storage: pa.Array) -> pl.Series:
    """PostgreSQL's binary timetz (int64 microseconds, int32 offset in seconds west of UTC; big-endian) ->
    ``datetime.time.isoformat()`` text with its offset (``13:45:30.500000+02:00``), as psycopg reads it."""
    records = np.frombuffer(_binary_values(storage), dtype=np.dtype([("us", ">i8"), ("west", ">i4")]))
    missing = np.asarray(storage.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if len(records) != int((~missing).sum()):
        raise SourceDataError("A timetz column holds values of an unexpected layout; cast it to text in the SQL.")
    east = pl.col("east")
    offset = east.abs()
    frame = pl.DataFrame(
        {"v": records["us"].astype(np.int64), "east": -records["west"].astype(np.int64)},
        schema={"v": pl.Int64, "east": pl.Int64},
    )
    zone = pl.concat_str(
        [
            pl.when(east < 0).then(pl.lit("-")).otherwise(pl.lit("+")),
            (offset // 3600).cast(pl.String).str.zfill(2),
            pl.lit(":"),
            (offset // 60 % 60).cast(pl.String).str.zfill(2),
            pl.when(offset % 60 != 0).then(":" + (offset % 60).cast(pl.String).str.zfill(2)).otherwise(pl.lit("")),
        ]
    )
    texts = frame.with_columns(_time_text(frame.get_column("v"), "us").alias("time")).select(
        (pl.col("time") + zone).alias("v")
    )
    present = texts.to_series()
    if not missing.any():
        return present
    return pl.repeat(None, len(storage), dtype=pl.String, eager=True).scatter(np.flatnonzero(~missing), present)


def _binary_values(storage: pa.Array) -> bytes:
    """The bytes of the non-null values of a binary array, one after another (nulls hold no bytes)."""
    if len(storage) == 0:
        return b""
    offsets_type = np.int64 if pa.types.is_large_binary(storage.type) else np.int32
    if not (pa.types.is_binary(storage.type) or pa.types.is_large_binary(storage.type)):
        storage = storage.cast(pa.binary())
        offsets_type = np.int32
    _validity, offsets_buffer, data = storage.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offsets_type)
    start, end = int(offsets[storage.offset]), int(offsets[storage.offset + len(storage)])
    return data.to_pybytes()[start:end] if data is not None else b""


def _interval_text(column: pa.Array) -> pl.Series:
    """month_day_nano intervals -> ISO-8601 text. Without months: as a timedelta of the days and time would read
    (``P1DT2H3M4.5S``, ``-PT1S``). With months: ``nYnM`` first (``P1Y2M``, ``-P1M``, ``P1M3DT4H``); when the months
    and the rest have different signs, each part carries its own (``P1M-1D``, ``P-1MT2H``), as PostgreSQL writes it."""
    layout = np.dtype([("months", "<i4"), ("days", "<i4"), ("ns", "<i8")])
    buffer = column.buffers()[1]
    raw = (
        np.frombuffer(buffer, dtype=layout)[column.offset : column.offset + len(column)]
        if buffer
        else np.empty(0, layout)
    )
    missing = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    frame = pl.DataFrame(
        {
            "months": raw["months"].astype(np.int64),
            "rest": raw["days"].astype(np.int64),
            "ns": raw["ns"].astype(np.int64),
        }
    ).select(
        pl.col("months"),
        (pl.col("rest").cast(pl.Int128) * pl.lit(_NS_PER_DAY, pl.Int128) + pl.col("ns").cast(pl.Int128)).alias("rest"),
    )
    rest_text = _duration_text(frame.get_column("rest"), "ns")
    m, rest = pl.col("months"), pl.col("rest")
    years, months = m.abs() // 12, m.abs() % 12
    ym = pl.concat_str(
        [
            pl.when(years > 0).then(years.cast(pl.String) + "Y").otherwise(pl.lit("")),
            pl.when(months > 0).then(months.cast(pl.String) + "M").otherwise(pl.lit("")),
        ]
    )
    body = pl.col("rest_text").str.strip_prefix("-").str.strip_prefix("P")
    negated = r"-${1}"
    number = r"([0-9]+(?:\.[0-9]+)?)"
    text = (
        pl.when(m == 0)
        .then(pl.col("rest_text"))
        .when(rest == 0)
        .then(pl.when(m < 0).then(pl.lit("-P")).otherwise(pl.lit("P")) + ym)
        .when((m < 0) == (rest < 0))
        .then(pl.when(m < 0).then(pl.lit("-P")).otherwise(pl.lit("P")) + ym + body)
        .otherwise(
            pl.lit("P")
            + pl.when(m < 0).then(ym.str.replace_all(number, negated)).otherwise(ym)
            + pl.when(rest < 0).then(body.str.replace_all(number, negated)).otherwise(body)
        )
    )
    texts = frame.with_columns(rest_text.alias("rest_text")).select(text.alias("v")).to_series()
    return texts.set(pl.Series(missing, dtype=pl.Boolean), None) if missing.any() else texts


# --- uuid, JSON, containers -----------------------------------------------------------------------------------
def _uuid_text(storage: pa.Array) -> pl.Series:
    """16-byte UUIDs -> their lowercase 8-4-4-4-12 text (``str(uuid.UUID)``)."""
    hexed = pl.DataFrame([_from_arrow(storage.cast(pa.binary())).alias("b")]).select(
        pl.col("b").bin.encode("hex").alias("h")
    )
    h = pl.col("h").str
    return hexed.select(
        pl.concat_str(
            [h.slice(0, 8), h.slice(8, 4), h.slice(12, 4), h.slice(16, 4), h.slice(20, 12)], separator="-"
        ).alias("v")
    ).to_series()


def _json_text_column(name: str, texts: pa.Array) -> pl.Series:
    """JSON texts (json/jsonb) -> canonical JSON text (sorted keys), each number kept at its exact value.

    orjson reads a text when that is exact: no long integers, and every number with a fraction or an exponent is
    the shortest text of its double (``0.1``, ``2.5``, ``1e-7``), checked for all texts at once. Other texts are
    read by ``json`` with :func:`_json_number`.
    """
    series = _from_arrow(texts.cast(pa.large_string()))
    missing = np.asarray(series.is_null().to_numpy(), dtype=bool)
    present = series.drop_nulls()
    inexact = np.asarray(present.str.contains(_LONG_INTEGER).to_numpy(), dtype=bool)
    tokens = (
        pl.DataFrame({"t": present})
        .with_row_index("row")
        .select("row", pl.col("t").str.extract_all(_FRACTIONAL_NUMBER).alias("number"))
        .explode("number")
        .drop_nulls("number")
    )
    if tokens.height:
        number = tokens.get_column("number")
        shortest = number.cast(pl.Float64, strict=False).cast(pl.String)
        unsure = (number != shortest).fill_null(True)  # most numbers are written as their double's shortest text
        if unsure.any():
            sure = (_decimal_text(number.filter(unsure)) == _decimal_text(shortest.filter(unsure))).fill_null(False)
            rows = tokens.get_column("row").filter(unsure).filter(~sure)
            inexact[rows.unique().to_numpy()] = True
    parsed = np.empty(len(present), dtype=object)
    parsed[~inexact] = _load_json(name, present.filter(~inexact), exact_numbers=False)
    parsed[inexact] = _load_json(name, present.filter(inexact), exact_numbers=True)
    values = np.empty(len(series), dtype=object)
    values[~missing] = parsed
    return _json_series(name, values, missing)


def _load_json(name: str, texts: pl.Series, *, exact_numbers: bool) -> np.ndarray:
    """Parse each JSON text, a batch at a time (one parser call for many values)."""
    out = np.empty(len(texts), dtype=object)
    for start in range(0, len(texts), _JSON_PARSE_BATCH):
        part = texts.slice(start, _JSON_PARSE_BATCH)
        joined = "[" + (part.str.join(",").item() or "") + "]"
        try:
            values = json.loads(joined, parse_float=_json_number) if exact_numbers else orjson.loads(joined)
        except ValueError:
            values = []  # some text is not one JSON value: found below, one by one
        if len(values) != part.len():
            values = [_load_one(name, text, exact_numbers=exact_numbers) for text in part.to_list()]
        out[start : start + part.len()] = np.fromiter(values, dtype=object, count=part.len())
    return out


def _load_one(name: str, text: str, *, exact_numbers: bool) -> Any:
    try:
        return json.loads(text, parse_float=_json_number if exact_numbers else float)
    except ValueError as exc:
        raise SourceDataError(f"Column {name!r} holds text that is not one JSON value: {exc}.") from exc


def _json_number(token: str) -> float | _decimal.Decimal:
    """A JSON number with a fraction or exponent: the float when it is exactly the written value, else the decimal."""
    value = float(token)
    if math.isfinite(value) and _decimal.Decimal(repr(value)) == _decimal.Decimal(token):
        return value
    return _decimal.Decimal(token)


def _parse_json_value(text: str) -> Any:
    return json.loads(text, parse_float=_json_number)


def _container_column(name: str, column: pa.Array) -> pl.Series:
    """Lists, structs and maps -> canonical JSON text, written like the pandas path writes Python lists/dicts."""
    convert = _python_converter(name, column.type)
    try:
        values = column.to_pylist(maps_as_pydicts="strict")
    except KeyError as exc:  # a map holding a key twice
        raise SourceDataError(
            f"Column {name!r} holds a map with a repeated key, which a JSON object cannot hold: {exc}"
        ) from exc
    if convert is not None:
        values = [None if value is None else convert(value) for value in values]
    objects = np.fromiter(values, dtype=object, count=len(column))
    missing = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return _json_series(name, objects, missing)


Converter: TypeAlias = Callable[[Any], Any]


def _python_converter(name: str, t: pa.DataType) -> Converter | None:
    """How to turn ``to_pylist()`` values of type ``t`` into the Python values the JSON writer expects (None: as
    they are). Only extension types need it: decimal text -> Decimal, JSON text -> parsed values."""
    if isinstance(t, pa.BaseExtensionType):
        if isinstance(t, pa.JsonType):
            return _parse_json_value
        if isinstance(t, pa.UuidType):
            return None  # to_pylist gives uuid.UUID, written as its text
        if isinstance(t, pa.OpaqueType) and t.type_name in _DECIMAL_OPAQUE and _is_text(t.storage_type):
            return _decimal.Decimal
        raise _unsupported_extension(name, t)
    if pa.types.is_dictionary(t):
        return _python_converter(name, t.value_type)
    if pa.types.is_struct(t):
        fields = {t.field(i).name: _python_converter(name, t.field(i).type) for i in range(t.num_fields)}
        if not any(fields.values()):
            return None

        def struct(value: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for key, item in value.items():
                convert = fields.get(key)
                out[key] = item if item is None or convert is None else convert(item)
            return out

        return struct
    if pa.types.is_map(t):
        key_convert, item_convert = _python_converter(name, t.key_type), _python_converter(name, t.item_type)
        if key_convert is None and item_convert is None:
            return None

        def mapping(value: dict[Any, Any]) -> dict[Any, Any]:
            return {
                (key if key_convert is None else key_convert(key)): (
                    item if item is None or item_convert is None else item_convert(item)
                )
                for key, item in value.items()
            }

        return mapping
    if _is_container(t):
        inner = _python_converter(name, t.value_type)
        if inner is None:
            return None

        def sequence(value: list[Any]) -> list[Any]:
            return [None if item is None else inner(item) for item in value]

        return sequence
    return None


# --------------------------------------------------------------------------------------------------------------
# text columns holding JSON (json_columns)
# --------------------------------------------------------------------------------------------------------------
#: Keys of the rows with invalid JSON named in the error.
_BAD_JSON_KEYS_SHOWN = 5


def parse_json_columns(canon: Canonical, columns: Sequence[str], *, keys_may_be_json: bool = False) -> Canonical:
    """``canon`` with the text columns named in ``columns`` parsed as JSON: kind ``json``, canonical JSON text.

    For every kind of source (the same canonical frame follows from pandas, polars and Arrow), after
    canonicalization: a column of kind ``string`` is parsed (numbers kept exact, keys sorted, so reformatted JSON
    text is no change); a column that is JSON already (PostgreSQL json/jsonb, MySQL 8's JSON) or holds only NULLs
    is left as it is. Raises :class:`SourceDataError` for a column the source does not have, a key column (unless
    ``keys_may_be_json``: events, whose key is the whole event), a column of another kind, or text that is not one
    JSON value (naming the column and the ``key_columns`` of up to five rows).
    """
    if not columns:
        return canon
    kinds = dict(canon.kinds)
    replaced: list[pl.Series] = []
    for name in dict.fromkeys(columns):
        kind = kinds.get(name)
        if kind is None:
            raise SourceDataError(
                f"json_columns names {name!r}, which the source does not have (its columns: "
                f"{', '.join(map(repr, canon.frame.columns))})."
            )
        if name in canon.key_columns and not keys_may_be_json:
            raise SourceDataError(f"json_columns names the key column {name!r}; a key cannot be a JSON value.")
        if kind in ("json", "null"):
            continue
        if kind != "string":
            raise SourceDataError(
                f"json_columns names {name!r}, whose values are of kind {kind!r}, not text holding JSON; leave it "
                "out of json_columns or cast it to text in the source."
            )
        texts = canon.frame.get_column(name)
        _check_json_texts(canon, name, texts)
        parsed = _json_text_column(name, texts.to_arrow())
        replaced.append(parsed.alias(name))
        kinds[name] = "json"
    if not replaced:
        return canon
    return Canonical(frame=canon.frame.with_columns(replaced), kinds=kinds, key_columns=canon.key_columns)


def _check_json_texts(canon: Canonical, name: str, texts: pl.Series) -> None:
    """Raise :class:`SourceDataError` naming ``name`` and up to five keys when any text is not one JSON value."""
    present = texts.drop_nulls()
    joined = "[" + (present.str.join(",").item() or "") + "]" if present.len() else "[]"
    try:
        if len(orjson.loads(joined)) == present.len():
            return
    except orjson.JSONDecodeError:
        pass
    bad = [row for row, text in enumerate(texts.to_list()) if text is not None and not _is_json(text)]
    if not bad:
        return
    keys = canon.frame.select(canon.key_columns)[bad[:_BAD_JSON_KEYS_SHOWN]]
    shown = [row[0] if len(row) == 1 else row for row in keys.rows()]
    more = f" (and {len(bad) - len(shown)} more)" if len(bad) > len(shown) else ""
    raise SourceDataError(
        f"Column {name!r} is in json_columns, but {len(bad)} row(s) hold text that is not valid JSON; keys "
        f"({', '.join(canon.key_columns)}) {', '.join(map(repr, shown))}{more}. Nothing was sent."
    )


def _is_json(text: str) -> bool:
    """Whether ``text`` is one JSON value (numbers beyond a double's range too, as json/jsonb hold them; not NaN)."""
    try:
        orjson.loads(text)
        return True
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses but the exact parser reads: numbers such as 1e400
        json.loads(text, parse_float=_json_number, parse_constant=_no_constant)
        return True
    except ValueError:
        return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
