"""Property tests of the warehouse diff: random tables, random churn, random delivery options; after every run
StopChurn holds exactly the source, the state table holds one row per source key, and an unchanged source sends
nothing. The same properties as the local engine's (tests/test_recovery_state_machine.py), on each warehouse."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers_sync import BRAND, T0, TABLE, Churn, assert_sandbox_matches, make_client, options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pushdown_engines import Engine, engine_fixture

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync

ENGINES = [
    "duckdb",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("spark", marks=pytest.mark.spark),
]
EXAMPLES = {"duckdb": 12, "postgres": 8, "spark": 2}


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from engine_fixture(request.param, request, tmp_path_factory.mktemp("warehouse"))


def _check(engine: Engine, sb: Any, seed: int, composite: bool, chunk_size: int, workers: int, steps: int) -> None:
    sb.reset()
    schema = f"st_{uuid.uuid4().hex[:10]}"
    root = Path(tempfile.mkdtemp(prefix="stopchurn-props-"))
    try:
        churn = Churn(seed, 25, composite=composite, with_json=False)
        store = SnapshotStore(root, BRAND, TABLE)
        opts = options(
            key_columns=list(churn.keys),
            chunk_size=chunk_size,
            max_concurrent_requests=workers,
            max_delete_fraction=1.0,
        )
        frame = churn.frame
        for step in range(steps + 1):
            if step:
                frame = churn.step()
            engine.load(frame)
            source = WarehouseSource("SELECT * FROM src", engine.warehouse(), state_schema=schema)
            summary = run_warehouse_sync(source, store, make_client(sb), opts, run_ms=T0 + step)
            assert summary.quarantined == 0
            assert_sandbox_matches(sb, frame, churn.keys)
            (state_rows,) = engine.rows(f"SELECT COUNT(*) FROM {schema}.b7_subscription")[0]
            assert state_rows == len(frame)
        again = run_warehouse_sync(
            WarehouseSource("SELECT * FROM src", engine.warehouse(), state_schema=schema),
            store,
            make_client(sb),
            opts,
            run_ms=T0 + steps + 1,
        )
        assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_random_tables_and_churn_stay_equal_to_the_source(engine: Engine, stopchurn_sandbox_factory: Any) -> None:
    sb = stopchurn_sandbox_factory(record=True)

    @settings(
        max_examples=EXAMPLES[engine.name],
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        seed=st.integers(0, 2**31),
        composite=st.booleans(),
        chunk_size=st.integers(1, 12),
        workers=st.integers(1, 3),
        steps=st.integers(1, 3),
    )
    def prop(seed: int, composite: bool, chunk_size: int, workers: int, steps: int) -> None:
        _check(engine, sb, seed, composite, chunk_size, workers, steps)

    prop()
