"""The findings of ``--pushdown``: what each churn run and baseline spent, read from its query log, and the small
number formatters the report shares."""

from __future__ import annotations

import argparse
from typing import Any

from harness import MB, above_text, fmt_bytes


def has_engine(rep: dict[str, Any], engine: str) -> bool:
    return {"postgres": "pg_runs", "duckdb": "duckdb_runs", "spark": "spark"}[engine] in rep


# ---------------------------------------------------------------------------------------------------------------
# numbers the report and the findings share
# ---------------------------------------------------------------------------------------------------------------
def mb_text(nbytes: float) -> str:
    return f"{nbytes / MB:.2f} MB" if nbytes < 10 * MB else fmt_bytes(nbytes)


def peak_above(run: dict[str, Any]) -> int:
    return int(run["peak_during_run"] - run["rss_before_run"])


def bytes_out_of_db(run: dict[str, Any]) -> int:
    return int(sum(q[4] for q in run["queries"]))


def bytes_into_db(run: dict[str, Any]) -> int:
    return int(sum(q[5] for q in run["queries"]))


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def highest_peak(runs: list[dict[str, Any]]) -> int:
    return max(peak_above(r) for r in runs)


def seconds_text(runs: list[dict[str, Any]]) -> str:
    s = sorted(r["seconds"] for r in runs)
    return f"{median_run(runs)['seconds']:.2f}" + (f" ({s[0]:.2f}-{s[-1]:.2f})" if len(s) > 1 else "")


def steps_text(run: dict[str, Any]) -> str:
    return "; ".join(f"{row[0]} {row[1]:.2f} s (peak +{fmt_bytes(row[2])})" for row in run["phases"])


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
    once = _q(run, "diff once")
    if _calls(run, "diff once"):  # the narrow diff: one full outer join, counted and joined back by key
        diff = (
            f"The diff runs once: the narrow diff ({once:.1f} s: every source row hashed, joined with the state "
            f"table, the changed keys written to a scratch table), its counts ({counts:.2f} s; the safeguards see them "
            f"before any row leaves) and the changed keys joined back to the source and the state table for their "
            f"columns ({changes:.1f} s){own}."
        )
    else:
        diff = (
            f"The diff is computed twice: the counts query ({counts:.1f} s; the safeguards see the counts before any "
            f"row leaves) and the changed-rows query ({changes:.1f} s) each hash every source row and join it with "
            f"the state table{own}."
        )
    notes = [
        f"{name} churn run, time: {run['seconds']:.1f} s, of which {sql:.1f} s waiting for {name}. {diff} The key "
        f"check (a GROUP BY over the source) takes {keys:.1f} s, settling (staging the acknowledged rows, applying "
        f"them to the state table) {settle:.1f} s; the worker's own work (encoding {changed:,} changed rows, the "
        f"plan, sending) {run['seconds'] - sql:.1f} s."
    ]
    rows, out = _q(run, "changed rows", 3), _q(run, "changed rows", 4)
    top = max(run["phases"], key=lambda row: row[2])
    plan = _step(run, "changed rows")
    text = (
        f"{name} churn run, memory: {above_text(peak_above(run))} above start, reached in '{top[0]}'. The changed rows "
        f"arrive as {mb_text(out)} of Arrow ({out / max(rows, 1):,.0f} bytes per changed row: the source's "
        "columns, the key text, the new hash and the state's createdAt and last delivered row, which only deletes use)"
    )
    if plan is not None and plan[3]:
        after = run["phases"][run["phases"].index(plan) :]
        text += (
            f"; the plan frame the engine keeps in the worker (every changed row: op, key text, hash, row JSON) is "
            f"{mb_text(plan[3])} ({plan[3] / max(changed, 1):,.0f} bytes per changed row). Peak of each step from "
            f"there on: {steps_text({'phases': after})}"
        )
    return [*notes, text + "."]


def baseline_notes(name: str, run: dict[str, Any], table_bytes: int | None, state_bytes: int | None) -> str:
    out, into = _q(run, "every source row", 4) + _q(run, "baseline rows", 4), _q(run, "load", 5)
    reading = _q(run, "every source row") + _q(run, "baseline rows")
    writing = _q(run, "load") + _q(run, "baseline: insert")
    sizes = ""
    if table_bytes and state_bytes:
        sizes = (
            f" The state table holds each row's key text, hash and delivered JSON: {fmt_bytes(state_bytes)} "
            f"beside the table's {fmt_bytes(table_bytes)}."
        )
    return (
        f"{name} baseline: {run['seconds']:.1f} s. Every source row leaves {name} ({mb_text(out)} of Arrow, "
        f"{reading:.1f} s waiting for its next batch), is canonicalized and JSON-encoded in the worker, and goes "
        f"back in ({mb_text(into)} in {_calls(run, 'load')} staging loads, then INSERT into the new state table; "
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
        join = median_run(runs["join"])
        notes += churn_notes("PostgreSQL", median_run(runs["postgres churn"]), join, changed)
        notes.append(parts_note("PostgreSQL", runs["join"][0]))
        local = median_run(runs["local churn"])
        notes.append(
            f"Local engine churn run, for comparison: {local['seconds']:.1f} s and {above_text(peak_above(local))}: it "
            f"reads the whole table ({mb_text(bytes_out_of_db(local))}, {local['queries'][0][2]:.1f} s waiting "
            "for ADBC) and holds it twice (the canonical frame and the committed snapshot it diffs against)."
        )
        table = rep["pg_table"].table_bytes
        notes.append(
            baseline_notes("PostgreSQL", median_run(runs["postgres baseline"]), table, rep.get("pg_state_bytes"))
        )
    if "duckdb_runs" in rep:
        runs, churn = rep["duckdb_runs"], rep["duckdb_churn"]
        changed = churn.inserted + churn.updated + churn.deleted
        notes += churn_notes("DuckDB", median_run(runs["churn"]), median_run(runs["join"]), changed)
        notes.append(parts_note("DuckDB", runs["join"][0]))
        gen = rep["duckdb_gen"]["file_bytes"]
        state = rep["duckdb_state_file_bytes"] - gen
        notes.append(baseline_notes("DuckDB", median_run(runs["baseline"]), gen, state))
    if "spark" in rep:
        churn = rep["spark_churn"]
        spark_runs = rep["spark"]["runs"]
        notes += churn_notes("Spark", spark_runs["churn"], None, churn.inserted + churn.updated + churn.deleted)
        base = spark_runs["baseline"]
        notes.append(baseline_notes("Spark", base, None, None))
        loads, rows = _calls(base, "load"), _q(base, "load", 3)
        notes.append(
            f"Spark baseline, memory: the worker {above_text(peak_above(base))} above start, the JVM "
            f"{fmt_bytes(base['jvm_rss_before'])} -> {fmt_bytes(base['jvm_peak'])}. "
            "`SparkWarehouse.batches` collects the whole result on the driver (`toArrow()`) before handing out "
            f"batches, so the baseline holds every row ({mb_text(_q(base, 'every source row', 4))} of Arrow) in "
            f"the worker at once; and it writes the state table in {loads:,} staging loads + INSERTs of about "
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
    return dict(median_run(rep[key][name])["verify"])


def duckdb_memory_bound(rep: dict[str, Any], args: argparse.Namespace) -> str:
    runs = rep["duckdb_runs"]["churn"]
    r = max(runs, key=peak_above)
    top = max(r["phases"], key=lambda row: row[2])
    plan = next((row for row in r["phases"] if row[0].startswith("changed rows")), None)
    churn = rep["duckdb_churn"]
    changed = churn.inserted + churn.updated + churn.deleted
    text = (
        f"DuckDB churn run, memory: {above_text(peak_above(r))} above start; DuckDB runs inside the worker "
        f"(memory_limit={args.duckdb_memory_limit}), so its buffers count. The peak is reached in "
        f"'{top[0]}'. Each step's own peak (the SQL-only steps show DuckDB's memory; the steps after the changed "
        f"rows are read also hold the engine's plan): {steps_text(r)}."
    )
    if plan is not None and plan[3]:
        text += (
            f" Without DuckDB's share the worker would still miss: the plan frame the engine holds (every changed "
            f"row: op, key text, hash, row JSON) is {mb_text(plan[3])} alone for {changed:,} changed rows "
            f"({plan[3] / changed:,.0f} bytes per row), and it is held from the changed-rows query to the settle."
        )
    return text
