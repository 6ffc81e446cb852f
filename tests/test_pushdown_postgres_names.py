"""The warehouse diff's tables on a real PostgreSQL, with a second session in the way: a stale scratch table
another session holds a lock on does not hold up the run, an older state table's key index is built without
waiting long for a lock another session holds, and state-table names PostgreSQL would cut at 63 bytes keep a table
(and a bookkeeping table) of their own while every shorter name stays as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from pushdown_engines import Engine, engine_fixture
from test_pushdown import churn, table
from test_pushdown_narrow import SCHEMA, _drop_indexes, _scratch_tables, _state

from airflow_provider_stopchurn.exceptions import SnapshotLockedError
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import PostgresWarehouse, WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse import sql as S

pytestmark = pytest.mark.postgres

#: how long the test waits for a run that should not be waiting on another session (a bound, not a measure)
PATIENCE_S = 90.0


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    yield from engine_fixture("postgres", request, tmp_path)


def _run(engine: Engine, store: SnapshotStore, sb: Any, tick: int, **opts: Any) -> Any:
    opts.setdefault("chunk_size", 7)
    opts.setdefault("max_concurrent_requests", 1)
    return run_warehouse_sync(
        WarehouseSource("SELECT * FROM src", engine.warehouse()),
        store,
        make_client(sb),
        options(**opts),
        run_ms=T0 + tick,
    )


class _Background:
    """A run in a thread of its own, so the test can act (and release the other session) while it waits."""

    def __init__(self, target: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(target,), daemon=True)
        self.thread.start()

    def _main(self, target: Any) -> None:
        try:
            self.result = target()
        except BaseException as err:  # handed to the test
            self.error = err

    def finished_within(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return not self.thread.is_alive()


def _waiting(engine: Engine, run: _Background, others: int) -> None:
    """Until a session besides the test's ``others`` waits for a lock, or the run ended (bounded)."""
    for _ in range(int(PATIENCE_S / 0.05)):
        ((waiting,),) = engine.rows("SELECT COUNT(*) FROM pg_locks WHERE NOT granted")
        if int(waiting) > others or not run.thread.is_alive():
            return
        time.sleep(0.05)


def _while_another_session_reads(engine: Engine, table: str, target: Any) -> _Background:
    """``target`` run in the background while a second session holds a lock on ``table`` (it read from it in a
    transaction left open), which ends once the run ended or :data:`PATIENCE_S` passed; the run must have ended
    without waiting for the lock."""
    holder = engine.handle.connect(autocommit=False)
    try:
        holder.execute(f"SELECT * FROM {table}")  # its lock is held until the transaction ends
        run = _Background(target)
        finished = run.finished_within(PATIENCE_S)
    finally:
        holder.rollback()
        holder.close()
    assert run.finished_within(PATIENCE_S)
    assert finished, "the run waited for the other session's lock"
    return run


def test_a_stale_scratch_table_another_session_locks_is_left_with_a_warning(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed try's scratch table a second session reads from (holding a lock the DROP waits for): the DROP
    gives up after ``lock_timeout``, the run delivers, and the next run drops it."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    _run(engine, store, sb, 1)
    stale = _state(engine).scratch("0123456789ab")
    engine.execute(f"CREATE TABLE {stale} AS SELECT 1 AS x")
    moved = churn(frame, 1)
    engine.load(moved)
    with caplog.at_level(logging.WARNING, logger="airflow_provider_stopchurn.warehouse.engine"):
        run = _while_another_session_reads(engine, stale, lambda: _run(engine, store, sb, 2))
    assert run.error is None, run.error
    assert_sandbox_matches(sb, moved)
    assert any(
        "Could not drop the scratch table" in r.getMessage() and "lock" in r.getMessage() for r in caplog.records
    )
    assert _scratch_tables(engine) == [stale.split(".")[1].strip('"')]
    again = _run(engine, store, sb, 3)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert _scratch_tables(engine) == []


def _valid_key_indexes(engine: Engine) -> list[bool]:
    name = _state(engine).short() + "__key"
    rows = engine.rows(
        "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
        f"JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = '{SCHEMA}' AND c.relname = '{name}'"
    )
    return [bool(v) for (v,) in rows]


def _synced_without_index(engine: Engine, store: SnapshotStore, sb: Any) -> pd.DataFrame:
    """A 30-row table synced once, its state table then stripped of its key index (as an older version made it)."""
    frame = table(30)
    engine.load(frame)
    _run(engine, store, sb, 1)
    _drop_indexes(engine)
    return frame


def test_an_older_state_tables_index_waits_a_bounded_time_for_a_session_that_locks_the_table(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A state table without its key index (made by an older version) while a second session holds a write lock
    on it: the build gives up after ``lock_timeout`` with a warning, the run delivers, and the next run builds it."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _synced_without_index(engine, store, sb)
    state = _state(engine).qualified
    moved = churn(frame, 1)
    engine.load(moved)
    holder = engine.handle.connect(autocommit=False)
    try:
        holder.execute(f"LOCK TABLE {state} IN ROW EXCLUSIVE MODE")  # a writer's open transaction
        run = _Background(lambda: _run(engine, store, sb, 2))
        assert run.finished_within(PATIENCE_S), "the index build waited for the other session's lock"
        indexes = _valid_key_indexes(engine)
    finally:
        holder.rollback()
        holder.close()
    assert run.error is None, run.error
    assert indexes == []
    assert_sandbox_matches(sb, moved)
    again = _run(engine, store, sb, 3)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert _valid_key_indexes(engine) == [True]


def _frame(n: int, seed: int, offset: int = 0) -> pd.DataFrame:
    frame = table(n, seed)
    return frame.assign(id=frame["id"] + offset)


def test_two_tables_alike_in_their_first_63_bytes_keep_state_tables_of_their_own(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Two table names whose state tables PostgreSQL would cut to one name (and whose bookkeeping table would be
    cut onto the state table itself) each sync on their own, twice."""
    sb = stopchurn_sandbox_factory(record=True)
    names = ["t" * 70 + "_a", "t" * 70 + "_b"]
    frames = {names[0]: _frame(30, 0), names[1]: _frame(20, 1, offset=1000)}
    stores = {name: SnapshotStore(tmp_path / name[-1], BRAND, name) for name in names}
    for tick in (1, 2):
        for name in names:
            engine.load(frames[name])
            _run(engine, stores[name], sb, tick, table_name=name)
            assert_sandbox_matches(sb, frames[name], table=name)
            frames[name] = churn(frames[name], tick)
    tables = engine.rows(f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{SCHEMA}'")
    state_names = {S.state_table_name(BRAND, n, "postgres") for n in names}
    assert len(state_names) == 2
    assert all(len(n) < S.PG_IDENTIFIER_BYTES for n in state_names)
    assert state_names <= {str(t) for (t,) in tables}


@pytest.mark.parametrize("length", [56, 60, 61, 62])
def test_a_state_name_near_63_bytes_keeps_its_name_and_survives_a_rebaseline(
    length: int, engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Below 63 bytes the state table keeps the name it always had (an existing one is found), and the scratch
    table a rebaseline builds in is not cut onto the bookkeeping table's name (61, 62) or onto another plan's
    (56 and up): a rebaseline and a churn run after it deliver the source."""
    sb = stopchurn_sandbox_factory(record=True)
    name = "t" * (length - len(f"b{BRAND}_"))
    store = SnapshotStore(tmp_path / "s", BRAND, name)
    frame = table(30)
    engine.load(frame)
    _run(engine, store, sb, 1, table_name=name)
    frame = churn(frame, 1).assign(tier="gold")  # a new column: rebaselined, nothing sent
    engine.load(frame)
    summary = _run(engine, store, sb, 2, table_name=name, on_schema_change="rebaseline")
    assert summary.baseline
    frame = churn(frame, 2)
    engine.load(frame)
    _run(engine, store, sb, 3, table_name=name)
    tables = engine.rows(f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{SCHEMA}'")
    assert f"b{BRAND}_{name}" in {str(t) for (t,) in tables}  # the name every version gave it
    again = _run(engine, store, sb, 4, table_name=name)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)


def test_a_long_named_first_load_an_older_version_delivered_is_settled_after_the_upgrade(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Before state names were shortened, a first load of a table whose state name PostgreSQL cuts at 63 bytes
    delivered every row, then failed writing its bookkeeping row (its table's name was cut onto the state table's
    own): a pending plan, and a state table under the cut name. After the upgrade the next run must go on (settle
    it into the state table it finds, or start again) without editing the store, and deliver the source."""
    sb = stopchurn_sandbox_factory(record=True)
    name = "t" * 70
    store = SnapshotStore(tmp_path / "s", BRAND, name)
    state = S.state_table_name(BRAND, name, "postgres")
    older = S.state_table_name(BRAND, name)[: S.PG_IDENTIFIER_BYTES]  # the name the older version's table has
    # the older version's failure, reproduced: its bookkeeping row had no table of its own to go into
    engine.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"; CREATE TABLE "{SCHEMA}"."{state}__meta" (x INT)')
    frame = table(30)
    engine.load(frame)
    with pytest.raises(Exception, match="more expressions than target columns"):
        _run(engine, store, sb, 1, table_name=name)
    assert store.pending_plan() is not None
    assert len(sb.received()) > 0  # delivered before the bookkeeping failed
    engine.execute(f'DROP TABLE "{SCHEMA}"."{state}__meta"; ALTER TABLE "{SCHEMA}"."{state}" RENAME TO "{older}"')
    for tick in (2, 3):
        _run(engine, store, sb, tick, table_name=name)
        assert_sandbox_matches(sb, frame, table=name)
        frame = churn(frame, tick)
        engine.load(frame)


def test_an_older_state_tables_index_is_built_while_another_table_is_read_in_a_long_transaction(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A state table without its key index while a second session reads an unrelated table in an open
    transaction (a report, a dump): nothing holds a lock on the state table, so the run builds its index (a build
    that gave up would be redone, in full, by every run while such a session is open)."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _synced_without_index(engine, store, sb)
    engine.execute("CREATE TABLE report AS SELECT 1 AS x")
    moved = churn(frame, 1)
    engine.load(moved)
    reader = engine.handle.connect(autocommit=False)
    try:
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT * FROM report")  # its snapshot is held until the transaction ends
        run = _Background(lambda: _run(engine, store, sb, 2))
        assert run.finished_within(PATIENCE_S)
        indexes = _valid_key_indexes(engine)
    finally:
        reader.rollback()
        reader.close()
    assert run.error is None, run.error
    assert_sandbox_matches(sb, moved)
    assert indexes == [True]


@pytest.mark.parametrize("schema", ["s" * 70, "s" * 62 + "é" + "s" * 5], ids=["ascii", "cut inside a character"])
def test_a_state_schema_postgres_cuts_at_63_bytes_syncs_on_every_run(
    schema: str, engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """PostgreSQL cuts a ``state_schema`` of 63 bytes or more to its first 63 (at a character's boundary) where it
    is an identifier, but not where it is compared as a value (a privilege check, the catalog): every run after the
    first failed with "schema ... does not exist". Each run now finds the schema the first one made."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    for tick in (1, 2, 3):
        engine.load(frame)
        run_warehouse_sync(
            WarehouseSource("SELECT * FROM src", engine.warehouse(), state_schema=schema),
            store,
            make_client(sb),
            options(chunk_size=7, max_concurrent_requests=1),
            run_ms=T0 + tick,
        )
        assert_sandbox_matches(sb, frame)
        frame = churn(frame, tick)
    cut = schema.encode()[: S.PG_IDENTIFIER_BYTES].decode(errors="ignore")
    ((held,),) = engine.rows(f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{cut}'")
    assert int(held) >= 2  # the state table and its bookkeeping table, in the schema PostgreSQL made


class _Killed(Exception):
    """The worker dying (raised in place of a statement, so nothing after it runs)."""


class _KilledAtTheSwap(PostgresWarehouse):
    """A PostgreSQL warehouse whose worker dies when it is about to swap a baseline's scratch table in."""

    def execute(self, statements: Any) -> None:
        if any("RENAME TO" in s for s in statements):
            raise _Killed
        PostgresWarehouse.execute(self, statements)


def _next_tables(engine: Engine) -> list[str]:
    rows = engine.rows(f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{SCHEMA}'")
    return sorted(str(t) for (t,) in rows if "__next" in str(t))


def test_an_interrupted_baselines_scratch_table_another_session_locks_fails_the_run_in_bounded_time(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A baseline killed before its swap leaves its plan and its own scratch table; the next run drops that table.
    A second session reading it (holding a lock the DROP waits for) held that run up for as long as the session
    lived. The DROP now gives up after ``lock_timeout`` with an error naming the table, the plan stays, and the
    run after the session ends drops the table and syncs."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    _run(engine, store, sb, 1)
    frame = frame.assign(tier="gold")  # a new column: the run rebaselines
    engine.load(frame)
    with pytest.raises(_Killed):
        run_warehouse_sync(
            WarehouseSource("SELECT * FROM src", _KilledAtTheSwap(engine.uri())),
            store,
            make_client(sb),
            options(on_schema_change="rebaseline"),
            run_ms=T0 + 2,
        )
    store.break_lock()
    assert store.pending_plan(cleanup=False) is not None
    (left,) = _next_tables(engine)
    rebaseline = lambda: _run(engine, store, sb, 3, on_schema_change="rebaseline")  # noqa: E731
    run = _while_another_session_reads(engine, f'"{SCHEMA}"."{left}"', rebaseline)
    assert run.error is not None and left in str(run.error) and "lock" in str(run.error)
    assert store.pending_plan(cleanup=False) is not None  # kept: the next run drops the table, then goes on
    store.break_lock()
    requests = len(sb.received())
    assert _run(engine, store, sb, 4, on_schema_change="rebaseline").baseline
    assert _next_tables(engine) == []
    assert store.pending_plan(cleanup=False) is None
    assert len(sb.received()) == requests  # a baseline sends nothing
    again = _run(engine, store, sb, 5)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)


def test_an_interrupted_baselines_scratch_table_locked_then_freed_lets_the_next_run_sync_without_help(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The run the other session's lock failed leaves no LOCK and its plan; the run after the session ended drops
    the table and syncs, with nobody breaking a lock by hand between them."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    _run(engine, store, sb, 1)
    frame = frame.assign(tier="gold")
    engine.load(frame)
    with pytest.raises(_Killed):
        run_warehouse_sync(
            WarehouseSource("SELECT * FROM src", _KilledAtTheSwap(engine.uri())),
            store,
            make_client(sb),
            options(on_schema_change="rebaseline"),
            run_ms=T0 + 2,
        )
    store.break_lock()  # the killed worker's lease (its process is this test's, so it would look alive)
    (left,) = _next_tables(engine)
    rebaseline = lambda: _run(engine, store, sb, 3, on_schema_change="rebaseline")  # noqa: E731
    run = _while_another_session_reads(engine, f'"{SCHEMA}"."{left}"', rebaseline)
    assert run.error is not None
    assert store.read_lock() is None, "the failed run released its lock"
    assert store.pending_plan(cleanup=False) is not None
    assert _run(engine, store, sb, 4, on_schema_change="rebaseline").baseline
    assert _next_tables(engine) == [] and store.pending_plan(cleanup=False) is None
    again = _run(engine, store, sb, 5)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)


def test_an_interrupted_baselines_scratch_table_that_cannot_be_dropped_for_another_cause_is_not_called_locked(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The leftover scratch table of an interrupted baseline that a view depends on: its DROP fails at once, not
    for a lock. The run says why (not "another session may hold a lock", a retryable error the user would wait
    on); once the view is gone the next run drops the table and syncs."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = table(30)
    engine.load(frame)
    _run(engine, store, sb, 1)
    engine.load(frame.assign(tier="gold"))
    with pytest.raises(_Killed):
        run_warehouse_sync(
            WarehouseSource("SELECT * FROM src", _KilledAtTheSwap(engine.uri())),
            store,
            make_client(sb),
            options(on_schema_change="rebaseline"),
            run_ms=T0 + 2,
        )
    store.break_lock()
    (left,) = _next_tables(engine)
    engine.execute(f'CREATE VIEW public.peek AS SELECT * FROM "{SCHEMA}"."{left}"')
    with pytest.raises(Exception) as raised:
        _run(engine, store, sb, 3, on_schema_change="rebaseline")
    assert not isinstance(raised.value, SnapshotLockedError), str(raised.value)
    assert "peek" in str(raised.value) or "depend" in str(raised.value)
    assert store.pending_plan(cleanup=False) is not None
    engine.execute("DROP VIEW public.peek")
    assert _run(engine, store, sb, 4, on_schema_change="rebaseline").baseline
    assert _next_tables(engine) == [] and store.pending_plan(cleanup=False) is None
