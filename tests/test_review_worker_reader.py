"""The numeric rewrite of a PostgreSQL source, against the driver's own read of the same statement.

Shapes the rewrite's own tests leave out: a session time zone moved by the connection, numerics past a double's
range and with thousands of digits, negative scales, names like the rewrite's alias, ORDER BY / LIMIT / DISTINCT
ON, VALUES and TABLE statements, a volatile function with a side effect, FOR UPDATE, a read-only role.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from airflow_provider_stopchurn.source.sql import PostgresUri, postgres_uri, read_postgres

pytestmark = pytest.mark.postgres


def _uri(db: Any, zone: str | None = None, login: str | None = None, read_only: bool = False) -> PostgresUri:
    options = [f"-c TimeZone={zone}"] if zone else []
    if read_only:
        options.append("-c default_transaction_read_only=on")
    extras = {"options": " ".join(options)} if options else None
    return postgres_uri(
        host=db.host, port=db.port, login=login or db.user, password=None, database=db.dbname, extras=extras
    )


def _read(uri: PostgresUri, sql: str) -> pa.Table:
    return pa.Table.from_batches(list(read_postgres(uri, sql))).combine_chunks()


def _driver(uri: PostgresUri, sql: str) -> pa.Table:
    """What the ADBC driver itself reads for ``sql`` in a UTC session (the engine's reading)."""
    import adbc_driver_postgresql.dbapi as adbc_postgres

    with adbc_postgres.connect(uri.reveal()) as conn, conn.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(sql)
        table = cursor.fetch_arrow_table()
        conn.rollback()
    return table.combine_chunks()


def _assert_same(read: pa.Table, driver: pa.Table) -> None:
    assert read.schema.equals(driver.schema, check_metadata=True)
    for name in read.column_names:
        got, want = read.column(name).to_pylist(), driver.column(name).to_pylist()
        bad = [(g, w) for g, w in zip(got, want, strict=True) if g != w]
        assert not bad, (name, len(bad), bad[:5])
    assert read.equals(driver)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 AS id, 1e-1000::numeric AS n, 1e1000::numeric AS m",
        "SELECT 1 AS id, round(1.0 / 3, 1000) AS n, '-0.0000'::numeric AS z, '100000000'::numeric(20, 4) AS m",
        "SELECT 1 AS id, 1.5::numeric AS q, 2.5::numeric AS text",  # named like the rewrite's alias and cast
        "SELECT i AS id, i::numeric AS n FROM generate_series(1, 3) i ORDER BY i DESC LIMIT 2",
        "SELECT DISTINCT ON (i % 2) i AS id, i::numeric AS n FROM generate_series(1, 5) i ORDER BY i % 2, i DESC",
        "VALUES (1, 1.5)",
        'SELECT 1 AS id, 1.5::numeric AS "ñúmero €", 2.5::numeric AS "a""b", 3.5::numeric AS "' + "x" * 70 + '"',
        "TABLE pg_catalog.pg_am",
        "SELECT i AS id, round(hashtext(i::text)::numeric * 10::numeric ^ ((i % 80) - 40), i % 50) AS n, "
        "hashtext(i::text)::numeric / (i % 97 + 1) AS m, (i % 1000)::numeric(7, -2) AS negative_scale "
        "FROM generate_series(1, 20000) AS i",
    ],
    ids=["exponents", "digits", "alias-names", "order-limit", "distinct-on", "values", "names", "table", "many"],
)
def test_numeric_values_arrive_as_the_driver_reads_them(postgres_database: Any, sql: str) -> None:
    uri = _uri(postgres_database)
    _assert_same(_read(uri, sql), _driver(uri, sql))


def test_a_moved_session_time_zone_changes_nothing(postgres_database: Any) -> None:
    """The rewrite is described before the session is set to UTC: literals and timestamps are still read in UTC."""
    sql = (
        "SELECT 1 AS id, extract(epoch FROM '2024-01-01 00:00'::timestamptz) AS n, "
        "'2024-01-01 00:00'::timestamptz AS at, '2024-01-01 00:00'::timestamp AS naive"
    )
    read = _read(_uri(postgres_database, zone="Asia/Tokyo"), sql)
    _assert_same(read, _driver(_uri(postgres_database), sql))
    assert read.column("n").chunk(0).storage.to_pylist() == ["1704067200.000000"]


def test_side_effects_run_once_locks_are_taken_and_a_read_only_role_reads_the_same(postgres_database: Any) -> None:
    db = postgres_database
    db.execute(
        "CREATE TABLE calls (at int)",
        "CREATE TABLE t (id int PRIMARY KEY, n numeric(10, 2))",
        "INSERT INTO t SELECT i, i / 3.0 FROM generate_series(1, 5) i",
        "CREATE FUNCTION bump(i int) RETURNS numeric LANGUAGE sql VOLATILE AS "
        "$$ INSERT INTO calls VALUES (i) RETURNING at::numeric / 7 $$",
        "CREATE ROLE reader LOGIN",
        "GRANT SELECT ON t TO reader",
    )
    read = _read(_uri(db), "SELECT id, n, bump(id) AS b FROM t ORDER BY id FOR UPDATE")
    assert read.column("id").to_pylist() == [1, 2, 3, 4, 5]
    with db.connect() as conn:  # described twice, run once: one call a row
        assert conn.execute("SELECT count(*) FROM calls").fetchone() == (5,)
    sql = "SELECT id, n FROM t"
    _assert_same(_read(_uri(db, login="reader", read_only=True), sql), _driver(_uri(db), sql))
