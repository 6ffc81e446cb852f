"""The state table's rows kept as values (``warehouse/rows.py``) where the bookkeeping row's text could be read
back differently from how it was written, or read by a version that does not know the representation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers_sync import T0, options
from pushdown_engines import Engine, local_engine  # noqa: F401 - the engine fixture
from test_pushdown_state_rows import _ROWS, STATE, _deletes_match_the_rows_delivered, _World


@pytest.mark.postgres
def test_a_database_without_standard_conforming_strings_keeps_the_layouts_exact(
    postgres_database: Any, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """``standard_conforming_strings = off`` (a database or role setting): a backslash in a plain string literal
    is an escape. The layouts' text is full of them (``{\\"id\\":``): written as a literal, it must still be read
    back as written, or a delete sends a row rebuilt from other texts (or no run can read the bookkeeping)."""
    engine = Engine("postgres", postgres_database)
    engine.execute(_ROWS["postgres"])
    engine.execute(f'ALTER DATABASE "{postgres_database.dbname}" SET standard_conforming_strings = off')
    world = _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)
    assert world.run().inserted == 3
    engine.execute("DELETE FROM src")
    assert world.run().deleted == 3
    assert _deletes_match_the_rows_delivered(world) == 3


def test_a_state_table_with_rows_kept_as_values_names_a_format_older_versions_refuse(
    engine: Engine, world: Any
) -> None:
    """A version before the layouts reads every row as its JSON text, so it would send a delete whose row is a
    row's values and separators. It refuses a bookkeeping row whose format is above the 2 it reads: rows kept as
    values must be marked so (rows kept as JSON text, e.g. for a role that may not add the column, need not)."""
    assert world.run().inserted == 3
    assert any(not r.startswith("{") for r in world.kept())
    ((fmt,),) = engine.rows(f'SELECT "format" FROM {STATE}__meta')
    assert int(fmt) > 2


@pytest.fixture
def world(engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path) -> _World:
    engine.execute(_ROWS[engine.name])
    return _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)


@pytest.mark.parametrize("older", [False, True], ids=["layouts", "json-texts"])
def test_a_schema_change_killed_at_every_write_then_deletes_send_each_row_as_delivered(
    stopchurn_sandbox_factory: Any, tmp_path: Path, older: bool
) -> None:
    """Rows of the first layout (``older``: a state table of JSON texts, as a version before the layouts left it),
    then a run that sends every row again with a new column (a new layout), deletes some and inserts some, killed
    at each write of the warehouse and the store. After the retry, deleting every row sends each one byte for byte
    as it was last delivered, whichever layout (or a crash between the rows and the bookkeeping row naming their
    layout, or adding the layouts' column) keeps it."""
    import re

    from helpers_sync import RecordingSender, make_client
    from test_crash_matrix_object_store import KillableMemoryFileSystem, Killed
    from test_pushdown import churn, table
    from test_pushdown_recovery import KillableDuckDB, _store
    from test_pushdown_state_rows import _UPDATE

    from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync

    engine = Engine("duckdb", tmp_path / "w.duckdb")
    sb = stopchurn_sandbox_factory(record=True)
    base = table(8)
    moved = churn(base, 1).assign(tier=lambda f: (f["id"] % 3).astype("int64"), **{"a.b": 'x,"name":}'})

    def run(store: Any, sender: Any, tick: int, **opts: Any) -> Any:
        source = WarehouseSource("SELECT * FROM src", KillableDuckDB(str(engine.handle)))
        opts = {"chunk_size": 3, "max_concurrent_requests": 1, "allow_large_changes": True, **opts}
        return run_warehouse_sync(source, store, sender, options(**opts), run_ms=T0 + tick)

    def fresh() -> tuple[Any, Any]:
        KillableMemoryFileSystem.arm(0, "never")
        sb.reset()
        engine.execute("DROP SCHEMA IF EXISTS stopchurn_state CASCADE")
        engine.load(base)
        store, sender = _store(), RecordingSender(make_client(sb))
        run(store, sender, 0)
        if older:
            engine.execute("ALTER TABLE stopchurn_state.b7_subscription__meta DROP COLUMN row_layouts")
            engine.execute('UPDATE stopchurn_state.b7_subscription__meta SET "format" = 2')
            for body in sender.bodies:
                for _, row in _UPDATE.findall(body.decode()):
                    key = re.match(r'\{"id":(\d+)', row)
                    assert key is not None, row
                    text = row.replace("'", "''")
                    engine.execute(
                        f"UPDATE stopchurn_state.b7_subscription SET _stopchurn_row = '{text}' WHERE id = '{key[1]}'"
                    )
            kept = engine.rows("SELECT _stopchurn_row FROM stopchurn_state.b7_subscription")
            assert kept and all(str(r).startswith("{") for (r,) in kept)
        engine.load(moved)
        return store, sender

    store, sender = fresh()
    KillableMemoryFileSystem.arm(0, "never")
    run(store, sender, 1, on_schema_change="update_all")
    writes = KillableMemoryFileSystem.writes
    assert writes >= 5
    # dying before write n leaves what dying after write n-1 leaves
    for n, when in [(1, "before")] + [(n, "after") for n in range(1, writes + 1)]:
        store, sender = fresh()
        KillableMemoryFileSystem.arm(n, when)
        with pytest.raises(Killed):
            run(store, sender, 1, on_schema_change="update_all")
        KillableMemoryFileSystem.arm(0, "never")
        store.break_lock()
        run(store, sender, 2, on_schema_change="update_all")
        engine.execute("DELETE FROM src")
        assert run(store, sender, 3).deleted == len(moved), (n, when)
        last: dict[str, str] = {}
        deletes = 0
        for body in sender.bodies:
            for op, row in _UPDATE.findall(body.decode()):
                key = re.match(r'\{"id":(\d+)', row)
                assert key is not None, row
                if op == "delete":
                    assert row == last[key.group(1)], (n, when, row, last[key.group(1)])
                    deletes += 1
                last[key.group(1)] = row
        assert deletes >= len(moved), (n, when)


@pytest.mark.postgres
def test_a_role_that_may_not_read_the_layouts_does_not_erase_them(
    postgres_database: Any, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The owner's runs keep rows as values. A role granted the bookkeeping table's other columns (not
    ``row_layouts``) then runs: its probe of the column fails, which reads as a table without it, and the
    bookkeeping row it writes would hold no layouts, while the rows the owner wrote still name theirs: every later
    delete of one would stop (or, once a new layout takes the freed tag, be rebuilt from other texts). The role's
    run stops before anything is read or sent, saying which grant it lacks."""
    from test_pushdown_state_rows import QUERY

    from airflow_provider_stopchurn.exceptions import StopChurnConfigError
    from airflow_provider_stopchurn.source.sql import postgres_uri
    from airflow_provider_stopchurn.warehouse import PostgresWarehouse, WarehouseSource, run_warehouse_sync

    engine = Engine("postgres", postgres_database)
    engine.execute(_ROWS["postgres"])
    world = _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)
    world.run()
    assert engine.rows(f'SELECT "row_layouts" FROM {STATE}__meta')[0][0]
    engine.execute("DROP ROLE IF EXISTS sc_columns")
    engine.execute("CREATE ROLE sc_columns LOGIN")
    engine.execute("GRANT USAGE, CREATE ON SCHEMA stopchurn_state TO sc_columns")
    engine.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {STATE} TO sc_columns")
    engine.execute(
        'GRANT SELECT ("format", "token", "plan_id", "columns", "key_columns", "rows"), INSERT, DELETE '
        f"ON {STATE}__meta TO sc_columns"
    )
    engine.execute("GRANT SELECT ON src TO sc_columns")
    server = engine.handle
    uri = postgres_uri(host=server.host, port=server.port, login="sc_columns", password=None, database=server.dbname)
    engine.execute("UPDATE src SET flag = NOT flag WHERE id = 2")
    source = WarehouseSource(QUERY, PostgresWarehouse(uri), state_schema="stopchurn_state")
    opts = options(chunk_size=4, max_concurrent_requests=1, allow_large_changes=True)
    with pytest.raises(StopChurnConfigError, match="Grant this connection SELECT"):
        run_warehouse_sync(source, world.store, world.sender, opts, run_ms=T0 + 50)
    assert engine.rows(f'SELECT "row_layouts" FROM {STATE}__meta')[0][0]
    assert world.run().updated == 1  # the owner's run: the grant was the cause
    engine.execute("DELETE FROM src")
    assert world.run().deleted == 3
    assert _deletes_match_the_rows_delivered(world) == 3


@pytest.mark.spark
def test_spark_keeps_rows_as_json_texts_and_deletes_send_them_as_delivered(
    request: pytest.FixtureRequest, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Spark has no transactions (its state table and bookkeeping row are swapped one after the other): its rows
    stay JSON text, its bookkeeping row format 2, and a delete sends the row as delivered."""
    import pandas as pd
    from pushdown_engines import engine_fixture

    fixture = engine_fixture("spark", request, tmp_path)
    engine = next(fixture)
    frame = pd.DataFrame({"id": [1, 2, 3], "note": ['x,"note":}', "", "é \x1f\x1e"], "a.b": ["{", None, '"']})
    engine.load(frame)
    world = _World(engine, stopchurn_sandbox_factory(record=True), tmp_path)
    assert world.run().inserted == 3
    kept = engine.rows(f"SELECT _stopchurn_row FROM {STATE}")  # Spark: no double-quoted names
    assert len(kept) == 3 and all(str(r).startswith("{") for (r,) in kept), kept
    assert engine.rows(f"SELECT format FROM {STATE}__meta") == [(2,)]
    engine.load(frame.iloc[:1])
    assert world.run().deleted == 2
    assert _deletes_match_the_rows_delivered(world) == 2
