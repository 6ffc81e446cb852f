"""The SQL source on PostgreSQL: the floor, the churn run and the first load through the operator's SQL path, each in
a fresh child process (``run.py --child sql-...``), and their section of the results."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from frames import run_child
from harness import (
    BRAND_ID,
    PG_CONN_ENV,
    PG_CONN_ID,
    RUN_MS,
    TABLE,
    TOKEN,
    Phases,
    PostgresCpu,
    Sandbox,
    Timing,
    above_text,
    check_counts,
    copy_root,
    engine_phases,
    fmt_bytes,
    fresh_dir,
    measured,
    options,
    phase_table,
    profile_top,
    table_row,
)
from synthetic import SQL_QUERY, SQL_TABLE, Churn, SqlTable, apply_sql_churn, load_sql_table

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import SyncSummary, run_sync

SQL_CHILDREN = ("sql-floor", "sql-first-load", "sql-churn")


#: memory the SQL part needs per row of the table (the largest child run; measured at 1M rows)
SQL_BYTES_PER_ROW = 1_300


def sql_floor(uri: Any, phases: Phases | None = None) -> tuple[int, int]:
    """The floor: ADBC reads the whole table into Arrow, polars hashes every row."""
    import adbc_driver_postgresql.dbapi as adbc_postgres

    phases = phases or Phases()
    with phases.step("ADBC read into Arrow"):
        with adbc_postgres.connect(uri.reveal()) as conn, conn.cursor() as cur:
            cur.execute(SQL_QUERY)
            table = cur.fetch_arrow_table()
        arrow_bytes = table.nbytes
    with phases.step("polars from_arrow + hash_rows()"):
        frame = pl.from_arrow(table)
        del table
        rows = int(frame.hash_rows().len())  # type: ignore[union-attr]
    return rows, arrow_bytes


def sql_engine_run(root: Path, url: str, chunk_size: int, concurrency: int) -> SyncSummary:
    """This project through the operator's SQL path: ``run_sync`` with the source the operator builds for
    ``sql=`` + ``sql_conn_id=`` (``lambda: read_sql(conn_id, sql)``), the read included."""
    from airflow_provider_stopchurn.operators.stopchurn import read_sql

    client = StopChurnClient(url, TOKEN)
    try:
        return run_sync(
            lambda: read_sql(PG_CONN_ID, SQL_QUERY),
            SnapshotStore(root, BRAND_ID, TABLE),
            client,
            options(chunk_size, concurrency),
            run_ms=RUN_MS,
        )
    finally:
        client.close()


def sql_child_main(args: argparse.Namespace) -> int:
    """One SQL scenario in a fresh process: its seconds, CPU seconds and peak RSS above the RSS before it, as one
    JSON line (or, with ``--profile``, its cProfile summary instead)."""
    # imported before the start, as in a worker that runs the operator: Airflow (through the operator's module),
    # the postgres hook and the ADBC driver
    import adbc_driver_postgresql.dbapi  # noqa: F401
    from airflow.providers.postgres.hooks.postgres import PostgresHook  # noqa: F401

    from airflow_provider_stopchurn.operators.stopchurn import read_sql  # noqa: F401
    from airflow_provider_stopchurn.source.sql import postgres_uri

    conn = json.loads(os.environ[PG_CONN_ENV])
    uri = postgres_uri(
        host=conn["host"], port=conn["port"], login=conn["login"], password=None, database=conn["schema"]
    )
    from airflow_provider_stopchurn.operators import _source as operator_module  # read_sql looks read_postgres up here

    phases = Phases()
    run: Callable[[], Any]
    if args.child == "sql-floor":
        run = lambda: sql_floor(uri, phases)  # noqa: E731
    else:
        if not args.profile:
            phases = engine_phases()
            reader = operator_module.read_postgres
            operator_module.read_postgres = lambda *a, **kw: phases.timed_batches(reader(*a, **kw))
        root, url = Path(args.root), str(args.url)
        run = lambda: sql_engine_run(root, url, args.chunk_size, args.concurrency)  # noqa: E731
    if args.profile:
        print("CHILD-RESULT " + json.dumps({"profile": profile_top(run)}), flush=True)
        return 0
    got, result = measured(run, phases)
    result["read_s"] = phases.read_s
    if args.child == "sql-floor":
        result["rows"], result["arrow_bytes"] = got
    else:
        result.update(inserted=got.inserted, updated=got.updated, deleted=got.deleted, chunks=got.chunks)
        result["bytes"] = got.bytes
    print("CHILD-RESULT " + json.dumps(result), flush=True)
    return 0


def bench_sql(args: argparse.Namespace, tmp: Path, sandbox: Sandbox, server: Any, rep: dict[str, Any]) -> None:
    """The SQL source on PostgreSQL; every run in a fresh child process, which measures its own seconds, CPU and
    peak RSS above the RSS before the run.

    Load the table (COPY); first loads (each into a fresh snapshot root; the last one's root is the committed state
    of the churn runs); the churn as SQL; then per repetition the floor and a churn run, alternating, so that the
    machine's other load weighs on both alike."""
    n, reps = args.rows, args.reps
    pg = PostgresCpu(server)
    print(f"SQL: loading {n:,} rows (+ {n // 200:,} for the churn's inserts) with COPY ...", flush=True)
    table = load_sql_table(server, n)
    rep["sql_table"] = table
    print(f"  {table.load_s:.1f} s, table {fmt_bytes(table.table_bytes)}", flush=True)
    first_load, floor, churn_run = Timing(), Timing(), Timing()
    rep.update(sql_first_load=first_load, sql_floor=floor, sql_churn=churn_run)
    roots: list[Path] = []

    def child(timing: Timing, label: str, kind: str, rep_no: int, root: Path | None = None) -> dict[str, Any]:
        sb0, db0 = sandbox.cpu(), pg.cpu()
        got = run_child(kind, args, root=root, url=sandbox.url)
        if kind != "sql-floor":
            timing.sandbox_cpu.append(sandbox.cpu() - sb0)
        timing.db_cpu.append(pg.cpu() - db0)
        timing.seconds.append(got["seconds"])
        timing.own_cpu.append(got["cpu"])
        timing.children.append(got)
        timing.result = got
        above = got["peak_during_run"] - got["rss_before_run"]
        print(f"  {label}: rep {rep_no + 1}/{reps}: {got['seconds']:.2f} s, peak +{fmt_bytes(above)}", flush=True)
        return got

    print("SQL first load (fresh child processes) ...", flush=True)
    for i in range(reps):
        sandbox.reset()
        for old in roots:
            shutil.rmtree(old, ignore_errors=True)
        roots = [fresh_dir(tmp, f"sql-fl-{i}")]
        got = child(first_load, "first load", "sql-first-load", i, roots[0])
        check_counts("SQL first load", Churn(got["inserted"], got["updated"], got["deleted"]), Churn(n, 0, 0))
    committed = roots[0]
    if args.profile and not args.large:  # as for the DataFrame source, --large profiles the churn run only
        print("SQL first load, profiled ...", flush=True)
        sandbox.reset()
        prof_root = fresh_dir(tmp, "sql-prof-fl")
        rep["profile_sql_first_load"] = run_child(
            "sql-first-load", args, root=prof_root, url=sandbox.url, profile=True
        )["profile"]
        shutil.rmtree(prof_root, ignore_errors=True)

    print("SQL: applying the churn with SQL ...", flush=True)
    churn = apply_sql_churn(server, table)
    print(
        f"  {churn.updated:,} updated, {churn.inserted:,} inserted, {churn.deleted:,} deleted ({table.churn_s:.1f} s)",
        flush=True,
    )
    print("SQL floor and churn run, alternating (fresh child processes) ...", flush=True)
    for i in range(reps):
        got = child(floor, "floor", "sql-floor", i)
        if got["rows"] != n - churn.deleted + churn.inserted:
            raise RuntimeError(f"SQL floor read {got['rows']:,} rows")
        sandbox.reset()
        root = copy_root(committed, tmp / "sql-churn-root")
        got = child(churn_run, "churn run", "sql-churn", i, root)
        check_counts("SQL churn run", Churn(got["inserted"], got["updated"], got["deleted"]), churn)
    if args.profile:
        print("SQL churn run, profiled ...", flush=True)
        sandbox.reset()
        root = copy_root(committed, tmp / "sql-churn-root")
        rep["profile_sql_churn"] = run_child("sql-churn", args, root=root, url=sandbox.url, profile=True)["profile"]
    sandbox.reset()
    shutil.rmtree(tmp / "sql-churn-root", ignore_errors=True)
    shutil.rmtree(committed, ignore_errors=True)


def render_sql(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    n = args.rows
    table: SqlTable = rep["sql_table"]
    churn = table.churn or Churn(0, 0, 0)
    floor, churn_run, fl = rep["sql_floor"], rep["sql_churn"], rep["sql_first_load"]

    def sb(t: Timing) -> str:
        return f"{t.sandbox_median:.2f}" if t.sandbox_cpu else "-"

    last_floor, last_churn, last_fl = floor.median_child, churn_run.median_child, fl.median_child
    out = [
        "",
        f"## SQL source: PostgreSQL {table.server_version}",
        "",
        "- Server: a throwaway PostgreSQL on 127.0.0.1 of this machine, started by `tests/pg_server.py` as the "
        "test suite starts its own (initdb into a temporary directory, fsync off, shared_buffers 32MB); its CPU "
        "seconds are the PostgreSQL CPU s column.",
        f"- Table `{SQL_TABLE}`: {n:,} rows x 12 columns: `id` bigint key; integer; 2 double precision (one 5% "
        "NULL); numeric(14,2) (2% NULL); 3 text (one 10% NULL); 2 timestamptz (one 3% NULL); boolean; jsonb (an "
        f"object of 3 keys). {fmt_bytes(table.table_bytes)} with its key. Loaded with `COPY ... FROM STDIN` "
        f"(CSV generated with polars) in {table.load_s:.1f} s, with the key and `VACUUM ANALYZE`.",
        f"- Churn, applied with SQL in one transaction after the first loads and before the floor and churn runs: "
        f"`UPDATE` of {churn.updated:,} rows (1%; each changes its score, some also status, quantity, balance or "
        f"preferences), `DELETE` of {churn.deleted:,} (0.5%), `INSERT ... SELECT` of {churn.inserted:,} (0.5%) "
        f"({table.churn_s:.1f} s with `VACUUM ANALYZE`).",
        "- Source of the runs: the operator's own SQL path. `run_sync` gets `lambda: read_sql(conn_id, "
        f'"{SQL_QUERY}")`, the source `StopChurnUpdateOperator(sql=..., sql_conn_id=...)` builds, with `read_sql` '
        f"from `operators/_source.py`; the connection is `{PG_CONN_ENV}` (Airflow's JSON form) in the "
        "benchmark's environment, so each run goes Airflow connection -> `postgres_uri` -> "
        "`source.sql.read_postgres` (ADBC) -> the engine, as in a task.",
        "- Each run in a fresh child process, which measures its own seconds, CPU seconds and peak RSS. Peak RSS "
        "above start: VmHWM, reset just before the run, minus the RSS then (after importing Airflow, the "
        "operator's module, the postgres hook and the ADBC driver, as in a worker); the highest of the "
        "repetitions. Order: the first loads (each into a fresh snapshot root; the last one's root is the "
        "committed state of the churn runs), the churn, then per repetition the floor and a churn run alternately.",
        "",
        "| # | scenario | seconds | ratio to the floor | CPU s | PostgreSQL CPU s | sandbox CPU s | "
        "peak RSS above start | notes |",
        "|---|---|---|---|---|---|---|---|---|",
        table_row(
            "S1",
            "floor: ADBC reads the table into Arrow (`fetch_arrow_table`), polars `from_arrow` + `hash_rows()`",
            floor.cell(),
            "1.00x",
            f"{floor.own_median:.2f}",
            f"{floor.db_median:.2f}",
            "-",
            above_text(floor.peak_above_start),
            f"Arrow table {fmt_bytes(last_floor['arrow_bytes'])}",
        ),
        table_row(
            "S2",
            "**SQL churn run** through the operator's SQL path: read, canonicalize, diff, encode, send, commit",
            churn_run.cell(),
            f"**{churn_run.median / floor.median:.2f}x**",
            f"{churn_run.own_median:.2f}",
            f"{churn_run.db_median:.2f}",
            sb(churn_run),
            f"**{above_text(churn_run.peak_above_start)}**",
            f"{last_churn['chunks']} chunks",
        ),
        table_row(
            "S3",
            f"**SQL first load** through the operator's SQL path: {n:,} inserts, read included",
            fl.cell(),
            f"{fl.median / floor.median:.2f}x",
            f"{fl.own_median:.2f}",
            f"{fl.db_median:.2f}",
            sb(fl),
            f"**{above_text(fl.peak_above_start)}**",
            f"{last_fl['chunks']} chunks, {fmt_bytes(last_fl['bytes'])} of JSON",
        ),
        "",
        "| scenario | RSS before the run | peak during the run | peak above start, each repetition |",
        "|---|---|---|---|",
    ]
    for label, timing in (("floor", floor), ("churn run", churn_run), ("first load", fl)):
        out.append(
            table_row(
                label,
                fmt_bytes(statistics.median(c["rss_before_run"] for c in timing.children)),
                fmt_bytes(max(c["peak_during_run"] for c in timing.children)),
                ", ".join(above_text(c["peak_during_run"] - c["rss_before_run"]) for c in timing.children),
            )
        )
    for label, child in (("floor", last_floor), ("churn run", last_churn), ("first load", last_fl)):
        above = child["peak_during_run"] - child["rss_before_run"]
        extra = ""
        if "read_s" in child and label != "floor":
            extra = f"; {child['read_s']:.2f} s of its source step were spent waiting for ADBC's batches"
        out += ["", f"Steps of the SQL {label} (its median repetition, {child['seconds']:.2f} s{extra}):", ""]
        out += phase_table(child["phases"], above)
    return out
