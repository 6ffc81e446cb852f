"""Peak memory of reading one large Spark result in the worker: ``SparkWarehouse.batches`` (a partition at a time)
against ``DataFrame.toArrow()`` (the whole result collected, as ``batches`` did before), each in a fresh child
process with a local-mode session of the test suite's settings.

    PYSPARK_PYTHON=.venv/bin/python python benchmarks/spark_stream_peak.py --rows 2000000 --partitions 16

Prints, per mode: seconds, the result's Arrow bytes, the worker's peak RSS above its RSS before the read (VmHWM
reset first) and the JVM's RSS before -> peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import reset_hwm, vm_hwm_bytes  # noqa: E402
from pushdown_children import _jvm_pids, _jvm_reset, _jvm_status, spark_session_module  # noqa: E402


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(mode: str, rows: int, partitions: int, width: int) -> dict[str, float]:
    from pyspark.sql import SparkSession

    from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

    base = Path(tempfile.mkdtemp(prefix="spark-peak-"))
    (base / "scratch").mkdir()
    conf = spark_session_module().spark_conf(base)
    conf.update({"spark.driver.memory": "3g", "spark.driver.maxResultSize": "0"})
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    sql = f"SELECT id, repeat(CAST(id % 10 AS STRING), {width}) AS s FROM range(0, {rows}, 1, {partitions})"
    warehouse = SparkWarehouse(spark)
    list(warehouse.batches("SELECT 1 AS warm"))  # Python workers started, imports done
    jvm = _jvm_pids()
    for pid in jvm:
        _jvm_reset(pid)
    jvm_before = sum(_jvm_status(pid, "VmRSS") for pid in jvm)
    before = _rss()
    reset_hwm()
    started = time.perf_counter()
    total = seen = 0
    if mode == "stream":
        for batch in warehouse.batches(sql):
            total += batch.nbytes
            seen += batch.num_rows
    else:
        table = spark.sql(sql).toArrow()
        for batch in table.to_batches():
            total += batch.nbytes
            seen += batch.num_rows
        del table
    seconds = time.perf_counter() - started
    peak = (vm_hwm_bytes() or 0) - before
    jvm_peak = sum(_jvm_status(pid, "VmHWM") for pid in jvm)
    spark.stop()
    assert seen == rows, (seen, rows)
    return {
        "seconds": seconds,
        "arrow_mb": total / 1e6,
        "peak_mb": peak / 1e6,
        "jvm_before_mb": jvm_before / 1e6,
        "jvm_peak_mb": jvm_peak / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--width", type=int, default=200, help="characters of the text column")
    parser.add_argument("--child", choices=["stream", "collect"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.partitions, args.width)))
        return 0
    for mode in ("collect", "stream"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--rows",
            str(args.rows),
            "--partitions",
            str(args.partitions),
            "--width",
            str(args.width),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        got = json.loads(out)
        print(
            f"{mode}: {got['seconds']:.1f} s, {got['arrow_mb']:,.0f} MB of Arrow, "
            f"worker peak +{got['peak_mb']:,.0f} MB, "
            f"JVM {got['jvm_before_mb']:,.0f} MB -> {got['jvm_peak_mb']:,.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
