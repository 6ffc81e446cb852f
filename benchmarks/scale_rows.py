"""Issue 22's table ("Scale"): its rows, their targets and MET/MISS, read from the measurements one run of
``make bench``, ``make bench-large`` or ``make bench-huge`` saved (``--save-json``). No measuring happens here."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from harness import GB, MB, Timing, above_text, table_row
from pushdown_findings import churn_notes, duckdb_memory_bound, highest_peak, median_run, peak_above
from report import memory_bound, time_bound

#: the issue's "today" column, quoted as it gives it
BEFORE = {
    "pg_churn": {1_000_000: "2.7x, +588 to +906 MB", 10_000_000: "2.2x to 2.9x, +5.1 to +6.9 GB"},
    "pg_churn_huge": "not tried (would need ~35 GB)",
    "frame_churn": "1.6x to 1.9x faster (it was 2.5x at 0.1.0: a regression)",
    "first_load": "+525 to +848 MB",
    "wh_pg": {
        1_000_000: "5.3x (25 s vs 4.7 s)",
        10_000_000: "3.3x PostgreSQL's own diff; 2.1x slower than the worker path",
    },
    "wh_duckdb": "needs a 4 GB `memory_limit`; 1 GB runs out",
    "state": "2x (PostgreSQL) to 3x (DuckDB) the source",
}
HUGE_ROWS = 50_000_000
DUCKDB_ROWS = 100_000_000
DUCKDB_LIMIT = 1 * GB  # the memory_limit the 100M-row DuckDB run must fit in
DUCKDB_ABOVE = 300 * MB  # the worker's peak above start, beyond that memory_limit
HUGE_ABOVE = 4 * GB
STATE_RATIO = 1.2


@dataclass
class Row:
    path: str
    measured: str
    floor: str
    peak: str
    target: str
    verdict: str
    before: str
    bounds: list[str] = field(default_factory=list)


def verdict(checks: Sequence[bool], rows: int, target_rows: int) -> str:
    """MET when every check holds, else MISS; a run at another scale than the target's says so (indicative)."""
    text = "MET" if checks and all(checks) else "MISS"
    return text if rows == target_rows else f"{text} (at {rows:,} rows, target set at {target_rows:,})"


def scale_name(rows: int) -> str:
    for size, name in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if rows >= size and rows % size == 0:
            return f"{rows // size}{name}"
    return f"{rows:,}"


def memory_limit_bytes(text: str) -> int:
    """DuckDB's ``memory_limit`` setting (``1GB``, ``512MB``, ``4GiB``) in bytes."""
    units = {"kib": 1024, "mib": MB, "gib": GB, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    t = text.strip().lower().replace(" ", "")
    for unit, size in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * size)
    return int(float(t))


# ---------------------------------------------------------------------------------------------------------------
# what the sync benchmark (run.py) keeps for the table: numbers and, per target, what bounds it
# ---------------------------------------------------------------------------------------------------------------
def _peaks(t: Timing) -> list[int]:
    return [int(c["peak_during_run"] - c["rss_before_run"]) for c in t.children]


def sync_summary(rep: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The numbers of ``run.py``'s run that the table needs (its ``--save-json``)."""
    out: dict[str, Any] = {"rows": args.rows, "large": bool(args.large), "sql": None, "frame": None}
    if "sql_churn" in rep:
        floor, churn, fl = rep["sql_floor"], rep["sql_churn"], rep["sql_first_load"]
        limit = 2.0 if args.rows >= 10_000_000 else 1.5
        out["sql"] = {
            "floor_s": floor.median,
            "floor_peaks": _peaks(floor),
            "churn_s": churn.median,
            "churn_peaks": _peaks(churn),
            "first_load_s": fl.median,
            "first_load_peaks": _peaks(fl),
            "reps": len(churn.seconds),
            "time_bound": time_bound(churn, floor, limit),
            "churn_memory_bound": memory_bound("SQL churn run", churn.peak_child, churn.peak_above_start),
            "first_load_memory_bound": memory_bound("SQL first load", fl.peak_child, fl.peak_above_start),
        }
    if "churn_run" in rep:
        naive, fl, fl_floor = rep.get("naive"), rep.get("first_load"), rep.get("first_load_floor")
        frame: dict[str, Any] = {"churn_s": rep["churn_run"].median, "naive_s": naive.median if naive else None}
        for key, label in (("rss_churn", "churn run"), ("rss_first_load", "first load")):
            r = rep.get(key)
            above = int(r["peak_during_run"] - r["rss_after_frames"]) if r else None
            frame[key] = above
            frame[key + "_bound"] = memory_bound(f"DataFrame {label}", r, above, "above input") if r else None
        frame["first_load_s"] = fl.median if fl else None
        frame["first_load_floor_s"] = fl_floor.median if fl_floor else None
        out["frame"] = frame
    return out


# ---------------------------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------------------------
def _range(peaks: Sequence[int]) -> str:
    lo, hi = above_text(min(peaks)), above_text(max(peaks))
    return hi if lo == hi else f"{lo} to {hi}"


def pg_churn_row(sync: dict[str, Any] | None, target_rows: int) -> Row:
    """The worker path's PostgreSQL churn run against its floor (ADBC read + ``hash_rows``)."""
    limit, mem = (2.0, 1536 * MB) if target_rows >= 10_000_000 else (1.5, 500 * MB)
    path = f"{scale_name(target_rows)}-row PostgreSQL churn run vs its floor (ADBC read + `hash_rows`)"
    target = f"<= {limit:g}x, <= {mem / GB:g} GB" if mem >= GB else f"<= {limit:g}x, <= {mem // MB} MB"
    before = BEFORE["pg_churn"][target_rows]
    sql = (sync or {}).get("sql")
    if not sql:
        return Row(path, "not measured", "", "", target, "MISS (not measured)", before)
    ratio, peak = sql["churn_s"] / sql["floor_s"], max(sql["churn_peaks"])
    time_ok, mem_ok = ratio <= limit, peak <= mem
    bounds = ([] if time_ok else [sql["time_bound"]]) + ([] if mem_ok else [sql["churn_memory_bound"]])
    return Row(
        path,
        f"{ratio:.2f}x ({sql['churn_s']:.2f} s / {sql['floor_s']:.2f} s), {_range(sql['churn_peaks'])}",
        f"{sql['floor_s']:.2f} s, {_range(sql['floor_peaks'])}",
        f"churn run {_range(sql['churn_peaks'])}, floor {_range(sql['floor_peaks'])} ({sql['reps']} rep(s) each)",
        target,
        verdict([time_ok, mem_ok], sync["rows"], target_rows),  # type: ignore[index]
        before,
        bounds,
    )


def frame_churn_row(sync: dict[str, Any] | None) -> Row:
    """The DataFrame churn run against the naive pandas peer, and its memory above the caller's input."""
    path = "1M-row DataFrame churn vs the naive pandas peer"
    target, before = ">= 3x faster, <= 300 MB above the input", BEFORE["frame_churn"]
    frame = (sync or {}).get("frame")
    if not frame or frame["naive_s"] is None or frame["rss_churn"] is None:
        return Row(path, "not measured", "", "", target, "MISS (not measured)", before)
    speed, above = frame["naive_s"] / frame["churn_s"], frame["rss_churn"]
    fast_ok, mem_ok = speed >= 3.0, above <= 300 * MB
    bounds = [] if mem_ok else [frame["rss_churn_bound"]]
    if not fast_ok:
        bounds.append(
            f"DataFrame churn run, time: {frame['churn_s']:.2f} s against the naive peer's {frame['naive_s']:.2f} s; "
            f"3x needs the run within {frame['naive_s'] / 3:.2f} s (its steps: RESULTS.md, 'Steps of the churn run')."
        )
    return Row(
        path,
        f"{speed:.2f}x faster ({frame['churn_s']:.2f} s vs {frame['naive_s']:.2f} s), {above_text(above)} above input",
        f"naive peer {frame['naive_s']:.2f} s",
        f"{above_text(above)} above input",
        target,
        verdict([fast_ok, mem_ok], sync["rows"], 1_000_000),  # type: ignore[index]
        before,
        bounds,
    )


def first_load_row(sync: dict[str, Any] | None, target_rows: int) -> Row:
    """First loads, SQL (peak above the run's start) and DataFrame (peak above the input; not run in --large)."""
    mem = 500 * MB if target_rows < 10_000_000 else 1536 * MB
    path = f"{scale_name(target_rows)}-row first load (SQL and DataFrame)"
    target = "<= 500 MB at 1M" if mem < GB else "<= 1.5 GB at 10M"
    before = BEFORE["first_load"] + ("" if target_rows < 10_000_000 else " (at 1M)")
    sql, frame = (sync or {}).get("sql"), (sync or {}).get("frame")
    measured, floors, checks, bounds = [], [], [], []
    if sql:
        peak = max(sql["first_load_peaks"])
        measured.append(f"SQL {_range(sql['first_load_peaks'])}")
        floors.append(f"SQL {sql['first_load_s'] / sql['floor_s']:.2f}x its floor ({sql['floor_s']:.2f} s)")
        checks.append(peak <= mem)
        if peak > mem:
            bounds.append(sql["first_load_memory_bound"])
    if frame and frame["rss_first_load"] is not None:
        above = frame["rss_first_load"]
        measured.append(f"DataFrame {above_text(above)} above input")
        if frame["first_load_floor_s"]:
            floors.append(
                f"DataFrame {frame['first_load_s'] / frame['first_load_floor_s']:.2f}x its floor "
                f"({frame['first_load_floor_s']:.2f} s)"
            )
        checks.append(above <= mem)
        if above > mem:
            bounds.append(frame["rss_first_load_bound"])
    elif frame:
        measured.append("DataFrame not run (--large sends no DataFrame first load)")
    if not checks:
        return Row(path, "not measured", "", "", target, "MISS (not measured)", before)
    return Row(
        path,
        "; ".join(measured),
        "; ".join(floors),
        "; ".join(measured),
        target,
        verdict(checks, sync["rows"], target_rows),  # type: ignore[index]
        before,
        bounds,
    )


def _failed(rep: dict[str, Any], engine: str) -> str | None:
    why = (rep.get("failed") or {}).get(engine)
    return f"FAILED: {why[:200]}" if why else None


def wh_pg_row(rep: dict[str, Any] | None, args: argparse.Namespace | None, target_rows: int) -> Row:
    """The warehouse diff on PostgreSQL against PostgreSQL's own single-pass diff (and, at 10M, the worker path)."""
    big = target_rows >= 10_000_000
    path = f"warehouse diff, {scale_name(target_rows)} rows on PostgreSQL, vs PostgreSQL's own single-pass diff"
    target = "<= 1.5x, faster than the worker path, <= 300 MB in the worker" if big else "<= 1.5x"
    before = BEFORE["wh_pg"][target_rows]
    if not rep or "pg_runs" not in rep:
        why = _failed(rep or {}, "postgres") or "not measured"
        return Row(path, why, "", "", target, "MISS (not measured)", before)
    runs = rep["pg_runs"]
    push, join, local = median_run(runs["postgres churn"]), median_run(runs["join"]), median_run(runs["local churn"])
    ratio, vs_local = push["seconds"] / join["seconds"], push["seconds"] / local["seconds"]
    peak = highest_peak(runs["postgres churn"])
    time_ok, mem_ok = ratio <= 1.5 and (vs_local < 1.0 or not big), peak <= 300 * MB or not big
    checks = [ratio <= 1.5] + ([vs_local < 1.0, peak <= 300 * MB] if big else [])
    churn = rep["pg_churn"]
    notes = churn_notes("PostgreSQL", push, join, churn.inserted + churn.updated + churn.deleted)
    bounds = ([] if time_ok else notes[:-1]) + ([] if mem_ok else notes[-1:])  # the last note: its memory
    return Row(
        path,
        f"{ratio:.2f}x ({push['seconds']:.2f} s vs {join['seconds']:.2f} s); {vs_local:.2f}x the worker path's "
        f"{local['seconds']:.2f} s",
        f"PostgreSQL's own diff {join['seconds']:.2f} s; worker path {local['seconds']:.2f} s",
        f"{above_text(peak)} (worker path {above_text(highest_peak(runs['local churn']))})",
        target,
        verdict(checks, args.rows, target_rows),  # type: ignore[union-attr]
        before,
        bounds,
    )


def wh_duckdb_row(rep: dict[str, Any] | None, args: argparse.Namespace | None) -> Row:
    """DuckDB at 100M rows: the churn run completes under a 1 GB ``memory_limit``, the worker <= 300 MB above it."""
    path = "warehouse diff, DuckDB 100M rows"
    target, before = "runs under a 1 GB `memory_limit`, worker <= 300 MB above it", BEFORE["wh_duckdb"]
    if not rep or args is None or "duckdb_runs" not in rep:
        why = _failed(rep or {}, "duckdb")
        limit = f" with memory_limit={args.duckdb_memory_limit}" if args is not None and why else ""
        return Row(path, (why or "not measured") + limit, "", "", target, "MISS", before)
    runs = rep["duckdb_runs"]
    run, join = median_run(runs["churn"]), median_run(runs["join"])
    limit = memory_limit_bytes(args.duckdb_memory_limit)
    peak = highest_peak(runs["churn"])
    checks = [limit <= DUCKDB_LIMIT, peak <= limit + DUCKDB_ABOVE]
    return Row(
        path,
        f"completed with memory_limit={args.duckdb_memory_limit}, {above_text(peak)} above start "
        f"({run['seconds']:.1f} s, {run['seconds'] / join['seconds']:.2f}x DuckDB's own join)",
        f"DuckDB's own join {join['seconds']:.1f} s ({above_text(highest_peak(runs['join']))})",
        above_text(peak),
        target,
        verdict(checks, args.duckdb_rows, DUCKDB_ROWS),
        before,
        [] if all(checks) else [duckdb_memory_bound(rep, args)],
    )


def state_row(rep: dict[str, Any] | None, args: argparse.Namespace | None) -> Row:
    """The pushdown's state table against the source: ``pg_total_relation_size`` of both after the baseline
    (PostgreSQL, indexes included); the growth of the DuckDB file with the baseline against the file before it."""
    path, target, before = "state table size", f"<= {STATE_RATIO:g}x the source", BEFORE["state"]
    rep = rep or {}
    parts, checks = [], []
    if "pg_state_bytes" in rep and "pg_table" in rep:
        state, source = rep["pg_state_bytes"], rep["pg_table"].table_bytes
        parts.append(
            f"PostgreSQL {state / source:.2f}x ({state / MB:,.0f} MB / {source / MB:,.0f} MB, {args.rows:,} rows)"  # type: ignore[union-attr]
        )
        checks.append(state / source <= STATE_RATIO)
    if "duckdb_state_file_bytes" in rep and "duckdb_gen" in rep:
        source = rep["duckdb_gen"]["file_bytes"]
        state = rep["duckdb_state_file_bytes"] - source
        parts.append(
            f"DuckDB {state / source:.2f}x ({state / MB:,.0f} MB / {source / MB:,.0f} MB, {args.duckdb_rows:,} rows)"  # type: ignore[union-attr]
        )
        checks.append(state / source <= STATE_RATIO)
    if not checks:
        return Row(path, "not measured", "", "", target, "MISS (not measured)", before)
    how = "the source: `pg_total_relation_size` of the table (key included); DuckDB: the file before the baseline"
    bounds = []
    if not all(checks) and rep.get("pg_state_parts"):
        parts_ = dict(rep["pg_state_parts"])
        total = parts_.pop("total")
        rest = total - sum(parts_.values())
        listed = ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in sorted(parts_.items(), key=lambda kv: -kv[1]))
        bounds.append(
            f"PostgreSQL state table, {total / MB:,.0f} MB: {listed}; row headers and free space {rest / MB:,.0f} MB "
            "(columns: the sum of `pg_column_size`, as stored)."
        )
    return Row(path, "; ".join(parts), how, "", target, "MET" if all(checks) else "MISS", before, bounds)


def huge_row(huge: dict[str, Any] | None) -> Row:
    """The 50M-row worker-path churn run (``make bench-huge``): it completes within 4 GB above its start."""
    path, target, before = (
        "50M-row PostgreSQL churn run, worker path",
        "completes in <= 4 GB above start",
        BEFORE["pg_churn_huge"],
    )
    if not huge:
        return Row(path, "not measured", "", "", target, "MISS (not measured)", before)
    if huge.get("failed"):
        return Row(path, f"FAILED: {huge['failed'][:300]}", "", "", target, "MISS", before)
    run = huge["churn"]
    peak = peak_above(run)
    ok = peak <= HUGE_ABOVE
    read = next((q[2] for q in run.get("queries", []) if q[0].startswith("the whole table")), float("nan"))
    bounds = [] if ok else [memory_bound("50M-row churn run", run, peak)]
    return Row(
        path,
        f"completed in {run['seconds']:.1f} s, {above_text(peak)} above start",
        f"none (the target is memory; the ADBC read took {read:.1f} s of the run)",
        f"churn run {above_text(peak)}, baseline {above_text(peak_above(huge['baseline']))}",
        target,
        verdict([ok], huge["rows"], HUGE_ROWS),
        before,
        bounds,
    )


def render_table(rows: Sequence[Row]) -> list[str]:
    out = [
        "| path | measured | floor (same run) | peak RSS (fresh child) | target | result | "
        "before (the issue's today) |",
        "|---|---|---|---|---|---|---|",
    ]
    out += [table_row(r.path, r.measured, r.floor, r.peak, r.target, r.verdict, r.before) for r in rows]
    bounds = [(r.path, b) for r in rows for b in r.bounds]
    if bounds:
        out += ["", "What bounds each miss (from the runs' per-step measurements):", ""]
        out += [f"- {path}: {b}" for path, b in bounds]
    return out
