"""SparkWarehouse against a real local-mode Spark session (``spark_session.spark``): Arrow types out, Arrow tables in,
and the statements the engine runs where there are no transactions (rewrite and swap of the state table)."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING

import pyarrow as pa
import pytest
import sqlglot

from airflow_provider_stopchurn.source.sql import BATCH_ROWS
from airflow_provider_stopchurn.warehouse.databases import Warehouse
from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse, spark_identifier

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")

UTC = dt.UTC


@pytest.fixture
def warehouse(spark_warehouse: SparkWarehouse) -> SparkWarehouse:
    return spark_warehouse


@pytest.fixture
def schema(spark: SparkSession) -> Iterator[str]:
    """A schema (database) of the test's own, dropped with its tables afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        spark.sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def _table(batches: list[pa.RecordBatch]) -> pa.Table:
    return pa.Table.from_batches(batches)


def test_is_a_warehouse(warehouse: SparkWarehouse) -> None:
    assert isinstance(warehouse, Warehouse)
    assert warehouse.dialect == "spark"
    assert warehouse.transactions is False
    assert repr(warehouse) == "SparkWarehouse(dialect='spark')"


def test_module_imports_without_pyspark() -> None:
    code = (
        "import sys; sys.modules['pyspark'] = None\n"
        "from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse\n"
        "assert 'airflow' not in sys.modules, 'spark.py imported Airflow'\n"
        "print(SparkWarehouse.dialect)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "spark"


def test_batches_arrow_types(warehouse: SparkWarehouse) -> None:
    sql = """
        SELECT * FROM VALUES
          (CAST(1 AS INT), CAST(2 AS BIGINT), CAST(1.5 AS DOUBLE), CAST(1.25 AS DECIMAL(10,2)), 'x', true,
           DATE'2024-01-02', TIMESTAMP'2024-01-02 03:04:05.123456', array(1, 2), map('k', 1),
           named_struct('a', 1, 'b', 'z')),
          (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
        AS t(i, b, d, dec, s, bo, dt, ts, arr, m, st)
    """
    batches = list(warehouse.batches(sql))
    table = _table(batches)
    types = {f.name: f.type for f in table.schema}
    assert types == {
        "i": pa.int32(),
        "b": pa.int64(),
        "d": pa.float64(),
        "dec": pa.decimal128(10, 2),
        "s": pa.string(),
        "bo": pa.bool_(),
        "dt": pa.date32(),
        "ts": pa.timestamp("us", tz="UTC"),
        # elements and map values are NOT NULL here because Spark knows the literals are
        "arr": pa.list_(pa.field("element", pa.int32(), nullable=False)),
        "m": pa.map_(pa.field("key", pa.string(), nullable=False), pa.field("value", pa.int32(), nullable=False)),
        "st": pa.struct([pa.field("a", pa.int32()), pa.field("b", pa.string())]),
    }
    first, second = table.to_pylist()
    assert first == {
        "i": 1,
        "b": 2,
        "d": 1.5,
        "dec": Decimal("1.25"),
        "s": "x",
        "bo": True,
        "dt": dt.date(2024, 1, 2),
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "arr": [1, 2],
        "m": [("k", 1)],
        "st": {"a": 1, "b": "z"},
    }
    assert set(second.values()) == {None}


def test_batches_nullability_follows_spark(warehouse: SparkWarehouse) -> None:
    """Columns Spark knows cannot be NULL (literals, count) come out as non-nullable Arrow fields."""
    (batch,) = warehouse.batches("SELECT 1 AS one, CAST(NULL AS INT) AS nothing")
    assert batch.schema.field("one").nullable is False
    assert batch.schema.field("nothing").nullable is True


def test_batches_null_structs_arrays_and_maps(warehouse: SparkWarehouse) -> None:
    """A NULL struct whose fields Spark declares NOT NULL (pyarrow refuses that in ``toArrow``'s own cast)."""
    sql = (
        "SELECT named_struct('a', 1) AS st, array(named_struct('a', 1)) AS arr, map('k', named_struct('a', 1)) AS m "
        "UNION ALL SELECT NULL, array(NULL), NULL"
    )
    table = _table(list(warehouse.batches(sql)))
    assert table.to_pylist() == [
        {"st": {"a": 1}, "arr": [{"a": 1}], "m": [("k", {"a": 1})]},
        {"st": None, "arr": [None], "m": None},
    ]
    assert table.schema.field("st").type == pa.struct([pa.field("a", pa.int32())])


def test_empty_result_is_one_batch_with_the_schema(warehouse: SparkWarehouse) -> None:
    batches = list(
        warehouse.batches("SELECT CAST(1 AS BIGINT) AS id, 'x' AS s, TIMESTAMP'2024-01-01 00:00:00' AS ts WHERE 1 = 0")
    )
    assert len(batches) == 1
    assert batches[0].num_rows == 0
    assert batches[0].schema.names == ["id", "s", "ts"]
    assert batches[0].schema.field("ts").type == pa.timestamp("us", tz="UTC")


def test_batches_are_at_most_batch_rows(warehouse: SparkWarehouse) -> None:
    total = BATCH_ROWS * 2 + 7
    batches = list(warehouse.batches(f"SELECT id FROM range({total})"))
    assert [b.num_rows for b in batches if b.num_rows > BATCH_ROWS] == []
    assert sum(b.num_rows for b in batches) == total
    assert _table(batches).column("id").to_pylist() == list(range(total))


def test_rows(warehouse: SparkWarehouse) -> None:
    assert warehouse.rows("SELECT COUNT(*) FROM range(5)") == [(5,)]
    assert warehouse.rows("SELECT 1 AS a, 2 AS a") == [(1, 2)]  # duplicate names are kept apart
    assert warehouse.rows("SELECT 'x' AS s WHERE 1 = 0") == []
    rows = warehouse.rows(
        "SELECT CAST(NULL AS STRING), TIMESTAMP'2024-01-02 03:04:05', CAST(1.25 AS DECIMAL(10,2)), array('a')"
    )
    assert rows == [(None, dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), Decimal("1.25"), ["a"])]


def test_query_error_raises(warehouse: SparkWarehouse) -> None:
    with pytest.raises(Exception, match="TABLE_OR_VIEW_NOT_FOUND"):
        warehouse.rows("SELECT 1 FROM no_such_schema.no_such_table WHERE 1 = 0")


def test_load_and_query(warehouse: SparkWarehouse, spark: SparkSession) -> None:
    data = pa.table(
        {
            "__sc_key_0": pa.array(["1", "2", "3"]),
            "hash": pa.array(["a", None, "c"], pa.large_string()),
            "created_at": pa.array([10, 20, None], pa.int64()),
            "ts": pa.array([0, 1_000_000, None], pa.timestamp("us", tz="UTC")),
            "amount": pa.array([Decimal("1.25"), None, Decimal("-3.00")], pa.decimal128(10, 2)),
        }
    )
    warehouse.load("__stopchurn_staging", data)
    got = _table(list(warehouse.batches("SELECT * FROM `__stopchurn_staging` ORDER BY `__sc_key_0`")))
    assert got.to_pylist() == data.to_pylist()
    assert got.schema.field("hash").type == pa.string()  # large_string is read back as string
    assert warehouse.rows("SELECT COUNT(*) FROM __STOPCHURN_STAGING WHERE hash IS NULL") == [(1,)]  # case-insensitive

    # a second load of the same name replaces the view
    warehouse.load("__stopchurn_staging", data.slice(0, 1))
    assert warehouse.rows("SELECT COUNT(*) FROM `__stopchurn_staging`") == [(1,)]

    # an empty table still has its columns
    warehouse.load("empty staging", data.schema.empty_table())
    assert warehouse.rows(f"SELECT COUNT(*), COUNT(hash) FROM {spark_identifier('empty staging')}") == [(0, 0)]

    # close drops the views it made; the session stays up
    warehouse.close()
    views = {t.name for t in spark.catalog.listTables() if t.isTemporary}
    assert not views & {"__stopchurn_staging", "empty staging"}
    assert spark.sql("SELECT 1").collect()[0][0] == 1


def test_load_needs_a_single_part_name(warehouse: SparkWarehouse) -> None:
    with pytest.raises(ValueError, match="single-part"):
        warehouse.load("schema.table", pa.table({"a": [1]}))


def test_load_naive_timestamps_are_utc(warehouse: SparkWarehouse) -> None:
    """A naive Arrow timestamp is read in the session time zone (UTC): the instant does not move."""
    warehouse.load("naive", pa.table({"ts": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5)], pa.timestamp("us"))}))
    assert warehouse.rows("SELECT ts, CAST(ts AS STRING) FROM naive") == [
        (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02 03:04:05")
    ]


def test_execute_ddl_dml_and_rewrite_and_swap(warehouse: SparkWarehouse, schema: str) -> None:
    state, nxt, meta = f"`{schema}`.`b1_items`", f"`{schema}`.`b1_items__next`", f"`{schema}`.`b1_items__meta`"
    warehouse.execute(
        [
            f"CREATE SCHEMA IF NOT EXISTS `{schema}`",
            f"CREATE SCHEMA IF NOT EXISTS `{schema}`",  # twice: no error
            f"CREATE TABLE {state} USING parquet AS "
            "SELECT * FROM VALUES ('1', 'h1', 100L, 'r1'), ('2', 'h2', 200L, 'r2'), ('3', 'h3', 300L, 'r3') "
            "AS t(k, hash, created_at, row)",
            f"INSERT INTO {state} SELECT '4', 'h4', 400L, 'r4'",
            f"INSERT INTO {state} VALUES ('5', 'h5', 500L, 'r5')",
            f"CREATE TABLE {meta} USING parquet AS SELECT 1 AS format, 'tok0' AS token, CAST(0 AS BIGINT) AS rows",
        ]
    )
    assert warehouse.rows(f"SELECT COUNT(*) FROM {state}") == [(5,)]

    # acknowledged changes: 2 updated, 3 deleted, 6 inserted
    warehouse.load(
        "__stopchurn_staging",
        pa.table(
            {
                "__sc_key_0": ["2", "3", "6"],
                "action": ["upsert", "delete", "upsert"],
                "hash": ["h2b", None, "h6"],
                "created_at": pa.array([200, None, 600], pa.int64()),
                "row": ["r2b", None, "r6"],
            }
        ),
    )
    upserts = (
        "SELECT g.__sc_key_0, g.hash, g.created_at, g.row FROM `__stopchurn_staging` AS g WHERE g.action = 'upsert'"
    )
    warehouse.execute(
        [
            f"DROP TABLE IF EXISTS {nxt}",
            f"CREATE TABLE {nxt} USING parquet AS "
            f"SELECT t.k, t.hash, t.created_at, t.row FROM {state} AS t "
            f"LEFT ANTI JOIN `__stopchurn_staging` AS g ON g.__sc_key_0 = t.k UNION ALL {upserts}",
            f"DROP TABLE IF EXISTS {state}",
            f"ALTER TABLE {nxt} RENAME TO {state}",
            f"INSERT OVERWRITE TABLE {meta} SELECT 1, 'tok1', (SELECT COUNT(*) FROM {state})",
        ]
    )
    assert warehouse.rows(f"SELECT k, hash, created_at, row FROM {state} ORDER BY k") == [
        ("1", "h1", 100, "r1"),
        ("2", "h2b", 200, "r2b"),
        ("4", "h4", 400, "r4"),
        ("5", "h5", 500, "r5"),
        ("6", "h6", 600, "r6"),
    ]
    assert warehouse.rows(f"SELECT format, token, rows FROM {meta}") == [(1, "tok1", 5)]
    tables = {r[1] for r in warehouse.rows(f"SHOW TABLES IN `{schema}`") if not r[2]}
    assert tables == {"b1_items", "b1_items__meta"}


def test_statements_spark_file_tables_refuse(warehouse: SparkWarehouse, schema: str) -> None:
    """What the engine must not emit for Spark's built-in tables (``transactions = False``)."""
    state = f"`{schema}`.`s`"
    warehouse.execute(
        [f"CREATE SCHEMA IF NOT EXISTS `{schema}`", f"CREATE TABLE {state} USING parquet AS SELECT 1 AS id"]
    )
    refused = {
        f"DELETE FROM {state} WHERE id = 1": "UNSUPPORTED_FEATURE.TABLE_OPERATION",
        f"UPDATE {state} SET id = 2": "UNSUPPORTED_FEATURE.TABLE_OPERATION",
        f"MERGE INTO {state} t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE": (
            "UNSUPPORTED_FEATURE.TABLE_OPERATION"
        ),
        f"CREATE OR REPLACE TABLE {state} USING parquet AS SELECT 2 AS id": "UNSUPPORTED_FEATURE.TABLE_OPERATION",
        # overwriting a table from a query that reads it
        f"INSERT OVERWRITE TABLE {state} SELECT * FROM {state} WHERE id <> 1": "UNSUPPORTED_OVERWRITE.TABLE",
        # CREATE TABLE over an existing name (rewrite into a name that was not dropped)
        f"CREATE TABLE {state} USING parquet AS SELECT 2 AS id": "TABLE_OR_VIEW_ALREADY_EXISTS",
    }
    for statement, error in refused.items():
        with pytest.raises(Exception, match=error.replace(".", r"\.")):
            warehouse.execute([statement])
    assert warehouse.rows(f"SELECT id FROM {state}") == [(1,)]


def test_statements_rendered_by_sqlglot_from_postgres(warehouse: SparkWarehouse, schema: str) -> None:
    """The engine's templates are PostgreSQL transpiled to Spark; ``CREATE TABLE`` without ``USING`` makes a
    parquet table (Spark 4 default), ``CREATE TEMPORARY``-free loads go through :meth:`SparkWarehouse.load`."""

    def r(sql: str) -> str:
        return sqlglot.transpile(sql, read="postgres", write="spark")[0]

    state, nxt = f'"{schema}"."b1_t"', f'"{schema}"."b1_t__next"'
    warehouse.execute(
        [
            r(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'),
            r(f'CREATE TABLE IF NOT EXISTS {state} ("k" TEXT, "hash" TEXT, "created_at" BIGINT, "row" TEXT)'),
            r(f'CREATE TABLE IF NOT EXISTS {state} ("k" TEXT, "hash" TEXT, "created_at" BIGINT, "row" TEXT)'),
            r(f'INSERT INTO {state} ("k", "hash", "created_at", "row") VALUES (\'1\', \'h1\', 1, \'r1\')'),
            r(f'INSERT INTO {state} ("k", "hash", "created_at", "row") VALUES (\'2\', \'h2\', 2, \'r2\')'),
        ]
    )
    provider = [r[1] for r in warehouse.rows(f"DESCRIBE TABLE EXTENDED `{schema}`.`b1_t`") if r[0] == "Provider"]
    assert provider == ["parquet"]
    warehouse.load("__stopchurn_staging", pa.table({"__sc_key_0": ["2"], "action": ["delete"]}))
    warehouse.execute(
        [
            r(f"DROP TABLE IF EXISTS {nxt}"),
            r(
                f'CREATE TABLE {nxt} AS SELECT t."k", t."hash", t."created_at", t."row" FROM {state} AS t '
                'WHERE NOT EXISTS (SELECT 1 FROM "__stopchurn_staging" AS g WHERE g."__sc_key_0" = t."k")'
            ),
            r(f"DROP TABLE IF EXISTS {state}"),
            r(f"ALTER TABLE {nxt} RENAME TO {state}"),
        ]
    )
    assert warehouse.rows(r(f'SELECT "k" FROM {state}')) == [("1",)]


def test_cast_to_string_and_md5(warehouse: SparkWarehouse) -> None:
    """How Spark renders values as text (the key texts and row hashes are built from these)."""
    exprs = {
        "CAST(1.5D AS STRING)": "1.5",
        "CAST(100.0D AS STRING)": "100.0",
        "CAST(1234567.0D AS STRING)": "1234567.0",
        "CAST(12345678.9D AS STRING)": "1.23456789E7",  # Java Double.toString: E notation from 1e7
        "CAST(0.0001D AS STRING)": "1.0E-4",  # ... and below 1e-3
        "CAST(-0.0D AS STRING)": "-0.0",
        "CAST(CAST('NaN' AS DOUBLE) AS STRING)": "NaN",
        "CAST(CAST('Infinity' AS DOUBLE) AS STRING)": "Infinity",
        "CAST(CAST(1.10 AS DECIMAL(10,2)) AS STRING)": "1.10",
        "CAST(TIMESTAMP'2024-01-02 03:04:05' AS STRING)": "2024-01-02 03:04:05",
        "CAST(TIMESTAMP'2024-01-02 03:04:05.100' AS STRING)": "2024-01-02 03:04:05.1",
        "CAST(DATE'2024-01-02' AS STRING)": "2024-01-02",
        "CAST(true AS STRING)": "true",
        "CAST(array(1, NULL) AS STRING)": "[1, null]",
        "CAST(map('k', 1) AS STRING)": "{k -> 1}",
        "CAST(named_struct('a', 1, 'b', 'x') AS STRING)": "{1, x}",
        "md5('abc')": "900150983cd24fb0d6963f7d28e17f72",
        "md5(CAST(NULL AS STRING))": None,
        "concat('a', NULL)": None,
        "'a' || NULL": None,
        "CAST(length('héllo') AS STRING)": "5",
        "current_timezone()": "UTC",
    }
    sql = "SELECT " + ", ".join(exprs)
    assert dict(zip(exprs, warehouse.rows(sql)[0], strict=True)) == exprs


def test_non_utc_session_is_warned_about(spark: SparkSession, caplog: pytest.LogCaptureFixture) -> None:
    previous = str(spark.conf.get("spark.sql.session.timeZone"))
    spark.conf.set("spark.sql.session.timeZone", "Europe/Paris")
    try:
        wh = SparkWarehouse(spark)
        with caplog.at_level(logging.WARNING, logger="airflow_provider_stopchurn.warehouse.spark"):
            assert wh.rows("SELECT 1") == [(1,)]
            assert wh.rows("SELECT 2") == [(2,)]
        warnings = [r for r in caplog.records if "time zone is Europe/Paris" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        spark.conf.set("spark.sql.session.timeZone", previous)


def test_batches_keep_duplicate_names_and_zoned_types(warehouse: SparkWarehouse) -> None:
    """Columns of one name are kept apart, and the batches carry the types ``toArrow()`` gives."""
    sql = "SELECT 1 AS a, 2 AS a, TIMESTAMP'2024-01-02 03:04:05' AS ts, named_struct('x', 1) AS st FROM range(3)"
    table = _table(list(warehouse.batches(sql)))
    assert table.schema.names == ["a", "a", "ts", "st"]
    assert table.num_rows == 3
    assert [table.column(0).to_pylist(), table.column(1).to_pylist()] == [[1, 1, 1], [2, 2, 2]]
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert table.schema == warehouse.spark.sql(sql).toArrow().schema
