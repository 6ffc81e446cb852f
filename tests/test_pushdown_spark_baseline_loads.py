"""A Spark baseline of several loads (``warehouse/bulk.py``: about 16 MB each on Spark) on a local session with
the suite's settings (512 MB driver, which is also the executor in local mode), in a child process of its own: a
session whose heap fills is not reused by other tests, and a run that never ends is stopped by the timeout. Each
load is written (a Spark job of its own) on the heap the result was collected on. At 400,000 rows the withdrawn
partition-at-a-time read failed here, and toArrow() itself failed now and then: 120,000 rows still make two
loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from spark_session import find_java

pytestmark = pytest.mark.spark

ROWS = 120_000  # about 30 MB of encoded rows: two 16 MB loads; small enough for toArrow() on a 512 MB driver

_CHILD = """
import os, sys, logging
from pathlib import Path
import numpy as np, pandas as pd
from pyspark.sql import SparkSession
from spark_session import spark_conf
from helpers_sync import BRAND, T0, TABLE, make_client, options
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync
from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

base, rows = Path(sys.argv[1]), int(sys.argv[2])
(base / "scratch").mkdir()
os.environ["PYSPARK_PYTHON"] = sys.executable
builder = SparkSession.builder
conf = {**spark_conf(base), "spark.sql.shuffle.partitions": "8"}
for key, value in conf.items():
    builder = builder.config(key, value)
spark = builder.getOrCreate()
spark.sparkContext.setLogLevel("OFF")
logging.getLogger("py4j").setLevel(logging.WARNING)
ids = np.arange(1, rows + 1)
frame = pd.DataFrame({"id": ids, "name": [f"user {i} " + "x" * 150 for i in ids], "score": (ids % 97) / 8})
spark.createDataFrame(frame).write.mode("overwrite").saveAsTable("src")
sb = SandboxServer(token="t").start()
store = SnapshotStore(base / "snapshots", BRAND, TABLE)
source = WarehouseSource("SELECT * FROM src", SparkWarehouse(spark), state_schema="stopchurn_state")
summary = run_warehouse_sync(source, store, make_client(sb), options(initial_load="baseline"), run_ms=T0)
count = spark.sql("SELECT COUNT(*) FROM stopchurn_state.b7_subscription").collect()[0][0]
print("RESULT", summary.baseline, sb.stats()["requests"], count, flush=True)
sb.stop()
spark.stop()
"""


@pytest.mark.timeout(900)
def test_a_spark_baseline_of_several_loads_completes_on_a_small_driver(tmp_path: Path) -> None:
    if find_java() is None:
        pytest.skip("no java")
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(ROWS)],
            capture_output=True,
            text=True,
            env=env,
            timeout=360,  # six times what the run took before loads, on this machine under load
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the baseline did not finish")
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert result == [f"RESULT True 0 {ROWS}"], out.stderr[-3000:]
