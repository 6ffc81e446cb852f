"""The event engine under an adversarial review: option changes and clock moves must not resend what the ledger
no longer knows (against the sandbox on 127.0.0.1).

The run's clock is the ``now_ms`` argument of ``run_events``; deposit i is at T0 + i hours.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_sync import make_client
from test_events import HOUR, T0, World, as_counts, deposits, expected, received_counts

from airflow_provider_stopchurn.exceptions import StopChurnConfigError


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[World]:
    yield World(stopchurn_sandbox_factory(), tmp_path / "state")


def ms(ts: pd.Timestamp) -> int:
    return int(ts.value // 10**6)


NOW = T0 + 100 * HOUR


def test_a_longer_lookback_does_not_resend_what_the_ledger_pruned(world: World) -> None:
    # 48 deposits delivered with a 6 h lookback: the ledger keeps only the last 6 hours of keys
    frame = deposits(range(48))
    assert world.run(frame, now_ms=ms(NOW), lookback=dt.timedelta(hours=6)).sent == 48
    # the owner widens the lookback to catch later stragglers; the query returns the whole day again
    again = world.run(frame, now_ms=ms(NOW), lookback=dt.timedelta(hours=48))
    assert again.sent == 0
    assert received_counts(world.sb) == as_counts(expected(frame))  # each event once


@pytest.mark.xfail(
    strict=True,
    reason="open: a worker clock that ran ahead lets a future row through and the ledger is pruned to it; once the "
    "clock is corrected the window restarts at the clock minus the lookback, and the events created between the last "
    "real watermark and that point are dropped as before the window",
)
def test_a_clock_that_ran_ahead_and_was_corrected_loses_no_event(world: World) -> None:
    # the worker's clock ran a year ahead: the deposits up to then were sent, the watermark and the ledger's bound
    # followed them; once the clock is corrected the later deposits must still go out
    ahead = T0 + pd.Timedelta(days=365)
    late = deposits([900], at=[T0 + pd.Timedelta(days=200)])  # dated in the future, not held by that clock
    assert world.run(pd.concat([deposits(range(48)), late]), now_ms=ms(ahead)).sent == 49
    frame = pd.concat([deposits(range(60)), late])
    again = world.run(frame, now_ms=ms(T0 + 61 * HOUR))
    assert (again.sent, again.held_future) == (12, 1)
    assert received_counts(world.sb) == as_counts(expected(frame))


def test_dropping_the_watermark_column_does_not_resend_every_event(world: World) -> None:
    frame = deposits(range(48))
    assert world.run(frame, now_ms=ms(NOW)).sent == 48
    # without a watermark column every row is an event and the ledger no longer filters by time: the 42 events
    # the ledger pruned would all be sent again. Refused (nothing sent) or nothing resent; never a silent resend.
    try:
        again = world.run(frame, now_ms=ms(NOW), watermark_column=None, lookback=dt.timedelta(0))
    except StopChurnConfigError:
        pass
    else:
        assert again.sent == 0
    assert received_counts(world.sb) == as_counts(expected(frame))


@pytest.mark.parametrize("explicit", [False, True], ids=["every column", "event_key"])
def test_the_same_key_columns_in_another_order_are_the_same_key(world: World, explicit: bool) -> None:
    # a query rewritten with its columns in another order (or a SELECT * after the table was recreated) holds the
    # same events: neither refused as a changed key nor sent again
    frame = deposits(range(10))
    key: dict[str, Any] = {"event_key": ("deposit_id", "user_id") if explicit else None}
    assert world.run(frame, now_ms=ms(NOW), **key).sent == 10
    if explicit:
        key = {"event_key": ("user_id", "deposit_id")}
    again = world.run(frame[list(reversed(frame.columns))], now_ms=ms(NOW), **key)
    assert (again.sent, again.duplicates, again.before_window) == (0, 7, 3)
    assert received_counts(world.sb) == as_counts(expected(frame))


# --- DuckDB read through the DB-API reader, in a session whose time zone is not UTC ----------------------------------
class DuckDBHook:
    """A DB-API hook of a DuckDB database file whose sessions run in Europe/Paris (a worker in Paris: DuckDB takes
    the machine's zone by default)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get_conn(self) -> Any:
        import duckdb

        conn = duckdb.connect(str(self.path))
        conn.execute("SET GLOBAL TimeZone = 'Europe/Paris'")  # as a worker in Paris has it
        return conn


@pytest.mark.parametrize(
    "where",
    ["created_at >= $since AND $since_ms IS NOT NULL", "created_at >= $since"],
    ids=["both parameters", "since alone"],
)
def test_a_duckdb_source_by_a_naive_timestamp_whatever_the_session_time_zone(
    stopchurn_sandbox_factory: Any, tmp_path: Path, where: str
) -> None:
    import duckdb

    from airflow_provider_stopchurn.events.engine import run_events
    from airflow_provider_stopchurn.events.ledger import Window, event_store
    from airflow_provider_stopchurn.events.options import EventOptions
    from airflow_provider_stopchurn.source.sql import read_dbapi

    path = tmp_path / "events.duckdb"
    with duckdb.connect(str(path)) as db:
        db.execute("CREATE TABLE deposits (deposit_id INT, user_id INT, amount INT, created_at TIMESTAMP)")
        db.execute("INSERT INTO deposits VALUES (1, 1, 10, '2025-01-01 10:00:00'), (2, 2, 20, '2025-01-01 11:00:00')")
    sb = stopchurn_sandbox_factory()
    # DuckDB refuses named parameters a query does not use: a query naming only one of them must work
    sql = f"SELECT * FROM deposits WHERE {where} ORDER BY deposit_id"
    hook = DuckDBHook(path)

    def read(window: Window) -> Any:
        return read_dbapi(hook, sql, window.parameters())

    options = EventOptions(
        brand_id=3,
        user_id_column="user_id",
        name="DEPOSIT",
        value_column="amount",
        event_key=("deposit_id",),
        watermark_column="created_at",
        lookback=dt.timedelta(0),
    )
    store = event_store(tmp_path / "state", 3, "duck")
    now = ms(pd.Timestamp("2025-01-02", tz="UTC"))
    assert run_events(read, store, make_client(sb), options, now_ms=now).sent == 2
    with duckdb.connect(str(path)) as db:  # a row stamped just after the watermark (naive UTC), committed late
        db.execute("INSERT INTO deposits VALUES (3, 1, 30, '2025-01-01 11:30:00')")
    assert run_events(read, store, make_client(sb), options, now_ms=now).sent == 1
    assert sorted(e["value"] for e in sb.events(3)) == [10, 20, 30]


# --- the lock of a run in another container of this host --------------------------------------------------------
def _other_namespace_lock(world: World) -> None:
    """A live run's lock, written in another container that shares this host's name (host networking, a fixed
    hostname) but not its process ids: its pid does not exist here."""
    import json as _json
    import os
    import socket
    import time as _time

    from airflow_provider_stopchurn.store.lock import FORMAT_VERSION

    pid = 4_000_000  # above any pid_max: no process of this namespace has it
    assert not os.path.exists(f"/proc/{pid}")
    now = _time.time()
    record = {
        "format_version": FORMAT_VERSION,
        "holder": "a run in another container",
        "token": "t",
        "host": socket.gethostname(),
        "pid": pid,
        "pid_ns": "pid:[1]",  # another PID namespace than this process's
        "acquired_at": "2026-01-01T00:00:00+00:00",
        "refreshed_at": "2026-01-01T00:00:00+00:00",
        "expires_at": now + 3600,
    }
    world.store.backend.write_bytes("LOCK", _json.dumps(record).encode())


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="PID namespaces are a Linux feature")
def test_a_live_lock_of_another_container_with_the_same_host_name_is_not_broken(world: World) -> None:
    from airflow_provider_stopchurn.exceptions import SnapshotLockedError

    world.run(deposits(range(3)), now_ms=ms(NOW))
    _other_namespace_lock(world)
    with pytest.raises(SnapshotLockedError, match="another container"):
        world.run(deposits(range(6)), now_ms=ms(NOW), lock_wait_s=0)
    assert received_counts(world.sb) == as_counts(expected(deposits(range(3))))  # nothing sent while it holds it
