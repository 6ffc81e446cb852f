"""Reading a SQL query result into a pandas DataFrame with every value exact (no Airflow import).

Why not simply ``hook.get_df(sql)``: ``get_df`` runs ``pandas.read_sql``, whose type inference loses data.

* default (``dtype_backend="numpy"``, ``coerce_float=True``): an integer column with a NULL becomes float64
  (2**53 + 1 arrives as 2**53, 7 as 7.0) and NUMERIC becomes float;
* ``coerce_float=False`` keeps Decimal, but integer columns with NULLs still become float64;
* ``dtype_backend="numpy_nullable"`` (or ``"pyarrow"``) keeps integers, but turns every column it cannot type
  (json/jsonb, arrays, NUMERIC, uuid, date, time) into strings: a jsonb object arrives as its Python ``repr``,
  and ``bytea`` raises ``UnicodeDecodeError``.

So for a common-sql ``DbApiHook`` (anything with ``run`` and ``descriptions``), the rows are fetched with
``run(..., handler=fetch_all)`` as the driver returns them and each column is typed here with ``pandas.array``
inference, which gives nullable ``Int64`` / ``boolean`` / ``Float64`` / ``string`` / datetime columns and keeps
everything else (Decimal, dict, list, UUID, date, time) as the Python objects the driver made. Timezone-aware
timestamps are converted to UTC. Any other object with ``get_df`` is read with ``get_df(coerce_float=False)``:
exact except for integer columns holding NULLs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from airflow_provider_stopchurn.exceptions import SourceDataError

__all__ = ["DataFrameHook", "RowsHook", "read_sql_frame"]

Parameters = Sequence[Any] | Mapping[str, Any] | None


@runtime_checkable
class DataFrameHook(Protocol):
    """What ``read_sql_frame`` needs at the least: common-sql's ``DbApiHook.get_df``."""

    def get_df(
        self, sql: str | list[str], parameters: Any = None, *, df_type: Any = "pandas", **kwargs: Any
    ) -> Any: ...


@runtime_checkable
class RowsHook(Protocol):
    """The exact path: common-sql's ``DbApiHook.run`` with a handler, and the cursor descriptions it keeps."""

    descriptions: Any

    def run(
        self,
        sql: Any,
        autocommit: bool = ...,
        parameters: Any = ...,
        handler: Any = ...,
        split_statements: bool = ...,
        return_last: bool = ...,
    ) -> Any: ...


def _fetch_all(cursor: Any) -> list[Any] | None:
    # Same as common-sql's fetch_all_handler: statements without a result set (DDL, DML) give None.
    return list(cursor.fetchall()) if cursor.description is not None else None


def read_sql_frame(hook: DataFrameHook | RowsHook, sql: str | list[str], parameters: Parameters = None) -> pd.DataFrame:
    """Run ``sql`` (one statement, or several run in order on one connection) and return the last result set.

    The frame has one column per result column, in order, even when no row matches. Database errors propagate
    unchanged. Raises ``SourceDataError`` for duplicate column names and for binary (bytea/BLOB) values.
    """
    statements = _statements(sql)
    if isinstance(hook, RowsHook):
        frame = _read_rows(hook, statements, parameters)
    else:
        query: str | list[str] = statements[0] if len(statements) == 1 else statements
        frame = hook.get_df(query, parameters, df_type="pandas", coerce_float=False)
        frame = _utc(frame)
    _check_columns(frame)
    return frame


def _statements(sql: str | list[str]) -> list[str]:
    given = [sql] if isinstance(sql, str) else [str(statement) for statement in sql]
    statements = [statement for statement in given if statement.strip()]
    if not statements:
        raise SourceDataError("The SQL source is empty: give a query that returns the table's rows.")
    return statements


def _read_rows(hook: RowsHook, statements: list[str], parameters: Parameters) -> pd.DataFrame:
    sql: str | list[str] = statements[0] if len(statements) == 1 else statements
    result = hook.run(sql, parameters=parameters, handler=_fetch_all, return_last=True)
    descriptions = list(hook.descriptions or [])
    if len(statements) > 1:  # one result and one description per statement; the last one is the table
        result = result[-1] if result else None
    description = descriptions[-1] if descriptions else None
    if description is None:
        raise SourceDataError(
            "The last SQL statement returned no result set: the SQL source must end with a query (SELECT ...)."
        )
    columns = [str(column[0]) for column in description]
    rows = list(result or [])
    return _frame_from_rows(rows, columns)


def _frame_from_rows(rows: list[Any], columns: list[str]) -> pd.DataFrame:
    if rows and isinstance(rows[0], Mapping):  # dict cursors (e.g. a connection with a dict cursor factory)
        rows = [tuple(row.values()) for row in rows]
    if not rows or not columns:
        return pd.DataFrame(index=pd.RangeIndex(len(rows)), columns=pd.Index(columns, dtype=object), dtype=object)
    arrays = []
    for values in zip(*rows, strict=True):
        raw = np.empty(len(values), dtype=object)
        raw[:] = values
        arrays.append(_typed(raw))
    frame = pd.DataFrame(dict(enumerate(arrays)), index=pd.RangeIndex(len(rows)))
    frame.columns = pd.Index(columns, dtype=object)
    return frame


def _typed(raw: np.ndarray) -> Any:
    """The narrowest exact pandas array for one column of driver values."""
    try:
        array = pd.array(raw, copy=False)
    except (TypeError, ValueError, OverflowError):  # e.g. timestamps with different UTC offsets
        try:
            return pd.array(pd.to_datetime(raw, utc=True))
        except (TypeError, ValueError, OverflowError):
            return raw
    if isinstance(array.dtype, pd.DatetimeTZDtype):
        return array.tz_convert("UTC")
    return array


def _utc(frame: pd.DataFrame) -> pd.DataFrame:
    for name in frame.columns[[isinstance(dtype, pd.DatetimeTZDtype) for dtype in frame.dtypes]]:
        frame[name] = frame[name].dt.tz_convert("UTC")
    return frame


_BINARY = (bytes, bytearray, memoryview)


def _check_columns(frame: pd.DataFrame) -> None:
    duplicated = sorted(name for name, count in Counter(map(str, frame.columns)).items() if count > 1)
    if duplicated:
        raise SourceDataError(
            f"The SQL query returns several columns named {', '.join(map(repr, duplicated))}: give each "
            "column a distinct name (SELECT a.id AS a_id, ...)."
        )
    for position, dtype in enumerate(frame.dtypes):
        if not pd.api.types.is_object_dtype(dtype):
            continue
        column = frame.iloc[:, position]
        inferred = pd.api.types.infer_dtype(column, skipna=True)
        if inferred == "bytes" or (
            inferred.startswith("mixed") and column.map(lambda value: isinstance(value, _BINARY)).any()
        ):
            name = frame.columns[position]
            raise SourceDataError(
                f"Column {name!r} holds binary values (bytea/BLOB), which JSON cannot carry. Convert it in the "
                f"SQL, e.g. encode({name}, 'base64') AS {name} in PostgreSQL or hex({name}) in SQLite, or "
                "leave the column out."
            )
