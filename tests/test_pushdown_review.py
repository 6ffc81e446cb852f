"""Edges of the warehouse diff found by trying to break it: each test is a small reproduction against the sandbox
and a real DuckDB or PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg2
import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options, update_requests
from pushdown_engines import Engine, engine_fixture

from airflow_provider_stopchurn.pushdown import DbApiWarehouse, WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.snapshot import SnapshotStore

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
