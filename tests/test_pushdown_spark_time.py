"""The Spark warehouse diff never depends on the session's time zone: a session whose zone is not UTC (Spark's
default is the JVM's, the worker's) or changes between runs finds nothing to send, and the caller's setting is
given back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options, update_requests
from pushdown_engines import Engine, engine_fixture

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")

KEYS = ("at",)
ZONE = "spark.sql.session.timeZone"


@pytest.fixture
def sparked(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    engine = next(engine_fixture("spark", request, tmp_path))
    before = engine.handle.conf.get(ZONE)
    try:
        yield engine
    finally:
        engine.handle.conf.set(ZONE, before)


@pytest.mark.xfail(
    strict=True,
    reason="Spark sessions are not pinned to UTC (only a warning): timestamp key texts follow the session's zone, "
    "so a zone change deletes and inserts every key; pinning needs format 1 Spark key texts moved from the zone "
    "they were written in",
)
def test_a_spark_session_in_another_zone_sends_nothing_and_keeps_its_zone(
    sparked: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    spark = sparked.handle
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    at = pd.Timestamp("2026-03-29 00:30", tz="UTC") + pd.to_timedelta(range(6), unit="h")  # across a DST change
    frame = pd.DataFrame({"at": at, "name": [f"row {i}" for i in range(6)]})
    sparked.load(frame)
    for tick, zone in enumerate(["Europe/Paris", "America/New_York"], start=1):
        spark.conf.set(ZONE, zone)
        source = WarehouseSource("SELECT * FROM src", SparkWarehouse(spark))
        summary = run_warehouse_sync(source, store, make_client(sb), options(key_columns=KEYS), run_ms=T0 + tick)
        assert spark.conf.get(ZONE) == zone  # the caller's session is given back as it was
        if tick == 1:
            assert summary.inserted == len(frame)
            requests = update_requests(sb)
        else:
            assert (summary.inserted, summary.updated, summary.deleted) == (0, 0, 0)
    assert update_requests(sb) == requests
    assert_sandbox_matches(sb, frame, KEYS)


def test_a_dry_run_while_a_swap_is_half_done_counts_from_the_new_table(
    sparked: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    spark = sparked.handle
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    frame = pd.DataFrame({"id": list(range(1, 7)), "name": [f"row {i}" for i in range(6)]})
    sparked.load(frame)

    def source() -> WarehouseSource:
        return WarehouseSource("SELECT * FROM src", SparkWarehouse(spark))

    run_warehouse_sync(source(), store, make_client(sb), options(), run_ms=T0)
    state = "stopchurn_state.b7_subscription"
    for table, new in ((state, f"{state}__next"), (f"{state}__meta", f"{state}__meta_next")):
        # the worker died between a swap's two statements: DROP of the table done, RENAME of the new one not yet
        spark.sql(f"ALTER TABLE {table} RENAME TO {new}")
        dry = run_warehouse_sync(source(), store, None, options(dry_run=True), run_ms=T0 + 1)
        assert (dry.inserted, dry.updated, dry.deleted, dry.unchanged) == (0, 0, 0, len(frame)), table
        real = run_warehouse_sync(source(), store, make_client(sb), options(), run_ms=T0 + 2)  # finishes the swap
        assert (real.inserted, real.updated, real.deleted) == (0, 0, 0)
