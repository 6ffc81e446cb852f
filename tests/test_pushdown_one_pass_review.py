"""The one-pass warehouse diff (PostgreSQL): the changed rows kept in the narrow diff's scratch table
read as the one-query change query reads them, for the types whose text, modifier or catalog entry a ``CASE`` or a
``CREATE TABLE AS`` could change, and a run over them sends what the worker path would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers_sync import BRAND, T0, TABLE, make_client, options, update_requests
from pushdown_engines import Engine, engine_fixture
from test_pushdown_one_pass import assert_scratch_rows_read_as_the_one_query_rows

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.sqlparts import key_index_valid

#: (type DDL, column type, value expression of i)
TYPES = {
    "enum": ("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')", "mood", "(ARRAY['sad','ok','happy'])[1 + i % 3]::mood"),
    "domain_int": ("CREATE DOMAIN posint AS INT CHECK (VALUE > 0)", "posint", "i"),
    "domain_numeric": ("CREATE DOMAIN money2 AS NUMERIC(10, 2)", "money2", "i / 7.0"),
    "domain_varchar": ("CREATE DOMAIN short AS VARCHAR(4)", "short", "'s' || i % 100"),
    "uuid": ("", "UUID", "md5(i::text)::uuid"),
    "timestamp": ("", "TIMESTAMP(3)", "TIMESTAMP '2026-01-01' + i * INTERVAL '1.2345 second'"),
    "timetz": ("", "TIMETZ", "TIMETZ '10:00+02' + i * INTERVAL '1 minute'"),
    "time": ("", "TIME(0)", "TIME '10:00' + i * INTERVAL '1 minute'"),
    "date": ("", "DATE", "DATE '2026-01-01' + i"),
    "float4": ("", "REAL", "i / 3.0"),
    "numeric_nan": ("", "NUMERIC", "CASE WHEN i % 5 = 0 THEN 'NaN'::numeric ELSE i / 3.0 END"),
    "text_array": ("", "VARCHAR(3)[]", "ARRAY['a' || i % 10, NULL]::varchar(3)[]"),
    "oid": ("", "OID", "i::oid"),
    "char_padded": ("", "CHAR(6)", "'ab'"),
}


def _setup(engine: Engine, ddl: str, column_type: str, value: str) -> None:
    engine.execute(
        (ddl + "; " if ddl else "")
        + f"CREATE TABLE typed (id BIGINT, v {column_type}); "
        + f"INSERT INTO typed SELECT i, {value} FROM generate_series(1, 30) AS i"
    )


def _run(engine: Engine, store: SnapshotStore, sb: Any, tick: int, query: str = "SELECT * FROM typed") -> Any:
    return run_warehouse_sync(
        WarehouseSource(query, engine.warehouse()),
        store,
        make_client(sb),
        options(chunk_size=4, max_delete_fraction=1.0),
        run_ms=T0 + tick,
    )


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except Exception as err:  # the two paths must fail alike too
        return "error", type(err).__name__


@pytest.mark.postgres
@pytest.mark.parametrize("kind", list(TYPES))
def test_scratch_rows_read_as_the_one_query_rows(
    kind: str, stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    engine = next(engine_fixture("postgres", request, tmp_path))
    _setup(engine, *TYPES[kind])
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    first = _outcome(lambda: _run(engine, store, sb, 1))
    assert first[0] == "ok", first
    engine.execute("UPDATE typed SET id = id + 1000 WHERE id % 4 = 0; DELETE FROM typed WHERE id % 9 = 0")
    assert_scratch_rows_read_as_the_one_query_rows(engine, "SELECT * FROM typed", ["id", "v"])
    second = _outcome(lambda: _run(engine, store, sb, 2))
    assert second[0] == "ok", second


#: queries over ``plain (id, a, b)`` whose columns a ``CREATE TABLE AS`` might not take as the query gives them
QUERIES = {
    "unknown_literal": "SELECT id, 'x' AS v, a FROM plain",
    "null_literal": "SELECT id, NULL AS v, a FROM plain",
    "aliases_as_names": (
        'SELECT id, a AS c, b AS d, a AS x, b AS g, a AS n, b AS t, a AS s, b AS k, a AS "count" FROM plain'
    ),
    "quoted_unicode_long": 'SELECT id, a AS "qu""ote", b AS "ünï cödé", a AS "' + "l" * 63 + '" FROM plain',
}


@pytest.mark.postgres
@pytest.mark.parametrize("kind", list(QUERIES))
def test_query_columns_the_scratch_table_keeps(
    kind: str, stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    engine = next(engine_fixture("postgres", request, tmp_path))
    engine.execute(
        "CREATE TABLE plain (id BIGINT, a INT, b TEXT); "
        "INSERT INTO plain SELECT i, i, 'b' || i FROM generate_series(1, 30) AS i"
    )
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    query = QUERIES[kind]
    first = _outcome(lambda: _run(engine, store, sb, 1, query))
    assert first[0] == "ok", first
    engine.execute("UPDATE plain SET id = id + 1000, a = a + 1 WHERE id % 4 = 0; DELETE FROM plain WHERE id % 9 = 0")
    second = _outcome(lambda: _run(engine, store, sb, 2, query))
    assert second[0] == "ok", second
    assert (second[1].inserted, second[1].deleted) == (6, 10)


@pytest.mark.postgres
def test_postgres_killed_at_every_write_then_a_clean_run_converges(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The crash matrix of a churn run on PostgreSQL, where the changed rows are read from the scratch table."""
    from test_pushdown import QUERY
    from test_pushdown_recovery import Matrix
    from test_pushdown_state_machine import KillablePostgres

    class PostgresMatrix(Matrix):
        def source(self) -> WarehouseSource:
            return WarehouseSource(QUERY, self.killable(self.engine.uri()), state_schema=self.state_schema)

    engine = next(engine_fixture("postgres", request, tmp_path))
    matrix = PostgresMatrix(engine, stopchurn_sandbox_factory(record=True), KillablePostgres)
    matrix.churn_run(("after",))  # dying before write n leaves what dying after n-1 leaves


@pytest.mark.postgres
@pytest.mark.parametrize("query", ["SELECT * FROM feelings", "SELECT id, ARRAY[m] AS ms, note FROM feelings"])
def test_a_role_without_usage_on_a_columns_type_keeps_syncing(
    query: str, stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A role may read a column of a type it has no USAGE on (an enum whose USAGE was revoked from PUBLIC), but
    may not make a table with such a column. It syncs with CREATE on the state schema as it did when the scratch
    table held the key texts only: the scratch table is an optimisation, never a reason for every run to fail."""
    from airflow_provider_stopchurn.source.sql import postgres_uri
    from airflow_provider_stopchurn.warehouse.databases import PostgresWarehouse

    engine = next(engine_fixture("postgres", request, tmp_path))
    engine.execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); REVOKE USAGE ON TYPE mood FROM PUBLIC; "
        "CREATE TABLE feelings (id BIGINT, m mood, note TEXT); "
        "INSERT INTO feelings SELECT i, (ARRAY['sad','ok','happy'])[1 + i % 3]::mood, 'n' || i "
        "FROM generate_series(1, 30) AS i; "
        "DROP ROLE IF EXISTS sc_typed; CREATE ROLE sc_typed LOGIN; "
        "CREATE SCHEMA IF NOT EXISTS stopchurn_state; GRANT USAGE, CREATE ON SCHEMA stopchurn_state TO sc_typed; "
        "GRANT SELECT ON feelings TO sc_typed; "
        "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO sc_typed', current_database()); END $$"
    )
    server = engine.handle
    uri = postgres_uri(host=server.host, port=server.port, login="sc_typed", password=None, database=server.dbname)
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)

    def run(tick: int) -> Any:
        source = WarehouseSource(query, PostgresWarehouse(uri))
        return run_warehouse_sync(source, store, make_client(sb), options(chunk_size=4), run_ms=T0 + tick)

    assert run(1).inserted == 30
    engine.execute("UPDATE feelings SET note = note || '!' WHERE id % 4 = 0")
    summary = run(2)
    assert summary.updated == 7


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["domain", "wide"])
def test_a_source_the_scratch_table_cannot_hold_keeps_syncing(
    kind: str, stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A domain without USAGE (the scratch table keeps its base type), and a source of 1,597 columns (a table holds
    at most 1,600: with the key text, op, flag and count the scratch table's would be 1,601)."""
    engine = next(engine_fixture("postgres", request, tmp_path))
    if kind == "domain":
        engine.execute(
            "CREATE DOMAIN posint AS INT CHECK (VALUE > 0); REVOKE USAGE ON DOMAIN posint FROM PUBLIC; "
            "CREATE TABLE wide (id BIGINT, p posint, note TEXT); "
            "INSERT INTO wide SELECT i, i, 'n' || i FROM generate_series(1, 30) AS i"
        )
        query, column = "SELECT * FROM wide", "note"
    else:
        extra = ", ".join(f"c{j} INT" for j in range(1595))
        values = ", ".join("i" for _ in range(1595))
        engine.execute(
            f"CREATE TABLE wide (id BIGINT, note TEXT, {extra}); "
            f"INSERT INTO wide SELECT i, 'n' || i, {values} FROM generate_series(1, 30) AS i"
        )
        query, column = "SELECT * FROM wide", "note"
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    assert _run(engine, store, sb, 1, query).inserted == 30
    engine.execute(f"UPDATE wide SET {column} = {column} || '!' WHERE id % 4 = 0")
    assert _run(engine, store, sb, 2, query).updated == 7


@pytest.mark.postgres
def test_a_source_row_wider_than_a_table_row_keeps_syncing(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A query may return rows wider than a table can store (a join of two wide tables of fixed-width columns:
    1,200 BIGINTs, 9,600 bytes, past PostgreSQL's 8,160-byte row): it synced when the scratch table held the key
    texts only."""
    engine = next(engine_fixture("postgres", request, tmp_path))
    extra = ", ".join(f"c{j} BIGINT" for j in range(600))
    values = ", ".join("i" for _ in range(600))
    for name in ("wa", "wb"):
        engine.execute(
            f"CREATE TABLE {name} (id BIGINT, {extra}); "
            f"INSERT INTO {name} SELECT i, {values} FROM generate_series(1, 30) AS i"
        )
    picked = ", ".join([*(f"a.c{j}" for j in range(600)), *(f"b.c{j} AS d{j}" for j in range(600))])
    query = f"SELECT a.id, {picked} FROM wa AS a JOIN wb AS b ON a.id = b.id"
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    assert _run(engine, store, sb, 1, query).inserted == 30
    engine.execute("UPDATE wa SET c0 = c0 + 1 WHERE id % 4 = 0")
    assert _run(engine, store, sb, 2, query).updated == 7


def _rows_read(plan: Any, table: str) -> int:
    """The rows the scans of ``table`` in an EXPLAIN (ANALYZE, FORMAT JSON) plan read, over all their loops."""
    node = plan[0]["Plan"] if isinstance(plan, list) else plan
    own = 0
    if node.get("Relation Name") == table:
        own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * node.get("Actual Loops", 1)
    return own + sum(_rows_read(child, table) for child in node.get("Plans", []))


@pytest.mark.postgres
def test_the_changed_rows_look_up_of_a_state_table_without_its_key_index_reads_it_about_once(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A state table without its key index (made before it had one, run by a role that does not own it, which
    cannot add it: a case the sync supports) is read about once for the changed rows' createdAt and delivered
    rows, not once per changed row."""
    import json

    engine = next(engine_fixture("postgres", request, tmp_path))
    engine.execute(
        "CREATE TABLE plain (id BIGINT, a INT, b TEXT); "
        "INSERT INTO plain SELECT i, i, 'b' || i FROM generate_series(1, 2000) AS i; "
        "CREATE FUNCTION explained(q TEXT) RETURNS JSON LANGUAGE plpgsql AS "
        "$$ DECLARE r JSON; BEGIN EXECUTE 'EXPLAIN (ANALYZE, FORMAT JSON) ' || q INTO r; RETURN r; END $$"
    )
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    query = "SELECT * FROM plain"
    _run(engine, store, sb, 1, query)
    name = S.state_table_name(BRAND, TABLE, "postgres")
    state = S.StateTable("stopchurn_state", name, ("id",), "postgres")
    index = f"{S.q(state.schema)}.{S.q(state.short() + '__key')}"
    assert engine.rows(key_index_valid(index)) == [(1,)]  # the look-up through it, as long as it is there
    for (index_name,) in engine.rows(f"SELECT indexname FROM pg_indexes WHERE tablename = '{name}'"):
        engine.execute(f'DROP INDEX "stopchurn_state"."{index_name}"')
    engine.execute("UPDATE plain SET a = a + 1 WHERE id % 4 = 0; DELETE FROM plain WHERE id % 9 = 0")
    scratch = state.scratch("0123456789ab")
    warehouse = engine.warehouse()
    try:
        warehouse.execute(state.diff_into(scratch, query, ["id", "a", "b"], update_all=False))
        indexed = bool(warehouse.rows(key_index_valid(index))[0][0])  # as the run decides (plan._change_batches)
        assert not indexed
        sql = state.changes(query, ["id", "a", "b"], update_all=False, among=scratch, indexed=indexed)
        (plan,) = warehouse.rows(f"SELECT CAST(explained({S.lit(sql)}) AS TEXT)")[0]
    finally:
        warehouse.execute([f"DROP TABLE IF EXISTS {scratch}"])
        warehouse.close()
    read = _rows_read(json.loads(plan) if isinstance(plan, str) else plan, name)
    assert 0 < read <= 3 * 2000, read


@pytest.mark.postgres
def test_a_source_the_role_may_not_read_is_reported_as_such_not_as_a_scratch_table_it_cannot_hold(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path, caplog: Any
) -> None:
    """A 42501 from the source itself (SELECT revoked) is not a scratch table that cannot hold the rows: the run
    fails with nothing sent and says nothing of a fallback, and once SELECT is granted again the next run syncs."""
    import logging

    from airflow_provider_stopchurn.source.sql import postgres_uri
    from airflow_provider_stopchurn.warehouse.databases import PostgresWarehouse

    engine = next(engine_fixture("postgres", request, tmp_path))
    engine.execute(
        "CREATE TABLE feelings (id BIGINT, note TEXT); "
        "INSERT INTO feelings SELECT i, 'n' || i FROM generate_series(1, 30) AS i; "
        "DROP ROLE IF EXISTS sc_reader; CREATE ROLE sc_reader LOGIN; "
        "CREATE SCHEMA IF NOT EXISTS stopchurn_state; GRANT USAGE, CREATE ON SCHEMA stopchurn_state TO sc_reader; "
        "GRANT SELECT ON feelings TO sc_reader; "
        "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO sc_reader', current_database()); END $$"
    )
    server = engine.handle
    uri = postgres_uri(host=server.host, port=server.port, login="sc_reader", password=None, database=server.dbname)
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)

    def run(tick: int) -> Any:
        source = WarehouseSource("SELECT * FROM feelings", PostgresWarehouse(uri))
        return run_warehouse_sync(source, store, make_client(sb), options(chunk_size=4), run_ms=T0 + tick)

    assert run(1).inserted == 30
    engine.execute("UPDATE feelings SET note = note || '!' WHERE id % 4 = 0; REVOKE SELECT ON feelings FROM sc_reader")
    sent = update_requests(sb)
    with caplog.at_level(logging.WARNING), pytest.raises(Exception) as raised:
        run(2)
    assert "feelings" in str(raised.value)
    assert update_requests(sb) == sent
    assert "cannot hold this source" not in caplog.text, "a source the role may not read is no scratch table issue"
    engine.execute("GRANT SELECT ON feelings TO sc_reader")
    assert run(3).updated == 7
