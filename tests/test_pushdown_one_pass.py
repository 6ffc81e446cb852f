"""The warehouse diff reads the user's query once (PostgreSQL): the statement that writes the narrow diff also
keeps the changed rows' columns, and the changed-rows query reads them from its scratch table. A row's op,
hash and columns come from that one statement, so a source that moves between the run's statements never yields a
row whose hash does not match the columns sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from pushdown_engines import Engine, engine_fixture, local_engine  # noqa: F401 - local_engine: the engine fixture
from test_pushdown import QUERY, churn, table

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse import sql as S

#: Every source row the query reads is logged (a volatile function in its WHERE clause).
LOGGED = "SELECT * FROM src WHERE seen(id)"
#: The churn run's second read sees every score moved: ``(SELECT COUNT(*) FROM reads)`` is taken once per
#: statement, and the first statement that reads every row logs them all.
MOVING = (
    "SELECT id, name, score + CASE WHEN (SELECT COUNT(*) FROM reads) > {before} THEN 1000 ELSE 0 END AS score, "
    "active, seen, plan FROM src WHERE seen(id)"
)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    engine = next(engine_fixture("postgres", request, tmp_path))
    engine.execute(
        "CREATE TABLE reads (id BIGINT); "
        "CREATE FUNCTION seen(key BIGINT) RETURNS BOOLEAN VOLATILE LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO reads VALUES (key); RETURN TRUE; END $$"
    )
    return engine


def _run(engine: Engine, query: str, store: SnapshotStore, sb: Any, tick: int, **opts: Any) -> Any:
    opts.setdefault("chunk_size", 4)
    return run_warehouse_sync(
        WarehouseSource(query, engine.warehouse()), store, make_client(sb), options(**opts), run_ms=T0 + tick
    )


def _reads(engine: Engine) -> int:
    return int(engine.rows("SELECT COUNT(*) FROM reads")[0][0])


@pytest.mark.postgres
@pytest.mark.parametrize("update_all", [False, True], ids=["churn", "schema change"])
def test_a_churn_run_reads_the_users_query_once(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path, update_all: bool
) -> None:
    """Each source row is read once by a churn run (the narrow diff), not a second time for the changed rows'
    columns; a schema change sent with ``update_all`` too."""
    engine = _postgres(request, tmp_path)
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(40)
    engine.load(frame)
    _run(engine, LOGGED, store, sb, 1)
    moved = churn(frame, 1)
    if update_all:
        moved = moved.drop(columns=["plan"])
    engine.load(moved)
    engine.execute("DELETE FROM reads")
    summary = _run(engine, LOGGED, store, sb, 2, on_schema_change="update_all")
    assert summary.inserted > 0 and summary.deleted > 0 and summary.updated > 0
    assert _reads(engine) == len(moved)
    assert_sandbox_matches(sb, moved)
    engine.execute("DELETE FROM reads")
    again = _run(engine, LOGGED, store, sb, 3)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert _reads(engine) == len(moved)


@pytest.mark.postgres
def test_a_source_that_moves_between_the_runs_statements_sends_the_rows_its_diff_read(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every read after the churn run's first sees each score 1000 higher. The rows sent, and the hashes kept for
    them, are those of the narrow diff's read: a run on the unmoved source then sends nothing, and StopChurn holds
    it."""
    engine = _postgres(request, tmp_path)
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(40)
    engine.load(frame)
    _run(engine, QUERY, store, sb, 1)
    moved = churn(frame, 1)
    engine.load(moved)
    summary = _run(engine, MOVING.format(before=_reads(engine)), store, sb, 2, max_delete_fraction=1.0)
    assert summary.updated + summary.inserted + summary.deleted < len(moved)  # not every row: the first read's diff
    assert_sandbox_matches(sb, moved)
    again = _run(engine, QUERY, store, sb, 3)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert_sandbox_matches(sb, moved)


def test_the_changed_rows_come_from_the_scratch_table_not_the_source(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The changed-rows query of a narrow diff on PostgreSQL does not hold the user's query (the state table only
    gives the changed rows their createdAt and last delivered rows), and on both its rows and columns (names,
    order, types) are those of the one-query change query."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    _run(engine, QUERY, store, sb, 1)
    engine.load(churn(frame, 1))
    state = S.StateTable("stopchurn_state", S.state_table_name(BRAND, TABLE), ("id",), engine.name)
    scratch = state.scratch("0123456789ab")
    warehouse = engine.warehouse()
    try:
        columns = list(frame.columns)
        warehouse.execute(state.diff_into(scratch, QUERY, columns, update_all=False))
        sql = state.changes(QUERY, columns, update_all=False, among=scratch)
        if engine.name in S.ONE_PASS:  # DuckDB diffs the changed keys again (sql.ONE_PASS)
            assert "src" not in sql and S.SOURCE not in sql
        one = pd.concat([b.to_pandas() for b in warehouse.batches(state.changes(QUERY, columns, update_all=False))])
        narrow = pd.concat([b.to_pandas() for b in warehouse.batches(sql)])
        assert list(narrow.columns) == list(one.columns)
        assert narrow.dtypes.to_dict() == one.dtypes.to_dict()
        by = [S.key_text(0)]
        pd.testing.assert_frame_equal(
            narrow.sort_values(by).reset_index(drop=True), one.sort_values(by).reset_index(drop=True)
        )
        assert len(narrow) > 0
    finally:
        warehouse.execute([f"DROP TABLE IF EXISTS {scratch}"])
        warehouse.close()


def test_a_source_naming_a_column_twice_is_refused_with_nothing_sent_or_left_and_the_fixed_source_syncs(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A query naming a column twice fails before anything is sent, as it did before the scratch table held the
    changed rows' columns (DuckDB's probe names the second one ``name_1``: a schema change; PostgreSQL refuses
    the row hash's ambiguous name). No scratch table is left, and the fixed query syncs."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    _run(engine, QUERY, store, sb, 1)
    moved = churn(frame, 1)
    engine.load(moved)
    requests = sb.stats()["requests"]
    with pytest.raises(Exception, match=r"name_1|ambiguous"):
        _run(engine, "SELECT id, name, score, active, seen, plan, name FROM src", store, sb, 2)
    assert sb.stats()["requests"] == requests
    assert store.pending_plan() is None
    rows = engine.rows("SELECT table_name FROM information_schema.tables WHERE table_schema = 'stopchurn_state'")
    assert not [name for (name,) in rows if "__diff_" in str(name)]
    summary = _run(engine, QUERY, store, sb, 3)
    assert summary.inserted + summary.updated + summary.deleted > 0
    assert_sandbox_matches(sb, moved)


PG_TYPE = b"POSTGRESQL:type"
TYPED = (
    "CREATE TABLE typed (id BIGINT, amount NUMERIC(10, 2), code VARCHAR(5), tag CHAR(3), doc JSONB, raw JSON, "
    "nums INT[], at TIMESTAMPTZ(0), span INTERVAL DAY TO SECOND); "
    "INSERT INTO typed SELECT i, i / 7.0, 'c' || i % 10, 't', jsonb_build_object('i', i), "
    "json_build_object('i', i), ARRAY[i, i + 1], TIMESTAMPTZ '2026-01-01 00:00:00+00' + i * INTERVAL '1 hour', "
    "i * INTERVAL '1 minute' FROM generate_series(1, 40) AS i"
)


@pytest.mark.postgres
def test_the_scratch_tables_changed_rows_read_with_the_sources_types_and_modifiers(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL: the changed rows read from the scratch table carry the Arrow types, PostgreSQL type names and
    values of the one-query change query: a numeric(10,2), a varchar(5), a char(3), jsonb and json (no equality),
    an array, a timestamptz(0) and an interval with fields."""
    engine = next(engine_fixture("postgres", request, tmp_path))
    engine.execute(TYPED)
    query = "SELECT * FROM typed"
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    _run(engine, query, store, sb, 1)
    engine.execute("UPDATE typed SET amount = amount + 1 WHERE id % 4 = 0; DELETE FROM typed WHERE id % 9 = 0")
    engine.execute("INSERT INTO typed SELECT id + 100, amount, code, tag, doc, raw, nums, at, span FROM typed LIMIT 3")
    columns = ["id", "amount", "code", "tag", "doc", "raw", "nums", "at", "span"]
    assert_scratch_rows_read_as_the_one_query_rows(engine, query, columns)
    summary = _run(engine, query, store, sb, 2, max_delete_fraction=1.0)
    assert (summary.inserted, summary.updated, summary.deleted) == (3, 9, 4)


def assert_scratch_rows_read_as_the_one_query_rows(engine: Any, query: str, columns: list[str]) -> None:
    """The changed rows read from a narrow diff's scratch table carry the Arrow types, PostgreSQL type names (not
    their modifiers: a datum is the same with or without one) and values of the one-query change query."""
    state = S.StateTable("stopchurn_state", S.state_table_name(BRAND, TABLE, "postgres"), ("id",), "postgres")
    scratch = state.scratch("0123456789ab")
    warehouse = engine.warehouse()
    try:
        warehouse.execute(state.diff_into(scratch, query, columns, update_all=False))
        one = pa.Table.from_batches(list(warehouse.batches(state.changes(query, columns, update_all=False))))
        narrow = pa.Table.from_batches(
            list(warehouse.batches(state.changes(query, columns, update_all=False, among=scratch)))
        )
        for a, b in zip(narrow.schema, one.schema, strict=True):
            assert (a.name, a.type, (a.metadata or {}).get(PG_TYPE)) == (
                b.name,
                b.type,
                (b.metadata or {}).get(PG_TYPE),
            )
        by = [(S.key_text(0), "ascending")]
        assert narrow.num_rows == one.num_rows > 0
        assert narrow.sort_by(by).to_pylist() == one.sort_by(by).to_pylist()
    finally:
        warehouse.execute([f"DROP TABLE IF EXISTS {scratch}"])
        warehouse.close()
