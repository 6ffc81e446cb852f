"""The DataFrame source (``make bench``): the engine's churn run and first load against their floors and the naive
hand-written peer, in this process and in fresh child processes (``run.py --child churn|first-load``)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import psutil
import requests
from harness import (
    BRAND_ID,
    HERE,
    RUN_MS,
    TABLE,
    TOKEN,
    Sandbox,
    check_counts,
    copy_root,
    engine_phases,
    fmt_bytes,
    fresh_dir,
    measure,
    options,
    profile_top,
    reset_hwm,
    vm_hwm_bytes,
)
from synthetic import Churn, make_data, make_table

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import SyncSummary, run_sync

FRAME_CHILDREN = ("churn", "first-load")


def engine_run(frame: pd.DataFrame, root: Path, url: str, chunk_size: int, concurrency: int) -> SyncSummary:
    """This project: one run_sync, end to end (canonicalize, diff, encode, send, commit)."""
    client = StopChurnClient(url, TOKEN)
    try:
        return run_sync(
            frame, SnapshotStore(root, BRAND_ID, TABLE), client, options(chunk_size, concurrency), run_ms=RUN_MS
        )
    finally:
        client.close()


def snapshot_file(root: Path) -> Path:
    files = sorted(root.glob(f"{BRAND_ID}/*/snapshots/*.parquet"))
    if len(files) != 1:
        raise RuntimeError(f"expected one committed snapshot file, found {len(files)}")
    return files[0]


def floor_churn(path: Path) -> int:
    """Floor of a churn run: read the committed snapshot Parquet file and hash every row."""
    return pl.read_parquet(path).hash_rows().len()


def floor_frame(base: pd.DataFrame) -> pl.DataFrame:
    """The table as polars wants to write it: ms timestamps, NaN as null, dicts as structs (built untimed)."""
    frame = pl.from_pandas(base)
    return frame.with_columns(
        pl.col(pl.Datetime).dt.epoch("ms"),
        pl.col(pl.Float64).fill_nan(None),
    )


def floor_first_load(frame: pl.DataFrame, path: Path, url: str, chunk_size: int, concurrency: int) -> int:
    """Encode-free lower bound of a first load: the table to Parquet, every row to one JSON update line with
    polars ``write_ndjson`` (envelope included, so the sandbox accepts it), bodies of ``chunk_size`` lines,
    POSTed with the project's client and the same concurrency."""
    frame.write_parquet(path, compression="zstd", compression_level=1, statistics=False)
    envelope = frame.select(
        pl.lit("insert").alias("type"),
        pl.struct(
            pl.lit(BRAND_ID).alias("brandId"),
            pl.lit(TABLE).alias("tableName"),
            pl.struct(pl.all()).alias("data"),
            pl.lit(RUN_MS).alias("createdAt"),
            pl.lit(RUN_MS).alias("updatedAt"),
        ).alias("data"),
    )
    buf = io.BytesIO()
    envelope.write_ndjson(buf)
    lines = buf.getvalue().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    bodies = (b'{"data":[' + b",".join(lines[i : i + chunk_size]) + b"]}" for i in range(0, len(lines), chunk_size))
    client = StopChurnClient(url, TOKEN)
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            sent = sum(1 for _ in pool.map(client.post_update_body, bodies))
    finally:
        client.close()
    return sent


def naive_sync(new: pd.DataFrame, prev_path: Path, out_path: Path, url: str, chunk_size: int) -> Churn:
    """A hand-written operator: pandas outer merge with indicator, per-column comparison, to_dict + json.dumps
    per update, one requests.post per chunk on a plain session, pandas to_parquet."""
    old = pd.read_parquet(prev_path)
    merged = old.merge(new, on="id", how="outer", suffixes=("_old", "_new"), indicator=True)
    cols = [c for c in new.columns if c != "id"]
    state = merged["_merge"]
    changed = np.zeros(len(merged), dtype=bool)
    for c in cols:  # vectorised per column (kinder than DataFrame.apply(axis=1)); NaN equals NaN
        a, b = merged[f"{c}_old"], merged[f"{c}_new"]
        changed |= ((a != b) & ~(a.isna() & b.isna())).to_numpy(dtype=bool)
    masks = {
        "delete": (state == "left_only").to_numpy(),
        "update": (state == "both").to_numpy() & changed,
        "insert": (state == "right_only").to_numpy(),
    }
    payloads: list[str] = []
    for kind, mask in masks.items():
        side = "old" if kind == "delete" else "new"
        part = merged.loc[mask, ["id", *(f"{c}_{side}" for c in cols)]]
        part.columns = ["id", *cols]
        part = part.astype(object).where(part.notna(), None)
        for row in part.to_dict("records"):
            update = {
                "type": kind,
                "data": {
                    "brandId": BRAND_ID,
                    "tableName": TABLE,
                    "data": row,
                    "createdAt": RUN_MS,
                    "updatedAt": RUN_MS,
                },
            }
            payloads.append(json.dumps(update, default=str))
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with requests.Session() as session:
        for i in range(0, len(payloads), chunk_size):
            body = '{"data":[' + ",".join(payloads[i : i + chunk_size]) + "]}"
            session.post(
                url + "/client-data/update", data=body.encode(), headers=headers, timeout=60
            ).raise_for_status()
    new.to_parquet(out_path)
    return Churn(
        inserted=int(masks["insert"].sum()), updated=int(masks["update"].sum()), deleted=int(masks["delete"].sum())
    )


def child_main(args: argparse.Namespace) -> int:
    """Build the input frame, then run one scenario; print the memory numbers as one JSON line."""
    n = args.rows
    rss_imports = psutil.Process().memory_info().rss
    if args.child == "churn":
        base, frame, churn = make_data(n)
        del base
    else:
        frame = make_table(n)
        churn = Churn(inserted=n, updated=0, deleted=0)
    gc.collect()
    rss_frames = psutil.Process().memory_info().rss
    hwm_build = vm_hwm_bytes()
    phases = engine_phases()
    hwm_reset = reset_hwm()
    summary = engine_run(frame, Path(args.root), args.url, args.chunk_size, args.concurrency)
    check_counts(f"child {args.child}", summary, churn)
    # ru_maxrss survives fork + execve (it would report the parent's peak), so VmHWM of this process's own
    # address space is used; it is reset after the frames are built so the run's own peak is seen.
    run_peak = phases.peak() if hwm_reset else None
    if run_peak is None:
        run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "rss_after_imports": rss_imports,
        "rss_after_frames": rss_frames,
        "peak_while_building": hwm_build or 0,
        "peak_during_run": run_peak,
        "peak_source": "VmHWM, reset after building the frames" if hwm_reset else "ru_maxrss (process lifetime)",
        "phases": phases.table(rss_frames),
    }
    print("CHILD-RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(
    kind: str, args: argparse.Namespace, *, root: Path | None = None, url: str | None = None, profile: bool = False
) -> dict[str, Any]:
    """Run one scenario in a fresh process (``run.py --child ...``) and return what it printed."""
    cmd = [
        sys.executable,
        str(HERE / "run.py"),
        "--child",
        kind,
        "--rows",
        str(args.rows),
        "--chunk-size",
        str(args.chunk_size),
        "--concurrency",
        str(args.concurrency),
    ]
    if root is not None:
        cmd += ["--root", str(root)]
    if url is not None:
        cmd += ["--url", url]
    if profile:
        cmd.append("--profile")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"child {kind} failed (exit {out.returncode}): {out.stderr[-3000:]}")


def commit_baseline(frame: pd.DataFrame, root: Path, url: str) -> Path:
    """Commit ``frame`` as the snapshot without sending it (preparation, never timed)."""
    opts = dataclasses.replace(options(500, 1), initial_load="baseline")
    client = StopChurnClient(url, TOKEN)
    try:
        run_sync(frame, SnapshotStore(root, BRAND_ID, TABLE), client, opts, run_ms=RUN_MS)
    finally:
        client.close()
    return root


def bench_frames(
    args: argparse.Namespace, tmp: Path, sandbox: Sandbox, sandboxes: list[Sandbox], rep: dict[str, Any]
) -> None:
    """The DataFrame source: timings in this process, then the peak RSS of each run in a fresh child."""
    committed = bench_in_process(args, tmp, sandbox, sandboxes, rep)  # its frames are released on return
    gc.collect()

    # 6. peak RSS, each scenario in a fresh process
    print("peak RSS (fresh child processes) ...", flush=True)
    sandbox.reset()
    rep["rss_churn"] = run_child("churn", args, root=copy_root(committed, tmp / "child-churn"), url=sandbox.url)
    print(f"  churn run: {fmt_bytes(rep['rss_churn']['peak_during_run'])}", flush=True)
    if not args.large:
        sandbox.reset()
        rep["rss_first_load"] = run_child("first-load", args, root=fresh_dir(tmp, "child-fl"), url=sandbox.url)
        print(f"  first load: {fmt_bytes(rep['rss_first_load']['peak_during_run'])}", flush=True)
    sandbox.reset()
    shutil.rmtree(committed, ignore_errors=True)


def bench_in_process(
    args: argparse.Namespace, tmp: Path, sandbox: Sandbox, sandboxes: list[Sandbox], rep: dict[str, Any]
) -> Path:
    """Every timing of this process; returns the committed root of the base table."""
    n, reps, cs, conc = args.rows, args.reps, args.chunk_size, args.concurrency
    print(f"generating {n:,} rows (+ churn) ...", flush=True)
    t0 = time.perf_counter()
    base, new, churn = make_data(n)
    rep["gen_s"] = time.perf_counter() - t0
    rep["churn"] = churn
    rep["input_rss"] = psutil.Process().memory_info().rss
    rep["input_bytes"] = int(base.memory_usage(deep=True).sum())
    rep["input_dict_bytes"] = int(base["preferences"].memory_usage(deep=True, index=False))
    print(f"  {rep['gen_s']:.1f} s, process RSS {fmt_bytes(rep['input_rss'])}", flush=True)
    holder: dict[str, Path] = {}
    counter = iter(range(10**9))

    if not args.large:
        # 3. first load, fresh root each rep; the last rep's root is the committed state of the churn runs
        print("first load (this project) ...", flush=True)

        def first_load_setup() -> None:
            sandbox.reset()
            holder["root"] = fresh_dir(tmp, f"fl-{next(counter)}")

        rep["first_load"] = measure(
            "first load",
            lambda: engine_run(base, holder["root"], sandbox.url, cs, conc),
            reps,
            sandbox,
            first_load_setup,
        )
        check_counts("first load", rep["first_load"].result, Churn(n, 0, 0))
        committed = holder["root"]

        print("first-load floor ...", flush=True)
        pframe = floor_frame(base)
        fl_path = tmp / "floor-first-load.parquet"
        rep["first_load_floor"] = measure(
            "first-load floor",
            lambda: floor_first_load(pframe, fl_path, sandbox.url, cs, conc),
            reps,
            sandbox,
            sandbox.reset,
        )
        del pframe
        fl_path.unlink(missing_ok=True)
    else:
        print("committing the base table as a baseline (untimed; --large sends no first load) ...", flush=True)
        committed = commit_baseline(base, fresh_dir(tmp, "baseline"), sandbox.url)
    sandbox.reset()
    snap = snapshot_file(committed)
    rep["snapshot_bytes"] = snap.stat().st_size

    # 1. churn floor
    print("churn floor ...", flush=True)
    rep["floor"] = measure("floor", lambda: floor_churn(snap), reps)

    # 2. churn run, each rep from a fresh copy of the committed state
    print("churn run (this project) ...", flush=True)

    def churn_setup(src: Path = committed) -> None:
        sandbox.reset()
        holder["churn"] = copy_root(src, tmp / "churn-root")

    rep["churn_run"] = measure(
        "churn run", lambda: engine_run(new, holder["churn"], sandbox.url, cs, conc), reps, sandbox, churn_setup
    )
    check_counts("churn run", rep["churn_run"].result, churn)
    rep["churn_chunks"] = rep["churn_run"].result.chunks

    # the same without the nested dict column (it is costly: one Python-level JSON dump per cell)
    print("without the dict column: churn floor and churn run ...", flush=True)
    base_nd, new_nd = base.drop(columns=["preferences"]), new.drop(columns=["preferences"])
    committed_nd = commit_baseline(base_nd, fresh_dir(tmp, "baseline-nd"), sandbox.url)
    snap_nd = snapshot_file(committed_nd)
    rep["floor_nd"] = measure("floor, no dict", lambda: floor_churn(snap_nd), reps)
    rep["churn_nd"] = measure(
        "churn run, no dict",
        lambda: engine_run(new_nd, holder["churn"], sandbox.url, cs, conc),
        reps,
        sandbox,
        lambda: churn_setup(committed_nd),
    )
    check_counts("churn run, no dict", rep["churn_nd"].result, churn)

    # 4. naive peer
    if not args.large or args.naive:
        naive_dir = fresh_dir(tmp, "naive")
        for key, old, cur in (("naive", base, new), ("naive_nd", base_nd, new_nd)):
            print(f"naive peer{', no dict' if key == 'naive_nd' else ''} ...", flush=True)
            prev = naive_dir / f"{key}.parquet"
            old.to_parquet(prev)
            rep[key] = measure(
                key.replace("_nd", ", no dict"),
                lambda prev=prev, cur=cur: naive_sync(cur, prev, naive_dir / "next.parquet", sandbox.url, cs),
                reps,
                sandbox,
                sandbox.reset,
            )
            check_counts(key, rep[key].result, churn)
        shutil.rmtree(naive_dir, ignore_errors=True)

    # optional profile of one run each (outside the timings)
    if args.profile:
        print("profiling ...", flush=True)
        sandbox.reset()
        root = copy_root(committed, tmp / "prof-churn")
        rep["profile_churn"] = profile_top(lambda: engine_run(new, root, sandbox.url, cs, conc))
        if not args.large:
            sandbox.reset()
            root = fresh_dir(tmp, "prof-fl")
            rep["profile_first_load"] = profile_top(lambda: engine_run(base, root, sandbox.url, cs, conc))
        sandbox.reset()

    # 7. sequential vs parallel delivery against a sandbox that adds 50 ms per request
    k = min(n, 100_000)
    part = base.iloc[:k].reset_index(drop=True)
    slow = Sandbox(latency=0.05)
    sandboxes.append(slow)
    rep["parallel_rows"] = k
    rep["parallel"] = {}
    print(f"delivery: {k:,}-row first load, 50 ms per request ...", flush=True)
    for workers in (1, 4, 8):

        def setup() -> None:
            slow.reset()
            holder["par"] = fresh_dir(tmp, "par")

        rep["parallel"][workers] = measure(
            f"max_concurrent_requests={workers}",
            lambda w=workers: engine_run(part, holder["par"], slow.url, cs, w),
            1,
            slow,
            setup,
        )
    rep["parallel_chunks"] = rep["parallel"][1].result.chunks
    slow.stop()
    return committed
