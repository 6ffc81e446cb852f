"""Edges of the warehouse diff found by trying to break it: each test is a small reproduction against the sandbox
and a real DuckDB or PostgreSQL database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg2
import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options, update_requests
from pushdown_engines import Engine, engine_fixture

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import DbApiWarehouse, DuckDBWarehouse, WarehouseSource, run_warehouse_sync

KEYS = ("at",)


def _frame(n: int = 8) -> pd.DataFrame:
    at = pd.Timestamp("2026-03-29 00:30", tz="UTC") + pd.to_timedelta(range(n), unit="h")  # across a DST change
    return pd.DataFrame({"at": at, "seen": at + pd.Timedelta(minutes=7), "name": [f"row {i}" for i in range(n)]})


@pytest.fixture
def pg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_fixture("postgres", request, tmp_path)


@pytest.mark.postgres
def test_postgres_through_the_hooks_own_driver_is_pinned_to_utc(
    pg: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A postgres connection with IAM authentication (or without the ADBC driver) is diffed through the hook's
    DB-API connection: its sessions must be pinned to UTC like the ADBC ones, or a database time-zone change makes
    every timestamptz key look deleted and inserted again."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _frame()
    pg.load(frame)
    db = pg.handle.dbname
    dsn = pg.handle.dsn

    def sync(tick: int) -> Any:
        warehouse = DbApiWarehouse(lambda: psycopg2.connect(dsn), "postgres", paramstyle="format")
        source = WarehouseSource("SELECT * FROM src", warehouse)
        return run_warehouse_sync(source, store, make_client(sb), options(key_columns=KEYS), run_ms=T0 + tick)

    pg.handle.execute(f"ALTER DATABASE \"{db}\" SET timezone TO 'America/New_York'")
    assert sync(1).inserted == len(frame)
    requests = update_requests(sb)
    pg.handle.execute(f"ALTER DATABASE \"{db}\" SET timezone TO 'Asia/Kolkata'")  # new sessions see it
    second = sync(2)
    assert (second.inserted, second.updated, second.deleted) == (0, 0, 0)
    assert update_requests(sb) == requests
    assert_sandbox_matches(sb, frame, KEYS)


def _as_format_1_in_paris(engine: Engine) -> None:
    """The state table as format 1 left it: zoned key texts written in a Europe/Paris session."""
    import duckdb

    state = "stopchurn_state.b7_subscription"
    statements = [
        "SET TimeZone = 'Europe/Paris'",
        f"""UPDATE {state} SET "at" = CAST(CAST("at" AS TIMESTAMPTZ) AS TEXT)""",
        f'UPDATE {state}__meta SET "format" = 1',
    ]
    if engine.name == "duckdb":
        with duckdb.connect(str(engine.handle)) as con:
            for statement in statements:
                con.execute(statement)
    else:
        with engine.handle.connect() as con:
            for statement in statements:
                con.execute(statement)


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_fixture(request.param, request, tmp_path)


def test_a_dry_run_before_the_format_2_migration_counts_no_key_as_deleted(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A dry run writes nothing, so it cannot migrate a format-1 state table; it must not report (or refuse) every
    zoned key as deleted and inserted when the real run that follows sends nothing."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _frame()
    engine.load(frame)
    source = lambda: WarehouseSource("SELECT * FROM src", engine.warehouse())  # noqa: E731
    run_warehouse_sync(source(), store, make_client(sb), options(key_columns=KEYS), run_ms=T0)
    _as_format_1_in_paris(engine)
    dry = run_warehouse_sync(source(), store, None, options(key_columns=KEYS, dry_run=True), run_ms=T0 + 1)
    assert (dry.inserted, dry.updated, dry.deleted) == (0, 0, 0)
    real = run_warehouse_sync(source(), store, make_client(sb), options(key_columns=KEYS), run_ms=T0 + 2)
    assert (real.inserted, real.updated, real.deleted) == (0, 0, 0)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("values", "cast"),
    [
        (pd.date_range("2026-03-01", periods=8).date, "DATE"),
        (pd.Timestamp("2026-03-29 00:30", tz="UTC") + pd.to_timedelta(range(8), unit="h"), "TIMESTAMPTZ"),
    ],
    ids=["date", "timestamptz"],
)
def test_a_format_1_state_table_of_a_non_iso_datestyle_database_is_migrated_without_resending_keys(
    pg: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path, values: Any, cast: str
) -> None:
    """Format-1 sessions wrote key texts in the database's own DateStyle ('SQL, DMY': ``29/03/2026``) and zone;
    the migration reads them back in that style: no key looks deleted and inserted (a date key), and the migration
    does not fail on every run (a timestamptz key, whose old text the pinned style cannot read)."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = pd.DataFrame({"k": values, "name": [f"d{i}" for i in range(8)]})
    pg.load(frame)
    source = lambda: WarehouseSource("SELECT * FROM src", pg.warehouse())  # noqa: E731
    run_warehouse_sync(source(), store, make_client(sb), options(key_columns=("k",)), run_ms=T0)
    db = pg.handle.dbname
    pg.handle.execute(
        f"ALTER DATABASE \"{db}\" SET DateStyle TO 'SQL, DMY'",
        f"ALTER DATABASE \"{db}\" SET timezone TO 'Europe/Paris'",
    )
    with pg.handle.connect() as con:  # the state table as format 1 left it in that database's sessions
        con.execute(f'UPDATE stopchurn_state.b7_subscription SET "k" = CAST(CAST("k" AS {cast}) AS TEXT)')
        con.execute('UPDATE stopchurn_state.b7_subscription__meta SET "format" = 1')
        assert "/" in con.execute('SELECT "k" FROM stopchurn_state.b7_subscription LIMIT 1').fetchone()[0]
    after = run_warehouse_sync(source(), store, make_client(sb), options(key_columns=("k",)), run_ms=T0 + 1)
    assert (after.inserted, after.deleted) == (0, 0)  # the row hashes changed with the style: updates, once
    assert pg.rows('SELECT "format" FROM stopchurn_state.b7_subscription__meta') == [(3,)]  # values kept
    again = run_warehouse_sync(source(), store, make_client(sb), options(key_columns=("k",)), run_ms=T0 + 2)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert_sandbox_matches(sb, frame, ("k",))


class _PausingDuckDB(DuckDBWarehouse):
    """A DuckDB warehouse that stops before it writes a batch of a baseline into ``..__next`` (as a worker paused
    by the operating system would), until the test lets it go on."""

    def __init__(self, database: str, paused: threading.Event, go: threading.Event) -> None:
        super().__init__(database)
        self.paused, self.go = paused, go

    def execute(self, statements: Any) -> None:
        if any(s.startswith("INSERT INTO") and "__next" in s for s in statements) and not self.go.is_set():
            self.paused.set()
            assert self.go.wait(60)
        DuckDBWarehouse.execute(self, statements)


def test_a_baseline_that_lost_its_lease_never_writes_into_the_new_owners_state(
    stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The worker of run a pauses inside its baseline for longer than its lease; run b takes the table and builds
    its own baseline. Run a, going on, must not write its rows into run b's scratch table (b would swap in a state
    table holding every key twice)."""
    duck = Engine("duckdb", tmp_path / "w.duckdb")
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    old = pd.DataFrame({"id": list(range(1, 9)), "plan": ["free"] * 8})
    duck.load(old)
    events = {name: (threading.Event(), threading.Event()) for name in ("a", "b")}
    errors: dict[str, BaseException] = {}

    def run(name: str) -> None:
        warehouse = _PausingDuckDB(str(duck.handle), *events[name])
        opts = options(initial_load="baseline", holder=f"run-{name}", lock_ttl_s=60)
        try:
            run_warehouse_sync(WarehouseSource("SELECT * FROM src", warehouse), store, make_client(sb), opts)
        except BaseException as err:  # kept for the assertions
            errors[name] = err

    a = threading.Thread(target=run, args=("a",))
    a.start()
    assert events["a"][0].wait(60)  # run a is paused inside its baseline
    store.break_lock()  # its lease is gone (it expired while the worker was paused)
    duck.load(pd.DataFrame({"id": list(range(1, 7)), "plan": ["pro"] * 6}))  # the source moved on
    b = threading.Thread(target=run, args=("b",))
    b.start()
    assert events["b"][0].wait(60)  # run b holds the lock and builds its baseline
    events["a"][1].set()
    a.join(60)
    events["b"][1].set()
    b.join(60)
    assert "b" not in errors and "a" in errors
    state = "stopchurn_state.b7_subscription"
    assert duck.rows(f'SELECT "id", COUNT(*) FROM {state} GROUP BY "id" HAVING COUNT(*) > 1') == []
    assert duck.rows("SELECT COUNT(*) FROM stopchurn_state.b7_subscription") == [(6,)]
