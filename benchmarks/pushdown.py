"""The diff inside the warehouse (``warehouse/``) at scale: ``benchmarks/run.py --pushdown`` (``make bench-pushdown``).

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
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
from harness import GB, HERE, Sandbox, airflow_environment, pg_server_module, publish
from pushdown_findings import has_engine
from pushdown_report import render
from pushdown_scenarios import bench_duckdb, bench_postgres, bench_spark, spark_unavailable
from synthetic import Churn, SqlTable

CHILDREN = ("pd-run", "pd-join", "pd-spark")
ENGINES = ("postgres", "duckdb", "spark")


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
    parser.add_argument(
        "--save-json",
        help="also write the measurements to this file (the sync benchmark: what benchmarks/scale.py's table needs)",
    )
    parser.add_argument("--from-json", help="with --pushdown: render the results of a --save-json file, run nothing")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-pid", type=int, help=argparse.SUPPRESS)


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
        args.out = str(HERE / "RESULTS-pushdown.md")
    if args.from_json:
        return write(*load_reports([Path(p) for p in args.from_json.split(",")]), args.out)
    argv = sys.argv[1:]
    if "--save-json" in argv:  # where a copy of the measurements went is not part of the command
        del argv[argv.index("--save-json") : argv.index("--save-json") + 2]
    command = ("python benchmarks/run.py " + " ".join(argv)).replace(str(HERE.parent) + os.sep, "")
    if "spark" in engines and (why := spark_unavailable()):
        print(f"error: the Spark scenario cannot run: {why}. Pass --engines postgres,duckdb.", file=sys.stderr)
        return 2
    # the local engine's baseline and churn run hold the whole table (~0.8 GB per million rows, run.py's results)
    need = args.rows * 800 if "postgres" in engines else 0
    if need > psutil.virtual_memory().available:
        print(f"refusing: {args.rows:,} rows need about {need / GB:.0f} GiB of memory", file=sys.stderr)
        return 2
    # the scenarios run one after another, each one's files (and the PostgreSQL server's) removed before the next
    # starts: the largest one's disk is what the run needs
    disk = max(
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
    sandbox: Sandbox | None = None
    try:
        with contextlib.ExitStack() as stack:
            server = None
            if "postgres" in engines:
                pg = pg_server_module()
                try:
                    server = stack.enter_context(pg.running_postgres())
                except pg.PostgresUnavailable as err:
                    print(f"error: the PostgreSQL scenario needs a PostgreSQL server: {err}", file=sys.stderr)
                    return 2
                print(f"PostgreSQL up on {server.host}:{server.port}", flush=True)
                with server.connect() as conn:
                    rep["pg_version"] = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]
            airflow_environment(tmp, server)
            sandbox = Sandbox()
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


#: measured before a scenario's churn runs and kept when it fails later (the scale table's state table size row)
KEPT_ON_FAILURE = ("pg_table", "pg_state_bytes", "pg_state_parts", "duckdb_gen", "duckdb_state_file_bytes")


def _drop(rep: dict[str, Any], engine: str) -> None:
    """Forget a failed scenario's partial measurements, but for the table and state table sizes."""
    prefix = {"postgres": "pg_", "duckdb": "duckdb_", "spark": "spark"}[engine]
    for key in [k for k in rep if k.startswith(prefix) and k not in KEPT_ON_FAILURE]:
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
    publish(text, out)
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
            one[key] = Churn(**one[key])
        if "pg_table" in one:
            one["pg_table"] = SqlTable(**{k: v for k, v in one["pg_table"].items() if k != "churn"})
        load = one.pop("load", None) or (float("nan"), one.get("load_now", float("nan")))
        done = [engine for engine in ENGINES if has_engine(one, engine)]
        for engine in done:
            rep["failed"].pop(engine, None)
        failed = one.pop("failed", {})
        rep["failed"].update({e: why for e, why in failed.items() if not has_engine(rep, e)})
        rep.update(one)
        rep["runs"].append({"command": data["command"], "date": data["date"], "wall": data["wall"], "load": load})
        rep["runs"][-1].update(engines=done, failed=failed)
        # each engine's rows too: a scenario that failed after its baseline still has measurements of that size
        for key in ("rows", "chunk_size", "concurrency", "reps", "duckdb_memory_limit", "spark_driver_memory"):
            values.setdefault(key, args[key])
        for key in ("duckdb_rows", "spark_rows"):
            values.setdefault(key, args.get(key))
        for engine, keys in (("duckdb", ("duckdb_rows", "duckdb_memory_limit")), ("spark", ("spark_rows",))):
            if engine in done:
                values.update({key: args[key] for key in keys})
    rep["load"] = (rep["runs"][0]["load"][0], rep["runs"][-1]["load"][1])
    rep["date"] = rep["runs"][-1]["date"]
    wall = sum(float(r["wall"]) for r in rep["runs"])
    return rep, argparse.Namespace(**values), rep["runs"][0]["command"], wall
