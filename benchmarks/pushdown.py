"""The diff inside the warehouse (``pushdown/``) at scale: ``benchmarks/run.py --pushdown`` (``make bench-pushdown``).

Three scenarios, each run of the engine in a fresh child process (``run.py --child pd-...``) that measures its own
seconds, CPU seconds and peak RSS above its start, and counts the bytes that leave the database (the Arrow batches
the engine reads, ``RecordBatch.nbytes``) and that go into it (the Arrow tables it loads):

1. PostgreSQL (``--rows``): the pushdown churn run against the local engine's churn run (``run_sync`` on the
   operator's ADBC read, as the SQL churn scenario of ``run.py``), both after a baseline.
2. DuckDB (``--duckdb-rows``, default 10x ``--rows``): generation, baseline, the pushdown churn run against DuckDB's
   own time for the same full outer join and row hash (a plain ``SELECT COUNT(*)``).
3. Spark local mode (``--spark-rows``, default ``--rows``): baseline, churn run, second run, in one child process
   (the in-memory catalog does not outlive its session).

The churn is 1% of the rows: 0.5% updated, 0.25% deleted, 0.25% inserted, applied with SQL. Every scenario checks
that the churn run's counts equal it, that StopChurn (the sandbox) holds the source's rows for a sample of the
changed keys and nothing else, and that a second run right after sends nothing. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pyarrow as pa
import requests
import run as bench

from airflow_provider_stopchurn.client import StopChurnClient
from airflow_provider_stopchurn.encoding import encode_rows
from airflow_provider_stopchurn.snapshot import SnapshotStore
from airflow_provider_stopchurn.sync import SyncOptions, SyncSummary, canonical_source, run_sync

CHILDREN = ("pd-run", "pd-join", "pd-spark")
ENGINES = ("postgres", "duckdb", "spark")
TABLE = bench.SQL_TABLE
EXTRA = bench.SQL_EXTRA
QUERY = f"SELECT * FROM {TABLE}"
STATE_SCHEMA = "stopchurn_state"
STATE_TABLE = f"b{bench.BRAND_ID}_{TABLE}"  # pushdown/sql.py state_table_name(BRAND_ID, TABLE)
RSS_TARGET = 300 * bench.MB
SAMPLE = 300  # keys checked in the sandbox per kind of change
CHILD_TIMEOUT_S = 6 * 3600
MB = bench.MB
GB = bench.GB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pushdown", action="store_true", help="run the warehouse-diff scenarios (alone)")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="with --pushdown: which of postgres,duckdb,spark to run"
    )
    parser.add_argument("--duckdb-rows", type=int, default=None, help="with --pushdown (default 10x --rows)")
    parser.add_argument("--spark-rows", type=int, default=None, help="with --pushdown (default --rows)")
    parser.add_argument(
        "--duckdb-memory-limit",
        default="4GB",
        help="DuckDB's memory_limit in the runs (its default: 80%% of RAM; 1GB is too little for 100M rows)",
    )
    parser.add_argument("--spark-driver-memory", default="6g", help="spark.driver.memory of the Spark scenario")
    parser.add_argument("--save-json", help="with --pushdown: also write the raw measurements to this file")
    parser.add_argument("--from-json", help="with --pushdown: render the results of a --save-json file, run nothing")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-pid", type=int, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------------------------
# the churn, the same in every warehouse: 0.5% updated, 0.25% deleted, 0.25% inserted
# ---------------------------------------------------------------------------------------------------------------
def churn_of(n: int) -> bench.Churn:
    return bench.Churn(inserted=n // 400, updated=len(range(11, n, 200)), deleted=len(range(3, n, 400)))


def _update_sql(div: str, prefs: str) -> str:
    """The UPDATE of the churn (every updated row changes its score; some also status, quantity, balance or
    preferences). ``div``: the dialect's integer division; ``prefs``: the new preferences (sms flipped)."""
    return (
        f"UPDATE {TABLE} SET score = score + 0.5, "
        f"status = CASE WHEN (id {div} 200) % 2 = 0 THEN "
        "(CASE WHEN status = 'active' THEN 'churned' ELSE 'active' END) ELSE status END, "
        f"quantity = quantity + CASE WHEN (id {div} 200) % 3 = 0 THEN 1 ELSE 0 END, "
        f"balance = CASE WHEN (id {div} 200) % 5 = 0 THEN balance + 1 ELSE balance END, "
        f"preferences = CASE WHEN (id {div} 200) % 4 = 0 THEN {prefs} ELSE preferences END "
        "WHERE id % 200 = 11"
    )


def churn_sql(dialect: str, n: int) -> list[str]:
    """Statements that apply the churn (PostgreSQL and DuckDB: in one transaction)."""
    prefs = {
        "postgres": "jsonb_set(preferences, '{sms}', to_jsonb(NOT (preferences->>'sms')::boolean))",
        "duckdb": "json_object('email', (preferences->>'email')::BOOLEAN, 'sms', NOT (preferences->>'sms')::BOOLEAN, "
        "'frequency', preferences->>'frequency')",
    }[dialect]
    return [
        f"DELETE FROM {TABLE} WHERE id % 400 = 3",
        _update_sql("/" if dialect == "postgres" else "//", prefs),
        f"INSERT INTO {TABLE} SELECT * FROM {EXTRA} WHERE id < {n + n // 400}",
    ]


def spark_churn_sql(n: int) -> list[str]:
    """Spark's file tables cannot DELETE or UPDATE: the churned table is written beside it and renamed."""
    upd = "id % 200 = 11"
    columns = (
        f"CAST(quantity + CASE WHEN {upd} AND (id div 200) % 3 = 0 THEN 1 ELSE 0 END AS INT) AS quantity",
        "price",
        f"CASE WHEN {upd} THEN score + 0.5 ELSE score END AS score",
        f"CAST(CASE WHEN {upd} AND (id div 200) % 5 = 0 THEN balance + 1 ELSE balance END AS DECIMAL(14,2)) AS balance",
        "name",
        "email",
        f"CASE WHEN {upd} AND (id div 200) % 2 = 0 THEN "
        "(CASE WHEN status = 'active' THEN 'churned' ELSE 'active' END) ELSE status END AS status",
        "signup_at",
        "last_seen_at",
        "is_vip",
        f"CASE WHEN {upd} AND (id div 200) % 4 = 0 THEN named_struct('email', preferences.email, 'sms', "
        "NOT preferences.sms, 'frequency', preferences.frequency) ELSE preferences END AS preferences",
    )
    return [
        f"DROP TABLE IF EXISTS {TABLE}_churned",
        f"CREATE TABLE {TABLE}_churned USING parquet AS SELECT id, {', '.join(columns)} FROM {TABLE} "
        f"WHERE id % 400 <> 3 UNION ALL SELECT * FROM {EXTRA} WHERE id < {n + n // 400}",
        f"DROP TABLE {TABLE}",
        f"ALTER TABLE {TABLE}_churned RENAME TO {TABLE}",
    ]


# ---------------------------------------------------------------------------------------------------------------
# generated tables in DuckDB and Spark (12 columns like run.py's PostgreSQL table; SQL, so nothing crosses Python)
# ---------------------------------------------------------------------------------------------------------------
def _names_sql(open_: str, close: str) -> str:
    return open_ + ", ".join(f"'{name}'" for name in bench._names()) + close


def duckdb_select(start: int, count: int) -> str:
    """``count`` rows from id ``start``: every value a function of (id, column) through DuckDB's ``hash``."""

    def h(k: int) -> str:
        return f"(hash(i, {k}) >> 1)::BIGINT"

    names = _names_sql("[", "]")
    name = f"{names}[({h(7)} % 225) + 1]"
    signup = f"1577836800 + ({h(10)} % 157680000000) / 1000.0"
    return f"""SELECT i AS id,
  ({h(1)} % 1000)::INTEGER AS quantity,
  CASE WHEN {h(2)} % 100 < 5 THEN NULL ELSE round(({h(3)} % 20000) / 100.0, 2) END AS price,
  ({h(4)} % 1000000000) / 1000000000.0 AS score,
  CASE WHEN {h(5)} % 100 < 2 THEN NULL ELSE (({h(6)} % 10000000) / 100.0)::DECIMAL(14,2) END AS balance,
  {name} AS name,
  CASE WHEN {h(8)} % 100 < 10 THEN NULL ELSE lower({name}) || '.' || i || '@example.com' END AS email,
  ['active', 'trial', 'paused', 'churned', 'pending'][({h(9)} % 5) + 1] AS status,
  to_timestamp({signup}) AS signup_at,
  CASE WHEN {h(11)} % 100 < 3 THEN NULL ELSE to_timestamp({signup} + ({h(12)} % 7776000000) / 1000.0) END
    AS last_seen_at,
  {h(13)} % 10 = 0 AS is_vip,
  json_object('email', {h(14)} % 10 < 7, 'sms', {h(15)} % 10 < 3,
              'frequency', ['daily', 'weekly', 'monthly', 'never'][({h(16)} % 4) + 1]) AS preferences
FROM range({start}, {start + count}) AS r(i)"""


def spark_select(start: int, count: int) -> str:
    """The same columns in Spark SQL (``xxhash64``); ``preferences`` is a struct (Spark has no JSON type)."""

    def h(k: int) -> str:
        return f"pmod(xxhash64(id, {k}), 4611686018427387903)"

    names = _names_sql("array(", ")")
    name = f"element_at({names}, CAST(pmod({h(7)}, 225) AS INT) + 1)"
    signup = f"1577836800000 + pmod({h(10)}, 157680000000)"
    return f"""SELECT id,
  CAST(pmod({h(1)}, 1000) AS INT) AS quantity,
  CASE WHEN pmod({h(2)}, 100) < 5 THEN NULL ELSE CAST(pmod({h(3)}, 20000) AS DOUBLE) / 100 END AS price,
  CAST(pmod({h(4)}, 1000000000) AS DOUBLE) / 1000000000 AS score,
  CASE WHEN pmod({h(5)}, 100) < 2 THEN NULL ELSE CAST(pmod({h(6)}, 10000000) / 100 AS DECIMAL(14,2)) END AS balance,
  {name} AS name,
  CASE WHEN pmod({h(8)}, 100) < 10 THEN NULL ELSE concat(lower({name}), '.', id, '@example.com') END AS email,
  element_at(array('active', 'trial', 'paused', 'churned', 'pending'), CAST(pmod({h(9)}, 5) AS INT) + 1) AS status,
  timestamp_millis({signup}) AS signup_at,
  CASE WHEN pmod({h(11)}, 100) < 3 THEN NULL ELSE timestamp_millis({signup} + pmod({h(12)}, 7776000000)) END
    AS last_seen_at,
  pmod({h(13)}, 10) = 0 AS is_vip,
  named_struct('email', pmod({h(14)}, 10) < 7, 'sms', pmod({h(15)}, 10) < 3,
               'frequency', element_at(array('daily', 'weekly', 'monthly', 'never'), CAST(pmod({h(16)}, 4) AS INT) + 1))
    AS preferences
FROM range({start}, {start + count})"""


def duckdb_connect(path: str | Path, memory_limit: str | None) -> Any:
    import duckdb

    return duckdb.connect(str(path), config={"memory_limit": memory_limit} if memory_limit else {})


def generate_duckdb(path: Path, n: int, memory_limit: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with duckdb_connect(path, memory_limit) as con:
        con.execute(f"CREATE TABLE {TABLE} AS {duckdb_select(0, n)}")
        con.execute(f"CREATE TABLE {EXTRA} AS {duckdb_select(n, n // 200)}")
        con.execute("CHECKPOINT")
    return {"seconds": time.perf_counter() - t0, "file_bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------------------------
# what crosses the database boundary, and where the run's time goes, query by query
# ---------------------------------------------------------------------------------------------------------------
#: (regular expression searched in the SQL with its quotes removed, label): the first match names the query
_KINDS = tuple(
    (re.compile(pattern), label)
    for pattern, label in (
        (r"LIMIT 0", "probe: the source's columns (LIMIT 0)"),
        (r"AS repeated_keys", "key check: NULL and repeated keys (a GROUP BY over the source)"),
        (r"GROUP BY d\.__sc_op", "counts: full outer join with the state table, row hash, GROUP BY op"),
        (r"WHERE d\.__sc_op IS NOT NULL", "changed rows: the same full outer join, changed rows returned"),
        (r"LEFT JOIN", "baseline rows: every source row + hash, joined to the state table"),
        (r"'insert' AS __sc_op", "every source row + hash (baseline / first load)"),
        (r"INSERT INTO \S+__next", "baseline: insert a staged batch into the new state table"),
        (r"WHERE (NOT )?EXISTS", "settle: apply the staged changes to the state table"),
        (r"RENAME TO", "swap the new state table in, bookkeeping row"),
        (r"COUNT\(\*\) FROM __stopchurn_source AS s$", "count the source's rows"),
        (r"__meta", "bookkeeping row (read or write)"),
    )
)
OTHER = "DDL and other statements"


def classify(sql: str) -> str:
    plain = re.sub(r'[`"]', "", sql).strip()
    return next((label for pattern, label in _KINDS if pattern.search(plain)), OTHER)


@dataclass
class QueryStat:
    calls: int = 0
    seconds: float = 0.0
    rows: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class QueryLog:
    def __init__(self) -> None:
        self.stats: dict[str, QueryStat] = {}

    def __call__(self, label: str) -> QueryStat:
        stat = self.stats.setdefault(label, QueryStat())
        stat.calls += 1
        return stat

    def table(self) -> list[list[Any]]:
        return [[k, s.calls, s.seconds, s.rows, s.bytes_out, s.bytes_in] for k, s in self.stats.items()]

    def total(self, index: int) -> Any:
        return sum(row[index] for row in self.table())


def counted(batches: Any, stat: QueryStat) -> Iterator[pa.RecordBatch]:
    """``batches`` passed through: the time spent producing each (the database's share), rows and Arrow bytes."""
    it = iter(batches)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                stat.seconds += time.perf_counter() - t0
            stat.rows += batch.num_rows
            stat.bytes_out += batch.nbytes
            yield batch
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


class CountingWarehouse:
    """A warehouse of ``pushdown/warehouse.py`` (or ``SparkWarehouse``) with every call timed and classified, and
    the Arrow bytes of every batch it returns and every table it loads counted."""

    def __init__(self, inner: Any, log: QueryLog) -> None:
        self.inner = inner
        self.log = log
        self.dialect = inner.dialect
        self.transactions = inner.transactions

    def batches(self, sql: str) -> Iterator[pa.RecordBatch]:
        return counted(self.inner.batches(sql), self.log(classify(sql)))

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        stat = self.log(classify(sql))
        t0 = time.perf_counter()
        try:
            out: list[tuple[Any, ...]] = self.inner.rows(sql)
        finally:
            stat.seconds += time.perf_counter() - t0
        stat.rows += len(out)
        stat.bytes_out += len(orjson.dumps(out, default=str))  # a few values: their text size
        return out

    def execute(self, statements: Sequence[str]) -> None:
        stat = self.log(next((k for k in map(classify, statements) if k != OTHER), OTHER))
        t0 = time.perf_counter()
        try:
            self.inner.execute(statements)
        finally:
            stat.seconds += time.perf_counter() - t0

    def load(self, table: str, data: pa.Table) -> None:
        stat = self.log("load: an Arrow table into a staging table")
        t0 = time.perf_counter()
        try:
            self.inner.load(table, data)
        finally:
            stat.seconds += time.perf_counter() - t0
        stat.rows += data.num_rows
        stat.bytes_in += data.nbytes

    def close(self) -> None:
        self.inner.close()


def pushdown_phases() -> bench.Phases:
    """Time and measure the pushdown engine's top-level steps in this process (``run.py``'s ``Phases``)."""
    from airflow_provider_stopchurn.pushdown import engine

    phases = bench.Phases()
    phases.wrap(engine, "check_state", "check the state table against the store")
    phases.wrap(engine, "_source_schema", "the source's columns (probe query)")
    phases.wrap(engine, "_check_keys", "key checks in SQL (NULL and repeated keys)")
    phases.wrap(engine, "_decide", "counts in SQL (full outer join) + safeguards")
    phases.wrap(
        engine,
        "_plan_frame",
        "changed rows: the query, read and encoded in the worker",
        lambda frame: int(frame.estimated_size()),
    )
    phases.wrap(SnapshotStore, "write_plan", "write the plan (snapshot store)")
    phases.wrap(engine, "deliver", "encode updates + send (deliver)")
    phases.wrap(engine, "settle_state", "settle: stage the acknowledged rows, apply them to the state table, commit")
    phases.wrap(engine, "_baseline", "baseline: every row read, encoded in the worker, written to the state table")
    return phases


# ---------------------------------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------------------------------
def run_options(baseline: bool, args: argparse.Namespace) -> SyncOptions:
    opts = bench.options(args.chunk_size, args.concurrency)
    return dataclasses.replace(opts, initial_load="baseline") if baseline else opts


def summary_dict(summary: SyncSummary) -> dict[str, Any]:
    return {
        "inserted": summary.inserted,
        "updated": summary.updated,
        "deleted": summary.deleted,
        "unchanged": summary.unchanged,
        "chunks": summary.chunks,
        "requests": summary.requests,
        "sent_bytes": summary.bytes,
        "baseline": summary.baseline,
    }


def _pg_uri() -> Any:
    from airflow_provider_stopchurn.sources import postgres_uri

    conn = json.loads(os.environ[bench.PG_CONN_ENV])
    return postgres_uri(
        host=conn["host"], port=conn["port"], login=conn["login"], password=None, database=conn["schema"]
    )


def measured(run: Callable[[], Any], phases: bench.Phases) -> tuple[Any, dict[str, Any]]:
    """Run ``run`` in this process: its seconds, CPU seconds, RSS before it and peak RSS (VmHWM reset first)."""
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    hwm_reset = bench._reset_hwm()
    cpu0 = bench._own_cpu()
    t0 = time.perf_counter()
    got = run()
    elapsed = time.perf_counter() - t0
    cpu = bench._own_cpu() - cpu0
    peak = phases.peak() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return got, {
        "seconds": elapsed,
        "cpu": cpu,
        "rss_before_run": rss_before,
        "peak_during_run": peak,
        "peak_source": "VmHWM, reset before the run" if hwm_reset else "ru_maxrss (process lifetime)",
        "phases": phases.table(rss_before),
    }


def child_main(args: argparse.Namespace) -> int:
    if args.child == "pd-spark":
        return spark_child_main(args)
    if args.child == "pd-join":
        return join_child_main(args)
    engine, mode = args.engine, args.mode
    # imported before the start, as in a worker that runs the operator
    from airflow_provider_stopchurn.operators import _source as operator_module
    from airflow_provider_stopchurn.pushdown import DuckDBWarehouse, PostgresWarehouse, WarehouseSource
    from airflow_provider_stopchurn.pushdown import run_warehouse_sync as warehouse_sync

    if engine in ("local", "postgres"):
        import adbc_driver_postgresql.dbapi  # noqa: F401
        from airflow.providers.postgres.hooks.postgres import PostgresHook  # noqa: F401
    else:
        import duckdb  # noqa: F401
    log = QueryLog()
    opts = run_options(mode == "baseline", args)
    store = SnapshotStore(Path(args.root), bench.BRAND_ID, TABLE)
    client = StopChurnClient(args.url, bench.TOKEN)
    if engine == "local":
        phases = bench.engine_phases()
        reader = operator_module.read_postgres
        stat = log("the whole table (ADBC, the operator's read_sql)")
        operator_module.read_postgres = lambda *a, **kw: counted(reader(*a, **kw), stat)

        def run() -> SyncSummary:
            return run_sync(
                lambda: operator_module.read_sql(bench.PG_CONN_ID, QUERY), store, client, opts, run_ms=bench.RUN_MS
            )

    else:
        phases = pushdown_phases()

        def run() -> SyncSummary:
            if engine == "postgres":
                warehouse: Any = PostgresWarehouse(_pg_uri())
                con = None
            else:
                con = duckdb_connect(args.db, args.duckdb_memory_limit)
                warehouse = DuckDBWarehouse(con)
            try:
                source = WarehouseSource(QUERY, CountingWarehouse(warehouse, log), state_schema=STATE_SCHEMA)
                return warehouse_sync(source, store, client, opts, run_ms=bench.RUN_MS)
            finally:
                if con is not None:
                    con.close()

    try:
        summary, result = measured(run, phases)
    finally:
        client.close()
    result.update(summary_dict(summary), queries=log.table())
    print("CHILD-RESULT " + json.dumps(result), flush=True)
    return 0


def diff_queries(state: Any, columns: Sequence[str], parts: bool) -> list[tuple[str, str]]:
    """The database's own time for the diff: ``SELECT COUNT(*)`` of the changed rows over the same ``WITH`` clauses
    the engine's counts and changes queries start with (source, key text, row hash, FULL OUTER JOIN the state
    table); with ``parts``, first its pieces alone: the text of the columns, the MD5 row hash, the join on the key."""
    from airflow_provider_stopchurn.pushdown import sql as S

    src = S.q(S.SOURCE)
    row_hash = S.row_hash_sql(columns)
    text = row_hash[len("MD5(") : -1]
    out = []
    if parts:
        out += [
            (
                "the text of every column, concatenated (no hash, no join)",
                f"SELECT COUNT(*) FROM (SELECT {text} AS v FROM {src} AS s) AS x WHERE x.v <> ''",
            ),
            (
                "the MD5 row hash of every source row (no join)",
                f"SELECT COUNT(*) FROM (SELECT {row_hash} AS v FROM {src} AS s) AS x WHERE x.v <> ''",
            ),
            (
                "full outer join with the state table on the key text alone (no hash)",
                f"SELECT COUNT(*) FROM (SELECT CAST(s.{S.q('id')} AS TEXT) AS k FROM {src} AS s) AS n "
                f"FULL OUTER JOIN {state.qualified} AS t ON n.k = t.{S.q('id')}",
            ),
        ]
    full = state._diff_cte(columns, update_all=False) + f"SELECT COUNT(*) FROM d WHERE d.{S.q(S.OP)} IS NOT NULL"
    out.append(("the diff: key text + row hash + full outer join, changed rows counted", full))
    return [(label, state.r(sql, QUERY)) for label, sql in out]


def join_child_main(args: argparse.Namespace) -> int:
    """The database's own time for the diff (:func:`diff_queries`), each query measured on its own."""
    from airflow_provider_stopchurn.pushdown import PostgresWarehouse
    from airflow_provider_stopchurn.pushdown import sql as S

    if args.engine == "duckdb":
        con = duckdb_connect(args.db, args.duckdb_memory_limit)
        query: Callable[[str], list[tuple[Any, ...]]] = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        close = con.close
    else:
        warehouse = PostgresWarehouse(_pg_uri())
        query, close = warehouse.rows, warehouse.close
    state = S.StateTable(STATE_SCHEMA, STATE_TABLE, ("id",), args.engine)
    parts = []
    try:
        columns = [
            str(row[0])
            for row in query(
                "SELECT column_name FROM information_schema.columns "
                f"WHERE table_name = '{TABLE}' ORDER BY ordinal_position"
            )
        ]
        for label, sql in diff_queries(state, columns, args.mode == "parts"):
            phases = bench.Phases()

            def run(label: str = label, sql: str = sql, phases: bench.Phases = phases) -> int:
                with phases.step(label):
                    return int(query(sql)[0][0])

            value, result = measured(run, phases)
            parts.append({"label": label, "value": value, **result})
    finally:
        close()
    print("CHILD-RESULT " + json.dumps({**parts[-1], "changed": parts[-1]["value"], "parts": parts}), flush=True)
    return 0


def run_pd_child(kind: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """This script with ``--child kind`` and ``--key value`` for each of ``extra``; what it printed."""
    cmd = [
        sys.executable,
        str(bench.HERE / "run.py"),
        "--child",
        kind,
        "--chunk-size",
        str(args.chunk_size),
        "--concurrency",
        str(args.concurrency),
        "--duckdb-memory-limit",
        args.duckdb_memory_limit,
        "--spark-driver-memory",
        args.spark_driver_memory,
    ]
    for key, value in extra.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S)
    for line in out.stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"child {kind} {extra} failed (exit {out.returncode}): {out.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------------------
# correctness: counts, what StopChurn holds, and a second run that sends nothing
# ---------------------------------------------------------------------------------------------------------------
def sample_ids(n: int, k: int = SAMPLE) -> dict[str, list[int]]:
    rng = np.random.default_rng(bench.SEED)

    def pick(ids: range) -> list[int]:
        chosen = np.sort(rng.choice(len(ids), size=min(k, len(ids)), replace=False))
        return [int(ids[int(i)]) for i in chosen]

    return {
        "updated": pick(range(11, n, 200)),
        "inserted": pick(range(n, n + n // 400)),
        "deleted": pick(range(3, n, 400)),
        "unchanged": pick(range(50, n, 200)),
    }


def sample_sql(sample: dict[str, list[int]]) -> str:
    ids = sorted({i for ids in sample.values() for i in ids})
    return f"SELECT * FROM {TABLE} WHERE id IN ({', '.join(map(str, ids))})"


def check_run(what: str, got: dict[str, Any], want: bench.Churn) -> None:
    bench.check_counts(what, bench.Churn(got["inserted"], got["updated"], got["deleted"]), want)


def check_again(what: str, got: dict[str, Any], sandbox_requests: int) -> None:
    sent = (got["inserted"], got["updated"], got["deleted"], got["chunks"], sandbox_requests)
    if sent != (0, 0, 0, 0, 0):
        raise RuntimeError(f"{what}: the second run sent something (ins, upd, del, chunks, requests) = {sent}")


def verify_sandbox(url: str, source: pa.Table, sample: dict[str, list[int]], churn: bench.Churn) -> dict[str, Any]:
    """After a churn run from a baseline on a reset sandbox: StopChurn got exactly the churn (its counters), holds
    exactly the inserted and updated rows, and for the sampled keys holds the source's rows as the local path
    encodes them (``canonical_source`` + ``encode_rows`` of the rows read from the warehouse), none of the deleted
    ones and none of the unchanged ones (a baseline sends nothing)."""
    stats = requests.get(url + "/_sandbox/stats", timeout=60).json()["updates"]
    body = requests.get(f"{url}/_sandbox/tables/{bench.BRAND_ID}/{TABLE}", timeout=1800).content
    held = {row["id"]: row for row in orjson.loads(body)["rows"]}
    del body
    opts = bench.options(500, 1)
    canon = canonical_source(source, opts)
    texts = encode_rows(
        canon.frame, canon.kinds, nest_dotted_columns=opts.nest_dotted_columns, decimal_as_string=opts.decimal_as_string
    )
    want = {row["id"]: row for row in map(orjson.loads, texts.to_list())}
    problems: list[str] = []
    got_counts = (stats["insert"], stats["update"], stats["delete"])
    if got_counts != (churn.inserted, churn.updated, churn.deleted):
        problems.append(f"the sandbox counted (insert, update, delete) = {got_counts}, expected {churn}")
    if len(held) != churn.inserted + churn.updated:
        problems.append(f"the sandbox holds {len(held):,} rows, expected {churn.inserted + churn.updated:,}")
    for kind in ("updated", "inserted"):
        for i in sample[kind]:
            if i not in want:
                problems.append(f"{kind} id {i} is not in the source")
            elif held.get(i) != want[i]:
                problems.append(f"{kind} id {i}: sandbox {held.get(i)!r} != source {want[i]!r}")
    problems += [f"deleted id {i} is in the source or the sandbox" for i in sample["deleted"] if i in want or i in held]
    problems += [f"unchanged id {i} was sent or is gone" for i in sample["unchanged"] if i not in want or i in held]
    return {
        "sandbox_rows": len(held),
        "counters": list(got_counts),
        "checked": sum(len(v) for v in sample.values()),
        "problems": problems[:10],
        "problem_count": len(problems),
    }


def require_ok(what: str, check: dict[str, Any]) -> None:
    if check["problem_count"]:
        raise RuntimeError(f"{what}: sandbox != source: {check['problem_count']} problems, e.g. {check['problems']}")


# ---------------------------------------------------------------------------------------------------------------
# saving the state of a churn run's start, for repetitions
# ---------------------------------------------------------------------------------------------------------------
def state_copy(dialect: str, save: bool) -> list[str]:
    q = "`" if dialect == "spark" else '"'
    out = []
    for name in (STATE_TABLE, f"{STATE_TABLE}__meta"):
        live, saved = f"{q}{STATE_SCHEMA}{q}.{q}{name}{q}", f"{q}{STATE_SCHEMA}{q}.{q}{name}__saved{q}"
        src, dst = (live, saved) if save else (saved, live)
        out += [f"DROP TABLE IF EXISTS {dst}", f"CREATE TABLE {dst} AS SELECT * FROM {src}"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# scenario 1: PostgreSQL, pushdown vs the local engine
# ---------------------------------------------------------------------------------------------------------------
def bench_postgres(
    args: argparse.Namespace, tmp: Path, sandbox: bench.Sandbox, server: Any, rep: dict[str, Any]
) -> None:
    n = args.rows
    pg = bench.PostgresCpu(server)
    print(f"[postgres] loading {n:,} rows (+ {n // 200:,} spare rows) with COPY ...", flush=True)
    table = bench.load_sql_table(server, n)
    rep["pg_table"] = table
    print(f"  {table.load_s:.1f} s, table {bench.fmt_bytes(table.table_bytes)}", flush=True)
    roots = {"local": bench.fresh_dir(tmp, "pg-local"), "postgres": bench.fresh_dir(tmp, "pg-pushdown")}
    runs: dict[str, list[dict[str, Any]]] = {}
    rep["pg_runs"] = runs

    def child(key: str, engine: str, mode: str, kind: str = "pd-run") -> dict[str, Any]:
        sandbox.reset()
        sb0, db0 = sandbox.cpu(), pg.cpu()
        got = run_pd_child(kind, args, engine=engine, mode=mode, root=roots.get(engine), url=sandbox.url)
        got["sandbox_cpu"], got["db_cpu"] = sandbox.cpu() - sb0, pg.cpu() - db0
        got["sandbox_requests"] = sandbox.stats()["requests"]
        runs.setdefault(key, []).append(got)
        above = got["peak_during_run"] - got["rss_before_run"]
        if kind == "pd-join":
            print(f"  {key}: {got['seconds']:.2f} s ({got['changed']:,} changed rows)", flush=True)
            return got
        out = sum(q[4] for q in got["queries"])
        print(
            f"  {key}: {got['seconds']:.2f} s, peak +{bench.fmt_bytes(above)}, {bench.fmt_bytes(out)} out of the "
            f"database, (ins, upd, del) = ({got['inserted']:,}, {got['updated']:,}, {got['deleted']:,})",
            flush=True,
        )
        return got

    print("[postgres] baselines (initial_load='baseline': the table recorded as delivered, nothing sent) ...")
    for engine in ("local", "postgres"):
        got = child(f"{engine} baseline", engine, "baseline")
        if not got["baseline"] or got["chunks"] or got["unchanged"] != n:
            raise RuntimeError(f"{engine} baseline: {got}")
    with server.connect() as conn:
        size = f"pg_total_relation_size('{STATE_SCHEMA}.{STATE_TABLE}')"
        rep["pg_state_bytes"] = int(conn.execute(f"SELECT {size}").fetchone()[0])
    churn = churn_of(n)
    rep["pg_churn"] = churn
    print("[postgres] applying the churn with SQL ...", flush=True)
    t0 = time.perf_counter()
    with server.connect(autocommit=False) as conn:
        counts = [conn.execute(statement).rowcount for statement in churn_sql("postgres", n)]
        conn.commit()
    server.execute(f"VACUUM (ANALYZE) {TABLE}")
    rep["pg_churn_s"] = time.perf_counter() - t0
    if tuple(counts) != (churn.deleted, churn.updated, churn.inserted):
        raise RuntimeError(f"the churn changed (deleted, updated, inserted) = {counts}, expected {churn}")
    sample = sample_ids(n)
    from airflow_provider_stopchurn.sources import postgres_uri, read_postgres

    uri = postgres_uri(host=server.host, port=server.port, login=server.user, password=None, database=server.dbname)
    source = pa.Table.from_batches(list(read_postgres(uri, sample_sql(sample))))
    reps = args.reps or 1
    saved: dict[str, Path] = {}
    if reps > 1:  # each repetition starts from the same state: the snapshot roots and the state table
        saved = {engine: bench.copy_root(root, tmp / f"{root.name}-saved") for engine, root in roots.items()}
        server.execute(*state_copy("postgres", save=True))
    changed = churn.inserted + churn.updated + churn.deleted
    print(f"[postgres] PostgreSQL's own diff query, churn runs local and pushdown ({reps} repetition(s)) ...")
    for i in range(reps):
        if i:
            for engine, root in roots.items():
                bench.copy_root(saved[engine], root)
            server.execute(*state_copy("postgres", save=False))
        got = child("join", "postgres", "parts" if i == 0 else "join", kind="pd-join")
        if got["changed"] != changed:
            raise RuntimeError(f"PostgreSQL's own diff query counted {got['changed']:,} changed rows, not {changed:,}")
        for engine in ("local", "postgres"):
            got = child(f"{engine} churn", engine, "churn")
            check_run(f"{engine} churn run", got, churn)
            got["verify"] = verify_sandbox(sandbox.url, source, sample, churn)
            require_ok(f"{engine} churn run", got["verify"])
    print("[postgres] second runs (nothing changed) ...", flush=True)
    for engine in ("local", "postgres"):
        got = child(f"{engine} again", engine, "again")
        check_again(f"{engine} second run", got, got["sandbox_requests"])
    sandbox.reset()


# ---------------------------------------------------------------------------------------------------------------
# scenario 2: DuckDB
# ---------------------------------------------------------------------------------------------------------------
def bench_duckdb(args: argparse.Namespace, tmp: Path, sandbox: bench.Sandbox, rep: dict[str, Any]) -> None:
    n = args.duckdb_rows
    path = tmp / "warehouse.duckdb"
    root = bench.fresh_dir(tmp, "duckdb-pushdown")
    print(f"[duckdb] generating {n:,} rows (+ {n // 200:,} spare rows) in {path.name} ...", flush=True)
    rep["duckdb_gen"] = generate_duckdb(path, n, args.duckdb_memory_limit)
    print(
        f"  {rep['duckdb_gen']['seconds']:.1f} s, file {bench.fmt_bytes(rep['duckdb_gen']['file_bytes'])}", flush=True
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    rep["duckdb_runs"] = runs

    def child(key: str, kind: str = "pd-run", mode: str | None = None) -> dict[str, Any]:
        sandbox.reset()
        sb0 = sandbox.cpu()
        got = run_pd_child(kind, args, engine="duckdb", mode=mode, root=root, url=sandbox.url, db=path)
        got["sandbox_cpu"] = sandbox.cpu() - sb0
        got["sandbox_requests"] = sandbox.stats()["requests"]
        runs.setdefault(key, []).append(got)
        above = got["peak_during_run"] - got["rss_before_run"]
        print(f"  {key}: {got['seconds']:.2f} s, peak +{bench.fmt_bytes(above)}", flush=True)
        return got

    print("[duckdb] baseline (initial_load='baseline') ...", flush=True)
    got = child("baseline", mode="baseline")
    if not got["baseline"] or got["unchanged"] != n:
        raise RuntimeError(f"duckdb baseline: {got}")
    rep["duckdb_state_file_bytes"] = path.stat().st_size
    churn = churn_of(n)
    rep["duckdb_churn"] = churn
    print("[duckdb] applying the churn with SQL ...", flush=True)
    t0 = time.perf_counter()
    with duckdb_connect(path, args.duckdb_memory_limit) as con:
        con.execute("BEGIN TRANSACTION")
        counts = [int(con.execute(s).fetchone()[0]) for s in churn_sql("duckdb", n)]
        con.execute("COMMIT")
        sample = sample_ids(n)
        relation = con.sql(sample_sql(sample))
        source = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        if args.reps and args.reps > 1:
            for statement in state_copy("duckdb", save=True):
                con.execute(statement)
    rep["duckdb_churn_s"] = time.perf_counter() - t0
    if tuple(counts) != (churn.deleted, churn.updated, churn.inserted):
        raise RuntimeError(f"the churn changed (deleted, updated, inserted) = {counts}, expected {churn}")
    reps = args.reps or 1
    saved = bench.copy_root(root, tmp / "duckdb-pushdown-saved") if reps > 1 else root
    print(f"[duckdb] DuckDB's own join and the churn run, alternating ({reps} repetition(s)) ...", flush=True)
    for i in range(reps):
        if i:
            bench.copy_root(saved, root)
            with duckdb_connect(path, args.duckdb_memory_limit) as con:
                for statement in state_copy("duckdb", save=False):
                    con.execute(statement)
        got = child("join", kind="pd-join", mode="parts" if i == 0 else "join")
        if got["changed"] != churn.inserted + churn.updated + churn.deleted:
            raise RuntimeError(f"DuckDB's own join counted {got['changed']:,} changed rows, expected {churn}")
        got = child("churn", mode="churn")
        check_run("duckdb churn run", got, churn)
        got["verify"] = verify_sandbox(sandbox.url, source, sample, churn)
        require_ok("duckdb churn run", got["verify"])
    print("[duckdb] second run (nothing changed) ...", flush=True)
    got = child("again", mode="again")
    check_again("duckdb second run", got, got["sandbox_requests"])
    rep["duckdb_file_bytes"] = path.stat().st_size
    sandbox.reset()
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# scenario 3: Spark local mode (one child process: the in-memory catalog lives as long as its session)
# ---------------------------------------------------------------------------------------------------------------
def spark_unavailable() -> str | None:
    try:
        import pyspark
    except ImportError as err:
        return f"pyspark is not installed ({err})"
    try:
        from airflow_provider_stopchurn.pushdown.spark import SparkWarehouse  # noqa: F401
    except ImportError as err:
        return f"airflow_provider_stopchurn/pushdown/spark.py is missing ({err})"
    if _spark_session_module().find_java() is None:
        return f"no Java runtime for Spark {pyspark.__version__} ($JAVA_HOME/bin/java or java on PATH)"
    return None


def _spark_session_module() -> Any:
    """``tests/spark_session.py``: the test suite's Spark settings (one place for them)."""
    tests_dir = str(bench.HERE.parent / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import spark_session

    return spark_session


def _jvm_pids() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True) if "java" in p.name()]


def _jvm_status(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _jvm_reset(pid: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def spark_child_main(args: argparse.Namespace) -> int:
    """Start a local-mode session, generate the table, then baseline, churn, churn run, second run, each measured
    (VmHWM of this process and of the JVM reset before it); the sample check reads the source through Spark."""
    from pyspark.sql import SparkSession

    from airflow_provider_stopchurn.pushdown import WarehouseSource, run_warehouse_sync
    from airflow_provider_stopchurn.pushdown.spark import SparkWarehouse

    n = args.rows
    base = Path(args.root).parent / "spark"
    (base / "scratch").mkdir(parents=True, exist_ok=True)
    conf = _spark_session_module().spark_conf(base)
    conf.update(
        {
            "spark.app.name": "stopchurn-bench",
            "spark.driver.memory": args.spark_driver_memory,
            "spark.driver.maxResultSize": "0",  # the baseline collects every row (see the results)
            "spark.sql.shuffle.partitions": "8",
        }
    )
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    t0 = time.perf_counter()
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    out: dict[str, Any] = {"start_s": time.perf_counter() - t0, "runs": {}}
    sandbox = psutil.Process(args.sandbox_pid)
    jvm = _jvm_pids()
    try:
        t0 = time.perf_counter()
        spark.sql(f"CREATE TABLE {TABLE} USING parquet AS {spark_select(0, n)}")
        spark.sql(f"CREATE TABLE {EXTRA} USING parquet AS {spark_select(n, n // 200)}")
        out["gen_s"] = time.perf_counter() - t0
        print(f"  generated {n:,} rows in {out['gen_s']:.1f} s", file=sys.stderr, flush=True)
        store = SnapshotStore(Path(args.root), bench.BRAND_ID, TABLE)

        def one(key: str, baseline: bool) -> dict[str, Any]:
            requests.post(args.url + "/_sandbox/reset", timeout=120).raise_for_status()
            log = QueryLog()
            phases = pushdown_phases()
            client = StopChurnClient(args.url, bench.TOKEN)
            for pid in jvm:
                _jvm_reset(pid)
            jvm_before = sum(_jvm_status(pid, "VmRSS") for pid in jvm)
            sb = sandbox.cpu_times()
            try:
                source = WarehouseSource(QUERY, CountingWarehouse(SparkWarehouse(spark), log), STATE_SCHEMA)
                summary, result = measured(
                    lambda: run_warehouse_sync(source, store, client, run_options(baseline, args), run_ms=bench.RUN_MS),
                    phases,
                )
            finally:
                client.close()
            sb2 = sandbox.cpu_times()
            result.update(summary_dict(summary), queries=log.table())
            result["jvm_rss_before"] = jvm_before
            result["jvm_peak"] = sum(_jvm_status(pid, "VmHWM") for pid in jvm)
            result["sandbox_cpu"] = sb2.user + sb2.system - sb.user - sb.system
            result["sandbox_requests"] = requests.get(args.url + "/_sandbox/stats", timeout=60).json()["requests"]
            out["runs"][key] = result
            print(f"  {key}: {result['seconds']:.2f} s", file=sys.stderr, flush=True)
            return result

        one("baseline", True)
        t0 = time.perf_counter()
        for statement in spark_churn_sql(n):
            spark.sql(statement)
        out["churn_s"] = time.perf_counter() - t0
        sample = sample_ids(n)
        source = spark.sql(sample_sql(sample)).toArrow()
        one("churn", False)
        out["verify"] = verify_sandbox(args.url, source, sample, churn_of(n))
        one("again", False)
    finally:
        spark.stop()
    print("CHILD-RESULT " + json.dumps(out), flush=True)
    return 0


def bench_spark(args: argparse.Namespace, tmp: Path, sandbox: bench.Sandbox, rep: dict[str, Any]) -> None:
    n = args.spark_rows
    root = bench.fresh_dir(tmp, "spark-pushdown")
    print(f"[spark] local mode: {n:,} rows; generation, baseline, churn run, second run in one child ...", flush=True)
    got = run_pd_child("pd-spark", args, rows=n, root=root, url=sandbox.url, sandbox_pid=sandbox.proc.pid)
    rep["spark"] = got
    churn = churn_of(n)
    rep["spark_churn"] = churn
    runs = got["runs"]
    for key, r in runs.items():
        above = r["peak_during_run"] - r["rss_before_run"]
        print(f"  {key}: {r['seconds']:.2f} s, peak +{bench.fmt_bytes(above)}", flush=True)
    if not runs["baseline"]["baseline"] or runs["baseline"]["unchanged"] != n:
        raise RuntimeError(f"spark baseline: {runs['baseline']}")
    check_run("spark churn run", runs["churn"], churn)
    require_ok("spark churn run", got["verify"])
    check_again("spark second run", runs["again"], runs["again"]["sandbox_requests"])
    sandbox.reset()


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        print(f"error: --engines takes postgres, duckdb, spark; got {args.engines!r}", file=sys.stderr)
        return 2
    args.duckdb_rows = args.duckdb_rows or 10 * args.rows
    args.spark_rows = args.spark_rows or args.rows
    if args.out is None:
        args.out = str(bench.HERE / "RESULTS-pushdown.md")
    if args.from_json:
        return write(*load_reports([Path(p) for p in args.from_json.split(",")]), args.out)
    argv = sys.argv[1:]
    if "--save-json" in argv:  # where a copy of the measurements went is not part of the command
        del argv[argv.index("--save-json") : argv.index("--save-json") + 2]
    command = "python benchmarks/run.py " + " ".join(argv)
    if "spark" in engines and (why := spark_unavailable()):
        print(f"error: the Spark scenario cannot run: {why}. Pass --engines postgres,duckdb.", file=sys.stderr)
        return 2
    # the local engine's baseline and churn run hold the whole table (~0.8 GB per million rows, run.py's results)
    need = args.rows * 800 if "postgres" in engines else 0
    if need > psutil.virtual_memory().available:
        print(f"refusing: {args.rows:,} rows need about {need / GB:.0f} GiB of memory", file=sys.stderr)
        return 2
    disk = sum(
        rows * per_row
        for engine, rows, per_row in (
            ("postgres", args.rows, 500),
            ("duckdb", args.duckdb_rows, 500),  # the file ~200, the changed-rows query's spill ~300
            ("spark", args.spark_rows, 300),
        )
        if engine in engines
    )
    tmp = Path(tempfile.mkdtemp(prefix="stopchurn-pushdown-"))
    if disk > shutil.disk_usage(tmp).free:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"refusing: the tables need about {disk / GB:.0f} GiB of disk in {tmp.parent}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rep: dict[str, Any] = {"engines": engines}
    sandbox: bench.Sandbox | None = None
    try:
        with contextlib.ExitStack() as stack:
            server = None
            if "postgres" in engines:
                pg = bench.pg_server_module()
                try:
                    server = stack.enter_context(pg.running_postgres())
                except pg.PostgresUnavailable as err:
                    print(f"error: the PostgreSQL scenario needs a PostgreSQL server: {err}", file=sys.stderr)
                    return 2
                print(f"PostgreSQL up on {server.host}:{server.port}", flush=True)
                with server.connect() as conn:
                    rep["pg_version"] = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]
            bench.airflow_environment(tmp, server)
            sandbox = bench.Sandbox()
            print(f"sandbox up (separate process, pid {sandbox.proc.pid})", flush=True)
            scenarios = (  # each with what to stop once it is done
                ("postgres", lambda: bench_postgres(args, tmp, sandbox, server, rep), stack.close),
                ("duckdb", lambda: bench_duckdb(args, tmp, sandbox, rep), None),
                ("spark", lambda: bench_spark(args, tmp, sandbox, rep), None),
            )
            for engine, scenario, done in scenarios:
                if engine not in engines:
                    continue
                try:
                    scenario()
                except Exception as err:  # the other scenarios still run; the results name the failure
                    traceback.print_exc()
                    lines = str(err).strip().splitlines() or [""]
                    why = lines[0][:300] + (f" ... {lines[-1][:500]}" if len(lines) > 1 else "")
                    rep.setdefault("failed", {})[engine] = f"{type(err).__name__}: {why}"
                    _drop(rep, engine)
                finally:
                    if done is not None:
                        done()  # the PostgreSQL server: stopped, its files removed
                    _clean(tmp)
                if args.save_json:
                    save_report(Path(args.save_json), rep, args, command, time.perf_counter() - started)
    finally:
        if sandbox is not None:
            sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rep["load"] = (load_before, os.getloadavg()[0])
    if args.save_json:
        save_report(Path(args.save_json), rep, args, command, time.perf_counter() - started)
    write(rep, args, command, time.perf_counter() - started, args.out)
    return 1 if rep.get("failed") else 0


def _drop(rep: dict[str, Any], engine: str) -> None:
    """Forget a failed scenario's partial measurements."""
    prefix = {"postgres": "pg_", "duckdb": "duckdb_", "spark": "spark"}[engine]
    for key in [k for k in rep if k.startswith(prefix)]:
        del rep[key]


def _clean(tmp: Path) -> None:
    """Remove a finished scenario's tables, snapshots and spill files (the disk the next one needs)."""
    for leftover in tmp.iterdir():
        if leftover.name == "airflow-home":
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def write(rep: dict[str, Any], args: argparse.Namespace, command: str, wall: float, out: str) -> int:
    text = render(rep, args, command, wall)
    print()
    print(text)
    if out != "-":
        Path(out).write_text(text)
        print(f"(written to {Path(out).name})")
    return 1 if rep.get("failed") else 0


_ARGS = ("rows", "duckdb_rows", "spark_rows", "reps", "chunk_size", "concurrency", "duckdb_memory_limit")
_ARGS += ("spark_driver_memory",)


def save_report(path: Path, rep: dict[str, Any], args: argparse.Namespace, command: str, wall: float) -> None:
    rep = {**rep, "load_now": os.getloadavg()[0]}
    data = {
        "rep": {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in rep.items()},
        "args": {k: getattr(args, k) for k in _ARGS},
        "command": command,
        "wall": wall,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    path.write_text(json.dumps(data, default=str))


def load_reports(paths: list[Path]) -> tuple[dict[str, Any], argparse.Namespace, str, float]:
    """The measurements of one or more ``--save-json`` files; a scenario measured in a later file replaces (or
    fills in) the earlier ones'."""
    rep: dict[str, Any] = {"runs": [], "failed": {}}
    values: dict[str, Any] = {}
    for path in paths:
        data = json.loads(path.read_text())
        one, args = data["rep"], data["args"]
        for key in [k for k in one if k.endswith("_churn")]:
            one[key] = bench.Churn(**one[key])
        if "pg_table" in one:
            one["pg_table"] = bench.SqlTable(**{k: v for k, v in one["pg_table"].items() if k != "churn"})
        load = one.pop("load", None) or (float("nan"), one.get("load_now", float("nan")))
        done = [engine for engine in ENGINES if _has(one, engine)]
        for engine in done:
            rep["failed"].pop(engine, None)
        failed = one.pop("failed", {})
        rep["failed"].update({e: why for e, why in failed.items() if not _has(rep, e)})
        rep.update(one)
        rep["runs"].append({"command": data["command"], "date": data["date"], "wall": data["wall"], "load": load})
        rep["runs"][-1].update(engines=done, failed=failed)
        for key in ("rows", "chunk_size", "concurrency", "reps", "duckdb_memory_limit", "spark_driver_memory"):
            values.setdefault(key, args[key])
        for engine, keys in (("duckdb", ("duckdb_rows", "duckdb_memory_limit")), ("spark", ("spark_rows",))):
            if engine in done:
                values.update({key: args[key] for key in keys})
    rep["load"] = (rep["runs"][0]["load"][0], rep["runs"][-1]["load"][1])
    rep["date"] = rep["runs"][-1]["date"]
    wall = sum(float(r["wall"]) for r in rep["runs"])
    return rep, argparse.Namespace(**values), rep["runs"][0]["command"], wall


def _has(rep: dict[str, Any], engine: str) -> bool:
    return {"postgres": "pg_runs", "duckdb": "duckdb_runs", "spark": "spark"}[engine] in rep


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:.2f} MB" if nbytes < 10 * MB else bench.fmt_bytes(nbytes)


def _above(run: dict[str, Any]) -> int:
    return int(run["peak_during_run"] - run["rss_before_run"])


def _out(run: dict[str, Any]) -> int:
    return int(sum(q[4] for q in run["queries"]))


def _in(run: dict[str, Any]) -> int:
    return int(sum(q[5] for q in run["queries"]))


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def _highest(runs: list[dict[str, Any]]) -> int:
    return max(_above(r) for r in runs)


def _secs(runs: list[dict[str, Any]]) -> str:
    s = sorted(r["seconds"] for r in runs)
    return f"{_median(runs)['seconds']:.2f}" + (f" ({s[0]:.2f}-{s[-1]:.2f})" if len(s) > 1 else "")


def _java_version() -> str:
    java = _spark_session_module().find_java()
    if java is None:
        return "(none found)"
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False, timeout=60)
    match = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    return match.group(1) if match else "(unknown version)"


def _versions(rep: dict[str, Any]) -> str:
    m = bench.machine()
    parts = [
        f"Python {m['python']}; polars {m['polars']}, pyarrow {m['pyarrow']}, sqlglot {bench._version('sqlglot')}",
        f"adbc-driver-postgresql {m['adbc']}",
    ]
    if "pg_version" in rep:
        parts.append(f"PostgreSQL {rep['pg_version']}")
    if "duckdb_runs" in rep:
        parts.append(f"DuckDB {bench._version('duckdb')}")
    if "spark" in rep:
        parts.append(f"pyspark {bench._version('pyspark')} on Java {_java_version()}")
    return ", ".join(parts)


def query_table(run: dict[str, Any], db: str) -> list[str]:
    out = [
        f"| query or call | calls | seconds in {db} | rows returned / loaded | bytes out of {db} | bytes into {db} |",
        "|---|---|---|---|---|---|",
    ]
    for label, calls, seconds, rows, bytes_out, bytes_in in sorted(run["queries"], key=lambda q: -q[2]):
        out.append(
            bench._row(
                label,
                calls,
                f"{seconds:.2f}",
                f"{rows:,}",
                _mb(bytes_out) if bytes_out else "",
                _mb(bytes_in) if bytes_in else "",
            )
        )
    total_s = sum(q[2] for q in run["queries"])
    out.append(
        bench._row(
            "total",
            "",
            f"{total_s:.2f} of {run['seconds']:.2f}",
            "",
            _mb(_out(run)),
            _mb(_in(run)),
        )
    )
    return out


def steps_text(run: dict[str, Any]) -> str:
    return "; ".join(f"{row[0]} {row[1]:.2f} s (peak +{bench.fmt_bytes(row[2])})" for row in run["phases"])


def run_row(label: str, runs: list[dict[str, Any]], ref: dict[str, Any] | None, db_cpu: bool) -> str:
    r = _median(runs)
    ratio = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else ""
    cells = [label, _secs(runs), ratio, f"{r['cpu']:.2f}"]
    if db_cpu:
        cells.append(f"{r['db_cpu']:.2f}")
    cells += [
        f"{r['sandbox_cpu']:.2f}",
        bench._above(_highest(runs)),
        _mb(_out(r)),
        _mb(_in(r)) if _in(r) else "-",
        f"{r['inserted']:,} / {r['updated']:,} / {r['deleted']:,}",
        f"{r['chunks']:,}",
    ]
    return bench._row(*cells)


def render(rep: dict[str, Any], args: argparse.Namespace, command: str, wall: float) -> str:
    m = bench.machine()
    sizes = []
    if "pg_runs" in rep:
        sizes.append(f"PostgreSQL {args.rows:,} rows")
    if "duckdb_runs" in rep:
        sizes.append(f"DuckDB {args.duckdb_rows:,} rows")
    if "spark" in rep:
        sizes.append(f"Spark {args.spark_rows:,} rows")
    runs = rep.get("runs") or []
    if len(runs) > 1:
        head = [
            f"- Commands ({wall:.0f} s in all; `make bench-pushdown` runs the first with `.venv/bin/python`, "
            "`make bench-large` too). Each scenario's numbers, and the ratios within it, come from one run:"
        ]
        for r in runs:
            command = re.sub(r" --out \S+", "", r["command"])  # where its own results file went
            head.append(
                f"  - `{command}`: {r['date']}, {r['wall']:.0f} s; results taken from it: "
                + (", ".join(r["engines"]) or "none")
                + "".join(
                    f"; its {engine} scenario FAILED (measured again by a later command): `{why}`"
                    for engine, why in (r.get("failed") or {}).items()
                    if _has(rep, engine)
                )
            )
    else:
        head = [
            f"- Command: `{command}` (`make bench-pushdown` runs it with `.venv/bin/python`; `make bench-large` too)",
            f"- Date: {rep.get('date') or dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; the whole "
            f"benchmark took {wall:.0f} s",
        ]
    out = [
        "# Benchmark results: the diff inside the warehouse (pushdown)",
        "",
        *head,
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['os']}",
        f"- {_versions(rep)}",
        f"- Scenarios: {', '.join(sizes)}; each run of the engine in a fresh child process.",
        f"- Engine settings: chunk_size={args.chunk_size}, max_concurrent_requests={args.concurrency}, "
        "max_delete_fraction=1.0, state_schema='stopchurn_state'. The StopChurn sandbox runs in its own process on "
        "127.0.0.1 (no latency added) and is reset before every run.",
        "- Churn (every scenario): 1% of the rows, applied with SQL after the baseline: 0.5% updated (`id % 200 = 11`; "
        "each changes its score, some also status, quantity, balance or preferences), 0.25% deleted (`id % 400 = 3`), "
        "0.25% inserted (spare rows generated with the table).",
        "- Before the churn, each path records the table with `initial_load='baseline'` (as delivered, nothing sent): "
        "the local engine writes its snapshot, the pushdown engine fills its state table.",
        "- Peak RSS above start: VmHWM of the child process, reset just before the run, minus its RSS then (imports "
        "done: Airflow, the operator's module, the database driver). Bytes out of the database: the Arrow bytes "
        "(`RecordBatch.nbytes`) of every batch the run read (the local path: the ADBC batches of the whole table; the "
        "pushdown: its queries' results); bytes into it: the Arrow tables the pushdown loaded (staging tables).",
        f"- Seconds: median of {args.reps or 1} repetition(s). CPU s: of the child process (all threads). The "
        f"machine's {m['cores']} cores were shared with other work (1-minute load average {rep['load'][0]:.2f} at the "
        "start, "
        f"{rep['load'][1]:.2f} at the end): seconds are noisy; ratios within this run are what counts.",
    ]
    out += render_targets(rep, args)
    for engine, why in (rep.get("failed") or {}).items():
        out += ["", f"**The {engine} scenario FAILED** (its results are left out): `{why}`"]
    out += render_findings(rep, args)
    if "pg_runs" in rep:
        out += render_postgres(rep, args)
    if "duckdb_runs" in rep:
        out += render_duckdb(rep, args)
    if "spark" in rep:
        out += render_spark(rep, args)
    return "\n".join(out) + "\n"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISS")


def render_targets(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    out = ["", "## Targets", "", "| target | measured | result |", "|---|---|---|"]
    bounds: list[str] = []
    if "duckdb_runs" in rep:
        churn = rep["duckdb_runs"]["churn"]
        above = _highest(churn)
        size = (
            "" if args.duckdb_rows == 100_000_000 else f" (target set at 100M rows; this run has {args.duckdb_rows:,})"
        )
        out.append(
            bench._row(
                f"DuckDB churn run: worker peak RSS above its start <= 300 MB{size}",
                bench._above(above),
                _verdict(above <= RSS_TARGET),
            )
        )
        if above > RSS_TARGET:
            bounds.append(duckdb_memory_bound(rep, args))
    for key, name in (("pg_runs", "PostgreSQL"), ("duckdb_runs", "DuckDB"), ("spark", "Spark")):
        if key not in rep:
            continue
        churn = rep[key.replace("_runs", "") + "_churn"]
        checks = verify_of(rep, key)
        out.append(
            bench._row(
                f"{name} pushdown: churn run counts = the churn; StopChurn holds the source's rows (sample); "
                "a second run sends nothing",
                f"{churn.inserted:,} / {churn.updated:,} / {churn.deleted:,} (ins / upd / del); sandbox "
                f"{checks['sandbox_rows']:,} rows, {checks['checked']:,} sampled keys equal; second run 0 requests",
                "MET",
            )
        )
    if "pg_runs" in rep:
        runs = rep["pg_runs"]
        local, push = _median(runs["local churn"]), _median(runs["postgres churn"])
        out.append(
            bench._row(
                "PostgreSQL churn run, pushdown vs local (reported, no target)",
                f"time {push['seconds']:.1f} s vs {local['seconds']:.1f} s "
                f"({push['seconds'] / local['seconds']:.2f}x); peak RSS "
                f"{bench._above(_highest(runs['postgres churn']))} vs {bench._above(_highest(runs['local churn']))}; "
                f"out of the database {_mb(_out(push))} vs {_mb(_out(local))} "
                f"({_out(push) / max(_out(local), 1):.1%})",
                "n/a",
            )
        )
    if "spark" in rep:
        r = rep["spark"]["runs"]["churn"]
        out.append(bench._row("Spark churn run time (reported, no target)", f"{r['seconds']:.1f} s", "n/a"))
    out.append("")
    out.append(
        "A failed check stops its scenario, which is then reported as FAILED below and left out of the tables; MET "
        "means every check of the scenario passed."
    )
    if bounds:
        out += ["", "What bounds the miss:", ""] + [f"- {b}" for b in bounds]
    return out


def _q(run: dict[str, Any], prefix: str, index: int = 2) -> float:
    """Seconds (or, with ``index`` 3/4/5, rows / bytes out / bytes in) of the run's queries named ``prefix...``."""
    return float(sum(q[index] for q in run["queries"] if q[0].startswith(prefix)))


def _calls(run: dict[str, Any], prefix: str) -> int:
    return int(sum(q[1] for q in run["queries"] if q[0].startswith(prefix)))


def _step(run: dict[str, Any], prefix: str) -> list[Any] | None:
    return next((row for row in run["phases"] if row[0].startswith(prefix)), None)


def churn_notes(name: str, run: dict[str, Any], join: dict[str, Any] | None, changed: int) -> list[str]:
    """Where a pushdown churn run's time and memory go, from its steps and queries."""
    sql = _q(run, "")
    counts, changes, keys = _q(run, "counts"), _q(run, "changed rows"), _q(run, "key check")
    settle = _q(run, "settle") + _q(run, "load") + _q(run, "swap")
    own = f" ({name}'s own diff query alone: {join['seconds']:.1f} s)" if join else ""
    notes = [
        f"{name} churn run, time: {run['seconds']:.1f} s, of which {sql:.1f} s waiting for {name}. The diff is "
        f"computed twice: the counts query ({counts:.1f} s; the safeguards see the counts before any row leaves) and "
        f"the changed-rows query ({changes:.1f} s) each hash every source row and join it with the state "
        f"table{own}. The key check (a GROUP BY over the source) takes {keys:.1f} s, settling (staging the "
        f"acknowledged rows, applying them to the state table) {settle:.1f} s; the worker's own work (encoding "
        f"{changed:,} changed rows, the plan, sending) {run['seconds'] - sql:.1f} s."
    ]
    rows, out = _q(run, "changed rows", 3), _q(run, "changed rows", 4)
    top = max(run["phases"], key=lambda row: row[2])
    plan = _step(run, "changed rows")
    text = (
        f"{name} churn run, memory: {bench._above(_above(run))} above start, reached in '{top[0]}'. The changed rows "
        f"arrive as {_mb(out)} of Arrow ({out / max(rows, 1):,.0f} bytes per changed row: the source's columns, the "
        "key text, the new hash and the state's createdAt and last delivered row, which only deletes use)"
    )
    if plan is not None and plan[3]:
        after = run["phases"][run["phases"].index(plan) :]
        text += (
            f"; the plan frame the engine keeps in the worker (every changed row: op, key text, hash, row JSON) is "
            f"{_mb(plan[3])} ({plan[3] / max(changed, 1):,.0f} bytes per changed row). Peak of each step from there "
            f"on: {steps_text({'phases': after})}"
        )
    return [*notes, text + "."]


def baseline_notes(name: str, run: dict[str, Any], table_bytes: int | None, state_bytes: int | None) -> str:
    out, into = _q(run, "every source row", 4) + _q(run, "baseline rows", 4), _q(run, "load", 5)
    reading = _q(run, "every source row") + _q(run, "baseline rows")
    writing = _q(run, "load") + _q(run, "baseline: insert")
    sizes = ""
    if table_bytes and state_bytes:
        sizes = (
            f" The state table holds each row's key text, hash and delivered JSON: {bench.fmt_bytes(state_bytes)} "
            f"beside the table's {bench.fmt_bytes(table_bytes)}."
        )
    return (
        f"{name} baseline: {run['seconds']:.1f} s. Every source row leaves {name} ({_mb(out)} of Arrow, "
        f"{reading:.1f} s waiting for its next batch), is canonicalized and JSON-encoded in the worker, and goes "
        f"back in ({_mb(into)} in {_calls(run, 'load')} staging loads, then INSERT into the new state table; "
        f"{writing:.1f} s waiting for {name}); the rest, {run['seconds'] - _q(run, ''):.1f} s, is the worker's "
        f"encoding.{sizes}"
    )


def parts_note(name: str, join: dict[str, Any]) -> str:
    parts = {p["label"].split(" (")[0]: p["seconds"] for p in join["parts"]}
    text = parts.get("the text of every column, concatenated", 0.0)
    md5 = parts.get("the MD5 row hash of every source row", 0.0)
    key = parts.get("full outer join with the state table on the key text alone", 0.0)
    full = join["parts"][-1]["seconds"]
    return (
        f"{name}'s diff query, piece by piece ({full:.1f} s in all): the row hash is most of it. Casting the 12 "
        f"columns to text and concatenating them takes {text:.1f} s, with MD5 {md5:.1f} s; the full outer join on "
        f"the key text alone {key:.1f} s."
    )


def render_findings(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    notes: list[str] = []
    if "pg_runs" in rep:
        runs, churn = rep["pg_runs"], rep["pg_churn"]
        changed = churn.inserted + churn.updated + churn.deleted
        join = _median(runs["join"])
        notes += churn_notes("PostgreSQL", _median(runs["postgres churn"]), join, changed)
        notes.append(parts_note("PostgreSQL", runs["join"][0]))
        local = _median(runs["local churn"])
        notes.append(
            f"Local engine churn run, for comparison: {local['seconds']:.1f} s and {bench._above(_above(local))}: it "
            f"reads the whole table ({_mb(_out(local))}, {local['queries'][0][2]:.1f} s waiting for ADBC) and holds "
            "it twice (the canonical frame and the committed snapshot it diffs against)."
        )
        table = rep["pg_table"].table_bytes
        notes.append(baseline_notes("PostgreSQL", _median(runs["postgres baseline"]), table, rep.get("pg_state_bytes")))
    if "duckdb_runs" in rep:
        runs, churn = rep["duckdb_runs"], rep["duckdb_churn"]
        changed = churn.inserted + churn.updated + churn.deleted
        notes += churn_notes("DuckDB", _median(runs["churn"]), _median(runs["join"]), changed)
        notes.append(parts_note("DuckDB", runs["join"][0]))
        gen = rep["duckdb_gen"]["file_bytes"]
        state = rep["duckdb_state_file_bytes"] - gen
        notes.append(baseline_notes("DuckDB", _median(runs["baseline"]), gen, state))
    if "spark" in rep:
        churn = rep["spark_churn"]
        spark_runs = rep["spark"]["runs"]
        notes += churn_notes("Spark", spark_runs["churn"], None, churn.inserted + churn.updated + churn.deleted)
        base = spark_runs["baseline"]
        notes.append(baseline_notes("Spark", base, None, None))
        loads, rows = _calls(base, "load"), _q(base, "load", 3)
        notes.append(
            f"Spark baseline, memory: the worker {bench._above(_above(base))} above start, the JVM "
            f"{bench.fmt_bytes(base['jvm_rss_before'])} -> {bench.fmt_bytes(base['jvm_peak'])}. "
            "`SparkWarehouse.batches` collects the whole result on the driver (`toArrow()`) before handing out "
            f"batches, so the baseline holds every row ({_mb(_q(base, 'every source row', 4))} of Arrow) in the worker "
            f"at once; and it writes the state table in {loads:,} staging loads + INSERTs of about "
            f"{rows / max(loads, 1):,.0f} rows each ({_q(base, 'load') + _q(base, 'baseline: insert'):.1f} s), one "
            "Spark job each."
        )
        run = spark_runs["churn"]
        notes.append(
            f"Spark churn run, settling: {_q(run, 'settle'):.1f} s, because Spark's file tables cannot DELETE: the "
            "whole state table is rewritten (`CREATE TABLE ..__next AS SELECT` the kept rows `UNION ALL` the "
            "staged ones, then drop and rename) to apply the changed rows."
        )
    if not notes:
        return []
    return ["", "## Where the time and memory go", "", *(f"- {note}" for note in notes)]


def verify_of(rep: dict[str, Any], key: str) -> dict[str, Any]:
    if key == "spark":
        return dict(rep["spark"]["verify"])
    name = "postgres churn" if key == "pg_runs" else "churn"
    return dict(_median(rep[key][name])["verify"])


def duckdb_memory_bound(rep: dict[str, Any], args: argparse.Namespace) -> str:
    runs = rep["duckdb_runs"]["churn"]
    r = max(runs, key=_above)
    top = max(r["phases"], key=lambda row: row[2])
    plan = next((row for row in r["phases"] if row[0].startswith("changed rows")), None)
    churn = rep["duckdb_churn"]
    changed = churn.inserted + churn.updated + churn.deleted
    text = (
        f"DuckDB churn run, memory: {bench._above(_above(r))} above start; DuckDB runs inside the worker "
        f"(memory_limit={args.duckdb_memory_limit}), so its buffers count. The peak is reached in "
        f"'{top[0]}'. Each step's own peak (the SQL-only steps show DuckDB's memory; the steps after the changed "
        f"rows are read also hold the engine's plan): {steps_text(r)}."
    )
    if plan is not None and plan[3]:
        text += (
            f" Without DuckDB's share the worker would still miss: the plan frame the engine holds (every changed "
            f"row: op, key text, hash, row JSON) is {_mb(plan[3])} alone for {changed:,} changed rows "
            f"({plan[3] / changed:,.0f} bytes per row), and it is held from the changed-rows query to the settle."
        )
    return text


def render_postgres(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    runs, table, churn = rep["pg_runs"], rep["pg_table"], rep["pg_churn"]
    local_churn = _median(runs["local churn"])
    out = [
        "",
        f"## 1. PostgreSQL {rep['pg_version']}, {args.rows:,} rows: pushdown vs the local engine",
        "",
        "- Server: a throwaway PostgreSQL on 127.0.0.1, started by `tests/pg_server.py` (fsync off, shared_buffers "
        "32MB); its CPU seconds are the PostgreSQL CPU s column.",
        f"- Table `{TABLE}`: {args.rows:,} rows x 12 columns, run.py's SQL table (bigint key, integer, 2 double "
        "precision, numeric(14,2), 3 text, 2 timestamptz, boolean, jsonb), loaded with `COPY` in "
        f"{table.load_s:.1f} s, {bench.fmt_bytes(table.table_bytes)} with its key. The pushdown's state table after "
        f"the baseline: {bench.fmt_bytes(rep['pg_state_bytes'])}.",
        f"- Churn: {churn.updated:,} updated, {churn.deleted:,} deleted, {churn.inserted:,} inserted, in one "
        f"transaction ({rep['pg_churn_s']:.1f} s with `VACUUM ANALYZE`).",
        "- Local: `run_sync(lambda: read_sql(conn_id, 'SELECT * FROM bench'), ...)` (the operator's SQL path, ADBC, "
        "as run.py's SQL churn scenario). Pushdown: `run_warehouse_sync(WarehouseSource('SELECT * FROM bench', "
        "PostgresWarehouse(uri)), ...)`, the same connection.",
        "",
        "| run | seconds | pushdown / local | CPU s | PostgreSQL CPU s | sandbox CPU s | peak RSS above start | "
        "bytes out of the database | bytes into it | ins / upd / del | chunks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("local baseline", "local engine, baseline"),
        ("postgres baseline", "pushdown, baseline"),
        ("local churn", "**local engine, churn run**"),
        ("postgres churn", "**pushdown, churn run**"),
        ("local again", "local engine, second run (no change)"),
        ("postgres again", "pushdown, second run (no change)"),
    ):
        ref = _median(runs[key.replace("postgres", "local")]) if key.startswith("postgres") else None
        out.append(run_row(label, runs[key], ref, db_cpu=True))
    push, join = _median(runs["postgres churn"]), _median(runs["join"])
    out += [
        "",
        f"PostgreSQL's own diff query (`SELECT COUNT(*)` of the changed rows over the same `WITH` clauses as the "
        f"engine's counts and changes queries; a fresh child process, before the churn runs): {_secs(runs['join'])} s; "
        "the pushdown churn run takes "
        f"{push['seconds'] / join['seconds']:.2f}x that.",
        "",
        f"Pushdown / local, churn run: time {push['seconds'] / local_churn['seconds']:.2f}x, peak RSS above start "
        f"{_highest(runs['postgres churn']) / max(_highest(runs['local churn']), 1):.2f}x, bytes out of the database "
        f"{_out(push) / max(_out(local_churn), 1):.2%} ({_mb(_out(push))} vs "
        f"{_mb(_out(local_churn))}), PostgreSQL CPU {push['db_cpu']:.1f} s vs "
        f"{local_churn['db_cpu']:.1f} s.",
    ]
    out += parts_table(runs["join"], "PostgreSQL", peak=False)
    out += _run_detail("Pushdown churn run", push, "PostgreSQL")
    out += _run_detail("Pushdown baseline", _median(runs["postgres baseline"]), "PostgreSQL")
    out += _run_detail("Pushdown second run (no change)", _median(runs["postgres again"]), "PostgreSQL")
    out += [
        "",
        f"Steps of the local churn run ({local_churn['seconds']:.2f} s; the ADBC read of the whole table "
        f"{local_churn['queries'][0][2]:.2f} s of it):",
        "",
    ]
    out += bench.phase_table(local_churn["phases"], _above(local_churn))
    return out


def parts_table(runs: list[dict[str, Any]], db: str, peak: bool) -> list[str]:
    """The pieces of the diff query alone (the first repetition of the database's own diff query)."""
    first = runs[0]
    full = first["parts"][-1]["seconds"]
    out = [
        "",
        f"Where {db}'s time goes: each piece of the diff as a `SELECT COUNT(*)` of its own, in a fresh child process "
        "(state table: the baseline; source: after the churn):",
        "",
        f"| query | seconds | share of the diff query |{' peak RSS above start |' if peak else ''}",
        f"|---|---|---|{'---|' if peak else ''}",
    ]
    for part in first["parts"]:
        cells = [part["label"], f"{part['seconds']:.2f}", f"{part['seconds'] / full:.0%}"]
        if peak:
            cells.append(bench._above(_above(part)))
        out.append(bench._row(*cells))
    return out


def _run_detail(title: str, run: dict[str, Any], db: str, what: str = "above start") -> list[str]:
    out = ["", f"{title} ({run['seconds']:.2f} s): steps", ""]
    out += bench.phase_table(run["phases"], _above(run), what)
    out += ["", f"{title}: queries and calls (seconds: waiting for {db}, including streaming its result)", ""]
    out += query_table(run, db)
    return out


def render_duckdb(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    runs, churn, gen = rep["duckdb_runs"], rep["duckdb_churn"], rep["duckdb_gen"]
    join, run = _median(runs["join"]), _median(runs["churn"])
    out = [
        "",
        f"## 2. DuckDB {bench._version('duckdb')}, {args.duckdb_rows:,} rows",
        "",
        f"- Table `{TABLE}` in a DuckDB file: the same 12 columns (`preferences` is DuckDB's JSON type), generated "
        f"in SQL (`range()` + `hash()`) in {gen['seconds']:.1f} s (with {args.duckdb_rows // 200:,} spare rows); "
        f"file {bench.fmt_bytes(gen['file_bytes'])}, {bench.fmt_bytes(rep['duckdb_state_file_bytes'])} with the "
        "state table after the baseline.",
        f"- DuckDB runs inside the worker process, with `memory_limit={args.duckdb_memory_limit}` (DuckDB's default "
        "is 80% of RAM) and its default threads (one per core), spilling to `<file>.tmp`: its memory is part of the "
        "worker's peak RSS.",
        f"- Churn: {churn.updated:,} updated, {churn.deleted:,} deleted, {churn.inserted:,} inserted, one "
        f"transaction ({rep['duckdb_churn_s']:.1f} s).",
        "- DuckDB's own join: `SELECT COUNT(*)` of the changed rows over the same `WITH` clauses as the engine's "
        "counts and changes queries (source + key text + row hash, FULL OUTER JOIN the state table), in a fresh "
        "child process with the same DuckDB settings, alternating with the churn run.",
        "",
        "| run | seconds | vs DuckDB's own join | CPU s | sandbox CPU s | peak RSS above start | bytes out of DuckDB | "
        "bytes into it | ins / upd / del | chunks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    j = runs["join"]
    out.append(
        bench._row(
            "DuckDB's own join + row hash (`SELECT COUNT(*)`)",
            _secs(j),
            "1.00x",
            f"{join['cpu']:.2f}",
            "-",
            bench._above(_highest(j)),
            "-",
            "-",
            f"{join['changed']:,} changed",
            "",
        )
    )
    for key, label in (
        ("baseline", "pushdown, baseline"),
        ("churn", "**pushdown, churn run**"),
        ("again", "pushdown, second run (no change)"),
    ):
        out.append(run_row(label, runs[key], join if key != "baseline" else None, db_cpu=False))
    out += parts_table(runs["join"], "DuckDB", peak=True)
    out += _run_detail("Churn run", run, "DuckDB")
    out += _run_detail("Baseline", _median(runs["baseline"]), "DuckDB")
    out += _run_detail("Second run (no change)", _median(runs["again"]), "DuckDB")
    return out


def render_spark(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    got, churn = rep["spark"], rep["spark_churn"]
    runs = {key: [r] for key, r in got["runs"].items()}
    check = got["verify"]
    out = [
        "",
        f"## 3. Spark {bench._version('pyspark')} local mode, {args.spark_rows:,} rows",
        "",
        f"- Session: `local[2]`, spark.driver.memory={args.spark_driver_memory}, spark.driver.maxResultSize=0, 8 "
        "shuffle partitions, session time zone UTC, in-memory catalog (tests/spark_session.py's settings otherwise); "
        f"started in {got['start_s']:.1f} s. The JVM is a child process of the worker: its RSS is reported beside "
        "the worker's (VmHWM of both reset before each run).",
        f"- Table `{TABLE}` (parquet): the same 12 columns (`preferences` a struct), generated with Spark SQL "
        f"(`range()` + `xxhash64()`) in {got['gen_s']:.1f} s. Churn: written as a new table and renamed (Spark's "
        f"file tables have no DELETE/UPDATE), {got['churn_s']:.1f} s: {churn.updated:,} updated, {churn.deleted:,} "
        f"deleted, {churn.inserted:,} inserted.",
        f"- Checks: the churn run's counts equal the churn; the sandbox holds {check['sandbox_rows']:,} rows (the "
        f"inserted and updated ones) and {check['checked']:,} sampled keys match the source read through Spark; the "
        "second run sends nothing. Baseline, churn run and second run ran one after another in one session.",
        "",
        "| run | seconds | CPU s | sandbox CPU s | worker peak RSS above start | JVM RSS before -> peak | "
        "bytes out of Spark | bytes into it | ins / upd / del | chunks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in (("baseline", "baseline"), ("churn", "**churn run**"), ("again", "second run (no change)")):
        r = runs[key][0]
        out.append(
            bench._row(
                label,
                f"{r['seconds']:.2f}",
                f"{r['cpu']:.2f}",
                f"{r['sandbox_cpu']:.2f}",
                bench._above(_above(r)),
                f"{bench.fmt_bytes(r['jvm_rss_before'])} -> {bench.fmt_bytes(r['jvm_peak'])}",
                _mb(_out(r)),
                _mb(_in(r)) if _in(r) else "-",
                f"{r['inserted']:,} / {r['updated']:,} / {r['deleted']:,}",
                f"{r['chunks']:,}",
            )
        )
    out += _run_detail("Churn run", runs["churn"][0], "Spark")
    out += _run_detail("Baseline", runs["baseline"][0], "Spark")
    out += _run_detail("Second run (no change)", runs["again"][0], "Spark")
    return out
