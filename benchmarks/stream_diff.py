"""The streamed worker path's diff step alone, at scale, without a database: its peak RSS in a fresh child.

    python benchmarks/stream_diff.py --rows 10000000

The 50M-row churn run (``make bench-huge``) peaks in the streamed diff step (``update/stream.py``'s ``_churn``:
the diff on keys and row hashes, the target written, the changes gathered); every other step stays far below it.
That step's memory depends on the rows and the changed rows, not on where the source comes from, so this measures
it on the SQL benchmark's rows (``synthetic.sql_rows``) read from an Arrow stream file instead of PostgreSQL:

1. a child writes the base table and its churned copy (1%: 0.5% updated, 0.25% deleted, 0.25% inserted, as the
   benchmark's SQL churn) as Arrow IPC streams, and records the base as delivered (``initial_load="baseline"``:
   a streamed first load, nothing sent);
2. a fresh child plans the churn run (``plan_streamed``) from the churned stream, each step's peak RSS measured
   above the RSS before the plan (VmHWM reset at each step, ``harness.Phases``).

Disk: about 250 bytes a row (two Arrow streams, the snapshot, the spool and the target). Nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow as pa
from harness import RUN_MS, Phases, engine_phases, measured, options
from synthetic import SEED, sql_rows

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.stream import STREAM_ENV, plan_streamed
from airflow_provider_stopchurn.update.sync import run_sync

PIECE = 1_000_000
#: --detail: the streamed plan's steps, the diff step cut into its parts
DETAIL = {
    "_spool_source": "read + canonicalize + spool the source",
    "_source_keys": "keys joined and checked over the table",
    "match_keys": "diff: the keys matched",
    "snapshot_states": "diff: the snapshot's createdAt and hashes read",
    "write_snapshot_frames": "diff: the target hashed and written",
    "deleted_rows": "diff: the deleted rows read",
}
MB = 2**20


def _write_stream(path: Path, pieces: Iterator[pl.DataFrame]) -> None:
    writer = None
    for piece in pieces:
        table = piece.to_arrow()
        if writer is None:
            writer = pa.ipc.new_stream(str(path), table.schema)
        writer.write_table(table, max_chunksize=65_536)
    assert writer is not None
    writer.close()


def _base_pieces(rows: int) -> Iterator[pl.DataFrame]:
    for start in range(0, rows, PIECE):
        yield sql_rows(start, min(PIECE, rows - start), SEED + start)


def _churned_pieces(rows: int) -> Iterator[pl.DataFrame]:
    for piece in _base_pieces(rows):
        piece = piece.filter(pl.col("id") % 400 != 7)
        changed = pl.col("id") % 200 == 3
        yield piece.with_columns(pl.when(changed).then(pl.col("quantity") + 1).otherwise("quantity").alias("quantity"))
    extra = rows // 400
    yield sql_rows(rows, extra, SEED + rows)


def _reader(path: Path) -> pa.RecordBatchReader:
    return pa.ipc.open_stream(pa.OSFile(str(path)))  # read, not mapped: mapped pages would count as RSS


def prepare(folder: Path, rows: int) -> None:
    _write_stream(folder / "base.arrow", _base_pieces(rows))
    _write_stream(folder / "churn.arrow", _churned_pieces(rows))
    store = SnapshotStore(folder / "store", 1, "bench")
    base = replace(options(500, 1), initial_load="baseline")
    run_sync(_reader(folder / "base.arrow"), store, object(), base, run_ms=RUN_MS)  # type: ignore[arg-type]


def churn(folder: Path, detail: bool) -> None:
    phases = engine_phases()
    if detail:  # the diff step's own parts, in place of the step
        from airflow_provider_stopchurn.update import stream

        phases = Phases()
        for owner, name in (
            (stream, "_spool_source"),
            (stream, "_source_keys"),
            (stream, "match_keys"),
            (stream, "snapshot_states"),
            (SnapshotStore, "write_snapshot_frames"),
            (stream, "deleted_rows"),
        ):
            phases.wrap(owner, name, DETAIL[name])
    store = SnapshotStore(folder / "store", 1, "bench")
    source = _reader(folder / "churn.arrow")
    (plan, _), got = measured(lambda: plan_streamed(source, store, options(500, 1), RUN_MS + 1), phases)
    print(
        json.dumps(
            {
                "seconds": round(got["seconds"], 1),
                "cpu": round(got["cpu"], 1),
                "peak_above_start_mb": round((got["peak_during_run"] - got["rss_before_run"]) / MB),
                "changes": [plan.inserted, plan.updated, plan.deleted, plan.unchanged],
                "steps": [[label, round(s, 1), round(p / MB)] for label, s, p, _ in got["phases"]],
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--child", choices=["prepare", "churn"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=1, help="churn plans measured (each in a fresh child)")
    parser.add_argument("--detail", action="store_true", help="measure the parts of the diff step instead")
    args = parser.parse_args()
    if args.child == "prepare":
        prepare(Path(args.folder), args.rows)
        return 0
    if args.child == "churn":
        churn(Path(args.folder), args.detail)
        return 0
    folder = Path(tempfile.mkdtemp(prefix="stopchurn-stream-diff-"))
    me = [sys.executable, __file__, "--rows", str(args.rows), "--folder", str(folder)]
    try:
        env = {**os.environ, STREAM_ENV: "always"}  # a smaller proxy streams too
        subprocess.run([*me, "--child", "prepare"], check=True, env=env)
        for _ in range(args.reps):
            subprocess.run([*me, "--child", "churn", *(["--detail"] if args.detail else [])], check=True, env=env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
