"""Issue 22's table ("Scale"): run the scenarios that measure each of its rows, then print one table and append it
to ``benchmarks/RESULTS-scale.md`` as a dated section.

Usage::

    python benchmarks/scale.py bench    # make bench: 1M rows (run.py's sync benchmark, the pushdown on PostgreSQL
                                        #   and DuckDB at 1M), then the table
    python benchmarks/scale.py large    # make bench-large: 10M rows, DuckDB 100M rows under memory_limit=1GB
    python benchmarks/scale.py huge     # make bench-huge: the 50M-row worker-path churn run on PostgreSQL
    python benchmarks/scale.py bench --rows 20000 --out -       # a quick check of every path, writes nothing

The scenarios are run.py's own (``run.py`` and ``run.py --pushdown``, each with ``--save-json``); this module only
runs them and reads what they measured (``scale_rows.py`` holds the rows and their MET/MISS). See
benchmarks/README.md, "Issue 22's table".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from harness import GB, HERE, Sandbox, airflow_environment, machine, pg_server_module
from pushdown import load_reports
from pushdown_findings import median_run
from pushdown_scenarios import bench_postgres
from results_file import append_section
from scale_rows import (
    DUCKDB_ROWS,
    HUGE_ROWS,
    Row,
    first_load_row,
    frame_churn_row,
    huge_row,
    pg_churn_row,
    render_table,
    scale_name,
    state_row,
    wh_duckdb_row,
    wh_pg_row,
)

RESULTS = HERE / "RESULTS-scale.md"
TITLE = "Benchmark results: issue 22's table (scale), one section per run"
DEFAULT_ROWS = {"bench": 1_000_000, "large": 10_000_000, "huge": HUGE_ROWS}
MAKE = {"bench": "make bench", "large": "make bench-large", "huge": "make bench-huge"}
#: disk the 50M-row scenario needs per row: the PostgreSQL table with its key and spare rows (~200 bytes), its WAL
#: and dead rows after the churn (~30), two snapshots of the worker path (the committed one and the next, ~50 each);
#: the 2026-12-07 run used 16.3 GB at 50M (326 bytes a row), so this keeps a small margin
HUGE_DISK_PER_ROW = 350
#: its seconds per row on 2 shared cores, measured: the 2026-12-07 run (the table's COPY, a baseline, the churn run
#: and a second run) took 729 s at 50M, 14.6 us a row; about 13 minutes at 50M with this margin
HUGE_SECONDS_PER_ROW = 16e-6
HUGE_MEMORY_CAP = 8 * GB  # the child is killed past this RSS (twice the target): the machine is shared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=sorted(DEFAULT_ROWS), help="bench (1M), large (10M + DuckDB 100M), huge (50M)")
    parser.add_argument("--rows", type=int, help="rows of the tables (default: 1M / 10M / 50M); a quick check: 20000")
    parser.add_argument("--duckdb-rows", type=int, help="DuckDB's rows (default: --rows; large: 100M)")
    parser.add_argument("--duckdb-memory-limit", default="1GB", help="DuckDB's memory_limit (the target: 1GB)")
    parser.add_argument("--reps", type=int, help="repetitions (default: run.py's and --pushdown's own)")
    parser.add_argument("--engines", help="large: the pushdown's engines (default postgres,duckdb,spark)")
    parser.add_argument(
        "--out",
        default=str(RESULTS),
        help="results file ('-': print only); the scenarios write their own results files (RESULTS.md, ...) only "
        "when this is the default",
    )
    parser.add_argument("--keep-json", help="keep the scenarios' measurements in this folder")
    parser.add_argument("--from-json", help="render the table from a --keep-json folder; run nothing")
    parser.add_argument("--memory-cap", type=int, default=HUGE_MEMORY_CAP, help="huge: kill a run past this RSS")
    args = parser.parse_args()
    args.rows = args.rows or DEFAULT_ROWS[args.which]
    if args.which == "large":
        args.duckdb_rows = args.duckdb_rows or (DUCKDB_ROWS if args.rows == DEFAULT_ROWS["large"] else 10 * args.rows)
    args.duckdb_rows = args.duckdb_rows or args.rows
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    if args.from_json:
        folder = Path(args.from_json)
        notes: list[str] = []
    else:
        folder = Path(args.keep_json) if args.keep_json else Path(tempfile.mkdtemp(prefix="stopchurn-scale-"))
        folder.mkdir(parents=True, exist_ok=True)
        runner = run_huge if args.which == "huge" else run_scenarios
        notes = runner(args, folder)
        if notes and notes[0].startswith("refusing"):
            print(notes[0], file=sys.stderr)
            if not args.keep_json:
                shutil.rmtree(folder, ignore_errors=True)
            return 2
    try:
        rows = table_rows(args.which, folder, args.rows)
    finally:
        if not args.keep_json and not args.from_json:
            shutil.rmtree(folder, ignore_errors=True)
    section = render(args, rows, notes, command, time.perf_counter() - started, load_before)
    print()
    print(section)
    if args.out != "-":
        append_section(Path(args.out), TITLE, section)
        print(f"(appended to {Path(args.out).name})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# make bench / make bench-large: run.py's scenarios, each saving what it measured
# ---------------------------------------------------------------------------------------------------------------
def scenario_commands(args: argparse.Namespace, folder: Path) -> list[list[str]]:
    run = [sys.executable, str(HERE / "run.py")]
    quiet = [] if args.out == str(RESULTS) else ["--out", "-"]
    reps = ["--reps", str(args.reps)] if args.reps else []
    sync = [*run, "--rows", str(args.rows), "--profile", *reps, *quiet, "--save-json", str(folder / "sync.json")]
    pushdown = [
        *run,
        "--pushdown",
        "--rows",
        str(args.rows),
        "--duckdb-rows",
        str(args.duckdb_rows),
        "--duckdb-memory-limit",
        args.duckdb_memory_limit,
        *reps,
        "--save-json",
        str(folder / "pushdown.json"),
    ]
    if args.which == "large":
        sync.insert(4, "--large")
        pushdown += ["--engines", args.engines] if args.engines else []
        pushdown += quiet
    else:  # at 1M: PostgreSQL and DuckDB (Spark has no row in the table); RESULTS-pushdown.md stays 10M's
        pushdown += ["--engines", "postgres,duckdb"]
        pushdown += quiet or ["--out", str(HERE / "RESULTS-pushdown-1M.md")]
    return [sync, pushdown]


def run_scenarios(args: argparse.Namespace, folder: Path) -> list[str]:
    """Run each scenario (its output streams through); a failed one is named and its rows say 'not measured'."""
    notes = []
    for cmd in scenario_commands(args, folder):
        shown = "python benchmarks/" + " ".join(Path(c).name if c.endswith(".py") else c for c in cmd[1:])
        shown = shown.replace(f" --save-json {folder / 'sync.json'}", "").replace(
            f" --save-json {folder / 'pushdown.json'}", ""
        )
        print(f"== {shown}", flush=True)
        code = subprocess.run(cmd, check=False).returncode
        notes.append(f"`{shown}`" + ("" if code == 0 else f" exited with status {code}"))
    return notes


# ---------------------------------------------------------------------------------------------------------------
# make bench-huge: the 50M-row worker path (PostgreSQL churn run), with its disk checked first
# ---------------------------------------------------------------------------------------------------------------
def huge_needs(rows: int) -> tuple[int, float]:
    """Bytes of disk and seconds the huge scenario needs at ``rows`` rows."""
    return rows * HUGE_DISK_PER_ROW, rows * HUGE_SECONDS_PER_ROW


def disk_refusal(rows: int, folder: Path) -> str | None:
    """Why the huge scenario cannot start here (too little free disk where its files go), or None."""
    need, _ = huge_needs(rows)
    free = shutil.disk_usage(folder).free
    if need <= free:
        return None
    return (
        f"refusing: {rows:,} rows need about {need / GB:.1f} GB of free disk in {folder} (the PostgreSQL table, "
        f"its WAL and two snapshots: {HUGE_DISK_PER_ROW} bytes a row); {free / GB:.1f} GB are free. Free some, or "
        "set TMPDIR to a larger disk."
    )


def run_huge(args: argparse.Namespace, folder: Path) -> list[str]:
    """The worker path's baseline, churn run and second run at ``--rows`` (run.py --pushdown's PostgreSQL scenario
    without the pushdown), each in a fresh child process killed past ``--memory-cap``."""
    tmp = Path(tempfile.mkdtemp(prefix="stopchurn-huge-"))
    why = disk_refusal(args.rows, tmp.parent)
    if why:
        shutil.rmtree(tmp, ignore_errors=True)
        return [why]
    need, seconds = huge_needs(args.rows)
    print(f"{args.rows:,} rows: about {need / GB:.1f} GB of disk and {seconds / 60:.0f} minutes", flush=True)
    args.memory_cap = min(args.memory_cap, psutil.virtual_memory().available - GB)
    sub = argparse.Namespace(
        rows=args.rows,
        reps=1,
        chunk_size=500,
        concurrency=4,
        duckdb_memory_limit="1GB",
        spark_driver_memory="1g",
        memory_cap=args.memory_cap,
    )
    rep: dict[str, Any] = {}
    result: dict[str, Any] = {"rows": args.rows, "memory_cap": args.memory_cap}
    sandbox: Sandbox | None = None
    try:
        with contextlib.ExitStack() as stack:
            pg = pg_server_module()
            server = stack.enter_context(pg.running_postgres())
            airflow_environment(tmp, server)
            sandbox = Sandbox()
            bench_postgres(sub, tmp, sandbox, server, rep, paths=("local",))
            runs = rep["pg_runs"]
            result.update(
                baseline=median_run(runs["local baseline"]),
                churn=median_run(runs["local churn"]),
                again=median_run(runs["local again"]),
                table_bytes=rep["pg_table"].table_bytes,
            )
    except Exception as err:  # the table says what failed (a killed run: its RSS at the kill)
        result["failed"] = failure_text(err)
    finally:
        if sandbox is not None:
            sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    (folder / "huge.json").write_text(json.dumps(result))
    return [
        f"the worker path's baseline, churn (1%: 0.5% updated, 0.25% deleted, 0.25% inserted), churn run and a "
        f"second run at {args.rows:,} rows, each child killed past {args.memory_cap / GB:.1f} GB of RSS"
    ]


def failure_text(err: Exception) -> str:
    """One line for the table: which run failed and why, without the child's arguments (paths, the URL)."""
    text = str(err).strip()
    mode = re.search(r"'mode': '(\w+)'", text)
    if mode and "): " in text:  # run_pd_child's "child ... failed (exit N): <its stderr>"
        lines = text.split("): ", 1)[1].strip().splitlines() or [""]
        return f"the {mode.group(1)} run failed: {lines[-1][:300]}"
    lines = text.splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:300]}" + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------
def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def table_rows(which: str, folder: Path, rows: int) -> list[Row]:
    if which == "huge":
        return [huge_row(_json(folder / "huge.json"))]
    sync = _json(folder / "sync.json")
    rep, pd_args = (None, None)
    if (folder / "pushdown.json").exists():
        rep, pd_args, _, _ = load_reports([folder / "pushdown.json"])
    if which == "bench":
        return [
            pg_churn_row(sync, 1_000_000),
            frame_churn_row(sync),
            first_load_row(sync, 1_000_000),
            wh_pg_row(rep, pd_args, 1_000_000),
            state_row(rep, pd_args),
        ]
    return [
        pg_churn_row(sync, 10_000_000),
        first_load_row(sync, 10_000_000),
        wh_pg_row(rep, pd_args, 10_000_000),
        wh_duckdb_row(rep, pd_args),
        state_row(rep, pd_args),
    ]


OTHER_ROWS = {
    "bench": "the 10M-row rows and DuckDB 100M: `make bench-large`; the 50M-row worker path: `make bench-huge`",
    "large": "the 1M-row rows (DataFrame churn vs the naive peer included): `make bench`; the 50M-row worker "
    "path: `make bench-huge`",
    "huge": "every other row: `make bench` (1M) and `make bench-large` (10M, DuckDB 100M)",
}


def render(
    args: argparse.Namespace, rows: list[Row], notes: list[str], command: str, wall: float, load_before: float
) -> str:
    m = machine()
    scale = f"{args.rows:,} rows" + (f", DuckDB {args.duckdb_rows:,}" if args.which != "huge" else "")
    at_target = args.rows == DEFAULT_ROWS[args.which]
    checkout = str(HERE.parent) + os.sep  # a results file names paths inside the checkout relative to it
    command = command.replace(checkout, "")
    notes = [n.replace(checkout, "") for n in notes]
    out = [
        f"## {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}: `{MAKE[args.which]}` ({scale})",
        "",
        f"- Command: `{command}`" + (f" (what `{MAKE[args.which]}` runs)" if at_target else ""),
        *(f"- Scenario: {n}" for n in notes),
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; 1-minute load average {load_before:.2f} at the "
        f"start, {os.getloadavg()[0]:.2f} at the end; {wall:.0f} s in all. Seconds are noisy on shared cores: each "
        "ratio is against a floor measured in the same run; every peak RSS is of a fresh child process, above the "
        "RSS before its run (DataFrame: above the caller's input frame).",
    ]
    if not at_target:
        out.append(
            f"- Scale: {args.rows:,} rows, not the target's {scale_name(DEFAULT_ROWS[args.which])}: the results are "
            "a check of the scenarios, not of the targets."
        )
    out += ["", *render_table(rows), "", f"Rows measured by the other targets: {OTHER_ROWS[args.which]}."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
