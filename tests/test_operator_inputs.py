"""The operator with sources beyond pandas, in real DAG runs (``dag.test()``): a polars DataFrame or LazyFrame, a
pyarrow Table, RecordBatchReader or batch iterator, given directly or returned by a callable.

After each run StopChurn's table must hold the rows (the JSON written out here, not computed by the provider), and
a second run of the same data must send nothing. (An upstream task cannot hand these over through Airflow 3.3's
default XCom backend, which serializes pandas DataFrames but neither polars nor Arrow objects: the task fails
when it pushes its return value. The operator reference says so (docs/update-operator.md); an XCom backend that
carries them works unchanged, as the operator takes whatever the XCom resolves to.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pendulum
import polars as pl
import pyarrow as pa
import pytest
from airflow.sdk import DAG
from airflow_plugin import run_dag, task_states, xcom_return

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")

START = pendulum.datetime(2025, 1, 1, tz="UTC")
_ids = itertools.count(1)
_brands = itertools.count(300)

ROWS = [
    {"id": 1, "name": "Ana", "score": 1.5, "tags": ["a"], "big": 2**53 + 1},
    {"id": 2, "name": None, "score": None, "tags": [], "big": None},
    {"id": 3, "name": "Chloé", "score": 3.0, "tags": None, "big": -7},
]
#: What StopChurn must hold (docs/values.md: Values): an integral float as an integer, bigints exact.
EXPECTED = [
    {"id": 1, "name": "Ana", "score": 1.5, "tags": ["a"], "big": 2**53 + 1},
    {"id": 2, "name": None, "score": None, "tags": [], "big": None},
    {"id": 3, "name": "Chloé", "score": 3, "tags": None, "big": -7},
]


def table() -> pa.Table:
    schema = pa.schema(
        [("id", pa.int64()), ("name", pa.string()), ("score", pa.float64()), ("tags", pa.list_(pa.string())),
         ("big", pa.int64())]
    )  # fmt: skip
    return pa.Table.from_pylist(ROWS, schema=schema)


def batches() -> Iterator[pa.RecordBatch]:
    yield from table().to_batches(max_chunksize=2)


@pytest.fixture
def brand(stopchurn_sandbox: SandboxServer, airflow_conn: Callable[..., None]) -> int:
    brand_id = next(_brands)
    airflow_conn(
        "stopchurn_default", conn_type="stopchurn", host=stopchurn_sandbox.url, password=stopchurn_sandbox.token,
        extra={"brand_id": brand_id},
    )  # fmt: skip
    return brand_id


def _run_twice(dag: DAG, sandbox: SandboxServer, brand_id: int) -> None:
    for day, counts in enumerate([(3, 0, 0, 0), (0, 0, 0, 3)]):
        dagrun = run_dag(dag, logical_date=START.add(days=day))
        assert str(dagrun.state) == "success", task_states(dagrun)
        summary = xcom_return(dagrun, "sync")
        assert (summary["inserted"], summary["updated"], summary["deleted"], summary["unchanged"]) == counts
        assert sandbox.rows(brand_id, "account") == EXPECTED


DIRECT: dict[str, Callable[[], Any]] = {
    "polars": lambda: pl.from_arrow(table()),
    "polars-lazy": lambda: pl.from_arrow(table()).lazy(),  # type: ignore[union-attr]
    "arrow-table": table,
}
FROM_A_CALLABLE: dict[str, Callable[[], Any]] = {
    **DIRECT,
    "arrow-reader": lambda: pa.RecordBatchReader.from_batches(table().schema, batches()),
    "batch-iterator": batches,
}


@pytest.mark.parametrize("kind", DIRECT)
def test_given_directly(kind: str, brand: int, stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    with DAG(f"inputs_direct_{next(_ids)}", schedule=None, start_date=START) as dag:
        StopChurnUpdateOperator(
            task_id="sync", table_name="account", dataframe=DIRECT[kind](), snapshot_uri=str(tmp_path / "s")
        )
    _run_twice(dag, stopchurn_sandbox, brand)


@pytest.mark.parametrize("kind", FROM_A_CALLABLE)
def test_from_a_callable(kind: str, brand: int, stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    make = FROM_A_CALLABLE[kind]
    with DAG(f"inputs_callable_{next(_ids)}", schedule=None, start_date=START) as dag:
        StopChurnUpdateOperator(
            task_id="sync", table_name="account", dataframe=lambda: make(), snapshot_uri=str(tmp_path / "s")
        )
    _run_twice(dag, stopchurn_sandbox, brand)
