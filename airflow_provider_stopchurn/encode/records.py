"""Canonical rows -> StopChurn's JSON: each row as one JSON object text, and rows wrapped in update records.

:func:`encode_rows` writes each row of a :class:`~airflow_provider_stopchurn.source.frame.Canonical` frame as one
JSON object text, each column by its kind (the kinds table of :mod:`~airflow_provider_stopchurn.source.frame` says
how); :func:`row_pieces` gives the same text as pieces to build a larger document around each row in one pass, and
:func:`json_fragment` the text of one column. :func:`encode_updates` wraps the rows in StopChurn's update envelope;
:mod:`~airflow_provider_stopchurn.encode.chunks` cuts the updates into request bodies. All vectorised with polars
(no Python loop over rows); no Airflow import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.frame import KINDS
from airflow_provider_stopchurn.source.values import listed

__all__ = ["build_tree", "encode_rows", "encode_updates", "json_fragment", "json_key_text", "row_pieces"]

_UPDATE_TYPES = ("insert", "update", "delete")


def _fragment(name: str, kind: str, dtype: pl.DataType, *, decimal_as_string: bool) -> pl.Expr:
    """A String expression holding the JSON text of column ``name`` for each row (``null`` for nulls)."""
    c = pl.col(name)
    if kind == "null" or dtype == pl.Null:
        return pl.lit("null")
    if kind in ("int", "timestamp", "date"):
        if dtype.is_float():
            return _float_fragment(c)
        return c.cast(pl.String).fill_null("null")
    if kind == "float":
        return _float_fragment(c.cast(pl.Float64))
    if kind == "bool":
        return pl.when(c.is_null()).then(pl.lit("null")).when(c).then(pl.lit("true")).otherwise(pl.lit("false"))
    if kind == "json" or (kind == "decimal" and not decimal_as_string):
        return c.cast(pl.String).fill_null("null")
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r} for column {name!r}; expected one of {KINDS}.")
    # string-like: let polars' JSON writer do the escaping, then strip the '{"v":' ... '}' wrapper.
    return pl.struct(c.cast(pl.String).alias("v")).struct.json_encode().str.slice(5).str.head(-1)


def json_fragment(name: str, kind: str, dtype: pl.DataType, *, decimal_as_string: bool = False) -> pl.Expr:
    """A String expression holding the canonical JSON text of column ``name`` in each row (``null`` for nulls).

    The text :func:`encode_rows` writes for the column, for building other JSON documents (events) around it.
    """
    return _fragment(name, kind, dtype, decimal_as_string=decimal_as_string)


def _float_fragment(c: pl.Expr) -> pl.Expr:
    integral = (c == c.floor()) & (c.abs() < 2.0**63)
    return (
        pl.when(c.is_null() | ~c.is_finite())
        .then(pl.lit("null"))
        .when(integral)
        .then(c.cast(pl.Int64).cast(pl.String))
        .otherwise(c.cast(pl.String))
    )


def json_key_text(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def build_tree(names: Sequence[str], nest: bool) -> dict[str, Any]:
    """Column names -> nested dict whose leaves are column names (dotted names nest when ``nest``)."""
    tree: dict[str, Any] = {}
    for name in names:
        parts = name.split(".") if nest else [name]
        if not all(parts):
            parts = [name]
        node = tree
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if last:
                if part in node:
                    raise SourceDataError(
                        f"Column {name!r} clashes with nested column(s) under {here!r}: a JSON key cannot be "
                        "both a value and an object. Rename one of them."
                    )
                node[part] = name
            else:
                child = node.setdefault(part, {})
                if isinstance(child, str):
                    raise SourceDataError(
                        f"Column {name!r} would nest under {here!r}, but column {child!r} already holds a "
                        "value there: a JSON key cannot be both a value and an object. Rename one of them."
                    )
                node = child
    return tree


def _object_pieces(tree: Mapping[str, Any], fragments: Mapping[str, pl.Expr]) -> list[pl.Expr]:
    pieces: list[pl.Expr] = []
    for i, (key, sub) in enumerate(tree.items()):
        pieces.append(pl.lit(("," if i else "") + json_key_text(key) + ":"))
        if isinstance(sub, str):
            pieces.append(fragments[sub])
        else:
            pieces.append(pl.lit("{"))
            pieces.extend(_object_pieces(sub, fragments))
            pieces.append(pl.lit("}"))
    return pieces


def encode_rows(
    frame: pl.DataFrame,
    kinds: Mapping[str, str],
    *,
    nest_dotted_columns: bool = True,
    decimal_as_string: bool = False,
) -> pl.Series:
    """Each row of a canonical ``frame`` -> one JSON object text (a String Series named ``"row"``).

    Keys are the column names; with ``nest_dotted_columns`` a column ``"a.b"`` becomes ``{"a": {"b": ...}}``.
    """
    pieces = row_pieces(
        frame.schema, kinds, nest_dotted_columns=nest_dotted_columns, decimal_as_string=decimal_as_string
    )
    if frame.height == 0:
        return pl.Series("row", [], dtype=pl.String)
    return frame.select(pl.concat_str(pieces).alias("row")).to_series()


def row_pieces(
    schema: Mapping[str, pl.DataType],
    kinds: Mapping[str, str],
    *,
    nest_dotted_columns: bool = True,
    decimal_as_string: bool = False,
) -> list[pl.Expr]:
    """The pieces of :func:`encode_rows`' JSON object text of each row, for ``pl.concat_str`` (never null).

    For building a larger document around each row in one pass (the historical-upload records).
    """
    missing = [c for c in schema if c not in kinds]
    if missing:
        raise ValueError(f"No kind given for column(s) {missing!r}.")
    tree = build_tree(list(schema), nest_dotted_columns)
    fragments = {
        name: _fragment(name, kinds[name], dtype, decimal_as_string=decimal_as_string) for name, dtype in schema.items()
    }
    return [pl.lit("{"), *_object_pieces(tree, fragments), pl.lit("}")]


def _ms_series(s: pl.Series, label: str) -> pl.Series:
    if isinstance(s.dtype, pl.Datetime | pl.Date):
        s = s.dt.epoch("ms")
    if not s.dtype.is_integer():
        raise ValueError(f"{label} must hold epoch milliseconds (integers); got dtype {s.dtype}.")
    if s.null_count():
        raise ValueError(f"{label} has {s.null_count()} null value(s); every update needs epoch milliseconds.")
    return s.cast(pl.Int64).cast(pl.String)


def encode_updates(
    ops: pl.Series,
    rows_json: pl.Series,
    created_at: pl.Series,
    updated_at: pl.Series,
    *,
    brand_id: int,
    table_name: str,
) -> pl.Series:
    """Wrap encoded rows in StopChurn's update envelope; returns one JSON text per update (String Series).

    ``{"type": <op>, "data": {"brandId": .., "tableName": .., "data": <row>, "createdAt": <ms>,
    "updatedAt": <ms>}}``
    """
    if isinstance(brand_id, bool) or not isinstance(brand_id, int | np.integer):
        raise ValueError(f"brand_id must be an integer; got {brand_id!r}.")
    n = len(rows_json)
    if not (len(ops) == len(created_at) == len(updated_at) == n):
        raise ValueError(
            f"Length mismatch: ops={len(ops)}, rows_json={n}, created_at={len(created_at)}, "
            f"updated_at={len(updated_at)}."
        )
    if n == 0:
        return pl.Series("update", [], dtype=pl.String)
    ops = ops.cast(pl.String)
    bad = ops.filter(~ops.is_in(_UPDATE_TYPES) | ops.is_null())
    if len(bad):
        raise ValueError(f"Unknown update type(s) {listed(bad.unique().to_list())}; expected {_UPDATE_TYPES}.")
    if rows_json.null_count():
        raise ValueError("rows_json has null rows.")
    head = '{"brandId":' + str(int(brand_id)) + ',"tableName":' + json_key_text(table_name) + ',"data":'
    frame = pl.DataFrame(
        [
            ops.alias("op"),
            rows_json.cast(pl.String).alias("row"),
            _ms_series(created_at, "created_at").alias("c"),
            _ms_series(updated_at, "updated_at").alias("u"),
        ]
    )
    return frame.select(
        pl.concat_str(
            [
                pl.lit('{"type":"'),
                pl.col("op"),
                pl.lit('","data":' + head),
                pl.col("row"),
                pl.lit(',"createdAt":'),
                pl.col("c"),
                pl.lit(',"updatedAt":'),
                pl.col("u"),
                pl.lit("}}"),
            ]
        ).alias("update")
    ).to_series()
