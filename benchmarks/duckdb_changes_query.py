"""The DuckDB changed-rows query alone, under a ``memory_limit``, in a fresh process (issue 22, part four).

    python benchmarks/duckdb_changes_query.py WAREHOUSE.duckdb 100MB both   # the narrow diff, then the changed rows
    python benchmarks/duckdb_changes_query.py WAREHOUSE.duckdb 65MB changes # the changed rows of the last diff

``WAREHOUSE.duckdb``: a copy of the database file ``run.py --pushdown --engines duckdb`` builds (table ``bench`` and
its state table after a run), with rows changed since (e.g. ``UPDATE bench SET score = score + 0.5 WHERE id % 200 =
11``). Prints the seconds and the peak RSS above the start (DuckDB runs in this process), or DuckDB's error. More
arguments are statements run first (``"SET threads = 1"``). Run it with ``PYTHONPATH`` naming the version to measure.
"""

from __future__ import annotations

import sys
import threading
import time

import duckdb
import psutil
from pushdown_sql import STATE_SCHEMA, STATE_TABLE, TABLE

from airflow_provider_stopchurn.warehouse import sql as S

TAG = "benchchanges"  # 12 characters, as a run's tag


def main() -> int:
    path, limit, step, *setup = sys.argv[1:]
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - start)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    con = duckdb.connect(path, config={"memory_limit": limit})
    for statement in [*setup, "SET TimeZone = 'UTC'"]:
        con.execute(statement)
    state = S.StateTable(STATE_SCHEMA, STATE_TABLE, ("id",), "duckdb")
    query = S.source_query(f"SELECT * FROM {TABLE}")
    columns = [str(d[0]) for d in con.execute(f"SELECT * FROM {TABLE} LIMIT 0").description]
    scratch = state.scratch(TAG)
    if step == "both":
        t0 = time.perf_counter()
        con.execute(f"DROP TABLE IF EXISTS {scratch}")
        for statement in state.diff_into(scratch, query, columns, update_all=False):
            con.execute(statement)
        print(f"narrow diff: {time.perf_counter() - t0:.1f} s, peak +{peak[0] >> 20} MB", flush=True)
    t0 = time.perf_counter()
    rows = 0
    relation = con.sql(state.changes(query, columns, update_all=False, among=scratch))
    read = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
    for batch in read(65536):
        rows += batch.num_rows
    print(f"changed rows: {rows:,} in {time.perf_counter() - t0:.1f} s, peak +{peak[0] >> 20} MB", flush=True)
    done.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
