"""Type fidelity of MySQL-family sources, on a real MariaDB server: database value -> the operator's
``read_sql`` (MySqlHook's mysqlclient connection, ``fetchmany`` batches turned into Arrow) -> the engine's
canonicalization (``canonical_source``, with ``json_columns``) -> encode_rows -> JSON.

MariaDB's JSON is LONGTEXT, so JSON arrives as text unless the column is named in ``json_columns``. TINYINT(1)
(BOOLEAN) arrives as 0/1 integers, TIME as a duration. The reader sets the session time zone to UTC, so
TIMESTAMP values are exact instants whatever the connection's own time zone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.operators.stopchurn import read_sql
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.source.canonical import Source, canonicalize_source
from airflow_provider_stopchurn.source.dbapi_rows import rows_to_batch
from airflow_provider_stopchurn.source.frame import Canonical
from airflow_provider_stopchurn.update.diff import diff_frames
from airflow_provider_stopchurn.update.sync import canonical_source

pytestmark = pytest.mark.mysql

UTC = dt.UTC


def ms(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def day_ms(value: dt.date) -> int:
    return (value - dt.date(1970, 1, 1)).days * 86_400_000


def canonical(source: Source, *, table: str = "t", json_columns: tuple[str, ...] = (), **kw: Any) -> Canonical:
    return canonical_source(source, SyncOptions(brand_id=1, table_name=table, json_columns=json_columns, **kw))


def encoded_rows(source: Source, **kw: Any) -> list[dict[str, Any]]:
    canon = canonical(source, **kw)
    rows = encode_rows(canon.frame, canon.kinds, nest_dotted_columns=True, decimal_as_string=False)
    return [json.loads(text, parse_float=Decimal) for text in rows.to_list()]


def assert_json_same(actual: Any, expected: Any) -> None:
    """Equal and of the same JSON type (True is not 1, 3 is not 3.0); floats compared through Decimal text."""
    if isinstance(expected, float):
        assert isinstance(actual, int | Decimal) and not isinstance(actual, bool), (actual, expected)
        assert float(actual) == expected
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), (actual, expected)
        for key in expected:
            assert_json_same(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected, strict=True):
            assert_json_same(a, e)
    else:
        assert type(actual) is type(expected) and actual == expected, (actual, expected)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    sql_type: str
    literal: str
    expected: Any
    json_columns: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


JSON_TEXT = '{"b": 1, "a": {"x": [1, 2]}}'

CASES = [
    Case("tinyint1-true", "TINYINT(1)", "1", 1),
    Case("tinyint1-false", "TINYINT(1)", "0", 0),
    Case("boolean-alias", "BOOLEAN", "TRUE", 1),
    Case("int", "INT", "-2147483648", -2147483648),
    Case("int-unsigned", "INT UNSIGNED", "4294967295", 4294967295),
    Case("bigint-beyond-2**53", "BIGINT", "9007199254740993", 9007199254740993),
    Case("bigint-min", "BIGINT", "-9223372036854775808", -9223372036854775808),
    Case("bigint-max", "BIGINT", "9223372036854775807", 9223372036854775807),
    Case("decimal-wide", "DECIMAL(30,9)", "12345678901234567890.123456789", Decimal("12345678901234567890.123456789")),
    Case("decimal-scale", "DECIMAL(12,3)", "1.100", Decimal("1.1")),
    Case("decimal-negative", "DECIMAL(5,1)", "-7.5", Decimal("-7.5")),
    Case("decimal-integral", "DECIMAL(10,0)", "5", 5),  # the JSON number 5
    Case("float", "FLOAT", "1.5", 1.5),
    Case("float-shortest-text", "FLOAT", "0.1", 0.1),
    Case("double", "DOUBLE", "0.1", 0.1),
    Case("double-integral", "DOUBLE", "3.0", 3),  # a float column encodes integral values as integers
    Case("date", "DATE", "'2024-02-29'", day_ms(dt.date(2024, 2, 29))),
    Case("date-before-1970", "DATE", "'1969-12-31'", -86_400_000),
    Case("datetime", "DATETIME(6)", "'2024-01-02 03:04:05.678901'", ms(dt.datetime(2024, 1, 2, 3, 4, 5, 678000))),
    Case("datetime-before-1970", "DATETIME(3)", "'1969-12-31 23:59:59.999'", -1),
    Case("datetime-year-1000", "DATETIME", "'1000-01-01 00:00:00'", ms(dt.datetime(1000, 1, 1))),
    Case("timestamp", "TIMESTAMP(3) NULL", "'2024-01-02 03:04:05.678'", ms(dt.datetime(2024, 1, 2, 3, 4, 5, 678000))),
    Case("time", "TIME(6)", "'13:45:30.123456'", "PT13H45M30.123456S"),
    Case("time-whole", "TIME", "'07:05:00'", "PT7H5M"),
    Case("time-negative", "TIME", "'-01:02:03'", "-PT1H2M3S"),
    Case("time-beyond-a-day", "TIME", "'838:59:59'", "P34DT22H59M59S"),
    Case("varchar", "VARCHAR(40)", "'héllo \"quoted\" \\\\ and\\nnew line'", 'héllo "quoted" \\ and\nnew line'),
    Case("varchar-empty", "VARCHAR(10)", "''", ""),
    Case("char", "CHAR(5)", "'ab'", "ab"),  # MySQL strips CHAR's padding
    Case("text-emoji", "TEXT", "'🙂 ok'", "🙂 ok"),
    Case("enum", "ENUM('gold', 'silver')", "'gold'", "gold"),
    Case("year", "YEAR", "2024", 2024),
    Case("json-as-text", "JSON", f"'{JSON_TEXT}'", JSON_TEXT),  # MariaDB's JSON is LONGTEXT: text, as it is
    Case("json-in-json-columns", "JSON", f"'{JSON_TEXT}'", {"a": {"x": [1, 2]}, "b": 1}, ("v",)),
    Case("text-in-json-columns", "TEXT", "'[1, 2.5, null, \"x\"]'", [1, Decimal("2.5"), None, "x"], ("v",)),
    Case(
        "json-exact-numbers",
        "JSON",
        """'{"n": 9007199254740993, "d": 0.1}'""",
        {"d": 0.1, "n": 9007199254740993},
        ("v",),
    ),
    Case("json-tiny-number-exact", "TEXT", "'[1e-400]'", [Decimal("1e-400")], ("v",)),  # orjson refuses it
    Case("json-scalar", "LONGTEXT", """'"gold"'""", "gold", ("v",)),
]


def _create(server: Any, case: Case, table: str = "t") -> None:
    server.execute(
        f"CREATE TABLE {table} (id INT PRIMARY KEY, v {case.sql_type})",
        f"INSERT INTO {table} VALUES (1, {case.literal}), (2, NULL)",
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_type_fidelity(mysql_database: Any, mysql_conn_id: str, case: Case) -> None:
    _create(mysql_database, case)
    rows = encoded_rows(read_sql(mysql_conn_id, "SELECT id, v FROM t ORDER BY id"), json_columns=case.json_columns)
    assert [row["id"] for row in rows] == [1, 2]
    assert_json_same(rows[0]["v"], case.expected)
    assert rows[1]["v"] is None


def test_timestamp_is_the_instant_whatever_the_session_time_zone(mysql_database: Any, mysql_conn_id: str) -> None:
    """A TIMESTAMP written in one session time zone and read through a connection set to another is one instant."""
    conn = mysql_database.connect()
    try:
        cursor = conn.cursor()
        cursor.execute("SET time_zone = '+02:00'")
        cursor.execute("CREATE TABLE t (id INT PRIMARY KEY, ts TIMESTAMP NULL, wall DATETIME)")
        cursor.execute("INSERT INTO t VALUES (1, '2024-07-01 14:00:00', '2024-07-01 14:00:00')")
    finally:
        conn.close()
    hook_params = {"init_command": "SET time_zone = '+05:30'"}
    rows = encoded_rows(read_sql(mysql_conn_id, "SELECT * FROM t", hook_params=hook_params))
    assert rows[0]["ts"] == ms(dt.datetime(2024, 7, 1, 12, 0, tzinfo=UTC))  # 14:00 at +02:00
    assert rows[0]["wall"] == ms(dt.datetime(2024, 7, 1, 14, 0))  # DATETIME is wall-clock time, taken as UTC


@pytest.mark.parametrize("sql_type", ["BLOB", "VARBINARY(8)", "BINARY(4)", "LONGBLOB"])
def test_binary_is_refused_naming_the_column(mysql_database: Any, mysql_conn_id: str, sql_type: str) -> None:
    mysql_database.execute(
        f"CREATE TABLE t (id INT PRIMARY KEY, avatar {sql_type})", "INSERT INTO t VALUES (1, x'deadbeef')"
    )
    with pytest.raises(SourceDataError, match=r"'avatar'.*binary.*hex\(avatar\)"):
        canonical(read_sql(mysql_conn_id, "SELECT * FROM t"))


def test_bigint_unsigned_beyond_int64_is_refused(mysql_database: Any, mysql_conn_id: str) -> None:
    mysql_database.execute(
        "CREATE TABLE t (id INT PRIMARY KEY, n BIGINT UNSIGNED)", "INSERT INTO t VALUES (1, 18446744073709551615)"
    )
    with pytest.raises(SourceDataError, match=r"'n'.*64-bit"):
        canonical(read_sql(mysql_conn_id, "SELECT * FROM t"))


def test_invalid_json_names_the_column_and_up_to_five_keys(mysql_database: Any, mysql_conn_id: str) -> None:
    mysql_database.execute(
        "CREATE TABLE t (id INT PRIMARY KEY, profile TEXT)",
        "INSERT INTO t VALUES (1, '{}'), (2, '{oops'), (3, NULL), (4, ''), (5, 'x'), (6, '[1,'), (7, '{\"a\": 1}'),"
        " (8, 'NaN'), (9, '1 2'), (10, 'nope')",
    )
    with pytest.raises(SourceDataError) as caught:
        canonical(read_sql(mysql_conn_id, "SELECT * FROM t ORDER BY id"), json_columns=("profile",))
    message = str(caught.value)
    assert "'profile'" in message and "json_columns" in message
    assert "keys (id) 2, 4, 5, 6, 8 (and 2 more)" in message, message
    assert "Nothing was sent" in message


def test_json_columns_misuse_is_clear(mysql_database: Any, mysql_conn_id: str) -> None:
    mysql_database.execute("CREATE TABLE t (id INT PRIMARY KEY, n INT, s TEXT)", "INSERT INTO t VALUES (1, 2, '{}')")
    for columns, words in [
        (("missing",), "'missing', which the source does not have"),
        (("n",), "'n', whose values are of kind 'int'"),
        (("id",), "key column 'id'"),
    ]:
        with pytest.raises(SourceDataError, match=words):
            canonical(read_sql(mysql_conn_id, "SELECT * FROM t"), json_columns=columns)


def test_reformatted_json_text_is_no_change(mysql_database: Any, mysql_conn_id: str) -> None:
    mysql_database.execute(
        "CREATE TABLE t (id INT PRIMARY KEY, profile JSON)",
        """INSERT INTO t VALUES (1, '{"b": 1, "a": {"x": [1, 2]}}'), (2, '[1, 2]'), (3, NULL)""",
    )
    before = canonical(read_sql(mysql_conn_id, "SELECT * FROM t"), json_columns=("profile",))
    mysql_database.execute(
        """UPDATE t SET profile = '{"a":{"x":[1,2]},   "b":1}' WHERE id = 1""",
        "UPDATE t SET profile = '[ 1,2 ]' WHERE id = 2",
    )
    after = canonical(read_sql(mysql_conn_id, "SELECT * FROM t"), json_columns=("profile",))
    assert after.frame.get_column("profile").to_list()[0] == '{"a":{"x":[1,2]},"b":1}'
    changes = diff_frames(before.frame, after.frame, ["id"])
    assert (changes.changed, changes.unchanged) == (0, 3)
    mysql_database.execute("""UPDATE t SET profile = '{"a": {"x": [1, 3]}, "b": 1}' WHERE id = 1""")
    changed = canonical(read_sql(mysql_conn_id, "SELECT * FROM t"), json_columns=("profile",))
    assert diff_frames(before.frame, changed.frame, ["id"]).updated["id"].to_list() == [1]


def test_json_columns_apply_to_every_source_kind() -> None:
    """The same json_columns on pandas, polars and Arrow sources give the same canonical frame."""
    import pandas as pd
    import polars as pl

    data = {"id": [1, 2], "p": ['{"b": 1, "a": 2}', None]}
    frames = [
        canonical(source, json_columns=("p",)) for source in (pd.DataFrame(data), pl.DataFrame(data), pa.table(data))
    ]
    for frame in frames:
        assert frame.kinds["p"] == "json"
        assert frame.frame.equals(frames[0].frame)
    assert frames[0].frame.get_column("p").to_list() == ['{"a":2,"b":1}', None]


def test_a_declared_json_column_is_parsed() -> None:
    """What MySQL 8's JSON type (declared in the cursor description) becomes: parsed, keys sorted, exact."""
    batch = rows_to_batch(
        [(1, '{"b": 1, "a": 0.1}'), (2, None), (3, b"[9007199254740993]")], ["id", "j"], json_columns=frozenset({"j"})
    )
    canon = canonicalize_source(batch, key_columns=["id"])
    assert canon.kinds["j"] == "json"
    assert canon.frame.get_column("j").to_list() == ['{"a":0.1,"b":1}', None, "[9007199254740993]"]


def test_user_table_from_tinyint_flags(mysql_database: Any, mysql_conn_id: str) -> None:
    """MySQL's BOOLEAN is TINYINT(1): 0/1 preference flags of the ``user`` table become booleans."""
    mysql_database.execute(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, email VARCHAR(80), `marketingPreferences.email` BOOLEAN,"
        " `marketingPreferences.phone` TINYINT(1), `systemPreferences.email` TINYINT(1),"
        " `systemPreferences.phone` TINYINT(1))",
        "INSERT INTO users VALUES (1, 'a@example.com', 1, 0, 1, 1), (2, 'b@example.com', 0, 0, 0, 1)",
    )
    rows = encoded_rows(read_sql(mysql_conn_id, "SELECT * FROM users ORDER BY id"), table="user")
    assert rows[0]["marketingPreferences"] == {"email": True, "phone": False}
    assert rows[1]["systemPreferences"] == {"email": False, "phone": True}
    mysql_database.execute("UPDATE users SET `systemPreferences.phone` = 2 WHERE id = 2")
    with pytest.raises(SourceDataError, match=r"systemPreferences\.phone"):
        canonical(read_sql(mysql_conn_id, "SELECT * FROM users ORDER BY id"), table="user")


def test_unchanged_rerun_has_no_drift(mysql_database: Any, mysql_conn_id: str) -> None:
    """Every type of the matrix, read twice (in another row order, in small batches): no change."""
    columns = [c for c in CASES if not c.json_columns]
    ddl = ", ".join(f"c{i} {case.sql_type}" for i, case in enumerate(columns))
    values = ", ".join(case.literal for case in columns)
    nulls = ", ".join("NULL" for _ in columns)
    mysql_database.execute(
        f"CREATE TABLE t (id BIGINT PRIMARY KEY, j JSON, {ddl})",
        f"""INSERT INTO t VALUES (1, '{JSON_TEXT}', {values}), (2, NULL, {nulls}), (3, '[]', {values})""",
    )
    first = canonical(read_sql(mysql_conn_id, "SELECT * FROM t ORDER BY id"), json_columns=("j",))
    second = canonical(read_sql(mysql_conn_id, "SELECT * FROM t ORDER BY id DESC"), json_columns=("j",))
    assert first.kinds == second.kinds
    changes = diff_frames(first.frame, second.frame, ["id"])
    assert (changes.changed, changes.unchanged) == (0, 3)


def test_the_export_parses_json_columns_too(mysql_database: Any, mysql_conn_id: str, tmp_path: Any) -> None:
    """The historical export takes json_columns as the update operator does: its files hold nested JSON."""
    from pathlib import Path

    from airflow_provider_stopchurn.export.engine import run_export
    from airflow_provider_stopchurn.export.options import ExportOptions
    from airflow_provider_stopchurn.store import SnapshotStore

    mysql_database.execute(
        "CREATE TABLE t (id INT PRIMARY KEY, profile JSON)",
        """INSERT INTO t VALUES (1, '{"b": 1, "a": [true]}'), (2, NULL)""",
    )
    options = ExportOptions(brand_id=1, table_name="t", json_columns=("profile",), run_id="r")
    store = SnapshotStore(tmp_path / "snapshots", 1, "t")
    summary = run_export(
        lambda: read_sql(mysql_conn_id, "SELECT * FROM t ORDER BY id"), store, tmp_path / "export", options, run_ms=1
    )
    items = [
        item for path in sorted(Path(summary.output_uri).glob("part-*.json")) for item in json.loads(path.read_bytes())
    ]
    assert [item["data"] for item in items] == [{"id": 1, "profile": {"a": [True], "b": 1}}, {"id": 2, "profile": None}]
