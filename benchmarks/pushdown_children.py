"""The child processes of ``--pushdown`` (``run.py --child pd-run|pd-join|pd-spark``) and the correctness checks:
counts, what StopChurn holds for a sample of changed keys, and a second run that sends nothing."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pyarrow as pa
import requests
from harness import (
    BRAND_ID,
    HERE,
    MB,
    PG_CONN_ENV,
    PG_CONN_ID,
    RUN_MS,
    TOKEN,
    Phases,
    check_counts,
    engine_phases,
    measured,
    options,
)
from pushdown_sql import (
    EXTRA,
    QUERY,
    STATE_SCHEMA,
    STATE_TABLE,
    TABLE,
    CountingWarehouse,
    QueryLog,
    churn_of,
    counted,
    duckdb_connect,
    pushdown_phases,
    spark_churn_sql,
    spark_select,
)
from synthetic import SEED, Churn

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.encode.records import encode_rows
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import SyncSummary, canonical_source, run_sync

RSS_TARGET = 300 * MB
SAMPLE = 300  # keys checked in the sandbox per kind of change
CHILD_TIMEOUT_S = 6 * 3600


# ---------------------------------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------------------------------
def run_options(baseline: bool, args: argparse.Namespace) -> SyncOptions:
    opts = options(args.chunk_size, args.concurrency)
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
    from airflow_provider_stopchurn.source.sql import postgres_uri

    conn = json.loads(os.environ[PG_CONN_ENV])
    return postgres_uri(
        host=conn["host"], port=conn["port"], login=conn["login"], password=None, database=conn["schema"]
    )


def child_main(args: argparse.Namespace) -> int:
    if args.child == "pd-spark":
        return spark_child_main(args)
    if args.child == "pd-join":
        return join_child_main(args)
    engine, mode = args.engine, args.mode
    # imported before the start, as in a worker that runs the operator
    from airflow_provider_stopchurn.operators import _source as operator_module  # read_sql looks read_postgres up here
    from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, PostgresWarehouse, WarehouseSource
    from airflow_provider_stopchurn.warehouse import run_warehouse_sync as warehouse_sync

    if engine in ("local", "postgres"):
        import adbc_driver_postgresql.dbapi  # noqa: F401
        from airflow.providers.postgres.hooks.postgres import PostgresHook  # noqa: F401
    else:
        import duckdb  # noqa: F401
    log = QueryLog()
    opts = run_options(mode == "baseline", args)
    store = SnapshotStore(Path(args.root), BRAND_ID, TABLE)
    client = StopChurnClient(args.url, TOKEN)
    if engine == "local":
        phases = engine_phases()
        reader = operator_module.read_postgres
        stat = log("the whole table (ADBC, the operator's read_sql)")
        operator_module.read_postgres = lambda *a, **kw: counted(reader(*a, **kw), stat)

        def run() -> SyncSummary:
            return run_sync(lambda: operator_module.read_sql(PG_CONN_ID, QUERY), store, client, opts, run_ms=RUN_MS)

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
                return warehouse_sync(source, store, client, opts, run_ms=RUN_MS)
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
    from airflow_provider_stopchurn.warehouse import sql as S

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
    from airflow_provider_stopchurn.warehouse import PostgresWarehouse
    from airflow_provider_stopchurn.warehouse import sql as S

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
            phases = Phases()

            def run(label: str = label, sql: str = sql, phases: Phases = phases) -> int:
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
        str(HERE / "run.py"),
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
    memory_cap = extra.pop("memory_cap", None)
    for key, value in extra.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if memory_cap is None:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S)
        stdout, stderr, code = out.stdout, out.stderr, out.returncode
    else:
        stdout, stderr, code = _capped(cmd, memory_cap)
    for line in stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"child {kind} {extra} failed (exit {code}): {stderr[-4000:]}")


def _capped(cmd: list[str], memory_cap: int) -> tuple[str, str, int]:
    """Run ``cmd``, killing it if its RSS passes ``memory_cap`` bytes (a run that would take the shared machine's
    memory fails instead, with its peak stated); its stdout, stderr and exit status."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        ps, started, killed = psutil.Process(proc.pid), time.monotonic(), 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                rss = ps.memory_info().rss
                if rss > memory_cap:
                    killed = rss
                    proc.kill()
            if time.monotonic() - started > CHILD_TIMEOUT_S:
                proc.kill()
            time.sleep(0.5)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stderr = err.read()
        if killed:
            stderr = f"killed: its RSS reached {killed / MB:,.0f} MB, over the cap of {memory_cap / MB:,.0f} MB"
        return out.read(), stderr, proc.returncode


# ---------------------------------------------------------------------------------------------------------------
# correctness: counts, what StopChurn holds, and a second run that sends nothing
# ---------------------------------------------------------------------------------------------------------------
def sample_ids(n: int, k: int = SAMPLE) -> dict[str, list[int]]:
    rng = np.random.default_rng(SEED)

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


def check_run(what: str, got: dict[str, Any], want: Churn) -> None:
    check_counts(what, Churn(got["inserted"], got["updated"], got["deleted"]), want)


def check_again(what: str, got: dict[str, Any], sandbox_requests: int) -> None:
    sent = (got["inserted"], got["updated"], got["deleted"], got["chunks"], sandbox_requests)
    if sent != (0, 0, 0, 0, 0):
        raise RuntimeError(f"{what}: the second run sent something (ins, upd, del, chunks, requests) = {sent}")


def verify_sandbox(url: str, source: pa.Table, sample: dict[str, list[int]], churn: Churn) -> dict[str, Any]:
    """After a churn run from a baseline on a reset sandbox: StopChurn got exactly the churn (its counters), holds
    exactly the inserted and updated rows, and for the sampled keys holds the source's rows as the local path
    encodes them (``canonical_source`` + ``encode_rows`` of the rows read from the warehouse), none of the deleted
    ones and none of the unchanged ones (a baseline sends nothing)."""
    stats = requests.get(url + "/_sandbox/stats", timeout=60).json()["updates"]
    body = requests.get(f"{url}/_sandbox/tables/{BRAND_ID}/{TABLE}", timeout=1800).content
    held = {row["id"]: row for row in orjson.loads(body)["rows"]}
    del body
    opts = options(500, 1)
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
# the Spark child process (baseline, churn run and second run in one session)
# ---------------------------------------------------------------------------------------------------------------
def spark_session_module() -> Any:
    """``tests/spark_session.py``: the test suite's Spark settings (one place for them)."""
    tests_dir = str(HERE.parent / "tests")
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

    from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync
    from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

    n = args.rows
    base = Path(args.root).parent / "spark"
    (base / "scratch").mkdir(parents=True, exist_ok=True)
    conf = spark_session_module().spark_conf(base)
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
        store = SnapshotStore(Path(args.root), BRAND_ID, TABLE)

        def one(key: str, baseline: bool) -> dict[str, Any]:
            requests.post(args.url + "/_sandbox/reset", timeout=120).raise_for_status()
            log = QueryLog()
            phases = pushdown_phases()
            client = StopChurnClient(args.url, TOKEN)
            for pid in jvm:
                _jvm_reset(pid)
            jvm_before = sum(_jvm_status(pid, "VmRSS") for pid in jvm)
            sb = sandbox.cpu_times()
            try:
                source = WarehouseSource(QUERY, CountingWarehouse(SparkWarehouse(spark), log), STATE_SCHEMA)
                summary, result = measured(
                    lambda: run_warehouse_sync(source, store, client, run_options(baseline, args), run_ms=RUN_MS),
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
