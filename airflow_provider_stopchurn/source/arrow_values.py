"""One Arrow column -> a canonical polars Series and its kind (no Airflow import).

The column rules of :mod:`~airflow_provider_stopchurn.source.canonical` (the Arrow types ADBC drivers deliver are listed
there); the pandas path of :mod:`~airflow_provider_stopchurn.source.frame` converts a DataFrame's Arrow-backed columns
with them too.
"""

from __future__ import annotations

import decimal as _decimal
import json
import math
from collections.abc import Callable
from typing import Any, TypeAlias

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.values import (
    _MS_PER_DAY,
    _SECONDS_PER_UNIT,
    _decimal_column,
    _decimal_text,
    _duration_text,
    _epoch_ms,
    _float_series,
    _from_arrow,
    _int64_array,
    _json_series,
    _raise_bytes,
)

#: Field metadata a source may set on a string column: ``{KIND_METADATA: JSON_TEXT_KIND}`` says the column holds
#: canonical JSON text already (``dbapi_rows.py`` writes mixed and JSON columns of DB-API rows so): taken as it is.
KIND_METADATA = b"stopchurn:kind"
JSON_TEXT_KIND = b"json"
#: ADBC PostgreSQL names each column's database type in its field metadata.
_PG_TYPE = b"POSTGRESQL:type"
#: ``arrow.opaque`` type names whose string storage holds decimal text (PostgreSQL's numeric; DB-API Decimals).
_DECIMAL_OPAQUE = frozenset({"numeric", "decimal"})
#: JSON numbers with a fraction or an exponent (and text inside strings that looks like one: checked too, harmless).
_FRACTIONAL_NUMBER = r"[0-9]+(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)"
#: An integer of 19 digits or more, which orjson may read as a float (beyond 64 bits).
_LONG_INTEGER = r"[0-9]{19}"
_JSON_PARSE_BATCH = 100_000
_NS_PER_DAY = 86_400 * 10**9
_BINARY_TESTS: tuple[Callable[[pa.DataType], bool], ...] = (
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_fixed_size_binary,
    pa.types.is_binary_view,
)
_CONTAINER_TESTS: tuple[Callable[[pa.DataType], bool], ...] = (
    pa.types.is_list,
    pa.types.is_large_list,
    pa.types.is_fixed_size_list,
    pa.types.is_list_view,
    pa.types.is_large_list_view,
    pa.types.is_struct,
    pa.types.is_map,
)


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
    """Arrow's binary types (of any layout): bytes, which JSON cannot carry."""
    return any(test(t) for test in _BINARY_TESTS)


def _is_container(t: pa.DataType) -> bool:
    """Arrow lists (of any layout), structs and maps: JSON arrays and objects."""
    return any(test(t) for test in _CONTAINER_TESTS)


def _convert_extension(name: str, column: pa.Array, *, decimal_as_string: bool) -> tuple[pl.Series, str]:
    t = column.type
    storage = column.storage
    if isinstance(t, pa.JsonType):
        return json_text_column(name, storage), "json"
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


def json_text_column(name: str, texts: pa.Array) -> pl.Series:
    """JSON texts (json/jsonb) -> canonical JSON text (sorted keys), each number kept at its exact value.

    Each distinct text is converted once (:func:`_canonical_json_texts`) and its canonical text put back in every
    row that holds it: JSON columns repeat their values (settings, flags, preferences: a few hundred distinct
    objects in a million rows), and parsing each row into Python cost about a second per million rows. The
    canonical text is a function of the text alone, so every row gets the bytes it would get on its own. Shared by
    the Arrow path's JSON columns and ``json_columns``.

    :param name: the column (named in errors).
    :param texts: the JSON texts (nulls stay null).
    """
    series = _from_arrow(texts.cast(pa.large_string()))
    # in the order of first occurrence: a column with invalid texts then fails on its first invalid row, as when each
    # row was parsed on its own, and with the same message on every run (a hash table's order is not stable)
    distinct = series.drop_nulls().unique(maintain_order=True)
    if distinct.len() > series.len() * _REPEATED_JSON_SHARE:  # mostly distinct: no repeat to save work on
        return _canonical_json_texts(name, series)
    return series.replace_strict(distinct, _canonical_json_texts(name, distinct), return_dtype=pl.String)


#: Distinct texts as a share of a JSON column's rows above which each row is converted as it comes.
_REPEATED_JSON_SHARE = 0.5


def _canonical_json_texts(name: str, series: pl.Series) -> pl.Series:
    """JSON texts -> canonical JSON text, row by row in one pass (see :func:`json_text_column`).

    orjson reads a text when that is exact: no long integers, and every number with a fraction or an exponent is
    the shortest text of its double (``0.1``, ``2.5``, ``1e-7``), checked for all texts at once. Other texts are
    read by ``json`` with :func:`json_number`.
    """
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
            values = json.loads(joined, parse_float=json_number) if exact_numbers else orjson.loads(joined)
        except ValueError:
            values = []  # some text is not one JSON value: found below, one by one
        if len(values) != part.len():
            values = [_load_one(name, text, exact_numbers=exact_numbers) for text in part.to_list()]
        out[start : start + part.len()] = np.fromiter(values, dtype=object, count=part.len())
    return out


def _load_one(name: str, text: str, *, exact_numbers: bool) -> Any:
    try:
        return json.loads(text, parse_float=json_number if exact_numbers else float)
    except ValueError as exc:
        raise SourceDataError(f"Column {name!r} holds text that is not one JSON value: {exc}.") from exc


def json_number(token: str) -> float | _decimal.Decimal:
    """A JSON number with a fraction or exponent: the float when it is exactly the written value, else the decimal.

    The ``parse_float`` of every exact JSON read (the Arrow path's JSON columns and ``json_columns``' check).

    :param token: the number as written.
    """
    value = float(token)
    if math.isfinite(value) and _decimal.Decimal(repr(value)) == _decimal.Decimal(token):
        return value
    return _decimal.Decimal(token)


def _parse_json_value(text: str) -> Any:
    return json.loads(text, parse_float=json_number)


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
