"""The DuckDB warehouse sync's memory, split into DuckDB's own and the rest of the worker (issue 22, part five).

    python benchmarks/duckdb_worker.py --rows 1000000 --limit 100MB     # generate, baseline, churn, churn run

DuckDB runs inside the worker, so a run's peak RSS holds DuckDB's buffers (bounded by ``memory_limit``) beside the
engine's own memory. This script builds ``run.py --pushdown``'s DuckDB table (``pushdown_sql.generate_duckdb``) in
a temporary folder, then runs the baseline, applies the churn (1%), and runs the churn run, each run in a fresh
child process (``--child``) against a sandbox of its own process. A thread in the child samples, every 20 ms, the
process's RSS and DuckDB's own memory (``duckdb_memory()``) and reports the peak of each above the run's start and
the peak of their difference (the worker's memory outside DuckDB's buffer manager). Nothing is written to the
results files; run it with ``PYTHONPATH`` naming the checkout to measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
from harness import BRAND_ID, MB, RUN_MS, TOKEN, Sandbox, options
from pushdown_sql import QUERY, STATE_SCHEMA, TABLE, churn_sql, duckdb_connect, generate_duckdb

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.store import SnapshotStore


def child(args: argparse.Namespace) -> int:
    import dataclasses

    from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync

    proc = psutil.Process()
    con = duckdb_connect(args.db, args.limit)
    probe = con.cursor()  # DuckDB's own memory, read beside the run
    start = proc.memory_info().rss
    peaks = {"rss": 0, "duckdb": 0, "rest": 0}
    done = threading.Event()

    def duckdb_bytes() -> int:
        ((used,),) = probe.execute("SELECT COALESCE(SUM(memory_usage_bytes), 0) FROM duckdb_memory()").fetchall()
        return int(used)

    base_duck = duckdb_bytes()

    main = threading.get_ident()
    where: list[str] = []

    def watch() -> None:
        while not done.is_set():
            rss, duck = proc.memory_info().rss - start, duckdb_bytes() - base_duck
            peaks["rss"], peaks["duckdb"] = max(peaks["rss"], rss), max(peaks["duckdb"], duck)
            if rss - duck > peaks["rest"]:
                peaks["rest"] = rss - duck
                frame = sys._current_frames().get(main)
                stack = traceback.extract_stack(frame) if frame is not None else []
                where[:] = [f"{Path(f.filename).stem}.{f.name}:{f.lineno}" for f in stack if "stopchurn" in f.filename]
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    opts = options(500, 4)
    if args.window_rows:
        opts = dataclasses.replace(opts, window_rows=args.window_rows)
    if args.mode == "baseline":
        opts = dataclasses.replace(opts, initial_load="baseline")
    client = StopChurnClient(args.url, TOKEN)
    t0 = time.perf_counter()
    try:
        source = WarehouseSource(QUERY, DuckDBWarehouse(con), state_schema=STATE_SCHEMA)
        store = SnapshotStore(Path(args.root), BRAND_ID, TABLE)
        summary = run_warehouse_sync(source, store, client, opts, run_ms=RUN_MS)
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        watcher.join()
        client.close()
    result = {
        "seconds": round(seconds, 2),
        **{f"peak_{k}_mb": round(v / MB) for k, v in peaks.items()},
        "counts": [summary.inserted, summary.updated, summary.deleted],
        "rest_peak_in": " > ".join(where[-6:]),
    }
    print("CHILD-RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(mode: str, args: argparse.Namespace, db: Path, root: Path, url: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--db", str(db), "--root", str(root), "--url", url]
    cmd += ["--limit", args.limit, "--window-rows", str(args.window_rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            return dict(json.loads(line.removeprefix("CHILD-RESULT ")))
    raise RuntimeError(f"child {mode} failed ({out.returncode}): {out.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--limit", default="100MB", help="DuckDB's memory_limit")
    parser.add_argument("--keep", help="keep the database and store after the churn (before the churn run) here")
    parser.add_argument("--from", dest="ready", help="a folder --keep made: run only the churn run, on a copy")
    parser.add_argument("--window-rows", type=int, default=0, help="the runs' window_rows (default: the option's)")
    parser.add_argument("--child", choices=["baseline", "churn"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)
    tmp = Path(tempfile.mkdtemp(prefix="stopchurn-duckworker-"))
    sandbox = Sandbox()
    try:
        db, root = tmp / "warehouse.duckdb", tmp / "store"
        if args.ready:
            shutil.copy(Path(args.ready) / db.name, db)
            shutil.copytree(Path(args.ready) / root.name, root)
        else:
            generate_duckdb(db, args.rows, args.limit)
            base = run_child("baseline", args, db, root, sandbox.url)
            print(f"{args.rows:,} rows, memory_limit={args.limit}; baseline: {base}", flush=True)
            with duckdb_connect(db, args.limit) as con:
                con.execute("BEGIN")
                for statement in churn_sql("duckdb", args.rows):
                    con.execute(statement)
                con.execute("COMMIT")
                con.execute("CHECKPOINT")
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(db, Path(args.keep) / db.name)
                shutil.copytree(root, Path(args.keep) / root.name, dirs_exist_ok=True)
        churn = run_child("churn", args, db, root, sandbox.url)
        print(f"{args.rows:,} rows, memory_limit={args.limit}; churn run: {churn}", flush=True)
    finally:
        sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
