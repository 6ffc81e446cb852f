"""Type fidelity of SQLite sources: database value -> read_sql_frame -> canonicalize -> encode_rows -> JSON.

SQLite has five storage classes (NULL, INTEGER, REAL, TEXT, BLOB) and the sqlite hook's connection does not
parse declared types, so dates and JSON arrive as text and booleans as 0/1 integers: these tests pin that down.
"""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pytest

from airflow_provider_stopchurn.diff import diff_frames
from airflow_provider_stopchurn.encoding import canonicalize, encode_rows
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.sources import read_sql_frame


def encoded_rows(frame: pd.DataFrame, *, decimal_as_string: bool = False) -> list[dict[str, Any]]:
    canon = canonicalize(frame, key_columns=["id"], decimal_as_string=decimal_as_string)
    rows = encode_rows(canon.frame, canon.kinds, nest_dotted_columns=True, decimal_as_string=decimal_as_string)
    return [json.loads(text, parse_float=Decimal) for text in rows.to_list()]


def same_json(actual: Any, expected: Any) -> bool:
    """Equal and of the same JSON type (True is not 1, 3 is not 3.0)."""
    if isinstance(expected, float):
        return isinstance(actual, int | Decimal) and not isinstance(actual, bool) and float(actual) == expected
    return type(actual) is type(expected) and actual == expected


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Path:
    return tmp_path / "source.db"


@pytest.fixture
def sqlite_hook(sqlite_db: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(
        "AIRFLOW_CONN_STOPCHURN_TEST_SQLITE", json.dumps({"conn_type": "sqlite", "host": str(sqlite_db)})
    )
    from airflow.providers.sqlite.hooks.sqlite import SqliteHook

    return SqliteHook(sqlite_conn_id="stopchurn_test_sqlite")


def run_script(db: Path, script: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.executescript(script)


CASES = [
    # name, declared type, literal, expected JSON value
    ("integer", "INTEGER", "42", 42),
    ("bigint-beyond-2**53", "BIGINT", "9007199254740993", 9007199254740993),
    ("int64-min", "INTEGER", "-9223372036854775808", -9223372036854775808),
    ("int64-max", "INTEGER", "9223372036854775807", 9223372036854775807),
    ("real", "REAL", "1.5", 1.5),
    ("double", "DOUBLE", "0.1", 0.1),
    ("real-integral", "REAL", "3.0", 3),  # a float column encodes integral values as integers
    ("real-inf", "REAL", "1e999", None),
    ("real-minus-inf", "REAL", "-1e999", None),
    ("numeric-is-real-in-sqlite", "NUMERIC(10,2)", "1.10", 1.1),
    ("numeric-integral-is-integer", "NUMERIC", "5", 5),
    ("boolean-is-0-1-in-sqlite", "BOOLEAN", "TRUE", 1),
    ("text", "TEXT", "'héllo \"quoted\" \\ and'||char(10)||'new line'", 'héllo "quoted" \\ and\nnew line'),
    ("varchar", "VARCHAR(10)", "'v'", "v"),
    ("char-not-padded-in-sqlite", "CHAR(5)", "'ab'", "ab"),
    ("date-is-text-in-sqlite", "DATE", "'2024-02-29'", "2024-02-29"),
    ("timestamp-is-text-in-sqlite", "TIMESTAMP", "'2024-01-02 03:04:05'", "2024-01-02 03:04:05"),
    ("json-is-text-in-sqlite", "JSON", """'{"b": 1, "a": [1]}'""", '{"b": 1, "a": [1]}'),
    ("uuid-text", "TEXT", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
]


@pytest.mark.parametrize(("name", "sql_type", "literal", "expected"), CASES, ids=[case[0] for case in CASES])
def test_type_fidelity(
    sqlite_db: Path, sqlite_hook: Any, name: str, sql_type: str, literal: str, expected: Any
) -> None:
    # Through a real table, so that the declared type's affinity applies.
    run_script(
        sqlite_db,
        f"CREATE TABLE t (id INTEGER PRIMARY KEY, v {sql_type}); "
        f"INSERT INTO t VALUES (1, {literal}); INSERT INTO t VALUES (2, NULL);",
    )
    rows = encoded_rows(read_sql_frame(sqlite_hook, "SELECT id, v FROM t ORDER BY id"))
    assert [row["id"] for row in rows] == [1, 2]
    assert same_json(rows[0]["v"], expected), f"{name}: {rows[0]['v']!r} is not {expected!r}"
    assert rows[1]["v"] is None


def test_null_first_then_values_still_integers(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(
        sqlite_db,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER);"
        "INSERT INTO t VALUES (1, NULL), (2, 9007199254740993), (3, NULL);",
    )
    rows = encoded_rows(read_sql_frame(sqlite_hook, "SELECT * FROM t ORDER BY id"))
    assert [row["v"] for row in rows] == [None, 9007199254740993, None]
    assert type(rows[1]["v"]) is int


def test_blob_is_refused_naming_the_column(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match=r"'avatar'.*hex\(avatar\)"):
        read_sql_frame(sqlite_hook, "SELECT 1 AS id, x'deadbeef' AS avatar")


def test_blob_among_other_values_is_refused(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match="'v'"):
        read_sql_frame(sqlite_hook, "SELECT 1 AS id, 'text' AS v UNION ALL SELECT 2, x'00'")


def test_empty_result_keeps_the_columns(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(sqlite_db, "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL);")
    frame = read_sql_frame(sqlite_hook, "SELECT * FROM t")
    assert list(frame.columns) == ["id", "name", "score"]
    assert len(frame) == 0


def test_duplicate_column_names_are_refused(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match="several columns named 'id'"):
        read_sql_frame(sqlite_hook, "SELECT 1 AS id, 2 AS id")


def test_parameters_and_statement_lists(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(
        sqlite_db, "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b');"
    )
    assert read_sql_frame(sqlite_hook, "SELECT * FROM t WHERE id = ?", [2])["name"].tolist() == ["b"]
    assert read_sql_frame(sqlite_hook, ["SELECT * FROM t WHERE id = 1"])["name"].tolist() == ["a"]
    frame = read_sql_frame(sqlite_hook, ["DELETE FROM t WHERE id = 1", "SELECT * FROM t"])
    assert frame["id"].tolist() == [2]


def test_empty_sql_and_statements_without_result_are_refused(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match="empty"):
        read_sql_frame(sqlite_hook, "  ")
    with pytest.raises(SourceDataError, match="no result set"):
        read_sql_frame(sqlite_hook, "CREATE TABLE no_rows (id INTEGER)")


def test_database_errors_propagate(sqlite_hook: Any) -> None:
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        read_sql_frame(sqlite_hook, "SELECT * FROM missing")


class GetDfOnly:
    """A hook that offers nothing but ``get_df`` (wrapping a real one): read_sql_frame's fallback path."""

    def __init__(self, hook: Any) -> None:
        self._hook = hook

    def get_df(self, sql: Any, parameters: Any = None, *, df_type: str = "pandas", **kwargs: Any) -> Any:
        return self._hook.get_df(sql, parameters, df_type=df_type, **kwargs)


def test_get_df_only_hooks_are_read_with_get_df(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(
        sqlite_db,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, big INTEGER, name TEXT, gap INTEGER);"
        "INSERT INTO t VALUES (1, 9007199254740993, 'a', 7), (2, -1, NULL, NULL);",
    )
    frame = read_sql_frame(GetDfOnly(sqlite_hook), "SELECT * FROM t WHERE id >= ? ORDER BY id", [1])
    assert list(frame.columns) == ["id", "big", "name", "gap"]
    assert frame["big"].tolist() == [9007199254740993, -1]  # no NULL: int64, exact
    assert frame["gap"].dtype == "float64"  # the documented limit of get_df: integers with NULLs are floats
    exact = read_sql_frame(sqlite_hook, "SELECT * FROM t ORDER BY id")
    assert exact["gap"].dtype == "Int64"


def test_unchanged_table_round_trips_through_parquet_without_changes(
    sqlite_db: Path, sqlite_hook: Any, tmp_path: Path
) -> None:
    run_script(
        sqlite_db,
        """
        CREATE TABLE users (id INTEGER PRIMARY KEY, big INTEGER, score REAL, ratio REAL, name TEXT, born DATE,
                            doc JSON, flag BOOLEAN);
        INSERT INTO users VALUES
          (1, 9007199254740993, 0.1, 3.0, 'a', '2024-02-29', '{"a": 1}', 1),
          (2, NULL, NULL, 1e999, NULL, NULL, NULL, NULL),
          (3, -9223372036854775808, 1e-300, -0.0, '', '1969-07-20', '[]', 0);
        """,
    )
    first = canonicalize(read_sql_frame(sqlite_hook, "SELECT * FROM users ORDER BY id"), key_columns=["id"])
    path = tmp_path / "snapshot.parquet"
    first.frame.write_parquet(path)
    stored = pl.read_parquet(path)
    assert stored.schema == first.frame.schema
    assert stored.equals(first.frame)

    second = canonicalize(read_sql_frame(sqlite_hook, "SELECT * FROM users ORDER BY id DESC"), key_columns=["id"])
    assert second.kinds == first.kinds
    changes = diff_frames(stored, second.frame, ["id"])
    assert (changes.inserted.height, changes.updated.height, changes.deleted.height) == (0, 0, 0)
    assert changes.unchanged == 3

    run_script(sqlite_db, "UPDATE users SET score = 0.1 + 1e-16 WHERE id = 1; DELETE FROM users WHERE id = 3;")
    third = canonicalize(read_sql_frame(sqlite_hook, "SELECT * FROM users"), key_columns=["id"])
    changes = diff_frames(stored, third.frame, ["id"])
    assert changes.updated["id"].to_list() == [1]
    assert changes.deleted["id"].to_list() == [3]
