"""The scale benchmark's table (benchmarks/scale_rows.py): each row's MET/MISS against the issue's targets, what a
miss reports, and the results files (a regenerated report keeps its dated sections; the huge run checks disk)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import results_file  # noqa: E402
import scale  # noqa: E402
import scale_rows as R  # noqa: E402
from pushdown import load_reports  # noqa: E402
from synthetic import Churn, SqlTable  # noqa: E402

MB, GB = R.MB, R.GB


def sync(rows: int = 1_000_000, churn_s: float = 3.0, floor_s: float = 2.0, churn_peak: int = 400 * MB) -> dict:
    return {
        "rows": rows,
        "large": rows >= 10_000_000,
        "sql": {
            "floor_s": floor_s,
            "floor_peaks": [150 * MB, 160 * MB],
            "churn_s": churn_s,
            "churn_peaks": [churn_peak - 10 * MB, churn_peak],
            "first_load_s": 9.0,
            "first_load_peaks": [450 * MB],
            "reps": 2,
            "time_bound": "TIME-BOUND",
            "churn_memory_bound": "CHURN-MEMORY-BOUND",
            "first_load_memory_bound": "FIRST-LOAD-BOUND",
        },
        "frame": {
            "churn_s": 1.0,
            "naive_s": 3.0,
            "rss_churn": 300 * MB,
            "rss_churn_bound": "FRAME-CHURN-BOUND",
            "rss_first_load": 200 * MB,
            "rss_first_load_bound": "FRAME-FL-BOUND",
            "first_load_s": 4.0,
            "first_load_floor_s": 2.0,
        },
    }


def test_pg_churn_row_is_met_at_its_limits_and_missed_just_past_them() -> None:
    assert R.pg_churn_row(sync(churn_s=3.0, floor_s=2.0, churn_peak=500 * MB), 1_000_000).verdict == "MET"
    slow = R.pg_churn_row(sync(churn_s=3.02, floor_s=2.0), 1_000_000)
    assert slow.verdict == "MISS"
    assert slow.bounds == ["TIME-BOUND"]
    big = R.pg_churn_row(sync(churn_peak=501 * MB), 1_000_000)
    assert (big.verdict, big.bounds) == ("MISS", ["CHURN-MEMORY-BOUND"])
    assert big.before == "2.7x, +588 to +906 MB"


def test_pg_churn_row_uses_the_10m_targets_and_says_when_the_scale_differs() -> None:
    row = R.pg_churn_row(sync(rows=20_000, churn_s=3.9, floor_s=2.0, churn_peak=1500 * MB), 10_000_000)
    assert row.verdict == "MET (at 20,000 rows, target set at 10,000,000)"
    assert row.target == "<= 2x, <= 1.5 GB"
    assert row.before == "2.2x to 2.9x, +5.1 to +6.9 GB"
    assert R.pg_churn_row(None, 10_000_000).verdict.startswith("MISS")


def test_frame_churn_row_needs_three_times_the_naive_peer_and_300_mb() -> None:
    assert R.frame_churn_row(sync()).verdict == "MET"
    s = sync()
    s["frame"]["naive_s"] = 2.9
    row = R.frame_churn_row(s)
    assert row.verdict == "MISS"
    assert "3x needs the run within 0.97 s" in row.bounds[0]
    s = sync()
    s["frame"]["rss_churn"] = 301 * MB
    assert R.frame_churn_row(s).bounds == ["FRAME-CHURN-BOUND"]


def test_first_load_row_checks_both_sources_and_at_10m_the_sql_one_alone() -> None:
    s = sync()
    assert R.first_load_row(s, 1_000_000).verdict == "MET"
    s["frame"]["rss_first_load"] = 600 * MB
    row = R.first_load_row(s, 1_000_000)
    assert (row.verdict, row.bounds) == ("MISS", ["FRAME-FL-BOUND"])
    large = sync(rows=10_000_000)
    large["sql"]["first_load_peaks"] = [1400 * MB]
    large["frame"]["rss_first_load"] = None
    row = R.first_load_row(large, 10_000_000)
    assert row.verdict == "MET"
    assert "DataFrame not run" in row.measured


def pd_args(**kw: Any) -> argparse.Namespace:
    values = {"rows": 1_000_000, "duckdb_rows": 100_000_000, "duckdb_memory_limit": "1GB"}
    return argparse.Namespace(**{**values, **kw})


def run(seconds: float, peak: int = 100 * MB) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "peak_during_run": 200 * MB + peak,
        "rss_before_run": 200 * MB,
        "phases": [["diff", seconds, peak, None]],
        "queries": [["diff once", 1, seconds / 2, 10, 0, 0], ["counts", 1, 0.1, 1, 0, 0]],
        "cpu": 1.0,
    }


def pg_rep(push_s: float, join_s: float, local_s: float, push_peak: int = 100 * MB) -> dict[str, Any]:
    return {
        "pg_runs": {
            "postgres churn": [run(push_s, push_peak)],
            "join": [run(join_s)],
            "local churn": [run(local_s, 900 * MB)],
        },
        "pg_churn": Churn(10, 20, 10),
        "pg_table": SqlTable(load_s=1.0, table_bytes=1000 * MB),
        "pg_state_bytes": 1200 * MB,
    }


def test_warehouse_pg_row_at_1m_is_the_ratio_to_postgres_own_diff() -> None:
    assert R.wh_pg_row(pg_rep(6.0, 4.0, 5.0), pd_args(), 1_000_000).verdict == "MET"
    row = R.wh_pg_row(pg_rep(6.1, 4.0, 5.0), pd_args(), 1_000_000)
    assert row.verdict == "MISS"
    assert [b.split(",")[1] for b in row.bounds] == [" time: 6.1 s"]


def test_warehouse_pg_row_at_10m_also_needs_faster_than_the_worker_path_and_300_mb() -> None:
    args = pd_args(rows=10_000_000)
    assert R.wh_pg_row(pg_rep(6.0, 4.0, 6.5), args, 10_000_000).verdict == "MET"
    assert R.wh_pg_row(pg_rep(6.0, 4.0, 6.0), args, 10_000_000).verdict == "MISS"  # not faster
    big = R.wh_pg_row(pg_rep(6.0, 4.0, 9.0, 301 * MB), args, 10_000_000)
    assert big.verdict == "MISS"
    assert [b.split(",")[1] for b in big.bounds] == [" memory: +301 MB above start"]
    failed = R.wh_pg_row({"failed": {"postgres": "RuntimeError: boom"}}, args, 10_000_000)
    assert failed.verdict.startswith("MISS")
    assert "boom" in failed.measured


def duck_rep(peak: int) -> dict[str, Any]:
    return {
        "duckdb_runs": {"churn": [run(60.0, peak)], "join": [run(30.0)]},
        "duckdb_churn": Churn(10, 20, 10),
        "duckdb_gen": {"file_bytes": 1000 * MB},
        "duckdb_state_file_bytes": 2300 * MB,
    }


def test_duckdb_row_needs_a_1gb_memory_limit_and_300_mb_above_it() -> None:
    limit = 1000**3  # DuckDB's "1GB"
    assert R.wh_duckdb_row(duck_rep(limit + 300 * MB), pd_args()).verdict == "MET"
    assert R.wh_duckdb_row(duck_rep(GB + 300 * MB), pd_args(duckdb_memory_limit="1GiB")).verdict == "MET"
    over = R.wh_duckdb_row(duck_rep(limit + 300 * MB + 1), pd_args())
    assert over.verdict == "MISS"
    assert over.bounds[0].startswith("DuckDB churn run, memory")
    assert R.wh_duckdb_row(duck_rep(100 * MB), pd_args(duckdb_memory_limit="4GB")).verdict == "MISS"
    out = R.wh_duckdb_row({"failed": {"duckdb": "OutOfMemoryException: x"}}, pd_args())
    assert out.verdict == "MISS"
    assert "OutOfMemory" in out.measured
    assert "memory_limit=1GB" in out.measured


def test_state_row_compares_each_state_table_with_its_source() -> None:
    pg = pg_rep(1, 1, 1)
    assert R.state_row(pg, pd_args()).verdict == "MET"  # 1,200 MB / 1,000 MB
    pg["pg_state_bytes"] = 1201 * MB
    assert R.state_row(pg, pd_args()).verdict == "MISS"
    both = {**pg_rep(1, 1, 1), **duck_rep(0)}  # DuckDB: grew 1,300 MB over a 1,000 MB file
    row = R.state_row(both, pd_args())
    assert row.verdict == "MISS"
    assert "DuckDB 1.30x" in row.measured
    assert R.state_row({}, None).verdict.startswith("MISS")


def test_huge_row_is_met_within_4_gb_above_start() -> None:
    churn = run(1500.0, 4 * GB)
    churn["queries"] = [["the whole table (ADBC, the operator's read_sql)", 1, 400.0, 1, 1, 0]]
    huge = {"rows": 50_000_000, "baseline": run(900.0), "churn": churn}
    row = R.huge_row(huge)
    assert row.verdict == "MET"
    assert "the ADBC read took 400.0 s" in row.floor
    huge["churn"] = run(1500.0, 4 * GB + 1)
    assert R.huge_row(huge).verdict == "MISS"
    killed = R.huge_row({"rows": 50_000_000, "failed": "RuntimeError: killed: its RSS reached 8,192 MB"})
    assert killed.verdict == "MISS"


def test_memory_limit_text() -> None:
    assert R.memory_limit_bytes("1GB") == 1000**3
    assert R.memory_limit_bytes("1GiB") == GB
    assert R.memory_limit_bytes("512MB") == 512 * 1000**2


def test_a_regenerated_report_keeps_the_dated_sections_of_the_file_it_replaces(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Results\n\n- old header\n\n## 2026-12-07: findings\n\nby hand\n\n### detail\n\nmore\n\n## Targets\n\nold\n"
    )
    results_file.write_report(path, "# Results\n\n- new header\n\n## Targets\n\nnew\n")
    text = path.read_text()
    assert text == (
        "# Results\n\n- new header\n\n## 2026-12-07: findings\n\nby hand\n\n### detail\n\nmore\n\n## Targets\n\nnew\n"
    )
    results_file.write_report(path, "# Results\n\n- third\n\n## Targets\n\nthird\n")
    assert path.read_text().count("## 2026-12-07: findings") == 1


def test_scale_results_are_appended(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS-scale.md"
    results_file.append_section(path, "Title", "## one\n\nfirst")
    results_file.append_section(path, "Title", "## two\n\nsecond")
    assert path.read_text() == "# Title\n\n## one\n\nfirst\n\n## two\n\nsecond\n"


def test_the_huge_run_refuses_without_the_disk_it_needs(tmp_path: Path) -> None:
    assert scale.disk_refusal(1_000, tmp_path) is None
    why = scale.disk_refusal(10**15, tmp_path)
    assert why is not None
    assert why.startswith("refusing: 1,000,000,000,000,000 rows need about")


@pytest.mark.parametrize("which", ["bench", "large", "huge"])
def test_every_table_has_its_rows_even_when_nothing_was_measured(which: str, tmp_path: Path) -> None:
    rows = scale.table_rows(which, tmp_path, 20_000)
    assert rows
    assert all(r.verdict.startswith("MISS") and r.before for r in rows)


def test_a_missed_state_size_says_where_the_bytes_are() -> None:
    rep = pg_rep(1, 1, 1)
    rep["pg_state_bytes"] = 2000 * MB
    rep["pg_state_parts"] = {"column row": 1500 * MB, "column key": 100 * MB, "indexes": 300 * MB, "total": 2000 * MB}
    row = R.state_row(rep, pd_args())
    assert row.verdict == "MISS"
    assert row.bounds == [
        "PostgreSQL state table, 2,000 MB: column row 1,500 MB, indexes 300 MB, column key 100 MB; row headers and "
        "free space 100 MB (columns: the sum of `pg_column_size`, as stored)."
    ]


def test_a_failed_huge_run_is_one_line_without_the_child_arguments() -> None:
    err = RuntimeError(
        "child pd-run {'engine': 'local', 'mode': 'churn', 'root': PosixPath('/x/pg-local'), 'url': 'http://h'} "
        "failed (exit -9): killed: its RSS reached 9,000 MB, over the cap of 8,192 MB"
    )
    assert scale.failure_text(err) == "the churn run failed: killed: its RSS reached 9,000 MB, over the cap of 8,192 MB"
    assert scale.failure_text(ValueError("one\ntwo")) == "ValueError: one ... two"


def test_a_duckdb_run_that_failed_after_its_baseline_still_gives_the_state_row(tmp_path: Path) -> None:
    """make bench-large: DuckDB's churn can fail under its memory_limit after its baseline measured the state
    table; the table is still rendered, with DuckDB's rows named (they were missing from the loaded arguments)."""
    saved = {
        "rep": {
            "failed": {"duckdb": "RuntimeError: OutOfMemoryException"},
            "duckdb_gen": {"file_bytes": 1000 * MB},
            "duckdb_state_file_bytes": 3500 * MB,
        },
        "args": {
            "rows": 10_000_000,
            "duckdb_rows": 100_000_000,
            "spark_rows": 1_000_000,
            "chunk_size": 500,
            "concurrency": 4,
            "reps": 1,
            "duckdb_memory_limit": "1GB",
            "spark_driver_memory": "512m",
        },
        "command": "python benchmarks/run.py --pushdown",
        "date": "2026-12-07 15:31 UTC",
        "wall": 1.0,
    }
    (tmp_path / "pushdown.json").write_text(json.dumps(saved))
    rep, args, _, _ = load_reports([tmp_path / "pushdown.json"])
    row = R.state_row(rep, args)
    assert "DuckDB 2.50x" in row.measured
    assert "100,000,000 rows" in row.measured
    assert row.verdict == "MISS"
