"""Time in the warehouse diff: what is sent never depends on the session time zone (the key texts and row hashes
are computed in a session pinned to UTC), and the state tokens are strictly ordered run after run, whatever the
clock says.

Each time-zone test syncs a table whose key and data hold ``timestamptz`` values, changes the zone the database
(or the worker) gives a new session, and checks that the next run finds nothing to send.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options, update_requests
from pushdown_engines import Engine, engine_fixture

from airflow_provider_stopchurn import cli
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse.settle import token_order

KEYS = ("at",)


def _frame(n: int = 12) -> pd.DataFrame:
    at = pd.Timestamp("2026-03-29 00:30", tz="UTC") + pd.to_timedelta(range(n), unit="h")  # across a DST change
    return pd.DataFrame(
        {
            "at": at,
            "seen": at + pd.Timedelta(minutes=7, microseconds=123),
            "day": at.date,
            "name": [f"row {i}" for i in range(n)],
        }
    )


def _sync(engine: Engine, store: SnapshotStore, sb: Any, tick: int, warehouse: Any = None) -> Any:
    source = WarehouseSource("SELECT * FROM src", warehouse or engine.warehouse())
    opts = options(key_columns=KEYS, chunk_size=5)
    return run_warehouse_sync(source, store, make_client(sb), opts, run_ms=T0 + tick)


def _sends_nothing(summary: Any) -> None:
    assert (summary.inserted, summary.updated, summary.deleted, summary.chunks) == (0, 0, 0, 0)


@pytest.fixture
def duck(tmp_path: Path) -> Engine:
    return Engine("duckdb", tmp_path / "w.duckdb")


@pytest.fixture
def pg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_fixture("postgres", request, tmp_path)


@pytest.mark.postgres
def test_postgres_database_time_zone_change_sends_nothing(
    pg: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _frame()
    pg.load(frame)
    db = pg.handle.dbname
    pg.handle.execute(f"ALTER DATABASE \"{db}\" SET timezone TO 'America/New_York'")
    first = _sync(pg, store, sb, 1)
    assert first.inserted == len(frame)
    assert_sandbox_matches(sb, frame, KEYS)
    requests = update_requests(sb)
    pg.handle.execute(f"ALTER DATABASE \"{db}\" SET timezone TO 'Asia/Kolkata'")  # new sessions see it
    _sends_nothing(_sync(pg, store, sb, 2))
    pg.handle.execute(f'ALTER DATABASE "{db}" RESET timezone')
    _sends_nothing(_sync(pg, store, sb, 3))
    assert update_requests(sb) == requests
    assert_sandbox_matches(sb, frame, KEYS)


def test_duckdb_session_time_zone_change_sends_nothing(
    duck: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """A connection handed to the warehouse with its own ``TimeZone``; the caller's setting is left as it was."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _frame()
    duck.load(frame)
    for tick, zone in enumerate(["Europe/Paris", "Pacific/Auckland", "UTC"], start=1):
        con = duckdb.connect(str(duck.handle))
        try:
            con.execute(f"SET TimeZone = '{zone}'")
            summary = _sync(duck, store, sb, tick, DuckDBWarehouse(con))
            assert con.sql("SELECT current_setting('TimeZone')").fetchall() == [(zone,)]
        finally:
            con.close()
        if tick == 1:
            assert summary.inserted == len(frame)
            requests = update_requests(sb)
        else:
            _sends_nothing(summary)
    assert update_requests(sb) == requests
    assert_sandbox_matches(sb, frame, KEYS)


def test_duckdb_worker_with_another_tz_sends_nothing(
    duck: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose ``TZ`` differs: DuckDB gives its new sessions that zone."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _frame()
    duck.load(frame)
    assert _sync(duck, store, sb, 1).inserted == len(frame)
    requests = update_requests(sb)
    try:
        for tick, zone in enumerate(["Asia/Tokyo", "America/Los_Angeles"], start=2):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            with duckdb.connect(str(duck.handle)) as con:  # the zone a new session gets
                assert con.sql("SELECT current_setting('TimeZone')").fetchall() == [(zone,)]
            _sends_nothing(_sync(duck, store, sb, tick))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert update_requests(sb) == requests
    assert_sandbox_matches(sb, frame, KEYS)


def test_tokens_are_strictly_ordered_run_after_run(
    duck: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Runs in quick succession (several a second): each commit's token is greater than the one before, as text
    and as :func:`token_order` reads it."""
    sb = stopchurn_sandbox_factory()
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _frame(6)
    tokens: list[str] = []
    for tick in range(1, 13):
        frame = frame.assign(name=[f"row {i} run {tick}" for i in range(len(frame))])
        duck.load(frame)
        _sync(duck, store, sb, tick)
        current = store.read_current()
        assert current is not None
        tokens.append(str(current["version"]))
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    orders = [token_order(t) for t in tokens]
    assert all(a < b for a, b in itertools.pairwise(orders))


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("20260101T000000-ffffffffffff", "20260101T000001-000000000000"),  # tokens written before ordering
        ("20260101T000000-ffffffffffff", "20260101T000000.000000001-000000000000"),  # old, then new, one second
        ("20260101T000000.000000001-ffffffffffff", "20260101T000000.000000002-000000000000"),
        ("20251231T235959.999999999-aaaaaaaaaaaa", "20260101T000000-000000000000"),
    ],
)
def test_token_order_reads_old_and_new_tokens(older: str, newer: str) -> None:
    assert token_order(older) < token_order(newer)
    assert older < newer  # the text sorts the same way (the CLI compares what it prints)


def test_token_order_refuses_what_is_not_a_token() -> None:
    with pytest.raises(ValueError, match="not a state token"):
        token_order("v1")


def test_reconcile_tells_an_older_state_table_within_one_second(
    duck: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warehouse restored from a backup taken moments before the last run: adopting its state table is
    reported as older than the store's record, every time."""
    import json
    import shutil

    sb = stopchurn_sandbox_factory()
    root = tmp_path / "s"
    store = SnapshotStore(root, BRAND, TABLE)
    frame = _frame(6)
    duck.load(frame)
    _sync(duck, store, sb, 1)
    shutil.copy(duck.handle, tmp_path / "backup.duckdb")
    duck.load(frame.assign(name="changed"))
    _sync(duck, store, sb, 2)
    shutil.copy(tmp_path / "backup.duckdb", duck.handle)
    capsys.readouterr()
    argv = ["reconcile", str(root), "--brand", str(BRAND), "--table", TABLE, "--duckdb", str(duck.handle)]
    assert cli.main([*argv, "--adopt-state", "--yes", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert token_order(result["state_token"]) < token_order(result["store_version"])
    assert "older than the store's record" in result["message"]


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_fixture(request.param, request, tmp_path)


def test_a_format_1_state_table_from_another_zone_is_migrated_without_resending_keys(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Before sessions were pinned, a zoned key was kept as text in the session's zone (here Europe/Paris). The
    upgrade rewrites those texts as the same instants in UTC: no key looks deleted and inserted again."""
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = _frame()
    engine.load(frame)
    _sync(engine, store, sb, 1)
    state = "stopchurn_state.b7_subscription"
    # the state table as format 1 left it in a Europe/Paris session
    zone = "SET TimeZone = 'Europe/Paris'" if engine.name == "duckdb" else "SET TIME ZONE 'Europe/Paris'"
    rewrite = f"""UPDATE {state} SET "at" = CAST(CAST("at" AS TIMESTAMPTZ) AS TEXT)"""
    old_format = f'UPDATE {state}__meta SET "format" = 1'
    if engine.name == "duckdb":
        with duckdb.connect(str(engine.handle)) as con:
            con.execute(zone)
            con.execute(rewrite)
            con.execute(old_format)
    else:
        with engine.handle.connect() as con:
            con.execute(zone)
            con.execute(rewrite)
            con.execute(old_format)
    assert all(
        str(t).endswith("+01") or str(t).endswith("+02") for (t,) in engine.rows(f"""SELECT "at" FROM {state}""")
    )
    requests = update_requests(sb)
    _sends_nothing(_sync(engine, store, sb, 2))
    assert update_requests(sb) == requests
    assert engine.rows(f'SELECT "format" FROM {state}__meta') == [(3,)]  # rows kept as values: format 3
    assert all(str(t).endswith("+00") for (t,) in engine.rows(f"""SELECT "at" FROM {state}"""))
    assert_sandbox_matches(sb, frame, KEYS)
