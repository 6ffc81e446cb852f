"""A baseline writes the state table in a few large loads (``warehouse/bulk.py``), not one per source batch, on
real DuckDB and PostgreSQL; the state table it writes diffs as before."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from helpers_sync import BRAND, T0, TABLE, make_client, options
from pushdown_engines import Engine, engine_fixture

from airflow_provider_stopchurn.source.sql import BATCH_ROWS
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import Warehouse, WarehouseSource, run_warehouse_sync

ENGINES = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]
ROWS = 2 * BATCH_ROWS + 20_000  # more than two source batches on every engine


class LoadCounting:
    """A real warehouse whose staging loads are counted (every call is passed on unchanged)."""

    def __init__(self, inner: Warehouse) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.transactions = inner.transactions
        self.loads: list[int] = []

    def batches(self, sql: str) -> Iterator[pa.RecordBatch]:
        return self.inner.batches(sql)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.inner.rows(sql)

    def execute(self, statements: Sequence[str]) -> None:
        self.inner.execute(statements)

    def load(self, table: str, data: pa.Table) -> None:
        self.loads.append(data.num_rows)
        self.inner.load(table, data)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    yield from engine_fixture(request.param, request, tmp_path)


def _frame(n: int) -> pd.DataFrame:
    ids = np.arange(1, n + 1)
    return pd.DataFrame({"id": ids, "name": [f"user {i} é" for i in ids], "score": (ids % 97) / 8})


def test_baseline_writes_the_state_table_in_one_load(
    engine: Engine, stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    frame = _frame(ROWS)
    engine.load(frame)

    def run(warehouse: Any, tick: int, **opts: Any) -> Any:
        source = WarehouseSource("SELECT * FROM src", warehouse, state_schema="stopchurn_state")
        return run_warehouse_sync(source, store, make_client(sb), options(**opts), run_ms=T0 + 1000 * tick)

    counting = LoadCounting(engine.warehouse())
    recorded = run(counting, 1, initial_load="baseline")
    assert recorded.baseline and sb.stats()["requests"] == 0
    # one load of every row (it was one per source batch: at least three here)
    assert counting.loads == [ROWS]
    assert engine.rows("SELECT COUNT(*) FROM stopchurn_state.b7_subscription") == [(ROWS,)]
    # the recorded rows diff as the source: nothing to send, then exactly the churn
    again = run(engine.warehouse(), 2)
    assert (again.inserted, again.updated, again.deleted, again.unchanged) == (0, 0, 0, ROWS)
    engine.execute("DELETE FROM src WHERE id % 1000 = 1")
    engine.execute("UPDATE src SET score = -1 WHERE id % 1000 = 2")
    churn = run(engine.warehouse(), 3, max_delete_fraction=1.0)
    assert (churn.inserted, churn.updated, churn.deleted) == (0, ROWS // 1000, ROWS // 1000)
