"""PostgreSQL numeric columns are read as the server's text, and the engine still gets the driver's own batches.

Against a real server: the query the server runs casts the numeric columns to text; the values, types and field
metadata of every column are those the driver gives for the statement as written (special values, scales, typmods,
odd column names, numeric arrays left alone); statements a subquery cannot hold run as written, in a transaction the
probe left as it was; errors are the driver's own, with the same message; a timeout still cancels the query.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from pg_sessions import driver_error, queries, wait_for, waits
from pg_sessions import sessions as server_sessions

from airflow_provider_stopchurn.source.canonical import canonicalize_source
from airflow_provider_stopchurn.source.read_ahead import THREAD_NAME, cancel_reads
from airflow_provider_stopchurn.source.sql import PostgresUri, postgres_uri, read_postgres

pytestmark = pytest.mark.postgres

#: Numeric values of every form numeric_out and the driver write: scales, signs, zeros, long digits, the specials.
VALUES = [
    "0",
    "0.000",
    "-0.00",
    "1.50",
    "-1.50",
    "100",
    "10000.0000",
    "1e-30",
    "-0.000000001",
    "123456789012345678901234567890.123456789",
    "1.7976931348623157e308",
    "2e308",
    "NaN",
    "Infinity",
    "-Infinity",
    None,
]
#: A result with numeric columns among others, odd names included, and a numeric array (left to the driver).
MIXED = (
    'SELECT row_number() OVER () AS id, x::numeric AS n, x::numeric AS "Mixed Case", '
    'CASE WHEN x ~ \'^-?[0-9.]+$\' THEN x::numeric(60, 12) END AS "we""ird", '
    "CASE WHEN x ~ '^-?[0-9.]{{1,20}}$' THEN ARRAY[x::numeric] END AS arr, x AS text_of_it, 1.5 AS \"?column?\" "
    "FROM unnest(ARRAY[{values}]::text[]) AS x"
).format(values=", ".join("NULL" if v is None else f"'{v}'" for v in VALUES))
#: About 40 MB in three batches with a numeric column: the reader is ahead of the engine while it holds the first.
WIDE_NUMERIC = "SELECT i AS id, i::numeric / 7 AS n, repeat('x', 2000) AS pad FROM generate_series(1, 20000) AS i"


@pytest.fixture
def uri(postgres_database: Any) -> PostgresUri:
    db = postgres_database
    return postgres_uri(host=db.host, port=db.port, login=db.user, password=None, database=db.dbname)


def _driver_table(uri: PostgresUri, statements: list[str]) -> pa.Table:
    """What the ADBC driver itself reads for the last statement (after the others, in one transaction)."""
    import adbc_driver_postgresql.dbapi as adbc_postgres

    with adbc_postgres.connect(uri.reveal()) as conn, conn.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        for statement in statements[:-1]:
            cursor.execute(statement)
        cursor.execute(statements[-1])
        table = cursor.fetch_arrow_table()
        conn.rollback()
    return table


def _read(uri: PostgresUri, statements: list[str]) -> pa.Table:
    batches = list(read_postgres(uri, statements))
    return pa.Table.from_batches(batches).combine_chunks()


def test_the_server_writes_numeric_columns_as_text(uri: PostgresUri, postgres_database: Any) -> None:
    batches = read_postgres(uri, WIDE_NUMERIC)
    first = next(batches)  # the engine holds this one: the query is still running on the server
    try:
        wait_for(server_sessions, postgres_database, lambda s: s and s[0][0] != "active")
        (query,) = queries(postgres_database)
        assert 'q."n"::text AS "n"' in query, query
        assert first.schema.field("n").type == pa.opaque(pa.string(), "numeric", "PostgreSQL")
        assert first.num_rows + sum(batch.num_rows for batch in batches) == 20_000
    finally:
        batches.close()


def test_numeric_columns_arrive_as_the_driver_reads_them(uri: PostgresUri) -> None:
    read = _read(uri, [MIXED])
    driver = _driver_table(uri, [MIXED]).combine_chunks()
    assert read.schema.equals(driver.schema, check_metadata=True)
    assert read.equals(driver)
    # the specials in the driver's spelling (numeric_out writes NaN, Infinity, -Infinity)
    assert read.column("n").chunk(0).storage.to_pylist()[-4:] == ["nan", "inf", "-inf", None]


@pytest.mark.parametrize(
    "sql",
    [WIDE_NUMERIC, "SELECT 1 AS id, 2.50::numeric(10, 2) AS n WHERE false"],
    ids=["many-batches", "no-rows"],
)
def test_any_number_of_rows_arrives_as_the_driver_reads_them(uri: PostgresUri, sql: str) -> None:
    read = _read(uri, [sql])
    driver = _driver_table(uri, [sql]).combine_chunks()
    assert read.schema.equals(driver.schema, check_metadata=True)
    assert read.equals(driver)


#: Every kind of column the engine reads from PostgreSQL, beside a numeric one (which makes the source rewritten).
EVERY_TYPE = (
    "SELECT i AS id, 1.25::numeric(8, 3) AS n, i::int2 AS small, i::float4 / 3 AS real, i::float8 / 3 AS double, "
    "'x' || i AS t, ('x' || i)::varchar(5) AS vc, 'ab'::char(3) AS ch, i % 2 = 0 AS flag, "
    "'2024-01-02 03:04:05.678'::timestamp AS ts, '2024-01-02 03:04:05+02'::timestamptz AS tstz, "
    "'2024-01-02'::date AS d, '03:04:05.5'::time AS tm, '03:04:05+02'::timetz AS ttz, "
    "'1 year 2 mons 3 days 04:05:06'::interval AS iv, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, "
    "'{\"b\": [1, 2.50]}'::json AS j, '{\"b\": [1, 2.50]}'::jsonb AS jb, ARRAY['a', NULL] AS ta, "
    "ARRAY[1.50, NULL]::numeric[] AS na, 'happy'::mood AS e "
    "FROM generate_series(1, 3) AS i"
)


def test_every_kind_of_column_arrives_as_the_driver_reads_it(uri: PostgresUri, postgres_database: Any) -> None:
    postgres_database.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    read = _read(uri, [EVERY_TYPE])
    driver = _driver_table(uri, [EVERY_TYPE]).combine_chunks()
    assert read.schema.equals(driver.schema, check_metadata=True)
    assert read.equals(driver)


def test_the_canonical_frame_is_the_same_as_from_the_driver(uri: PostgresUri) -> None:
    # as strings: 2e308 is past what a JSON number may carry
    read = canonicalize_source(lambda: read_postgres(uri, MIXED), key_columns=["id"], decimal_as_string=True)
    driver = canonicalize_source(_driver_table(uri, [MIXED]), key_columns=["id"], decimal_as_string=True)
    assert read.kinds == driver.kinds
    assert read.frame.equals(driver.frame)
    assert read.frame.get_column("n").to_list()[:5] == ["0", "0", "0", "1.5", "-1.5"]


@pytest.mark.parametrize(
    ("statements", "committed"),
    [
        # a subquery cannot hold these: the probe's failure is rolled back and they run as written
        (["INSERT INTO t VALUES (1, 2.50), (2, NULL) RETURNING id, n"], 2),
        (["WITH w AS (INSERT INTO t VALUES (1, 2.50) RETURNING id, n) SELECT * FROM w"], 1),
        # several statements: the last one's result may depend on the others, read as written
        (["INSERT INTO t VALUES (1, 2.50)", "SELECT id, n FROM t"], 1),
        (["COMMIT", "SELECT 1 AS id, 2.50::numeric AS n"], 0),
    ],
    ids=["insert-returning", "writing-with", "two-statements", "after-commit"],
)
def test_a_statement_that_cannot_be_rewritten_runs_as_written(
    uri: PostgresUri, postgres_database: Any, statements: list[str], committed: int
) -> None:
    postgres_database.execute("CREATE TABLE t (id int, n numeric)")
    driver = _driver_table(uri, statements)  # rolled back
    read = _read(uri, statements)
    assert read.schema.equals(driver.schema, check_metadata=True)
    assert read.equals(driver.combine_chunks())
    with postgres_database.connect() as conn:  # the statements ran once, and were committed
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (committed,)


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1.5::numeric AS n",  # refused when prepared
        "SELECT i AS id, (1 / (i - 15000))::numeric AS n FROM generate_series(1, 20000) AS i",  # fails as it runs
        "SELECT 1 AS id, 'x'::numeric AS n",  # fails as it runs, on the numeric's own input
    ],
)
def test_an_error_is_the_drivers_own(uri: PostgresUri, postgres_database: Any, sql: str) -> None:
    direct = driver_error(uri, sql)
    with pytest.raises(type(direct)) as through:
        canonicalize_source(lambda: read_postgres(uri, sql), key_columns=["id"])
    assert type(through.value) is type(direct)
    assert str(through.value) == str(direct)
    assert [t for t in threading.enumerate() if t.name == THREAD_NAME] == []
    assert wait_for(server_sessions, postgres_database, lambda sessions: not sessions) == []


class TaskStopped(Exception):
    """Stands for Airflow's AirflowTaskTimeout: raised by a signal handler."""


@pytest.fixture
def alarm() -> Iterator[None]:
    def handler(_signum: int, _frame: Any) -> None:
        raise TaskStopped("timeout")

    previous = signal.signal(signal.SIGALRM, handler)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("alarm")
def test_a_timeout_cancels_a_query_with_numeric_columns(uri: PostgresUri, postgres_database: Any) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    with pytest.raises(TaskStopped):
        canonicalize_source(
            lambda: read_postgres(uri, "SELECT 1 AS id, 2.5::numeric AS n FROM pg_sleep(600)"), key_columns=["id"]
        )
    assert [t for t in threading.enumerate() if t.name == THREAD_NAME] == []
    assert wait_for(server_sessions, postgres_database, lambda sessions: not sessions) == []


def test_a_cancel_while_the_server_describes_the_query_cancels_the_read(postgres_database: Any) -> None:
    """``on_kill`` (``cancel_reads``) while the rewrite is being described: the read fails as cancelled, it does not
    go on to run the query as written. The description waits on a lock another session holds, so the cancel
    lands in it."""
    db = postgres_database
    db.execute("CREATE TABLE locked (id int, n numeric)")
    uri = postgres_uri(host=db.host, port=db.port, login=db.user, password=None, database=db.dbname)
    outcome: dict[str, Any] = {}
    with db.connect(autocommit=False) as holder:
        holder.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")

        def cancel_then_release() -> None:
            outcome["waited"] = wait_for(waits, db, lambda w: "relation" in w)
            cancel_reads()  # what the operator's on_kill does on SIGTERM
            # the query as written would wait for the lock again: give it a moment to, then let it finish
            outcome["after"] = wait_for(waits, db, lambda w: "relation" in w, tries=20)
            holder.rollback()

        stopper = threading.Thread(target=cancel_then_release)
        stopper.start()
        try:
            with pytest.raises(Exception, match="canceling statement due to user request"):
                canonicalize_source(lambda: read_postgres(uri, "SELECT * FROM locked"), key_columns=["id"])
        finally:
            stopper.join()
    assert "relation" in outcome["waited"]
    assert [t for t in threading.enumerate() if t.name == THREAD_NAME] == []
