"""The warehouse diff in one narrow pass (DuckDB, PostgreSQL): the state table is indexed on its key, an older
state table gets the index on its next run, the diff is written once into a scratch table of the run's own, a
killed try's scratch table never reaches the next run, and the counts the safeguards see are those of the one-query
diff (the dry run's) on a mixed change set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from pushdown_engines import Engine, engine_fixture, local_engine  # noqa: F401 - local_engine: the engine fixture
from test_crash_matrix_object_store import KillableMemoryFileSystem, Killed
from test_pushdown import QUERY, churn, table
from test_pushdown_recovery import KillableDuckDB, Matrix, _store, run_on

from airflow_provider_stopchurn.exceptions import DeliveryError, SafeguardError
from airflow_provider_stopchurn.sandbox import FaultConfig
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.plan import _decide, _source_schema
from airflow_provider_stopchurn.warehouse.state import read_meta

SCHEMA = WarehouseSource(QUERY, None).state_schema  # the default one


def _run(engine: Engine, store: SnapshotStore, sb: Any, tick: int, **opts: Any) -> Any:
    return run_on(engine, store, make_client(sb), tick, **opts)


def _synced(engine: Engine, factory: Any, tmp_path: Path, frame: pd.DataFrame) -> tuple[Any, SnapshotStore]:
    """``frame`` loaded into ``engine`` and synced once to a recording sandbox: the sandbox and the store."""
    sb = factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    engine.load(frame)
    _run(engine, store, sb, 1)
    return sb, store


def _synced_once(factory: Any, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Engine, Any, SnapshotStore]:
    """A PostgreSQL source of 30 rows synced once to a recording sandbox."""
    engine = next(engine_fixture("postgres", request, tmp_path))
    sb, store = _synced(engine, factory, tmp_path, table(30))
    return engine, sb, store


def _state(engine: Engine) -> S.StateTable:
    return S.StateTable(SCHEMA, S.state_table_name(BRAND, TABLE), ("id",), engine.name)


def _key_indexes(engine: Engine) -> list[tuple[Any, ...]]:
    """The indexes on the state table, with their columns."""
    name = S.state_table_name(BRAND, TABLE)
    if engine.name == "postgres":
        return engine.rows(
            f"SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = '{SCHEMA}' AND tablename = '{name}'"
        )
    return engine.rows(f"SELECT index_name, expressions FROM duckdb_indexes() WHERE table_name = '{name}'")


def _drop_indexes(engine: Engine) -> None:
    for index, _ in _key_indexes(engine):
        engine.execute(f'DROP INDEX "{SCHEMA}"."{index}"')


def _scratch_tables(engine: Engine) -> list[str]:
    rows = engine.rows(f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{SCHEMA}'")
    return sorted(str(name) for (name,) in rows if "__diff_" in str(name))


@pytest.mark.postgres
def test_a_state_table_without_the_index_gets_it_on_the_next_run(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL (DuckDB's state table has no index: its hash joins never use one)."""
    engine, sb, store = _synced_once(stopchurn_sandbox_factory, request, tmp_path)
    frame = table(30)
    assert len(_key_indexes(engine)) == 1  # a new state table is made with it
    _drop_indexes(engine)  # a state table made by a version without the index
    assert _key_indexes(engine) == []
    frame = churn(frame, 1)
    engine.load(frame)
    _run(engine, store, sb, 2)
    indexes = _key_indexes(engine)
    assert len(indexes) == 1, indexes
    assert "id" in str(indexes[0][1])
    for tick in (3, 4):  # idempotent: no second index, nothing sent
        again = _run(engine, store, sb, tick)
        assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
        assert _key_indexes(engine) == indexes
    # a rebaseline swaps in a new state table: it is indexed too
    engine.load(frame.assign(extra=1))
    assert _run(engine, store, sb, 5, on_schema_change="rebaseline").baseline
    assert len(_key_indexes(engine)) == 1
    assert_sandbox_matches(sb, frame)


def test_the_counts_the_safeguards_see_are_the_one_query_diffs(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Inserts, updates, deletes, unchanged rows, and rows a lost acknowledgement left dirty (inserted and
    updated): the narrow diff's counts equal the one-query diff's, with and without ``update_all``."""
    frame = table(40)
    sb, store = _synced(engine, stopchurn_sandbox_factory, tmp_path, frame)
    moved = churn(frame, 1)
    engine.load(moved)
    sb.set_faults(FaultConfig(drop_after_apply_rate=1.0))  # applied, never acknowledged: dirty rows
    with pytest.raises(DeliveryError):
        _run(engine, store, sb, 2)
    sb.set_faults(FaultConfig())
    final = churn(moved, 2)
    engine.load(final)
    warehouse = engine.warehouse()
    try:
        state = _state(engine)
        meta = read_meta(warehouse, state)
        assert meta is not None
        dirty = warehouse.rows(f"SELECT COUNT(*) FROM {state.qualified} WHERE {S.q(S.HASH)} LIKE 'dirty:%'")[0][0]
        assert dirty > 0
        schema = _source_schema(warehouse, state, QUERY, options())
        for update_all in (False, True):
            opts = options(max_delete_fraction=1.0)
            one = _decide(warehouse, state, QUERY, schema, meta, opts)
            if update_all:
                meta.columns = {**meta.columns, "gone": "int64"}  # a column dropped: on_schema_change sends all
                opts = options(max_delete_fraction=1.0, on_schema_change="update_all")
                one = _decide(warehouse, state, QUERY, schema, meta, opts)
            scratch = state.scratch("counts")
            narrow = _decide(warehouse, state, QUERY, schema, meta, opts, scratch)
            assert narrow.update_all == one.update_all == update_all
            assert narrow.counts == one.counts
            expected = {"insert", "update", "delete"} | (set() if update_all else {"unchanged"})
            assert set(one.counts) == expected
            warehouse.execute([f"DROP TABLE {scratch}"])
    finally:
        warehouse.close()
    # the safeguard trips on the same numbers in a dry run (one query) and a real run (the narrow diff)
    messages = []
    for dry_run in (True, False):
        with pytest.raises(SafeguardError) as err:
            _run(engine, store, sb, 3, max_delete_fraction=0.01, dry_run=dry_run)
        messages.append(str(err.value).splitlines()[0])
    assert messages[0] == messages[1]
    _run(engine, store, sb, 4, max_delete_fraction=1.0)
    assert_sandbox_matches(sb, final)
    assert _scratch_tables(engine) == []


def test_a_stale_scratch_table_is_dropped_and_never_read(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A scratch table left by a killed try (here: one claiming every key changed) is dropped by the next run,
    which diffs into its own."""
    frame = table(30)
    sb, store = _synced(engine, stopchurn_sandbox_factory, tmp_path, frame)
    state = _state(engine)
    stale = state.scratch("0123456789ab")
    engine.execute(
        f'CREATE TABLE {stale} AS SELECT CAST("id" AS TEXT) AS "{S.key_text(0)}", \'delete\' AS "{S.OP}", '
        f'1 AS "{S.IN_STATE}" FROM src'
    )
    assert _scratch_tables(engine) == [state.scratch_prefix + "0123456789ab"]
    moved = churn(frame, 1)
    engine.load(moved)
    summary = _run(engine, store, sb, 2)
    assert summary.deleted == len(set(frame["id"]) - set(moved["id"]))
    assert _scratch_tables(engine) == []
    assert_sandbox_matches(sb, moved)
    if engine.name == "duckdb":  # no index to keep up (see sql.INDEXED)
        assert _key_indexes(engine) == []


def test_a_try_killed_after_the_narrow_diff_leaves_it_and_the_next_run_drops_it_and_converges(
    stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Killed at every write of a churn run: at the write that made the scratch table, the try leaves it behind;
    the next run drops it, converges, and leaves no scratch table."""
    matrix = Matrix(Engine("duckdb", tmp_path / "w.duckdb"), stopchurn_sandbox_factory(record=True), KillableDuckDB)
    engine = matrix.engine
    base, second, moved = table(24), churn(table(24), 1), churn(churn(table(24), 1), 2)

    def fresh() -> SnapshotStore:
        KillableMemoryFileSystem.arm(0, "never")
        matrix.sb.reset()
        matrix.drop_state()
        engine.load(base)
        store = _store()
        matrix.run(store, 0)
        engine.load(second)
        return store

    store = fresh()
    KillableMemoryFileSystem.arm(0, "never")
    matrix.run(store, 1)
    writes = KillableMemoryFileSystem.writes
    left_behind = 0
    for n in range(1, writes + 1):
        store = fresh()
        KillableMemoryFileSystem.arm(n, "after")
        with pytest.raises(Killed):
            matrix.run(store, 1)
        KillableMemoryFileSystem.arm(0, "never")
        left_behind += len(_scratch_tables(engine))
        store.break_lock()
        engine.load(moved)
        matrix.run(store, 2)
        assert _scratch_tables(engine) == [], n
        assert_sandbox_matches(matrix.sb, moved)
        assert store.pending_plan() is None, n
        again = matrix.run(store, 3)
        assert again.inserted + again.updated + again.deleted == 0, n
    assert left_behind == 1  # the one kill right after the narrow diff was written


@pytest.mark.postgres
def test_a_key_longer_than_a_btree_entry_still_syncs_and_settles(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL: a B-tree entry holds at most ~2.7 kB, so a B-tree on the key would refuse a row with a long
    text key (at the first load, at the index a later run adds, or at a settle after the row was delivered: a run
    that fails forever). The key index must take any key the state table takes."""
    import numpy as np

    engine = next(engine_fixture("postgres", request, tmp_path))
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))

    def long_key() -> str:  # incompressible: the index cannot squeeze it under the limit
        return "".join(rng.choice(letters, 6000))

    frame = table(10).assign(id=[f"k{i}" for i in range(10)])
    engine.load(frame)
    _run(engine, store, sb, 1)
    assert len(_key_indexes(engine)) == 1
    moved = pd.concat([frame, table(2).assign(id=[long_key(), long_key()])], ignore_index=True)
    engine.load(moved)
    summary = _run(engine, store, sb, 2)
    assert summary.inserted == 2
    assert_sandbox_matches(sb, moved)
    again = _run(engine, store, sb, 3)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    # a state table made before the index, already holding a long key, gets an index all the same
    _drop_indexes(engine)
    final = moved.drop(index=[0, 10]).reset_index(drop=True)  # a short and a long key deleted
    final.loc[0, "score"] = 99.5  # updated
    final = pd.concat([final, table(1).assign(id=[long_key()])], ignore_index=True)  # inserted
    engine.load(final)
    summary = _run(engine, store, sb, 4)
    assert (summary.inserted, summary.updated, summary.deleted) == (1, 1, 2)
    assert len(_key_indexes(engine)) == 1
    assert_sandbox_matches(sb, final)


@pytest.mark.postgres
@pytest.mark.parametrize("may_create", [True, False], ids=["create-on-schema", "no-create-on-schema"])
def test_a_role_that_does_not_own_the_state_table_keeps_syncing(
    may_create: bool, stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL: only a table's owner may index it, and only a role with CREATE on the state schema may make a
    scratch table there. A state table made before it had an index, run by a role that may read and write it but
    does not own it (made by another role, or its owner changed), may or may not create tables in its schema, and
    may not drop a killed try's scratch table, syncs as it did: the index and the scratch table are
    optimisations, never a reason for every run to fail."""
    from airflow_provider_stopchurn.source.sql import postgres_uri
    from airflow_provider_stopchurn.warehouse.databases import PostgresWarehouse

    engine, sb, store = _synced_once(stopchurn_sandbox_factory, request, tmp_path)
    frame = table(30)
    _drop_indexes(engine)  # a state table made by a version without the index
    stale = _state(engine).scratch("0123456789ab")  # a killed try's, under the role that ran it (not ours)
    engine.execute(f'CREATE TABLE {stale} AS SELECT CAST("id" AS TEXT) AS "{S.key_text(0)}" FROM src')
    engine.execute("DROP ROLE IF EXISTS sc_runner")
    engine.execute("CREATE ROLE sc_runner LOGIN")
    engine.execute(f"GRANT USAGE{', CREATE' if may_create else ''} ON SCHEMA {SCHEMA} TO sc_runner")
    engine.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO sc_runner")
    engine.execute("GRANT SELECT ON src TO sc_runner")
    server = engine.handle
    uri = postgres_uri(host=server.host, port=server.port, login="sc_runner", password=None, database=server.dbname)
    for tick in (2, 3):
        frame = churn(frame, tick)
        engine.load(frame, table="src_next")  # the source is reloaded in place: the grant on it stays
        engine.execute("DELETE FROM src")
        engine.execute("INSERT INTO src SELECT * FROM src_next")
        source = WarehouseSource(QUERY, PostgresWarehouse(uri), state_schema=SCHEMA)
        opts = options(chunk_size=4, max_concurrent_requests=1)
        summary = run_warehouse_sync(source, store, make_client(sb), opts, run_ms=T0 + tick)
        assert summary.inserted == 5
        assert_sandbox_matches(sb, frame)


def test_the_cleanup_drops_only_names_a_run_makes(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A table in the state schema that merely starts like a scratch table (a user's, or another table's state
    table whose name happens to) is never dropped: only ``<prefix><12 hex digits>`` is a run's."""
    frame = table(12)
    sb, store = _synced(engine, stopchurn_sandbox_factory, tmp_path, frame)
    state = _state(engine)
    keep = [state.scratch_prefix + "keep", state.scratch_prefix + "0123456789ab_x"]
    for name in keep:
        engine.execute(f'CREATE TABLE "{SCHEMA}"."{name}" AS SELECT 1 AS one')
    stale = state.scratch_prefix + "0123456789ab"
    engine.execute(f'CREATE TABLE "{SCHEMA}"."{stale}" AS SELECT 1 AS one')
    engine.load(churn(frame, 1))
    _run(engine, store, sb, 2)
    assert _scratch_tables(engine) == sorted(keep)


@pytest.mark.postgres
def test_a_composite_key_longer_than_a_btree_entry_still_settles(
    stopchurn_sandbox_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL: a composite key whose texts add up to more than a B-tree entry holds (~2.7 kB) is delivered
    and settled, as a one-column key is (the index is a hash index on all its texts joined)."""
    import numpy as np

    engine = next(engine_fixture("postgres", request, tmp_path))
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    rng = np.random.default_rng(11)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    frame = table(6)
    engine.load(frame)
    _run(engine, store, sb, 1, key_columns=["id", "name"])
    moved = pd.concat([frame, table(1).assign(id=[99], name=["".join(rng.choice(letters, 6000))])])
    engine.load(moved.reset_index(drop=True))
    assert _run(engine, store, sb, 2, key_columns=["id", "name"]).inserted == 1
    assert _run(engine, store, sb, 3, key_columns=["id", "name"]).inserted == 0
    assert_sandbox_matches(sb, moved)
    assert "hash" in str(_key_indexes(engine)[0][1])
