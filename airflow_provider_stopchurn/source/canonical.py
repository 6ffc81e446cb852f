"""Arrow sources -> canonical frames, without pandas (no Airflow import).

:func:`canonicalize_arrow` gives, for Arrow data (a ``pyarrow.Table``, a ``RecordBatch``, a ``RecordBatchReader`` or
any iterable of record batches), exactly the :class:`~airflow_provider_stopchurn.source.frame.Canonical` frame
that :func:`~airflow_provider_stopchurn.source.frame.canonicalize` gives for the same values in a pandas
DataFrame: the same kinds, dtypes and canonical values (see the kinds table in
:mod:`~airflow_provider_stopchurn.source.frame`), the same key and ``id`` checks, the same errors. It reuses the
pandas path's helpers, so both follow one set of rules.
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

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import GeneratorType
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.arrow_values import (
    JSON_TEXT_KIND,
    KIND_METADATA,
    convert_arrow_column,
)
from airflow_provider_stopchurn.source.frame import Canonical, canonicalize, check_names, finish
from airflow_provider_stopchurn.source.json_columns import parse_json_columns
from airflow_provider_stopchurn.source.key_values import as_key, check_float_key, check_missing_keys
from airflow_provider_stopchurn.source.memory import release_freed_memory
from airflow_provider_stopchurn.source.values import _json_series

__all__ = [
    "JSON_TEXT_KIND",
    "KIND_METADATA",
    "Batch",
    "Source",
    "SourceData",
    "canonical_batches",
    "canonicalize_arrow",
    "canonicalize_batch",
    "canonicalize_source",
    "convert_arrow_column",
    "is_batch_iterable",
    "join_batches",
    "joined_small_batches",
    "merge_batches",
    "parse_json_columns",
    "release_freed_memory",
    "retyped",
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
#: A canonical batch: its columns, and their kinds.
Batch: TypeAlias = tuple[pl.DataFrame, dict[str, str]]

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


# --------------------------------------------------------------------------------------------------------------
# any source
# --------------------------------------------------------------------------------------------------------------
def canonicalize_source(source: Source, *, key_columns: Sequence[str], decimal_as_string: bool = False) -> Canonical:
    """Read ``source`` (calling it first if it is a callable) and canonicalize it.

    pandas DataFrames take :func:`~airflow_provider_stopchurn.source.frame.canonicalize`; polars DataFrames and
    LazyFrames (collected), pyarrow Tables, RecordBatches, RecordBatchReaders and iterables of RecordBatches take
    :func:`canonicalize_arrow`, with no pandas conversion. A reader or generator is consumed and closed.
    """
    data = source() if callable(source) else source
    try:
        if isinstance(data, pd.DataFrame):
            canon = canonicalize(data, key_columns=key_columns, decimal_as_string=decimal_as_string)
            release_freed_memory()  # the Python values its JSON and text columns were written from
            return canon
        if isinstance(data, pl.LazyFrame):
            data = data.collect()
        if isinstance(data, pl.DataFrame):
            return canonicalize_arrow(
                _polars_to_arrow(data), key_columns=key_columns, decimal_as_string=decimal_as_string
            )
        if isinstance(data, pa.Table | pa.RecordBatch | pa.RecordBatchReader) or is_batch_iterable(data):
            return canonicalize_arrow(data, key_columns=key_columns, decimal_as_string=decimal_as_string)
    finally:
        if isinstance(data, GeneratorType | pa.RecordBatchReader):
            data.close()  # a SQL source's generator releases its connection
    raise _not_a_source(_type_name(data))


def is_batch_iterable(data: Any) -> bool:
    """Whether ``data`` is read as record batches: an iterator (any items: checked as they come), or a list/tuple
    of record batches or tables.

    :param data: a source, already called.
    """
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

    def converted() -> Iterator[Batch]:
        nonlocal keys
        for found, part in canonical_batches(data, key_columns=key_columns, decimal_as_string=decimal_as_string):
            keys = found
            yield part

    parts: list[Batch] = []
    for part in joined_small_batches(converted()):
        parts.append(part)
        release_freed_memory()
    if keys is None:  # no batch and no schema: a source without columns
        keys = check_names([], key_columns)
    frame, kinds = merge_batches(parts, keys)
    canon = finish(frame, kinds, keys)
    release_freed_memory()
    return canon


def canonical_batches(
    data: pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch],
    *,
    key_columns: Sequence[str],
    decimal_as_string: bool = False,
) -> Iterator[tuple[tuple[str, ...], tuple[pl.DataFrame, dict[str, str]]]]:
    """Each record batch of ``data`` as (the checked key columns, (its canonical columns, their kinds)), in order.

    The checks over the whole table (kinds joined, unique keys, ``id``) are the caller's, after the last batch:
    :func:`merge_batches`, then :func:`~airflow_provider_stopchurn.source.frame.finish`. Nothing is yielded for data
    without a batch or a schema.
    """
    keys: tuple[str, ...] | None = None
    names: list[str] | None = None
    offset = 0
    for batch in _record_batches(data):
        if names is None:
            names = batch.schema.names
            keys = check_names(names, key_columns)
        elif batch.schema.names != names:
            raise SourceDataError(
                f"The source's record batches have different columns: {names!r}, then {batch.schema.names!r}."
            )
        assert keys is not None
        part = canonicalize_batch(batch, keys=keys, offset=offset, decimal_as_string=decimal_as_string)
        offset += batch.num_rows
        yield keys, part


#: Rows under which consecutive batches are joined into one chunk as they are read: a frame of thousands of small
#: chunks (a cursor fetching a few rows at a time) makes every later step of the plan several times slower.
_SMALL_BATCH = 10_000


def join_batches(parts: Sequence[Batch]) -> Batch:
    """Canonical batches of the same kinds as one batch of one chunk (the same frame as joined later, retyped or
    not: their columns are retyped alike).

    :param parts: consecutive canonical batches, all of the first one's kinds.
    """
    if len(parts) == 1:
        return parts[0]
    return pl.concat([frame for frame, _ in parts], how="vertical", rechunk=True), parts[0][1]


def joined_small_batches(parts: Iterable[Batch]) -> Iterator[Batch]:
    """``parts`` in order, consecutive batches of the same kinds under ``_SMALL_BATCH`` rows joined as they come
    (:func:`join_batches`); each joined batch is yielded once it reaches ``_SMALL_BATCH`` rows, its kinds end, or a
    larger batch follows.

    :param parts: canonical batches (:func:`canonical_batches`), in source order.
    """
    small: list[Batch] = []  # consecutive small batches of the same kinds
    for part in parts:
        if small and (part[1] != small[0][1] or part[0].height >= _SMALL_BATCH):
            yield join_batches(small)
            small = []
        if part[0].height >= _SMALL_BATCH:
            yield part
            continue
        small.append(part)
        if sum(frame.height for frame, _ in small) >= _SMALL_BATCH:
            yield join_batches(small)
            small = []
    if small:
        yield join_batches(small)


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
    # a stream's batches are the engine's alone (nobody else holds them): copied, so none outlives its conversion
    streamed = not isinstance(data, pa.Table | list | tuple)
    seen = False
    for item in items:
        if isinstance(item, pa.Table):  # an iterator of tables (e.g. a driver's Arrow batches)
            if item.num_rows == 0 and not seen:
                schema = item.schema
            for batch in item.to_batches():
                yield _detached(batch) if streamed else batch
            seen = seen or item.num_rows > 0
            continue
        if not isinstance(item, pa.RecordBatch):
            raise _not_a_source(f"an iterator yielding {_type_name(item)}")
        seen = True
        yield _detached(item) if streamed else item
    if not seen and schema is not None:
        yield pa.RecordBatch.from_pylist([], schema=schema)


def _detached(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A copy of a streamed batch whose columns each own their memory.

    A batch imported through the Arrow C data interface (an ADBC driver's) is released as one block once nothing
    references any of its buffers; a canonical column read zero-copy from it (an integer key, a boolean) would keep
    every column of the batch alive for the whole run (about 200 MB for 1M rows from PostgreSQL). The copy costs one
    batch at a time; the conversion then keeps only what it needs.
    """
    return pa.RecordBatch.from_arrays([_copied(column) for column in batch.columns], schema=batch.schema)


def _copied(column: pa.Array) -> pa.Array:
    try:
        return pa.concat_arrays([column])
    # a type Arrow cannot join (the conversion refuses it), or an empty slice past its start whose exported buffers
    # are shorter than its offset (ArrowIndexError): read as it is, as before the copy
    except pa.ArrowException:
        return column


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
            converted, kind = as_key(name, converted, kind)
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
            as_key(key, pl.Series(key, [], dtype=pl.String), "json")
    frames = [retyped(frame, batch_kinds, kinds) for frame, batch_kinds in parts]
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


def retyped(frame: pl.DataFrame, have: Mapping[str, str], want: Mapping[str, str]) -> pl.DataFrame:
    """A canonical batch's columns converted from the kinds it was read with to the table's joined kinds, as
    :func:`merge_batches` converts every batch.

    :param frame: one canonical batch.
    :param have: its columns' kinds.
    :param want: the kinds joined over the whole table.
    """
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
    check_missing_keys(name, missing, rows)
    if pa.types.is_floating(column.type):
        check_float_key(name, np.asarray(column.to_numpy(zero_copy_only=False), dtype="float64"), rows)


def _plain(column: pa.Array) -> pa.Array:
    """Dictionary-encoded values decoded, extension arrays as their storage."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if isinstance(column.type, pa.BaseExtensionType):
        column = column.storage
    return column
