"""The results of ``--pushdown`` (``RESULTS-pushdown.md``): header, targets and one section per engine."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
from typing import Any

from harness import above_text, dist_version, fmt_bytes, machine, phase_table, table_row
from pushdown_children import RSS_TARGET, spark_session_module
from pushdown_findings import (
    bytes_into_db,
    bytes_out_of_db,
    duckdb_memory_bound,
    has_engine,
    highest_peak,
    mb_text,
    median_run,
    peak_above,
    render_findings,
    seconds_text,
    verify_of,
)
from pushdown_sql import TABLE


def _java_version() -> str:
    java = spark_session_module().find_java()
    if java is None:
        return "(none found)"
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False, timeout=60)
    match = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    return match.group(1) if match else "(unknown version)"


def _versions(rep: dict[str, Any]) -> str:
    m = machine()
    parts = [
        f"Python {m['python']}; polars {m['polars']}, pyarrow {m['pyarrow']}, sqlglot {dist_version('sqlglot')}",
        f"adbc-driver-postgresql {m['adbc']}",
    ]
    if "pg_version" in rep:
        parts.append(f"PostgreSQL {rep['pg_version']}")
    if "duckdb_runs" in rep:
        parts.append(f"DuckDB {dist_version('duckdb')}")
    if "spark" in rep:
        parts.append(f"pyspark {dist_version('pyspark')} on Java {_java_version()}")
    return ", ".join(parts)


def query_table(run: dict[str, Any], db: str) -> list[str]:
    out = [
        f"| query or call | calls | seconds in {db} | rows returned / loaded | bytes out of {db} | bytes into {db} |",
        "|---|---|---|---|---|---|",
    ]
    for label, calls, seconds, rows, bytes_out, bytes_in in sorted(run["queries"], key=lambda q: -q[2]):
        out.append(
            table_row(
                label,
                calls,
                f"{seconds:.2f}",
                f"{rows:,}",
                mb_text(bytes_out) if bytes_out else "",
                mb_text(bytes_in) if bytes_in else "",
            )
        )
    total_s = sum(q[2] for q in run["queries"])
    out.append(
        table_row(
            "total",
            "",
            f"{total_s:.2f} of {run['seconds']:.2f}",
            "",
            mb_text(bytes_out_of_db(run)),
            mb_text(bytes_into_db(run)),
        )
    )
    return out


def run_row(label: str, runs: list[dict[str, Any]], ref: dict[str, Any] | None, db_cpu: bool) -> str:
    r = median_run(runs)
    ratio = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else ""
    cells = [label, seconds_text(runs), ratio, f"{r['cpu']:.2f}"]
    if db_cpu:
        cells.append(f"{r['db_cpu']:.2f}")
    cells += [
        f"{r['sandbox_cpu']:.2f}",
        above_text(highest_peak(runs)),
        mb_text(bytes_out_of_db(r)),
        mb_text(bytes_into_db(r)) if bytes_into_db(r) else "-",
        f"{r['inserted']:,} / {r['updated']:,} / {r['deleted']:,}",
        f"{r['chunks']:,}",
    ]
    return table_row(*cells)


def render(rep: dict[str, Any], args: argparse.Namespace, command: str, wall: float) -> str:
    m = machine()
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
                    if has_engine(rep, engine)
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
        above = highest_peak(churn)
        size = (
            "" if args.duckdb_rows == 100_000_000 else f" (target set at 100M rows; this run has {args.duckdb_rows:,})"
        )
        out.append(
            table_row(
                f"DuckDB churn run: worker peak RSS above its start <= 300 MB{size}",
                above_text(above),
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
            table_row(
                f"{name} pushdown: churn run counts = the churn; StopChurn holds the source's rows (sample); "
                "a second run sends nothing",
                f"{churn.inserted:,} / {churn.updated:,} / {churn.deleted:,} (ins / upd / del); sandbox "
                f"{checks['sandbox_rows']:,} rows, {checks['checked']:,} sampled keys equal; second run 0 requests",
                "MET",
            )
        )
    if "pg_runs" in rep:
        runs = rep["pg_runs"]
        local, push = median_run(runs["local churn"]), median_run(runs["postgres churn"])
        out.append(
            table_row(
                "PostgreSQL churn run, pushdown vs local (reported, no target)",
                f"time {push['seconds']:.1f} s vs {local['seconds']:.1f} s "
                f"({push['seconds'] / local['seconds']:.2f}x); peak RSS "
                f"{above_text(highest_peak(runs['postgres churn']))} vs "
                f"{above_text(highest_peak(runs['local churn']))}; "
                f"out of the database {mb_text(bytes_out_of_db(push))} vs {mb_text(bytes_out_of_db(local))} "
                f"({bytes_out_of_db(push) / max(bytes_out_of_db(local), 1):.1%})",
                "n/a",
            )
        )
    if "spark" in rep:
        r = rep["spark"]["runs"]["churn"]
        out.append(table_row("Spark churn run time (reported, no target)", f"{r['seconds']:.1f} s", "n/a"))
    out.append("")
    out.append(
        "A failed check stops its scenario, which is then reported as FAILED below and left out of the tables; MET "
        "means every check of the scenario passed."
    )
    if bounds:
        out += ["", "What bounds the miss:", ""] + [f"- {b}" for b in bounds]
    return out


def render_postgres(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    runs, table, churn = rep["pg_runs"], rep["pg_table"], rep["pg_churn"]
    local_churn = median_run(runs["local churn"])
    out = [
        "",
        f"## 1. PostgreSQL {rep['pg_version']}, {args.rows:,} rows: pushdown vs the local engine",
        "",
        "- Server: a throwaway PostgreSQL on 127.0.0.1, started by `tests/pg_server.py` (fsync off, shared_buffers "
        "32MB); its CPU seconds are the PostgreSQL CPU s column.",
        f"- Table `{TABLE}`: {args.rows:,} rows x 12 columns, run.py's SQL table (bigint key, integer, 2 double "
        "precision, numeric(14,2), 3 text, 2 timestamptz, boolean, jsonb), loaded with `COPY` in "
        f"{table.load_s:.1f} s, {fmt_bytes(table.table_bytes)} with its key. The pushdown's state table after "
        f"the baseline: {fmt_bytes(rep['pg_state_bytes'])}.",
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
        ref = median_run(runs[key.replace("postgres", "local")]) if key.startswith("postgres") else None
        out.append(run_row(label, runs[key], ref, db_cpu=True))
    push, join = median_run(runs["postgres churn"]), median_run(runs["join"])
    out += [
        "",
        f"PostgreSQL's own diff query (`SELECT COUNT(*)` of the changed rows over the same `WITH` clauses as the "
        "engine's counts and changes queries; a fresh child process, before the churn runs): "
        f"{seconds_text(runs['join'])} s; "
        "the pushdown churn run takes "
        f"{push['seconds'] / join['seconds']:.2f}x that.",
        "",
        f"Pushdown / local, churn run: time {push['seconds'] / local_churn['seconds']:.2f}x, peak RSS above start "
        f"{highest_peak(runs['postgres churn']) / max(highest_peak(runs['local churn']), 1):.2f}x, bytes out "
        "of the database "
        f"{bytes_out_of_db(push) / max(bytes_out_of_db(local_churn), 1):.2%} ({mb_text(bytes_out_of_db(push))} vs "
        f"{mb_text(bytes_out_of_db(local_churn))}), PostgreSQL CPU {push['db_cpu']:.1f} s vs "
        f"{local_churn['db_cpu']:.1f} s.",
    ]
    out += parts_table(runs["join"], "PostgreSQL", peak=False)
    out += _run_detail("Pushdown churn run", push, "PostgreSQL")
    out += _run_detail("Pushdown baseline", median_run(runs["postgres baseline"]), "PostgreSQL")
    out += _run_detail("Pushdown second run (no change)", median_run(runs["postgres again"]), "PostgreSQL")
    out += [
        "",
        f"Steps of the local churn run ({local_churn['seconds']:.2f} s; the ADBC read of the whole table "
        f"{local_churn['queries'][0][2]:.2f} s of it):",
        "",
    ]
    out += phase_table(local_churn["phases"], peak_above(local_churn))
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
            cells.append(above_text(peak_above(part)))
        out.append(table_row(*cells))
    return out


def _run_detail(title: str, run: dict[str, Any], db: str, what: str = "above start") -> list[str]:
    out = ["", f"{title} ({run['seconds']:.2f} s): steps", ""]
    out += phase_table(run["phases"], peak_above(run), what)
    out += ["", f"{title}: queries and calls (seconds: waiting for {db}, including streaming its result)", ""]
    out += query_table(run, db)
    return out


def render_duckdb(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    runs, churn, gen = rep["duckdb_runs"], rep["duckdb_churn"], rep["duckdb_gen"]
    join, run = median_run(runs["join"]), median_run(runs["churn"])
    out = [
        "",
        f"## 2. DuckDB {dist_version('duckdb')}, {args.duckdb_rows:,} rows",
        "",
        f"- Table `{TABLE}` in a DuckDB file: the same 12 columns (`preferences` is DuckDB's JSON type), generated "
        f"in SQL (`range()` + `hash()`) in {gen['seconds']:.1f} s (with {args.duckdb_rows // 200:,} spare rows); "
        f"file {fmt_bytes(gen['file_bytes'])}, {fmt_bytes(rep['duckdb_state_file_bytes'])} with the "
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
        table_row(
            "DuckDB's own join + row hash (`SELECT COUNT(*)`)",
            seconds_text(j),
            "1.00x",
            f"{join['cpu']:.2f}",
            "-",
            above_text(highest_peak(j)),
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
    out += _run_detail("Baseline", median_run(runs["baseline"]), "DuckDB")
    out += _run_detail("Second run (no change)", median_run(runs["again"]), "DuckDB")
    return out


def render_spark(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    got, churn = rep["spark"], rep["spark_churn"]
    runs = {key: [r] for key, r in got["runs"].items()}
    check = got["verify"]
    out = [
        "",
        f"## 3. Spark {dist_version('pyspark')} local mode, {args.spark_rows:,} rows",
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
            table_row(
                label,
                f"{r['seconds']:.2f}",
                f"{r['cpu']:.2f}",
                f"{r['sandbox_cpu']:.2f}",
                above_text(peak_above(r)),
                f"{fmt_bytes(r['jvm_rss_before'])} -> {fmt_bytes(r['jvm_peak'])}",
                mb_text(bytes_out_of_db(r)),
                mb_text(bytes_into_db(r)) if bytes_into_db(r) else "-",
                f"{r['inserted']:,} / {r['updated']:,} / {r['deleted']:,}",
                f"{r['chunks']:,}",
            )
        )
    out += _run_detail("Churn run", runs["churn"][0], "Spark")
    out += _run_detail("Baseline", runs["baseline"][0], "Spark")
    out += _run_detail("Second run (no change)", runs["again"][0], "Spark")
    return out
