"""Type fidelity of SQLite sources: database value -> the operator's ``read_sql`` (the hook's DB-API connection,
``fetchmany`` batches turned into Arrow) -> canonicalize_source -> encode_rows -> JSON.

SQLite has five storage classes (NULL, INTEGER, REAL, TEXT, BLOB) and the sqlite hook's connection does not
parse declared types, so dates and JSON arrive as text and booleans as 0/1 integers: these tests pin that down.
A column's storage class may change from row to row, so batches may type a column differently: the kinds are
joined as over the whole column (tests with small batches below).
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

from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.operators.stopchurn import read_sql
from airflow_provider_stopchurn.source.canonical import Source, canonicalize_source
from airflow_provider_stopchurn.source.frame import Canonical, canonicalize
from airflow_provider_stopchurn.source.sql import read_dbapi
from airflow_provider_stopchurn.update.diff import diff_frames

CONN_ID = "stopchurn_test_sqlite"


def canonical(source: Source) -> Canonical:
    return canonicalize_source(source, key_columns=["id"])


def read(sql: str | list[str], parameters: Any = None) -> Any:
    return read_sql(CONN_ID, sql, parameters)


def encoded_rows(source: Source, *, decimal_as_string: bool = False) -> list[dict[str, Any]]:
    canon = canonicalize_source(source, key_columns=["id"], decimal_as_string=decimal_as_string)
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
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "sqlite", "host": str(sqlite_db)}))
    from airflow.providers.sqlite.hooks.sqlite import SqliteHook

    return SqliteHook(sqlite_conn_id=CONN_ID)


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
    rows = encoded_rows(read("SELECT id, v FROM t ORDER BY id"))
    assert [row["id"] for row in rows] == [1, 2]
    assert same_json(rows[0]["v"], expected), f"{name}: {rows[0]['v']!r} is not {expected!r}"
    assert rows[1]["v"] is None


def test_null_first_then_values_still_integers(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(
        sqlite_db,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER);"
        "INSERT INTO t VALUES (1, NULL), (2, 9007199254740993), (3, NULL);",
    )
    rows = encoded_rows(read("SELECT * FROM t ORDER BY id"))
    assert [row["v"] for row in rows] == [None, 9007199254740993, None]
    assert type(rows[1]["v"]) is int


def test_blob_is_refused_naming_the_column(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match=r"'avatar'.*hex\(avatar\)"):
        canonical(read("SELECT 1 AS id, x'deadbeef' AS avatar"))


def test_blob_among_other_values_is_refused(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match="'v'"):
        canonical(read("SELECT 1 AS id, 'text' AS v UNION ALL SELECT 2, x'00'"))


def test_empty_result_keeps_the_columns(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(sqlite_db, "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL);")
    canon = canonical(read("SELECT * FROM t"))
    assert canon.frame.columns == ["id", "name", "score"]
    assert canon.frame.height == 0


def test_duplicate_column_names_are_refused(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match="several columns named 'id'"):
        canonical(read("SELECT 1 AS id, 2 AS id"))


def test_parameters_and_statement_lists(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(
        sqlite_db, "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b');"
    )

    def names(source: Source) -> list[Any]:
        return canonical(source).frame["name"].to_list()

    assert names(read("SELECT * FROM t WHERE id = ?", [2])) == ["b"]
    assert names(read(["SELECT * FROM t WHERE id = 1"])) == ["a"]
    assert canonical(read(["DELETE FROM t WHERE id = 1", "SELECT * FROM t"])).frame["id"].to_list() == [2]
    with sqlite3.connect(sqlite_db) as conn:  # committed, as DbApiHook.run commits
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_empty_sql_and_statements_without_result_are_refused(sqlite_hook: Any) -> None:
    with pytest.raises(SourceDataError, match="empty"):
        canonical(read("  "))
    with pytest.raises(SourceDataError, match="no result set"):
        canonical(read("CREATE TABLE no_rows (id INTEGER)"))


def test_database_errors_propagate(sqlite_hook: Any) -> None:
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        canonical(read("SELECT * FROM missing"))


# --- batches: a column typed differently from one batch to the next ---------------------------------------------
@pytest.mark.parametrize(
    ("values", "kind", "expected"),
    [
        ([None, None, None, 9007199254740993, None], "int", [None, None, None, 9007199254740993, None]),
        ([1, 2, 3, 2.5, None], "float", [1, 2, 3, 2.5, None]),  # NUMERIC affinity: INTEGER and REAL rows
        ([1, 2, 3, "x", None], "json", [1, 2, 3, "x", None]),  # mixed storage classes: JSON values
        ([True, 1, 0, None, None], "int", [1, 1, 0, None, None]),  # SQLite stores TRUE as 1
        (["a", "b", None, None, "c"], "string", ["a", "b", None, None, "c"]),
        ([None, None, None, None, None], "null", [None, None, None, None, None]),
    ],
)
def test_batches_typed_differently_give_the_whole_column_kind(
    sqlite_db: Path, sqlite_hook: Any, values: list[Any], kind: str, expected: list[Any]
) -> None:
    run_script(sqlite_db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v NUMERIC);")
    with sqlite3.connect(sqlite_db) as conn:
        conn.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values, start=1)))
    small = canonical(read_dbapi(sqlite_hook, "SELECT * FROM t ORDER BY id", batch_rows=2))
    whole = canonical(read_dbapi(sqlite_hook, "SELECT * FROM t ORDER BY id"))
    assert small.kinds["v"] == whole.kinds["v"] == kind
    assert small.frame.equals(whole.frame)
    rows = encoded_rows(read_dbapi(sqlite_hook, "SELECT * FROM t ORDER BY id", batch_rows=2))
    assert [row["v"] for row in rows] == expected
    # and the same as a pandas frame holding the driver's values
    frame = pd.DataFrame({"id": range(1, len(values) + 1), "v": pd.Series(_stored(values), dtype=object)})
    assert canonicalize(frame, key_columns=["id"]).frame.equals(whole.frame)


def _stored(values: list[Any]) -> list[Any]:
    return [int(v) if isinstance(v, bool) else v for v in values]


def test_keys_checked_across_batches(sqlite_db: Path, sqlite_hook: Any) -> None:
    run_script(sqlite_db, "CREATE TABLE t (id, v INTEGER); INSERT INTO t VALUES (1, 1), (2, 2), (1, 3), (NULL, 4);")
    with pytest.raises(SourceDataError, match="Duplicate key value"):
        canonical(read_dbapi(sqlite_hook, "SELECT * FROM t WHERE id IS NOT NULL", batch_rows=2))
    with pytest.raises(SourceDataError, match=r"missing value\(s\).* at row\(s\) 3;"):  # counted over all batches
        canonical(read_dbapi(sqlite_hook, "SELECT * FROM t", batch_rows=2))
    run_script(sqlite_db, "CREATE TABLE u (id, v INTEGER); INSERT INTO u VALUES (1, 1), (2, 2), ('3', 3);")
    with pytest.raises(SourceDataError, match="mixes value types"):
        canonical(read_dbapi(sqlite_hook, "SELECT * FROM u", batch_rows=2))


class ArrowCursorHook:
    """A real DB-API hook (common.sql's DbApiHook) whose connection is ADBC's SQLite driver: its cursors hand out
    Arrow record batches (``fetch_record_batch``), which the SQL source passes on as they are."""

    def __new__(cls, path: Path) -> Any:
        from airflow.providers.common.sql.hooks.sql import DbApiHook

        class _Hook(DbApiHook):
            conn_name_attr = "adbc_sqlite_conn_id"

            def get_conn(self) -> Any:
                import adbc_driver_sqlite.dbapi

                return adbc_driver_sqlite.dbapi.connect(str(path))

        return _Hook()


def test_a_cursor_with_arrow_batches_is_read_as_arrow(sqlite_db: Path) -> None:
    run_script(
        sqlite_db,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, big INTEGER, name TEXT, score REAL);"
        "INSERT INTO t VALUES (1, 9007199254740993, 'a', 0.5), (2, NULL, NULL, NULL);",
    )
    rows = encoded_rows(read_dbapi(ArrowCursorHook(sqlite_db), "SELECT * FROM t ORDER BY id"))
    assert rows == [
        {"id": 1, "big": 9007199254740993, "name": "a", "score": Decimal("0.5")},
        {"id": 2, "big": None, "name": None, "score": None},
    ]
    with pytest.raises(SourceDataError, match=r"'avatar'.*hex\(avatar\)"):  # refused from the schema
        canonical(read_dbapi(ArrowCursorHook(sqlite_db), "SELECT 1 AS id, x'00' AS avatar"))


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
    first = canonical(read("SELECT * FROM users ORDER BY id"))
    path = tmp_path / "snapshot.parquet"
    first.frame.write_parquet(path)
    stored = pl.read_parquet(path)
    assert stored.schema == first.frame.schema
    assert stored.equals(first.frame)

    second = canonical(read("SELECT * FROM users ORDER BY id DESC"))
    assert second.kinds == first.kinds
    changes = diff_frames(stored, second.frame, ["id"])
    assert (changes.inserted.height, changes.updated.height, changes.deleted.height) == (0, 0, 0)
    assert changes.unchanged == 3

    run_script(sqlite_db, "UPDATE users SET score = 0.1 + 1e-16 WHERE id = 1; DELETE FROM users WHERE id = 3;")
    third = canonical(read("SELECT * FROM users"))
    changes = diff_frames(stored, third.frame, ["id"])
    assert changes.updated["id"].to_list() == [1]
    assert changes.deleted["id"].to_list() == [3]
