"""Encoding an event source: one event per row as the JSON text sent, with its key and watermark (vectorised)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.encode.records import encode_rows, json_fragment
from airflow_provider_stopchurn.events.ledger import KEY, WATERMARK
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.canonical import parse_json_columns
from airflow_provider_stopchurn.source.frame import Canonical, canonical_columns, check_reserved_names

#: Plan column: the event's JSON text, as sent.
EVENT = "__sc_event"
_MAX_LISTED = 5
_USER_ID = "__sc_user_id"
_VALUE = "__sc_value"
_WATERMARK_KINDS = ("timestamp", "date", "int")
#: Floats are exact integers only up to 2**53: a larger float user id may be another user's id, rounded.
_MAX_EXACT_FLOAT = 2**53


@dataclass
class Encoded:
    """One event per source row, in source order: ``EVENT`` (JSON text), ``KEY``, ``WATERMARK``."""

    frame: pl.DataFrame
    key_columns: list[str]


def _as_frame(source: Any) -> pd.DataFrame:
    """A pandas frame of the source; Arrow batches (a SQL source) keep their Arrow types (``pd.ArrowDtype``)."""
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, pl.DataFrame | pl.LazyFrame):
        source = source.collect() if isinstance(source, pl.LazyFrame) else source
        check_reserved_names(source.columns)  # before polars renames an empty name to "column_1"
        return source.to_pandas(use_pyarrow_extension_array=True)
    if isinstance(source, pa.Table):
        return source.to_pandas(types_mapper=pd.ArrowDtype)
    if isinstance(source, pa.RecordBatch):
        return pa.Table.from_batches([source]).to_pandas(types_mapper=pd.ArrowDtype)
    if isinstance(source, pa.RecordBatchReader | Iterator | list):
        batches = list(source)
        if batches and all(isinstance(b, pa.RecordBatch) for b in batches):
            return pa.Table.from_batches(batches).to_pandas(types_mapper=pd.ArrowDtype)
    raise SourceDataError(
        f"The event source must be a pandas or polars DataFrame or Arrow data, got {type(source).__name__}."
    )


def encode_events(df: Any, options: EventOptions, key_order: Sequence[str] | None = None) -> Encoded:
    """Validate the source and encode one event per row (vectorised); raise before anything is sent.

    :param key_order: the event key columns as the ledger recorded them: the same columns in another order (a
        query rewritten, a ``SELECT *`` of a recreated table) are encoded in that order, so their keys match.
    """
    df = _as_frame(df)
    columns = [str(c) for c in df.columns]
    key_columns = list(options.event_key) if options.event_key is not None else columns
    if key_order is not None and sorted(key_order) == sorted(key_columns):
        key_columns = list(key_order)
    named = {
        "user_id_column": [options.user_id_column],
        "name_column": [options.name_column] if options.name_column else [],
        "value_column": [options.value_column] if options.value_column else [],
        "value_columns": list(options.value_columns or ()),
        "event_key": key_columns,
        "watermark_column": [options.watermark_column] if options.watermark_column else [],
    }
    missing = [f"{arg} {c!r}" for arg, names in named.items() for c in names if c not in df.columns]
    if missing:
        raise SourceDataError(
            f"The event source lacks {', '.join(missing)}; its columns are {columns or '(none)'}. Nothing was sent."
        )
    needed = list(dict.fromkeys(c for names in named.values() for c in names))
    canon, kinds = canonical_columns(df[needed])
    if options.json_columns:
        absent = [c for c in options.json_columns if c not in needed]
        if absent:
            raise SourceDataError(
                f"json_columns names {', '.join(map(repr, absent))}, which no event argument uses (columns used: "
                f"{needed}). Nothing was sent."
            )
        parsed = parse_json_columns(
            Canonical(frame=canon, kinds=kinds, key_columns=tuple(key_columns)),
            options.json_columns,
            keys_may_be_json=True,
        )
        canon, kinds = parsed.frame, parsed.kinds
    rows = canon.height
    canon = canon.with_columns(_user_id(canon, kinds, options.user_id_column).alias(_USER_ID))
    _check_present(canon, _USER_ID, f"user id (column {options.user_id_column!r})")
    pieces: list[pl.Expr] = [
        pl.lit('{"brandId":' + str(int(options.brand_id)) + ',"userId":'),
        json_fragment(_USER_ID, "string", pl.String()),
        pl.lit(',"name":'),
    ]
    if options.name is not None:
        pieces.append(pl.lit(json.dumps(options.name, ensure_ascii=False)))
    else:
        name = str(options.name_column)
        if rows and kinds[name] not in ("string", "null"):
            raise SourceDataError(f"Event name column {name!r} must hold strings, not {kinds[name]} values.")
        _check_present(canon, name, f"event name (column {name!r})")
        pieces.append(json_fragment(name, "string", pl.String()))
    if options.value_columns is not None:
        cols = list(options.value_columns)
        obj = encode_rows(
            canon.select(cols), {c: kinds[c] for c in cols}, nest_dotted_columns=options.nest_dotted_columns
        )
        canon = canon.with_columns(obj.alias(_VALUE))
        pieces += [pl.lit(',"value":'), pl.col(_VALUE)]
    elif options.value_column is not None:
        name = options.value_column
        fragment = json_fragment(name, kinds[name], canon.schema[name])
        # a null value is left out: the field is optional, and a null may not fit the event's definition
        pieces.append(pl.when(fragment == "null").then(pl.lit("")).otherwise(pl.lit(',"value":') + fragment))
    pieces.append(pl.lit("}"))
    keys = encode_rows(canon.select(key_columns), {c: kinds[c] for c in key_columns}, nest_dotted_columns=False)
    frame = canon.select(pl.concat_str(pieces).alias(EVENT)).with_columns(
        keys.alias(KEY), _watermark(canon, kinds, options.watermark_column).alias(WATERMARK)
    )
    return Encoded(frame, key_columns)


def _user_id(canon: pl.DataFrame, kinds: Mapping[str, str], column: str) -> pl.Series:
    """The user id as text: strings as they are, integers (also integral floats and decimals) as digits."""
    values = canon.get_column(column)
    kind = kinds[column]
    if kind in ("string", "null"):
        return values.cast(pl.String)
    if kind == "int":
        return values.cast(pl.String)
    if kind == "float":
        fractional = values.is_not_null() & (values != values.floor())
        if fractional.any():
            raise SourceDataError(
                f"User id column {column!r} holds non-integral numbers, e.g. "
                f"{values.filter(fractional).head(_MAX_LISTED).to_list()}; user ids are strings or whole numbers."
            )
        inexact = values.is_not_null() & (values.abs() > _MAX_EXACT_FLOAT)
        if inexact.any():
            shown = ", ".join(f"{v:g}" for v in values.filter(inexact).head(_MAX_LISTED).to_list())
            raise SourceDataError(
                f"User id column {column!r} holds numbers too large to be exact as floats, e.g. {shown}; a float "
                f"is an exact whole number only up to 2**53, so such an id may be another user's, rounded. Read "
                "the column as integers or text. Nothing was sent."
            )
        return values.cast(pl.Int64).cast(pl.String)
    if kind == "decimal":
        fractional = values.str.contains(".", literal=True) | values.str.contains("E-", literal=True)
        if fractional.fill_null(False).any():
            raise SourceDataError(f"User id column {column!r} holds non-integral decimals; user ids must be whole.")
        return values
    raise SourceDataError(f"User id column {column!r} must hold strings or integers, not {kind} values.")


def _check_present(canon: pl.DataFrame, column: str, what: str) -> None:
    """Refuse null and empty values of a column every event needs (before anything is sent)."""
    values = canon.get_column(column)
    bad = values.is_null() | (values == "")
    if bad.fill_null(True).any():
        positions = bad.fill_null(True).arg_true()
        shown = positions.head(_MAX_LISTED).to_list()
        more = f" (and {positions.len() - len(shown)} more)" if positions.len() > len(shown) else ""
        raise SourceDataError(
            f"{positions.len()} row(s) of the event source have no {what} (null or empty), at row position(s) "
            f"{', '.join(map(str, shown))}{more}; every event needs one. Nothing was sent."
        )


def _watermark(canon: pl.DataFrame, kinds: Mapping[str, str], column: str | None) -> pl.Series:
    if column is None:
        return pl.repeat(None, canon.height, dtype=pl.Int64, eager=True)
    kind = kinds[column]
    values = canon.get_column(column)
    missing = values.is_null()
    if missing.any():
        positions = missing.arg_true()
        raise SourceDataError(
            f"{positions.len()} row(s) of the event source have no watermark (column {column!r} is null), at row "
            f"position(s) {', '.join(map(str, positions.head(_MAX_LISTED).to_list()))}; the window of the next "
            "run could not place them. Nothing was sent."
        )
    if canon.height and kind not in _WATERMARK_KINDS:
        raise SourceDataError(
            f"Watermark column {column!r} must hold datetimes, dates or epoch milliseconds, not {kind} values."
        )
    return values.cast(pl.Int64)


__all__ = ["EVENT", "Encoded", "encode_events"]
