"""Benchmark of the StopChurn sync engine against its floor and a naive hand-written peer.

Usage::

    python benchmarks/run.py --rows 1000000              # make bench (writes benchmarks/RESULTS.md)
    python benchmarks/run.py --rows 10000000 --large     # make bench-large (writes benchmarks/RESULTS-large.md)
    python benchmarks/run.py --rows 100000 --reps 1      # quick check
    python benchmarks/run.py --events --export           # events and historical export only (RESULTS-events-export.md)
    python benchmarks/run.py --pushdown --rows 10000000  # make bench-pushdown: the diff in the warehouse (pushdown.py)

Everything runs on one deterministic synthetic table (numpy, seeded). The StopChurn sandbox runs in a separate
process on 127.0.0.1 so its CPU time does not hide inside the measured process; peak memory of the engine is
measured in fresh child processes (this script re-invoked with ``--child``). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pushdown
import pushdown_children
from events_export import events_export_main, export_child_main
from frames import FRAME_CHILDREN, bench_frames, child_main
from harness import HERE, Sandbox, airflow_environment, enough_memory, pg_server_module, publish
from report import render
from scale_rows import sync_summary
from sql_source import SQL_BYTES_PER_ROW, SQL_CHILDREN, bench_sql, sql_child_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the base table")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 3; 1 with --large)")
    parser.add_argument("--large", action="store_true", help="large mode: 1 rep, checks the 10M-row targets")
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4, help="max_concurrent_requests of the main runs")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/RESULTS.md; '-' = none)")
    parser.add_argument("--naive", action="store_true", help="run the naive peer in --large mode too")
    parser.add_argument("--profile", action="store_true", help="also cProfile one churn run and one first load")
    parser.add_argument("--events", action="store_true", help="run the event scenarios (alone, or with --export)")
    parser.add_argument(
        "--export", action="store_true", help="run the historical export scenarios (alone, or with --events)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sql-only", action="store_true", help="only the SQL scenarios (PostgreSQL source)")
    which.add_argument("--no-sql", action="store_true", help="only the DataFrame scenarios (no PostgreSQL needed)")
    parser.add_argument(
        "--child", choices=[*FRAME_CHILDREN, *SQL_CHILDREN, "export", *pushdown.CHILDREN], help=argparse.SUPPRESS
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    pushdown.add_arguments(parser)
    args = parser.parse_args()
    if args.child in pushdown.CHILDREN:
        return pushdown_children.child_main(args)
    if args.pushdown:
        return pushdown.main(args)
    if args.child == "export":
        return export_child_main(args)
    if args.child in SQL_CHILDREN:
        return sql_child_main(args)
    if args.child:
        return child_main(args)
    args.reps = args.reps or (1 if args.large else 3)
    if args.events or args.export:
        return events_export_main(args)
    if args.out is None:
        args.out = str(HERE / ("RESULTS-large.md" if args.large else "RESULTS.md"))
    argv = sys.argv[1:]
    if "--save-json" in argv:  # where a copy of the measurements went is not part of the command
        del argv[argv.index("--save-json") : argv.index("--save-json") + 2]
    command = "python benchmarks/run.py " + " ".join(argv)
    # rough need in bytes (measured at 1M rows): the DataFrame part ~1.5 KB per row for this process's frames and
    # runs, then the same in a child process after this one released its frames; the SQL part (afterwards, each
    # run in a child process) ~SQL_BYTES_PER_ROW
    need = max(0 if args.sql_only else args.rows * 1_700, 0 if args.no_sql else args.rows * SQL_BYTES_PER_ROW)
    if not enough_memory(args.rows, need):
        return 2

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="stopchurn-bench-"))
    sandboxes: list[Sandbox] = []
    try:
        with contextlib.ExitStack() as stack:
            server = None
            if not args.no_sql:  # first, so that a missing PostgreSQL fails the run before anything is measured
                pg = pg_server_module()
                try:
                    server = stack.enter_context(pg.running_postgres())
                except pg.PostgresUnavailable as err:
                    print(
                        f"error: the SQL scenarios need a PostgreSQL server and none can run here: {err}. Install "
                        "the server binaries (Debian: apt-get install postgresql) or pass --no-sql.",
                        file=sys.stderr,
                    )
                    return 2
                print(f"PostgreSQL up on {server.host}:{server.port} (started as the tests start theirs)", flush=True)
            airflow_environment(tmp, server)
            report = bench(args, tmp, sandboxes, server)
    finally:
        for sandbox in sandboxes:
            sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - started
    report["load"] = (load_before, os.getloadavg()[0])
    text = render(report, args, command, wall)
    publish(text, args.out)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(sync_summary(report, args)))
    return 0


def bench(args: argparse.Namespace, tmp: Path, sandboxes: list[Sandbox], server: Any | None) -> dict[str, Any]:
    rep: dict[str, Any] = {}
    sandbox = Sandbox()
    sandboxes.append(sandbox)
    print(f"sandbox up (separate process, pid {sandbox.proc.pid})", flush=True)
    if not args.sql_only:
        bench_frames(args, tmp, sandbox, sandboxes, rep)
    if server is not None:
        bench_sql(args, tmp, sandbox, server, rep)
    return rep


if __name__ == "__main__":
    sys.exit(main())
