"""Event windows do not depend on time zones: a PostgreSQL database whose sessions run in Europe/Paris (through
ADBC and through the hook's own driver), a SQLite source read by epoch milliseconds, and naive pandas datetimes in
a worker whose ``TZ`` is not UTC. Every case is a late-but-inside-the-window row that must be sent, once.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_events import deposit_options
from helpers_sync import make_client

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import Window, event_store
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.events.summary import EventSummary
from airflow_provider_stopchurn.sandbox import SandboxServer

BRAND = 11
NOW = int(pd.Timestamp("2025-01-02", tz="UTC").value // 10**6)


def options(watermark_column: str = "created_at") -> EventOptions:
    return deposit_options(
        BRAND,
        watermark_column=watermark_column,
        lookback=dt.timedelta(0),
        max_concurrent_requests=1,
    )


def sent_values(sb: SandboxServer) -> list[int]:
    return sorted(e["value"] for e in sb.events(BRAND))


@pytest.fixture
def sb(stopchurn_sandbox_factory: Callable[..., SandboxServer]) -> SandboxServer:
    return stopchurn_sandbox_factory()


def run(source: Any, root: Path, sb: SandboxServer, column: str = "created_at") -> EventSummary:
    return run_events(source, event_store(root, BRAND, "tz"), make_client(sb), options(column), now_ms=NOW)


# --- PostgreSQL, a database in Europe/Paris --------------------------------------------------------------------------
TABLE = """CREATE TABLE deposits (
    deposit_id int PRIMARY KEY, user_id int NOT NULL, amount int NOT NULL,
    created_at timestamp without time zone NOT NULL, created_tz timestamptz NOT NULL)"""
QUERY = "SELECT deposit_id, user_id, amount, {column} FROM deposits WHERE {column} >= %(since)s ORDER BY deposit_id"


def _insert(db: Any, rows: list[tuple[int, str]]) -> None:
    """Deposits with their time as UTC wall-clock text, in both columns (the naive one holds UTC, as documented)."""
    values = ", ".join(f"({i}, {i % 3}, {i * 10}, '{at}', '{at}+00')" for i, at in rows)
    db.execute(f"INSERT INTO deposits VALUES {values}")


@pytest.fixture
def paris_db(postgres_database: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    from pg_plugin import set_airflow_postgres_conn

    postgres_database.execute(f"ALTER DATABASE \"{postgres_database.dbname}\" SET timezone = 'Europe/Paris'")
    postgres_database.execute(TABLE)
    yield postgres_database, set_airflow_postgres_conn(monkeypatch, postgres_database, "stopchurn_events_paris")


def _adbc(conn_id: str, column: str) -> Callable[[Window], Any]:
    from airflow_provider_stopchurn.operators.stopchurn import read_sql

    return lambda window: read_sql(conn_id, QUERY.format(column=column), window.parameters())


def _hook(conn_id: str, column: str) -> Callable[[Window], Any]:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from airflow_provider_stopchurn.source.sql import read_dbapi

    return lambda window: read_dbapi(
        PostgresHook(postgres_conn_id=conn_id), QUERY.format(column=column), window.parameters()
    )


@pytest.mark.postgres
@pytest.mark.parametrize("reader", [_adbc, _hook], ids=["adbc", "hook driver"])
@pytest.mark.parametrize("column", ["created_at", "created_tz"], ids=["timestamp", "timestamptz"])
def test_a_row_just_after_the_watermark_is_sent_whatever_the_database_time_zone(
    paris_db: tuple[Any, str], sb: SandboxServer, tmp_path: Path, reader: Any, column: str
) -> None:
    db, conn_id = paris_db
    _insert(db, [(1, "2025-01-01 10:00:00"), (2, "2025-01-01 11:00:00")])
    first = run(reader(conn_id, column), tmp_path, sb, column)
    assert (first.sent, first.watermark) == (2, "2025-01-01T11:00:00.000Z")
    _insert(db, [(3, "2025-01-01 11:30:00"), (4, "2025-01-01 11:00:00.001")])  # just after the watermark
    second = run(reader(conn_id, column), tmp_path, sb, column)
    assert (second.sent, second.duplicates, second.before_window) == (2, 1, 0)
    assert second.watermark == "2025-01-01T11:30:00.000Z"
    assert sent_values(sb) == [10, 20, 30, 40]  # each once


@pytest.mark.postgres
def test_a_set_time_zone_in_the_query_still_wins(paris_db: tuple[Any, str]) -> None:
    from airflow_provider_stopchurn.operators.stopchurn import read_sql

    _db, conn_id = paris_db
    batches = list(read_sql(conn_id, ["SET TIME ZONE 'Asia/Tokyo'", "SELECT current_setting('TimeZone') AS tz"]))
    assert batches[0].column(0).to_pylist() == ["Asia/Tokyo"]
    plain = list(read_sql(conn_id, "SELECT current_setting('TimeZone') AS tz"))
    assert plain[0].column(0).to_pylist() == ["UTC"]  # the database says Europe/Paris: the reader pins UTC


# --- SQLite by epoch milliseconds, naive pandas datetimes under another TZ ----------------------------------------
def test_sqlite_by_epoch_milliseconds(sb: SandboxServer, tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE deposits (deposit_id INTEGER, user_id INTEGER, amount INTEGER, created_ms INTEGER)")
        conn.executemany(
            "INSERT INTO deposits VALUES (?, ?, ?, ?)", [(1, 1, 10, NOW - 7_200_000), (2, 1, 20, NOW - 3_600_000)]
        )

    def read(window: Window) -> pd.DataFrame:
        with sqlite3.connect(path) as conn:
            return pd.read_sql_query(
                "SELECT * FROM deposits WHERE created_ms >= :since_ms", conn, params=window.parameters()
            )

    assert run(read, tmp_path / "state", sb, "created_ms").sent == 2
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO deposits VALUES (3, 1, 30, ?)", (NOW - 3_600_000 + 1,))
    again = run(read, tmp_path / "state", sb, "created_ms")
    assert (again.sent, again.duplicates) == (1, 1)
    assert sent_values(sb) == [10, 20, 30]


def test_naive_pandas_datetimes_are_utc_whatever_the_worker_time_zone(
    sb: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        frame = pd.DataFrame(
            {
                "deposit_id": [1, 2],
                "user_id": [1, 2],
                "amount": [10, 20],
                "created_at": [pd.Timestamp("2025-01-01 10:00"), pd.Timestamp("2025-01-01 11:00")],  # naive: UTC
            }
        )
        seen: list[dt.datetime] = []

        def read(window: Window) -> pd.DataFrame:
            seen.append(window.since)
            return frame

        assert run(read, tmp_path, sb).watermark == "2025-01-01T11:00:00.000Z"
        late = pd.concat(
            [frame, frame.iloc[:1].assign(deposit_id=3, amount=30, created_at=pd.Timestamp("2025-01-01 11:00:00.001"))]
        )
        frame = late
        assert run(read, tmp_path, sb).sent == 1
        assert seen[1] == dt.datetime(2025, 1, 1, 11, tzinfo=dt.UTC)
        assert json.dumps(sent_values(sb)) == "[10, 20, 30]"
    finally:
        monkeypatch.undo()  # TZ as it was, then the C library told so
        time.tzset()
