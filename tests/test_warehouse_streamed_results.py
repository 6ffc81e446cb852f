"""Results leave the warehouse a part at a time: Spark streams a partition at a time instead of collecting the
whole result on the driver, and DuckDB diffs a table larger than its memory limit."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pytest
from helpers_sync import BRAND, T0, TABLE, make_client, options, sandbox_rows

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

pytest_plugins = ["spark_session"]
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")


def _tasks_done(spark: SparkSession, group: str) -> int:
    """The tasks completed so far by the jobs of ``group``."""
    tracker = spark.sparkContext.statusTracker()
    done = 0
    for job in tracker.getJobIdsForGroup(group):
        info = tracker.getJobInfo(job)
        for stage in info.stageIds if info is not None else ():
            stage_info = tracker.getStageInfo(stage)
            done += stage_info.numCompletedTasks if stage_info is not None else 0
    return done


def test_spark_hands_out_the_first_batch_before_the_other_partitions_are_computed(
    spark: SparkSession, spark_warehouse: SparkWarehouse
) -> None:
    list(spark_warehouse.batches("SELECT 1 AS x"))  # whatever a first use runs once, outside the group
    group = f"stream-{uuid.uuid4().hex}"
    spark.sparkContext.setJobGroup(group, "streamed result")
    try:
        batches = spark_warehouse.batches("SELECT id, CAST(id AS STRING) AS s FROM range(0, 40000, 1, 4)")
        first = next(batches)
        # one of the four partitions computed: the worker holds its batches only, not the whole result
        assert _tasks_done(spark, group) == 1
        rest = list(batches)
        assert _tasks_done(spark, group) == 4  # the measure sees every partition once all are read
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
    table = pa.Table.from_batches([first, *rest])
    assert table.column("id").to_pylist() == list(range(40000))
    assert table.column("s").to_pylist() == [str(i) for i in range(40000)]


def test_spark_streamed_batches_have_the_types_to_arrow_gives(
    spark: SparkSession, spark_warehouse: SparkWarehouse
) -> None:
    sql = (
        "SELECT id, TIMESTAMP'2024-01-01 00:00:00' + make_interval(0, 0, 0, 0, 0, 0, id) AS ts, "
        "TIMESTAMP_NTZ'2024-01-01 00:00:00' AS ntz, CAST(id AS DECIMAL(10, 2)) AS d, DATE'2024-01-01' AS day, "
        "map('k', id) AS m, array(id) AS a, X'01' AS b, named_struct('a', id) AS st, CAST(NULL AS STRING) AS n "
        "FROM range(0, 10, 1, 3)"
    )
    whole: Any = spark.sql(sql).toArrow()
    streamed = pa.Table.from_batches(list(spark_warehouse.batches(sql)))
    assert streamed.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert streamed.schema.equals(whole.schema)
    assert streamed.to_pylist() == whole.to_pylist()


def test_spark_without_python_workers_collects_whole_and_says_so(
    spark: SparkSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Where Spark cannot start a Python worker with pyarrow, every result is collected whole, as before."""
    context: Any = spark.sparkContext
    interpreter = context.pythonExec
    context.pythonExec = "/nonexistent/python3"  # the interpreter Spark starts its Python workers with
    wh = SparkWarehouse(spark)
    try:
        with caplog.at_level(logging.WARNING, logger="airflow_provider_stopchurn.warehouse.spark"):
            batches = list(wh.batches("SELECT id FROM range(0, 100, 1, 3)"))
    finally:
        context.pythonExec = interpreter
        wh.close()
    assert pa.Table.from_batches(batches).column("id").to_pylist() == list(range(100))
    assert "cannot stream Arrow batches" in caplog.text
    assert "PYSPARK_PYTHON" in caplog.text


# --- DuckDB: a churn run under a memory_limit far below the table -------------------------------------------------
DUCK_ROWS = 400_000


def _duck_sync(path: Path, store: SnapshotStore, sb: Any, tick: int, *, limit: str | None = None, **kw: Any) -> Any:
    con = duckdb.connect(str(path), config={"memory_limit": limit, "threads": 2} if limit else {})
    try:
        source = WarehouseSource("SELECT * FROM src", DuckDBWarehouse(con))
        opts = options(key_columns=("id",), chunk_size=500, **kw)
        return run_warehouse_sync(source, store, make_client(sb), opts, run_ms=T0 + tick)
    finally:
        con.close()


def test_duckdb_diffs_a_table_many_times_its_memory_limit(tmp_path: Path, stopchurn_sandbox_factory: Any) -> None:
    """The changed rows are read back by their keys alone: the source is scanned once, streaming, and only the
    changed keys are held. Before, DuckDB planned the join back on the distinct keys of every source row, with the
    source query materialized whole, and ran out of memory under a limit far below the table."""
    sb = stopchurn_sandbox_factory()
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE src AS SELECT i AS id, 'name ' || i AS name, repeat(md5(CAST(i AS TEXT)), 8) AS payload, "
            f"i % 7 AS grp FROM range({DUCK_ROWS}) AS r(i)"
        )  # about 300 bytes a row: 120 MB of text
    base = _duck_sync(path, store, sb, 1, initial_load="baseline")
    assert base.baseline
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE src SET grp = grp + 100 WHERE id % 500 = 11")
        con.execute("DELETE FROM src WHERE id % 1000 = 3")
        con.execute(f"INSERT INTO src SELECT {DUCK_ROWS} + i, 'new', 'p', 0 FROM range(300) AS r(i)")
        ((size,),) = con.execute("SELECT SUM(LENGTH(payload) + LENGTH(name)) FROM src").fetchall()
    assert size > 100_000_000
    churn = _duck_sync(path, store, sb, 2, limit="48MB")  # the limit: under half the table's text
    assert (churn.inserted, churn.updated, churn.deleted) == (300, DUCK_ROWS // 500, DUCK_ROWS // 1000)
    assert len(sandbox_rows(sb, BRAND, TABLE)) == DUCK_ROWS // 500 + 300  # the baseline sent nothing
    again = _duck_sync(path, store, sb, 3, limit="48MB")
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
