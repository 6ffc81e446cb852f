"""The results of ``make bench`` / ``make bench-large`` (``RESULTS.md``, ``RESULTS-large.md``): the header, the
targets, the before/after table and the DataFrame section (the SQL section is ``sql_source.render_sql``)."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from typing import Any

from harness import GB, MB, Timing, above_text, fmt_bytes, machine, phase_table, table_row, verdict
from sql_source import render_sql
from synthetic import Churn

SQL_BEFORE = {  # issue 10: the old path (read_sql_frame: psycopg rows -> pandas), 1M rows, PostgreSQL 15, 2 cores
    "churn": (22.2, "22.2", 1_340 * MB),
    "first_load": (26.3, "26.3", 2_040 * MB),
    "floor": (2.3, "1.6-3.0", 150 * MB),
}


FRAME_BEFORE = {"churn run": 500 * MB, "first load": 890 * MB}  # issue 10 ("today"): peak above the input


def render(rep: dict[str, Any], args: argparse.Namespace, command: str, wall: float) -> str:
    n, reps, large = args.rows, args.reps, args.large
    m = machine()
    sql, frames = "sql_churn" in rep, "churn_run" in rep
    ran = " and ".join(x for x, ok in (("the DataFrame source", frames), ("the SQL source (PostgreSQL)", sql)) if ok)
    out = [
        f"# Benchmark results: {n:,} rows{' (large mode)' if large else ''}",
        "",
        f"- Command: `{command}` (`make {'bench-large' if large else 'bench'}` runs it with `.venv/bin/python`)",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; the whole benchmark took {wall:.0f} s",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['os']}",
        f"- Python {m['python']}; polars {m['polars']}, pandas {m['pandas']}, pyarrow {m['pyarrow']}, "
        f"numpy {m['numpy']}, orjson {m['orjson']}, requests {m['requests']}, "
        f"adbc-driver-postgresql {m['adbc']}" + (f"; PostgreSQL {rep['sql_table'].server_version}" if sql else ""),
        f"- Scenarios: {ran}, in one run.",
        f"- Engine settings: chunk_size={args.chunk_size}, max_concurrent_requests={args.concurrency}, "
        "max_delete_fraction=1.0. The StopChurn sandbox runs in its own process on 127.0.0.1 (no latency added).",
        f"- Seconds: median of {reps} repetition(s)"
        + (" (min-max in brackets)" if reps > 1 else "")
        + ". CPU s: CPU seconds of the measuring process (all threads); sandbox CPU s"
        + (" and PostgreSQL CPU s: of those servers' processes" if sql else ": of the server process")
        + f". All share the machine's {m['cores']} cores, which other work was also using "
        f"(1-minute load average {rep['load'][0]:.2f} at the start, {rep['load'][1]:.2f} at the end): seconds are "
        "noisy; the ratios, measured within this one run, are what counts.",
    ]
    out += render_targets(rep, args)
    if sql:
        out += render_before_after(rep, args)
        out += render_sql(rep, args)
    if frames:
        out += render_frames(rep, args)
    for key, title in (
        ("profile_sql_churn", "SQL churn run"),
        ("profile_sql_first_load", "SQL first load"),
        ("profile_churn", "DataFrame churn run"),
        ("profile_first_load", "DataFrame first load"),
    ):
        if key in rep:
            out += ["", f"## Profile: {title} (cProfile, one run, main thread)", "", "```", rep[key], "```"]
    return "\n".join(out) + "\n"


def render_targets(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Issue 10's targets: pass/miss, and what bounds each miss."""
    n = args.rows
    scale = {1_000_000: "1M", 10_000_000: "10M"}.get(n)
    note = "" if scale else f" (set at 1M/10M rows; this run has {n:,})"
    out = ["", "## Targets (issue 10; 2 cores, ratios measured in this run)", ""]
    out += ["| target | measured | result |", "|---|---|---|"]
    misses: list[str] = []
    if "sql_churn" in rep:
        floor, churn, fl = rep["sql_floor"], rep["sql_churn"], rep["sql_first_load"]
        ratio = churn.median / floor.median
        limit = 2.0 if scale == "10M" else 1.5
        ok = ratio <= limit if scale else None
        out.append(
            table_row(
                f"{scale or '1M'}-row SQL churn run <= {limit:g}x its floor{note}",
                f"{ratio:.2f}x ({churn.median:.2f} s / {floor.median:.2f} s)",
                verdict(ok),
            )
        )
        if ok is False:
            misses.append(time_bound(churn, floor, limit))
        rss_limit = 1536 * MB if scale == "10M" else 500 * MB
        for label, timing in (("SQL churn run", churn), ("SQL first load", fl)):
            above = timing.peak_above_start
            ok = above <= rss_limit if scale else None
            out.append(
                table_row(
                    f"{label}: peak RSS above the start of the run <= {fmt_bytes(rss_limit)}{note}",
                    above_text(above),
                    verdict(ok),
                )
            )
            if ok is False:
                misses.append(memory_bound(label, timing.peak_child, above))
    if "churn_run" in rep:
        for label, r in (("churn run", rep.get("rss_churn")), ("first load", rep.get("rss_first_load"))):
            if r is None:
                out.append(
                    table_row(
                        f"DataFrame path, {label}: peak RSS above the caller's input <= 300 MB at 1M rows",
                        "not run" + (" in --large" if args.large else ""),
                        "n/a",
                    )
                )
                continue
            above = r["peak_during_run"] - r["rss_after_frames"]
            ok = above <= 300 * MB if scale == "1M" else None
            out.append(
                table_row(
                    f"DataFrame path, {label}: peak RSS above the caller's input <= 300 MB at 1M rows"
                    + ("" if scale == "1M" else f" (this run has {n:,})"),
                    above_text(above),
                    verdict(ok),
                )
            )
            if ok is False:
                misses.append(memory_bound(f"DataFrame {label}", r, above, "above input"))
    if misses:
        out += [
            "",
            "What bounds the misses (from each run's steps, measured in its child process; the cProfile "
            "summaries, where run with `--profile`, are at the end):",
            "",
        ]
        out += [f"- {m}" for m in misses]
    return out


def _steps_text(phases: list[list[Any]], key: int, fmt: Callable[[Any], str]) -> str:
    return ", ".join(f"{row[0]} {fmt(row[key])}" for row in phases)


def _sizes_text(phases: list[list[Any]]) -> str:
    sized = [f"{row[0]}: {fmt_bytes(row[3])}" for row in phases if row[3]]
    return f" Frames the steps returned (polars estimated size): {'; '.join(sized)}." if sized else ""


def time_bound(churn: Timing, floor: Timing, limit: float) -> str:
    run, floor_run = churn.median_child, floor.median_child
    read_s = run.get("read_s", 0.0)
    floor_read = next((row[1] for row in floor_run["phases"] if row[0].startswith("ADBC read")), 0.0)
    budget = limit * floor.median
    return (
        f"SQL churn run, time: {churn.median:.2f} s against the floor's {floor.median:.2f} s (the floor's median "
        f"repetition: ADBC read {floor_read:.2f} s, the rest hashing). Steps of the churn run's median repetition "
        f"({run['seconds']:.2f} s): {_steps_text(run['phases'], 1, lambda s: f'{s:.2f} s')}. Inside the source "
        f"step, {read_s:.2f} s went to waiting for ADBC's batches and the rest to converting them to the canonical "
        "frame; the steps run one after another. Within "
        f"{limit:g}x the floor the run has {budget:.2f} s; with the read taking about {read_s:.2f} s of it, "
        f"everything else would have to fit in {budget - read_s:.2f} s (it takes {run['seconds'] - read_s:.2f} s)."
    )


def memory_bound(label: str, child: dict[str, Any], above: int, what: str = "above start") -> str:
    phases = child.get("phases") or []
    if not phases:
        return f"{label}, memory: {above_text(above)} {what} (no step breakdown)"
    top = max(phases, key=lambda r: r[2])
    return (
        f"{label}, memory: {above_text(above)} {what} at the highest repetition. The peak is reached in the step "
        f"'{top[0]}'; each step's own peak: {_steps_text(phases, 2, above_text)}.{_sizes_text(phases)}"
    )


def render_before_after(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    floor, churn, fl = rep["sql_floor"], rep["sql_churn"], rep["sql_first_load"]
    at_1m = args.rows == 1_000_000
    out = [
        "",
        "## Before / after (SQL source and DataFrame memory)",
        "",
    ]
    if not at_1m:
        out.append(
            "Issue 10 measured the old SQL path at 1M rows only (at 10M it estimated minutes and well over 10 GB of "
            f"memory); there is no before for this run's {args.rows:,} rows. The 1M-row before/after table is in "
            "RESULTS.md; this run's numbers are in the tables above and below."
        )
        return out
    out += [
        "| scenario | before: seconds | before: peak RSS | after: seconds | after: peak RSS |",
        "|---|---|---|---|---|",
    ]
    for key, label, timing in (
        ("churn", "SQL churn run (operator's SQL path, read included)", churn),
        ("first_load", "SQL first load (the issue's 'baseline run through the operator')", fl),
        ("floor", "floor: ADBC read into Arrow + polars `hash_rows()`", floor),
    ):
        _, before_s, before_rss = SQL_BEFORE[key]
        out.append(
            table_row(
                label,
                before_s,
                f"{above_text(before_rss)} above start",
                timing.cell(),
                f"{above_text(timing.peak_above_start)} above start",
            )
        )
    ratio = churn.median / floor.median
    out.append(table_row("SQL churn run / floor", "about 13x (7.4-13.9x)", "", f"{ratio:.2f}x", ""))
    for label, key in (("churn run", "rss_churn"), ("first load", "rss_first_load")):
        r = rep.get(key)
        if r is not None:
            out.append(
                table_row(
                    f"DataFrame {label}: peak RSS above the caller's input",
                    "",
                    f"{above_text(FRAME_BEFORE[label])} above input",
                    "",
                    f"{above_text(r['peak_during_run'] - r['rss_after_frames'])} above input",
                )
            )
    out += [
        "",
        "Before: issue 10's own numbers, measured on this project's 2-core machines with PostgreSQL 15 on a "
        "1M-row x 12-column table through the old path (`read_sql_frame`: psycopg row tuples into pandas, then the "
        "engine). That path was removed when SQL sources moved to Arrow batches (`read_sql_frame` no longer "
        "exists), so it cannot be re-measured here; its table differed a little from this one (no numeric "
        "column), and its runs were not in this run, so the before/after ratios are indicative, not exact. The "
        "DataFrame before is the issue's 'today' (the previous RESULTS.md).",
    ]
    return out


def render_frames(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The DataFrame source's sections (the benchmark's original scenarios)."""
    n, large = args.rows, args.large
    churn: Churn = rep["churn"]
    floor, churn_run = rep["floor"], rep["churn_run"]
    fl, fl_floor = rep.get("first_load"), rep.get("first_load_floor")
    naive, naive_nd = rep.get("naive"), rep.get("naive_nd")
    floor_nd, churn_nd = rep["floor_nd"], rep["churn_nd"]
    at_1m = n == 1_000_000

    def sb(t: Timing) -> str:
        return f"{t.sandbox_median:.2f}" if t.sandbox_cpu else "-"

    out = [
        "",
        "## DataFrame source (pandas DataFrame given to the operator)",
        "",
        f"- Table: {n:,} rows x 12 columns: `id` int64 key; 2 int64; 2 float64 (one 5% NaN); 3 strings (one 10% null); "
        f"2 UTC timestamps (one 3% null); bool; `preferences`, a dict of 3 keys per row. In memory (pandas, deep) "
        f"{fmt_bytes(rep['input_bytes'])}, of which the dict column {fmt_bytes(rep['input_dict_bytes'])}.",
        f"- Churn: {churn.updated:,} updated (1%), {churn.inserted:,} inserted (0.5%), "
        f"{churn.deleted:,} deleted (0.5%).",
        "- Timings in this process (median of the repetitions); peak RSS in fresh child processes (below).",
        "",
        "| # | scenario | seconds | CPU s | sandbox CPU s | notes |",
        "|---|---|---|---|---|---|",
        table_row(
            1,
            "floor: read the committed snapshot Parquet file + `hash_rows()`",
            floor.cell(),
            f"{floor.own_median:.2f}",
            "-",
            f"snapshot file {fmt_bytes(rep['snapshot_bytes'])} (zstd)",
        ),
        table_row(
            2,
            "**this project, churn run**: `run_sync` diff, encode, send, commit",
            churn_run.cell(),
            f"{churn_run.own_median:.2f}",
            sb(churn_run),
            f"{rep['churn_chunks']} chunks",
        ),
    ]
    if fl and fl_floor:
        out += [
            table_row(
                3,
                f"**this project, first load**: {n:,} inserts end to end",
                fl.cell(),
                f"{fl.own_median:.2f}",
                sb(fl),
                f"{fl.result.chunks} chunks, {fmt_bytes(fl.result.bytes)} of JSON",
            ),
            table_row(
                "3f",
                "first-load floor: polars `write_parquet` + `write_ndjson` of the update envelopes + the same chunks "
                "POSTed with the same client and concurrency (table pre-built in polars with ms timestamps and "
                "struct dicts, untimed)",
                fl_floor.cell(),
                f"{fl_floor.own_median:.2f}",
                sb(fl_floor),
                "encode-free lower bound",
            ),
        ]
    else:
        out.append(
            table_row(3, "first load", "not run in --large", "", "", "the base table is committed as a baseline")
        )
    if naive:
        out.append(
            table_row(
                4,
                "naive peer: pandas `read_parquet`, outer `merge(indicator=True)`, per-column compare, "
                f"`to_dict('records')` + `json.dumps` per update, sequential `requests.post` per {args.chunk_size}, "
                "pandas `to_parquet`",
                naive.cell(),
                f"{naive.own_median:.2f}",
                sb(naive),
                "finds the same inserted/updated/deleted counts",
            )
        )
    else:
        out.append(table_row(4, "naive peer", "not run" + (" in --large (use --naive)" if large else ""), "", "", ""))

    ratio_floor = churn_run.median / floor.median
    ratio_naive = naive.median / churn_run.median if naive else None
    ratio_fl = fl.median / fl_floor.median if fl and fl_floor else None
    rss_c, rss_f = rep["rss_churn"], rep.get("rss_first_load")
    scale_note = "" if at_1m else f" (set at 1M rows; this run has {n:,})"
    out += [
        "",
        "### Earlier targets (set before issue 10)",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        table_row("churn run within 2x of the floor (1)", f"{ratio_floor:.2f}x", verdict(ratio_floor <= 2)),
        table_row(
            "churn run >= 10x faster than the naive peer (4 / 2)",
            f"{ratio_naive:.2f}x" if ratio_naive else "not run",
            verdict(ratio_naive >= 10 if ratio_naive else None),
        ),
        table_row(
            "first load within 2x of its floor (3 / 3f)",
            f"{ratio_fl:.2f}x" if ratio_fl else "not run",
            verdict(ratio_fl <= 2 if ratio_fl else None),
        ),
    ]
    for label, r in (("churn run", rss_c), ("first load", rss_f)):
        if r is None:
            out.append(table_row(f"peak RSS <= 1 GB at 1M rows, {label}", "not run", "n/a"))
            continue
        peak = r["peak_during_run"]
        out.append(
            table_row(
                f"peak RSS <= 1 GB at 1M rows, {label}{scale_note}",
                fmt_bytes(peak),
                verdict(peak <= GB) if at_1m else "n/a",
            )
        )
    if large:
        peak = rss_c["peak_during_run"]
        big = n >= 10_000_000
        out.append(
            table_row(
                "10M-row churn run < 30 s" + ("" if big else f" (this run has {n:,} rows)"),
                f"{churn_run.median:.1f} s",
                verdict(churn_run.median < 30) if big else "n/a",
            )
        )
        out.append(
            table_row(
                "10M-row churn run peak RSS < 8 GB" + ("" if big else f" (this run has {n:,} rows)"),
                fmt_bytes(peak),
                verdict(peak < 8 * GB) if big else "n/a",
            )
        )

    out += [
        "",
        "### The nested dict column, separately",
        "",
        "The same churn on the table without `preferences` (11 columns; its own committed snapshot):",
        "",
        "| scenario | seconds | CPU s | ratio |",
        "|---|---|---|---|",
        table_row("floor, no dict column", floor_nd.cell(), f"{floor_nd.own_median:.2f}", ""),
        table_row(
            "this project, churn run, no dict column",
            churn_nd.cell(),
            f"{churn_nd.own_median:.2f}",
            f"{churn_nd.median / floor_nd.median:.2f}x the floor",
        ),
    ]
    if naive_nd:
        out.append(
            table_row(
                "naive peer, no dict column",
                naive_nd.cell(),
                f"{naive_nd.own_median:.2f}",
                f"{naive_nd.median / churn_nd.median:.2f}x the churn run",
            )
        )
    out += [
        "",
        f"The dict column accounts for {churn_run.median - churn_nd.median:.2f} s of the "
        f"{churn_run.median:.2f} s churn run.",
        "",
        "### Memory (each scenario in a fresh process)",
        "",
        "| scenario | RSS after imports | RSS after building the input frame | peak while building it | "
        "peak during the run | peak above input |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("churn run", rss_c), ("first load", rss_f)):
        if r is not None:
            out.append(
                table_row(
                    label,
                    fmt_bytes(r["rss_after_imports"]),
                    fmt_bytes(r["rss_after_frames"]),
                    fmt_bytes(r["peak_while_building"]),
                    fmt_bytes(r["peak_during_run"]),
                    fmt_bytes(r["peak_during_run"] - r["rss_after_frames"]),
                )
            )
    out += [
        "",
        f"Peak during the run: {rss_c['peak_source']}, so it includes the input frame the caller holds "
        "(`ru_maxrss` is not used: Linux carries it over fork + exec from the parent). The churn child builds the "
        "base table, derives the churned one and drops the base before the run. For context, the benchmark "
        f"process held {fmt_bytes(rep['input_rss'])} after building both frames "
        f"(generation took {rep['gen_s']:.1f} s).",
    ]
    for label, r in (("churn run", rss_c), ("first load", rss_f)):
        if r is not None and r.get("phases"):
            out += ["", f"Steps of the {label} (its child process; peak above input):", ""]
            out += phase_table(r["phases"], r["peak_during_run"] - r["rss_after_frames"], "above input")
    out += [
        "",
        f"### Delivery: sequential vs parallel ({rep['parallel_rows']:,}-row first load, a second sandbox adds 50 ms "
        f"to every request, {rep['parallel_chunks']} chunks, 1 repetition)",
        "",
        "| max_concurrent_requests | seconds | speedup |",
        "|---|---|---|",
    ]
    seq = rep["parallel"][1].median
    for workers, timing in rep["parallel"].items():
        out.append(table_row(workers, f"{timing.median:.2f}", f"{seq / timing.median:.2f}x"))
    out += [
        "",
        f"Latency alone costs {rep['parallel_chunks'] * 0.05:.0f} s sequentially ({rep['parallel_chunks']} x 50 ms).",
        "",
        "Definitions: the churn floor reads the snapshot file the store committed and hashes every row; it does not "
        "convert the pandas source, diff, encode JSON or send. The naive peer compares column by column with "
        "vectorised pandas operations (kinder to it than a row-wise `apply`) and sends with one plain session, "
        "one request at a time.",
    ]
    return out
