"""Events and the historical export (``run.py --events --export``, ``RESULTS-events-export.md``): ``run_events``
against a sandbox and its floor, ``run_export`` against polars' writer, the export in a fresh child process."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import psutil
from frames import floor_frame
from harness import (
    BRAND_ID,
    HERE,
    MB,
    RUN_MS,
    TABLE,
    TOKEN,
    Sandbox,
    Timing,
    enough_memory,
    fmt_bytes,
    fresh_dir,
    machine,
    measure,
    publish,
    reset_hwm,
    table_row,
    verdict,
    vm_hwm_bytes,
)
from synthetic import SEED, make_table

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.encode.records import row_pieces
from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.events.options import EventOptions
from airflow_provider_stopchurn.events.summary import EventSummary
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.files import _BATCH_ROWS, _records
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.export.summary import ExportSummary
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.diff import data_columns
from airflow_provider_stopchurn.update.plan import make_plan
from airflow_provider_stopchurn.update.sync import canonical_source

# ---------------------------------------------------------------------------------------------------------------
# events and the historical export (--events / --export)
# ---------------------------------------------------------------------------------------------------------------
EVENT_CHUNK = 1000  # the operator's default chunk_size
EVENT_LOOKBACK = dt.timedelta(hours=6)


def make_deposits(n: int, seed: int = SEED) -> pd.DataFrame:
    """``n`` deposit rows, one event each: an int64 key, an int64 user id, an amount, a UTC timestamp (10 per s)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64)
    return pd.DataFrame(
        {
            "deposit_id": ids,
            "user_id": rng.integers(1, 200_000, n, dtype=np.int64),
            "amount": np.round(rng.gamma(2.0, 50.0, n), 2),
            "created_at": pd.Series(pd.to_datetime(1_735_689_600_000 + ids * 100, unit="ms", utc=True)),
        }
    )


def event_options(concurrency: int) -> EventOptions:
    return EventOptions(
        brand_id=BRAND_ID,
        user_id_column="user_id",
        name="DEPOSIT",
        value_column="amount",
        event_key=("deposit_id",),
        watermark_column="created_at",
        lookback=EVENT_LOOKBACK,
        chunk_size=EVENT_CHUNK,
        max_concurrent_requests=concurrency,
    )


def events_run(frame: pd.DataFrame, root: Path, url: str, concurrency: int) -> EventSummary:
    """This project: one run_events, end to end (encode, ledger, plan, send, acknowledge, commit)."""
    client = StopChurnClient(url, TOKEN)
    try:
        return run_events(frame, event_store(root, BRAND_ID, "bench"), client, event_options(concurrency))
    finally:
        client.close()


def event_bodies(frame: pd.DataFrame) -> list[bytes]:
    """The same events as request bodies, built by polars' NDJSON writer (untimed; for the delivery floor)."""
    events = pl.from_pandas(frame).select(
        pl.struct(
            pl.lit(BRAND_ID).alias("brandId"),
            pl.col("user_id").cast(pl.String).alias("userId"),
            pl.lit("DEPOSIT").alias("name"),
            pl.col("amount").alias("value"),
        ).alias("event")
    )
    buf = io.BytesIO()
    events.unnest("event").write_ndjson(buf)
    lines = buf.getvalue().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return [b'{"data":[' + b",".join(lines[i : i + EVENT_CHUNK]) + b"]}" for i in range(0, len(lines), EVENT_CHUNK)]


def floor_events(bodies: list[bytes], url: str, concurrency: int) -> int:
    """Delivery floor: pre-built bodies POSTed with the project's client and the same concurrency."""
    client = StopChurnClient(url, TOKEN)
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return sum(1 for _ in pool.map(client.post_event_body, bodies))
    finally:
        client.close()


def export_run(frame: pd.DataFrame, root: Path) -> ExportSummary:
    """This project: one run_export (canonicalize, baseline snapshot, files, SHA-256, commit, manifest)."""
    options = ExportOptions(brand_id=BRAND_ID, table_name=TABLE, run_id="bench")
    return run_export(frame, SnapshotStore(root / "snapshots", BRAND_ID, TABLE), root / "out", options, run_ms=RUN_MS)


def floor_export(frame: pd.DataFrame, path: Path) -> int:
    """Polars writing the same rows as NDJSON, from the same pandas frame: ``from_pandas`` (dicts become structs),
    timestamps to epoch ms, NaN to null, ``write_ndjson``."""
    polars_frame = floor_frame(frame)
    polars_frame.write_ndjson(path)
    return path.stat().st_size


def export_stages(frame: pd.DataFrame, tmp: Path) -> dict[str, float]:
    """CPU seconds of each stage of an export, run one after the other (the export overlaps the last three)."""
    options = ExportOptions(brand_id=BRAND_ID, table_name=TABLE)
    stages: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        start = time.process_time()
        result = fn()
        stages[name] = time.process_time() - start
        return result

    sync_options = options.sync_options()
    canon = stage(
        "canonicalize the pandas source (keys, ids, values; the dict column as JSON text)",
        lambda: canonical_source(frame, sync_options),
    )
    plan = stage(
        "the target snapshot: createdAt and two row hashes", lambda: make_plan(canon, None, sync_options, RUN_MS)
    )
    target = plan.target
    columns = data_columns(target)
    pieces = row_pieces(target.select(columns).schema, {c: plan.kinds[c] for c in columns})
    batches = stage(
        "encode the records (canonical JSON, in batches)",
        lambda: [
            _records(target.slice(i, _BATCH_ROWS), pieces, options, RUN_MS)
            for i in range(0, target.height, _BATCH_ROWS)
        ],
    )
    stage("SHA-256 of the records (writer thread)", lambda: [hashlib.sha256(data).digest() for data, _ in batches])
    path = tmp / "stages.json"

    def write() -> None:
        with path.open("wb") as fh:
            for data, _ in batches:
                fh.write(data)

    stage("write the records to a file (writer thread)", write)
    path.unlink()
    stage(
        "the baseline snapshot as Parquet (snapshot thread)",
        lambda: target.write_parquet(tmp / "stages.parquet", compression="zstd", compression_level=1, statistics=False),
    )
    (tmp / "stages.parquet").unlink()
    start = time.process_time()
    canon.frame.write_ndjson(tmp / "stages.ndjson")  # the dict column as a quoted string: not the same JSON
    stages["(comparison) polars write_ndjson of the same canonical frame"] = time.process_time() - start
    (tmp / "stages.ndjson").unlink()
    return stages


def export_child_main(args: argparse.Namespace) -> int:
    """Peak memory of one export in a fresh process: build the table, reset the peak, export, print it."""
    rss_imports = psutil.Process().memory_info().rss
    frame = make_table(args.rows)
    gc.collect()
    rss_frames = psutil.Process().memory_info().rss
    hwm_reset = reset_hwm()
    summary = export_run(frame, Path(args.root))
    run_peak = vm_hwm_bytes() if hwm_reset else None
    if run_peak is None:
        run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "rss_after_imports": rss_imports,
        "rss_after_frames": rss_frames,
        "peak_during_run": run_peak,
        "bytes": summary.bytes,
        "peak_source": "VmHWM, reset after building the table" if hwm_reset else "ru_maxrss (process lifetime)",
    }
    print("CHILD-RESULT " + json.dumps(result), flush=True)
    return 0


def events_export_main(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = str(HERE / "RESULTS-events-export.md")
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    need = args.rows * 1_500
    if not enough_memory(args.rows, need):
        return 2
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="stopchurn-bench-"))
    rep: dict[str, Any] = {}
    sandbox: Sandbox | None = None
    try:
        if args.events:
            sandbox = Sandbox()
            print(f"sandbox up (separate process, pid {sandbox.proc.pid})", flush=True)
            bench_events(args, tmp, sandbox, rep)
            sandbox.stop()
            sandbox = None
        if args.export:
            bench_export(args, tmp, rep)
    finally:
        if sandbox is not None:
            sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rep["load"] = (load_before, os.getloadavg()[0])
    text = render_events_export(rep, args, command, time.perf_counter() - started)
    publish(text, args.out)
    return 0


def bench_events(args: argparse.Namespace, tmp: Path, sandbox: Sandbox, rep: dict[str, Any]) -> None:
    n, reps, conc = args.rows, args.reps, args.concurrency
    print(f"events: generating {n:,} deposits ...", flush=True)
    frame = make_deposits(n)
    holder: dict[str, Path] = {}
    counter = iter(range(10**9))

    def fresh() -> None:
        sandbox.reset()
        holder["root"] = fresh_dir(tmp, f"events-{next(counter)}")

    print("events: first delivery (this project) ...", flush=True)
    rep["events_first"] = measure(
        "events, first delivery", lambda: events_run(frame, holder["root"], sandbox.url, conc), reps, sandbox, fresh
    )
    first: EventSummary = rep["events_first"].result
    received = sandbox.stats()["events"]
    if (first.sent, received) != (n, n):
        raise RuntimeError(f"events: sent {first.sent}, the sandbox received {received}, expected {n}")
    rep["events_chunks"], rep["events_bytes"] = first.chunks, first.bytes

    print("events: the same rows again (a re-run: nothing to send) ...", flush=True)
    rep["events_rerun"] = measure(
        "events, re-run", lambda: events_run(frame, holder["root"], sandbox.url, conc), reps, sandbox
    )
    again: EventSummary = rep["events_rerun"].result
    if again.sent != 0 or sandbox.stats()["events"] != n:
        raise RuntimeError(f"events: the re-run sent {again.sent} events")
    rep["events_rerun_counts"] = (again.duplicates, again.before_window, again.ledger_keys)

    print("events: delivery floor (pre-built bodies) ...", flush=True)
    bodies = event_bodies(frame)
    rep["events_floor"] = measure(
        "events, delivery floor", lambda: floor_events(bodies, sandbox.url, conc), reps, sandbox, sandbox.reset
    )


def bench_export(args: argparse.Namespace, tmp: Path, rep: dict[str, Any]) -> None:
    n, reps = args.rows, args.reps
    print(f"export: generating {n:,} rows ...", flush=True)
    frame = make_table(n)
    rep["export_input_bytes"] = int(frame.memory_usage(deep=True).sum())
    holder: dict[str, Path] = {}
    counter = iter(range(10**9))

    def fresh() -> None:
        holder["root"] = fresh_dir(tmp, f"export-{next(counter)}")

    print("export: this project ...", flush=True)
    floor_path = tmp / "floor.ndjson"
    # interleaved, so that a noisy neighbour hits both alike
    rep["export"], rep["export_floor"], rep["export_ndjson"] = Timing(), Timing(), Timing()
    prebuilt = floor_frame(frame)
    for _ in range(reps):
        for key, fn, setup in (
            ("export", lambda: export_run(frame, holder["root"]), fresh),
            ("export_floor", lambda: floor_export(frame, floor_path), None),
            ("export_ndjson", lambda: prebuilt.write_ndjson(floor_path), None),
        ):
            timing = measure(key, fn, 1, None, setup)
            rep[key].seconds += timing.seconds
            rep[key].own_cpu += timing.own_cpu
            rep[key].result = timing.result if key == "export" else rep[key].result
            floor_path.unlink(missing_ok=True)
            if key == "export":
                shutil.rmtree(holder["root"], ignore_errors=True)
    summary: ExportSummary = rep["export"].result
    if summary.rows != n:
        raise RuntimeError(f"export: {summary.rows} rows exported, expected {n}")
    rep["export_floor_bytes"] = floor_export(frame, floor_path)
    floor_path.unlink(missing_ok=True)
    print("export: CPU seconds per stage ...", flush=True)
    rep["export_stages"] = export_stages(frame, tmp)
    start = time.process_time()
    floor_export(frame, floor_path)
    rep["export_floor_cpu_once"] = time.process_time() - start
    floor_path.unlink(missing_ok=True)
    gc.collect()
    print("export: peak memory (fresh child process) ...", flush=True)
    cmd = [sys.executable, str(HERE / "run.py"), "--child", "export", "--rows", str(n), "--root"]
    out = subprocess.run([*cmd, str(fresh_dir(tmp, "export-child"))], capture_output=True, text=True, check=False)
    rep["export_rss"] = None
    for line in out.stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            rep["export_rss"] = json.loads(line.split(" ", 1)[1])
    if rep["export_rss"] is None:
        raise RuntimeError(f"export child failed (exit {out.returncode}): {out.stderr[-2000:]}")


def render_events_export(rep: dict[str, Any], args: argparse.Namespace, command: str, wall: float) -> str:
    n, reps = args.rows, args.reps
    m = machine()
    out = [
        f"# Benchmark results: events and the historical export, {n:,} rows",
        "",
        f"- Command: `{command}` (`make bench` runs it with `.venv/bin/python`)",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; the whole benchmark took {wall:.0f} s",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['os']}",
        f"- Python {m['python']}; polars {m['polars']}, pandas {m['pandas']}, pyarrow {m['pyarrow']}, "
        f"numpy {m['numpy']}, orjson {m['orjson']}, requests {m['requests']}",
        f"- Seconds: median of {reps} repetition(s)"
        + (" (min-max in brackets)" if reps > 1 else "")
        + ". CPU s: CPU seconds of the measuring process (all threads); sandbox CPU s: of the server process. "
        f"Both share the machine's {m['cores']} cores with whatever else runs on it: the 1-minute load average was "
        f"{rep['load'][0]:.2f} at the start and {rep['load'][1]:.2f} at the end (above {m['cores']} means other "
        "work competed for the cores, and the spread shows it).",
    ]
    if "events_first" in rep:
        first, rerun, floor = rep["events_first"], rep["events_rerun"], rep["events_floor"]
        rate = n / first.median
        dup, before, ledger = rep["events_rerun_counts"]
        out += [
            "",
            "## Events: `run_events` to the sandbox",
            "",
            f"{n:,} deposits (int64 key, int64 user id, a float amount, a UTC timestamp) as `DEPOSIT` events: "
            f"`event_key=deposit_id`, `watermark_column=created_at`, lookback 6 h, chunk_size={EVENT_CHUNK}, "
            f"max_concurrent_requests={args.concurrency}; a fresh state store each repetition. The sandbox "
            "(`python -m airflow_provider_stopchurn.sandbox`) validates every event and keeps it.",
            "",
            "| # | scenario | seconds | events/s | CPU s | sandbox CPU s | notes |",
            "|---|---|---|---|---|---|---|",
            table_row(
                "E1",
                "**this project, first delivery**: encode, ledger, plan written, sent, acknowledged, committed",
                first.cell(),
                f"{rate:,.0f}",
                f"{first.own_median:.2f}",
                f"{first.sandbox_median:.2f}",
                f"{rep['events_chunks']} requests, {fmt_bytes(rep['events_bytes'])} of JSON",
            ),
            table_row(
                "E2",
                "the same rows again (a re-run): read, window, ledger; nothing sent",
                rerun.cell(),
                f"{n / rerun.median:,.0f}",
                f"{rerun.own_median:.2f}",
                f"{rerun.sandbox_median:.2f}",
                f"{dup:,} in the ledger, {before:,} before the window; ledger {ledger:,} keys",
            ),
            table_row(
                "Ef",
                "delivery floor: the same events as pre-built bodies (untimed), POSTed with the same client and "
                "concurrency",
                floor.cell(),
                f"{n / floor.median:,.0f}",
                f"{floor.own_median:.2f}",
                f"{floor.sandbox_median:.2f}",
                "no encoding, no state",
            ),
            "",
            "| target | measured | result |",
            "|---|---|---|",
            table_row(
                f"events/s to the sandbox for {n:,} events >= 200,000 (E1)", f"{rate:,.0f}", verdict(rate >= 200_000)
            ),
        ]
    if "export" in rep:
        export, floor, ndjson = rep["export"], rep["export_floor"], rep["export_ndjson"]
        summary: ExportSummary = export.result
        ratio, ratio_write = export.median / floor.median, export.median / ndjson.median
        rss = rep["export_rss"]
        out += [
            "",
            "## Historical export: `run_export`",
            "",
            f"The benchmark table ({n:,} rows x 12 columns, with a dict per row; "
            f"{fmt_bytes(rep['export_input_bytes'])} as pandas) exported to a local folder with the default "
            "max_file_bytes (2 GB), against polars writing the same rows as NDJSON. Repetitions interleaved.",
            "",
            "| # | scenario | seconds | MB/s written | CPU s | notes |",
            "|---|---|---|---|---|---|",
            table_row(
                "X1",
                "**this project**: canonicalize, baseline snapshot (Parquet), files, SHA-256 of each, commit, manifest",
                export.cell(),
                f"{summary.bytes / MB / export.median:,.0f}",
                f"{export.own_median:.2f}",
                f"{summary.files} file(s), {fmt_bytes(summary.bytes)}",
            ),
            table_row(
                "Xf",
                "floor: polars from the same pandas frame (`from_pandas`, epoch ms, NaN to null) + `write_ndjson`",
                floor.cell(),
                f"{rep['export_floor_bytes'] / MB / floor.median:,.0f}",
                f"{floor.own_median:.2f}",
                f"{fmt_bytes(rep['export_floor_bytes'])}",
            ),
            table_row(
                "Xw",
                "polars `write_ndjson` alone, the frame pre-built (untimed)",
                ndjson.cell(),
                f"{rep['export_floor_bytes'] / MB / ndjson.median:,.0f}",
                f"{ndjson.own_median:.2f}",
                "writing only",
            ),
            "",
            "| target | measured | result |",
            "|---|---|---|",
            table_row(
                "export within 1.5x of polars writing the same rows as NDJSON (X1 / Xf)",
                f"{ratio:.2f}x",
                verdict(ratio <= 1.5),
            ),
            table_row("for reference: X1 / Xw (polars' writer alone)", f"{ratio_write:.2f}x", "n/a"),
            table_row(
                "for reference: CPU seconds, X1 / Xf (less sensitive to other load on the machine)",
                f"{export.own_median / floor.own_median:.2f}x",
                "n/a",
            ),
            "",
            "Where the export's CPU goes (each stage run once, one after the other, CPU seconds of this process):",
            "",
            "| stage | CPU s |",
            "|---|---|",
            *(table_row(name, f"{seconds:.2f}") for name, seconds in rep["export_stages"].items() if name[0] != "("),
            table_row("**sum**", f"{sum(v for k, v in rep['export_stages'].items() if k[0] != '('):.2f}"),
            *(
                table_row(name[13:], f"{seconds:.2f}")
                for name, seconds in rep["export_stages"].items()
                if name[0] == "("
            ),
            table_row(
                "polars, for comparison: `from_pandas` + `write_ndjson` (Xf)", f"{rep['export_floor_cpu_once']:.2f}"
            ),
            "",
            "The records cost about what polars' own NDJSON writer costs for the same canonical frame; the rest of the "
            "gap to the floor is work the floor does not do: the dict column as canonical JSON text, the row hashes "
            "and the Parquet snapshot of the baseline, and SHA-256 of every file for the manifest.",
            "",
            f"Peak memory of one export in a fresh process ({rss['peak_source']}): "
            f"{fmt_bytes(rss['peak_during_run'])}, "
            f"of which {fmt_bytes(rss['rss_after_frames'])} is the input table and the interpreter; the export "
            f"itself added {fmt_bytes(rss['peak_during_run'] - rss['rss_after_frames'])} while writing "
            f"{fmt_bytes(rss['bytes'])} of files (the canonical table and its snapshot, and one batch of "
            "100,000 records at a time: the files are streamed).",
        ]
    return "\n".join(out) + "\n"
