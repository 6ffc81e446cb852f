"""Benchmark of the StopChurn sync engine against its floor and a naive hand-written peer.

Usage::

    python benchmarks/run.py --rows 1000000              # make bench (writes benchmarks/RESULTS.md)
    python benchmarks/run.py --rows 10000000 --large     # make bench-large (writes benchmarks/RESULTS-large.md)
    python benchmarks/run.py --rows 100000 --reps 1      # quick check
    python benchmarks/run.py --events --export           # events and historical export only (RESULTS-events-export.md)

Everything runs on one deterministic synthetic table (numpy, seeded). The StopChurn sandbox runs in a separate
process on 127.0.0.1 so its CPU time does not hide inside the measured process; peak memory of the engine is
measured in fresh child processes (this script re-invoked with ``--child``). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import datetime as dt
import gc
import hashlib
import io
import json
import os
import platform
import pstats
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import polars as pl
import psutil
import pyarrow as pa
import requests

from airflow_provider_stopchurn.client import StopChurnClient
from airflow_provider_stopchurn.diff import data_columns
from airflow_provider_stopchurn.encoding import row_pieces
from airflow_provider_stopchurn.events import EventOptions, EventSummary, event_store, run_events
from airflow_provider_stopchurn.export import _BATCH_ROWS, ExportOptions, ExportSummary, _records, run_export
from airflow_provider_stopchurn.plan import make_plan
from airflow_provider_stopchurn.snapshot import SnapshotStore
from airflow_provider_stopchurn.sync import SyncOptions, SyncSummary, canonical_source, run_sync

SEED = 20240601
RUN_MS = 1_700_000_000_000
BRAND_ID = 1
TABLE = "bench"
TOKEN = "bench-token"  # the local sandbox's key, not a secret
HERE = Path(__file__).resolve().parent
GB = 1024**3
MB = 1024**2


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
_SYLLABLES = np.array(["an", "bel", "cor", "da", "el", "fi", "gra", "ho", "is", "jo", "ka", "li", "mar", "no", "ol"])
_STATUSES = np.array(["active", "trial", "paused", "churned", "pending"], dtype=object)
_FREQUENCIES = ("daily", "weekly", "monthly", "never")
_EPOCH_2020_MS = 1_577_836_800_000
_FIVE_YEARS_MS = 5 * 365 * 86_400_000


def _names() -> np.ndarray:
    """225 first names made of two syllables (deterministic, no word list needed)."""
    a, b = np.meshgrid(_SYLLABLES, _SYLLABLES, indexing="ij")
    return np.char.capitalize(np.char.add(a.ravel(), b.ravel())).astype(object)


def make_table(n: int, seed: int = SEED, id_start: int = 0) -> pd.DataFrame:
    """``n`` rows x 12 columns: ints, floats with NaN, strings, nullable strings, timestamps, bools, dicts."""
    rng = np.random.default_rng(seed)
    ids = np.arange(id_start, id_start + n, dtype=np.int64)
    names = _names()
    name_idx = rng.integers(0, len(names), n)
    price = np.round(rng.gamma(2.0, 20.0, n), 2)
    price[rng.random(n) < 0.05] = np.nan
    name = pd.Series(names[name_idx], dtype="str")
    email = name.str.lower() + "." + pd.Series(ids, dtype="str") + "@example.com"
    email[rng.random(n) < 0.10] = None
    signup = rng.integers(0, _FIVE_YEARS_MS, n) + _EPOCH_2020_MS
    last_seen = pd.Series(pd.to_datetime(signup + rng.integers(0, 90 * 86_400_000, n), unit="ms", utc=True))
    last_seen[rng.random(n) < 0.03] = pd.NaT
    pref_email = (rng.random(n) < 0.7).tolist()
    pref_sms = (rng.random(n) < 0.3).tolist()
    pref_freq = rng.integers(0, len(_FREQUENCIES), n).tolist()
    prefs = np.empty(n, dtype=object)
    prefs[:] = [
        {"email": e, "sms": s, "frequency": _FREQUENCIES[f]}
        for e, s, f in zip(pref_email, pref_sms, pref_freq, strict=True)
    ]
    return pd.DataFrame(
        {
            "id": ids,
            "account_id": rng.integers(1, 50_000, n, dtype=np.int64),
            "quantity": rng.integers(0, 1_000, n, dtype=np.int64),
            "price": price,
            "score": rng.random(n),
            "name": name,
            "email": email,
            "status": pd.Series(_STATUSES[rng.integers(0, len(_STATUSES), n)], dtype="str"),
            "signup_at": pd.Series(pd.to_datetime(signup, unit="ms", utc=True)),
            "last_seen_at": last_seen,
            "is_vip": rng.random(n) < 0.1,
            "preferences": prefs,
        }
    )


@dataclass
class Churn:
    inserted: int
    updated: int
    deleted: int


def make_churn(base: pd.DataFrame, extra: pd.DataFrame, seed: int = SEED + 1) -> tuple[pd.DataFrame, Churn]:
    """The base table after 2% churn: 1% of rows updated, 0.5% deleted, 0.5% inserted (rows of ``extra``)."""
    n = len(base)
    n_upd, n_del = n // 100, n // 200
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    del_idx, upd_idx = np.sort(perm[:n_del]), np.sort(perm[n_del : n_del + n_upd])
    new = base.copy()
    col = new.columns.get_loc
    # every updated row changes its score; some also their status, quantity or preferences
    new.iloc[upd_idx, col("score")] = new["score"].to_numpy()[upd_idx] + 0.5
    half = upd_idx[: len(upd_idx) // 2]
    status = new["status"].to_numpy(dtype=object)[half]
    new.iloc[half, col("status")] = np.where(status == "active", "churned", "active")
    third = upd_idx[::3]
    new.iloc[third, col("quantity")] = new["quantity"].to_numpy()[third] + 1
    quarter = upd_idx[::4]
    prefs = new["preferences"].to_numpy()
    changed = np.empty(len(quarter), dtype=object)
    changed[:] = [{**prefs[i], "sms": not prefs[i]["sms"]} for i in quarter]
    new.iloc[quarter, col("preferences")] = changed
    keep = np.ones(n, dtype=bool)
    keep[del_idx] = False
    new = pd.concat([new[keep], extra], ignore_index=True)
    return new, Churn(inserted=len(extra), updated=n_upd, deleted=n_del)


def make_data(n: int) -> tuple[pd.DataFrame, pd.DataFrame, Churn]:
    full = make_table(n + n // 200)
    base = full.iloc[:n].reset_index(drop=True)
    extra = full.iloc[n:].reset_index(drop=True)
    del full
    new, churn = make_churn(base, extra)
    return base, new, churn


# ---------------------------------------------------------------------------------------------------------------
# sandbox (separate process)
# ---------------------------------------------------------------------------------------------------------------
class Sandbox:
    """``python -m airflow_provider_stopchurn.sandbox`` on a free port of 127.0.0.1, in its own process."""

    def __init__(self, latency: float = 0.0) -> None:
        cmd = [sys.executable, "-m", "airflow_provider_stopchurn.sandbox", "--port", "0", "--token", TOKEN]
        if latency:
            cmd += ["--latency", str(latency)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if "listening on" not in line:
                raise RuntimeError(f"the sandbox did not start (said {line!r})")
            self.url = line.rsplit(" ", 1)[-1].strip()
            self.ps = psutil.Process(self.proc.pid)
        except BaseException:
            self.stop()
            raise

    def reset(self) -> None:
        requests.post(self.url + "/_sandbox/reset", timeout=120).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return requests.get(self.url + "/_sandbox/stats", timeout=30).json()

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------------------------
def options(chunk_size: int, concurrency: int) -> SyncOptions:
    return SyncOptions(
        brand_id=BRAND_ID,
        table_name=TABLE,
        chunk_size=chunk_size,
        max_concurrent_requests=concurrency,
        max_delete_fraction=1.0,
    )


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


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    sandbox_cpu: list[float] = field(default_factory=list)
    own_cpu: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def sandbox_median(self) -> float:
        return statistics.median(self.sandbox_cpu) if self.sandbox_cpu else float("nan")

    @property
    def own_median(self) -> float:
        return statistics.median(self.own_cpu)

    def cell(self) -> str:
        spread = f" ({min(self.seconds):.2f}-{max(self.seconds):.2f})" if len(self.seconds) > 1 else ""
        return f"{self.median:.2f}{spread}"


def measure(
    label: str,
    fn: Callable[[], Any],
    reps: int,
    sandbox: Sandbox | None = None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    timing = Timing()
    for rep in range(reps):
        if setup is not None:
            setup()
        gc.collect()
        cpu0 = sandbox.cpu() if sandbox else 0.0
        own0 = _own_cpu()
        t0 = time.perf_counter()
        timing.result = fn()
        elapsed = time.perf_counter() - t0
        timing.own_cpu.append(_own_cpu() - own0)
        if sandbox:
            timing.sandbox_cpu.append(sandbox.cpu() - cpu0)
        timing.seconds.append(elapsed)
        print(f"  {label}: rep {rep + 1}/{reps}: {elapsed:.2f} s", flush=True)
    return timing


def _own_cpu() -> float:
    """CPU seconds of this process, all threads."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


def fresh_dir(parent: Path, name: str) -> Path:
    path = parent / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def copy_root(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def check_counts(what: str, got: Any, want: Churn) -> None:
    have = (got.inserted, got.updated, got.deleted)
    if have != (want.inserted, want.updated, want.deleted):
        raise RuntimeError(f"{what}: inserted/updated/deleted = {have}, expected {want}")


# ---------------------------------------------------------------------------------------------------------------
# child process: peak RSS of one engine run
# ---------------------------------------------------------------------------------------------------------------
def _vm_hwm_bytes() -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


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
    hwm_build = _vm_hwm_bytes()
    hwm_reset = _reset_hwm()
    summary = engine_run(frame, Path(args.root), args.url, args.chunk_size, args.concurrency)
    check_counts(f"child {args.child}", summary, churn)
    # ru_maxrss survives fork + execve (it would report the parent's peak), so VmHWM of this process's own
    # address space is used; it is reset after the frames are built so the run's own peak is seen.
    run_peak = _vm_hwm_bytes() if hwm_reset else None
    if run_peak is None:
        run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "rss_after_imports": rss_imports,
        "rss_after_frames": rss_frames,
        "peak_while_building": hwm_build or 0,
        "peak_during_run": run_peak,
        "peak_source": "VmHWM, reset after building the frames" if hwm_reset else "ru_maxrss (process lifetime)",
    }
    print("CHILD-RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(kind: str, root: Path, url: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--rows",
        str(args.rows),
        "--root",
        str(root),
        "--url",
        url,
        "--chunk-size",
        str(args.chunk_size),
        "--concurrency",
        str(args.concurrency),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"child {kind} failed (exit {out.returncode}): {out.stderr[-2000:]}")


# ---------------------------------------------------------------------------------------------------------------
# profile (optional)
# ---------------------------------------------------------------------------------------------------------------
def profile_top(fn: Callable[[], Any], top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof)
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((ct, tt, nc, _short(filename, line, func)))
    lines = [f"total {total:.2f} s (main thread; sending runs in worker threads)", "", "by own time:"]
    for ct, tt, nc, name in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"  {tt:7.2f} s {tt / total:6.1%}  cum {ct:7.2f} s  calls {nc:>8}  {name}")
    lines += ["", "by cumulative time:"]
    for ct, tt, nc, name in sorted(rows, key=lambda r: -r[0])[:top]:
        lines.append(f"  {ct:7.2f} s {ct / total:6.1%}  own {tt:7.2f} s  calls {nc:>8}  {name}")
    return "\n".join(lines)


def _short(filename: str, line: int, func: str) -> str:
    """A location without machine paths: package-relative module and function."""
    if filename == "~":
        return func
    parts = Path(filename).parts
    for anchor in ("airflow_provider_stopchurn", "site-packages"):
        if anchor in parts:
            rel = parts[parts.index(anchor) + (1 if anchor == "site-packages" else 0) :]
            return f"{'/'.join(rel)}:{line} {func}"
    return f"{Path(filename).name}:{line} {func}"


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{psutil.virtual_memory().total / GB:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "polars": pl.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "orjson": orjson.__version__,
        "requests": requests.__version__,
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def fmt_bytes(n: float) -> str:
    return f"{n / MB:,.0f} MB"


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
    hwm_reset = _reset_hwm()
    summary = export_run(frame, Path(args.root))
    run_peak = _vm_hwm_bytes() if hwm_reset else None
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
    free = psutil.virtual_memory().available
    if need > free:
        print(
            f"refusing: {args.rows:,} rows need about {need / GB:.1f} GiB, {free / GB:.1f} GiB available",
            file=sys.stderr,
        )
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
    print()
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"(written to {Path(args.out).name})")
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "export", "--rows", str(n), "--root"]
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
            _row(
                "E1",
                "**this project, first delivery**: encode, ledger, plan written, sent, acknowledged, committed",
                first.cell(),
                f"{rate:,.0f}",
                f"{first.own_median:.2f}",
                f"{first.sandbox_median:.2f}",
                f"{rep['events_chunks']} requests, {fmt_bytes(rep['events_bytes'])} of JSON",
            ),
            _row(
                "E2",
                "the same rows again (a re-run): read, window, ledger; nothing sent",
                rerun.cell(),
                f"{n / rerun.median:,.0f}",
                f"{rerun.own_median:.2f}",
                f"{rerun.sandbox_median:.2f}",
                f"{dup:,} in the ledger, {before:,} before the window; ledger {ledger:,} keys",
            ),
            _row(
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
            _row(f"events/s to the sandbox for {n:,} events >= 200,000 (E1)", f"{rate:,.0f}", verdict(rate >= 200_000)),
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
            _row(
                "X1",
                "**this project**: canonicalize, baseline snapshot (Parquet), files, SHA-256 of each, commit, manifest",
                export.cell(),
                f"{summary.bytes / MB / export.median:,.0f}",
                f"{export.own_median:.2f}",
                f"{summary.files} file(s), {fmt_bytes(summary.bytes)}",
            ),
            _row(
                "Xf",
                "floor: polars from the same pandas frame (`from_pandas`, epoch ms, NaN to null) + `write_ndjson`",
                floor.cell(),
                f"{rep['export_floor_bytes'] / MB / floor.median:,.0f}",
                f"{floor.own_median:.2f}",
                f"{fmt_bytes(rep['export_floor_bytes'])}",
            ),
            _row(
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
            _row(
                "export within 1.5x of polars writing the same rows as NDJSON (X1 / Xf)",
                f"{ratio:.2f}x",
                verdict(ratio <= 1.5),
            ),
            _row("for reference: X1 / Xw (polars' writer alone)", f"{ratio_write:.2f}x", "n/a"),
            _row(
                "for reference: CPU seconds, X1 / Xf (less sensitive to other load on the machine)",
                f"{export.own_median / floor.own_median:.2f}x",
                "n/a",
            ),
            "",
            "Where the export's CPU goes (each stage run once, one after the other, CPU seconds of this process):",
            "",
            "| stage | CPU s |",
            "|---|---|",
            *(_row(name, f"{seconds:.2f}") for name, seconds in rep["export_stages"].items() if name[0] != "("),
            _row("**sum**", f"{sum(v for k, v in rep['export_stages'].items() if k[0] != '('):.2f}"),
            *(_row(name[13:], f"{seconds:.2f}") for name, seconds in rep["export_stages"].items() if name[0] == "("),
            _row("polars, for comparison: `from_pandas` + `write_ndjson` (Xf)", f"{rep['export_floor_cpu_once']:.2f}"),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the base table")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 3; 1 with --large)")
    parser.add_argument("--large", action="store_true", help="large mode: 1 rep, checks the 10M-row targets")
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4, help="max_concurrent_requests of the main runs")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/RESULTS.md; '-' = none)")
    parser.add_argument("--naive", action="store_true", help="run the naive peer in --large mode too")
    parser.add_argument("--profile", action="store_true", help="also cProfile one churn run and one first load")
    parser.add_argument("--events", action="store_true", help="run the event scenarios (alone, or with --export)")
    parser.add_argument(
        "--export", action="store_true", help="run the historical export scenarios (alone, or with --events)"
    )
    parser.add_argument("--child", choices=["churn", "first-load", "export"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "export":
        return export_child_main(args)
    if args.child:
        return child_main(args)
    args.reps = args.reps or (1 if args.large else 3)
    if args.events or args.export:
        return events_export_main(args)
    if args.out is None:
        args.out = str(HERE / ("RESULTS-large.md" if args.large else "RESULTS.md"))
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    # rough need in bytes: ~1.5 KB per row for this process's frames and runs, then the same in a child
    # process after this one released its frames (measured at 1M rows)
    need = args.rows * 1_700
    free = psutil.virtual_memory().available
    if need > free:
        print(
            f"refusing: {args.rows:,} rows need about {need / GB:.0f} GiB of memory, {free / GB:.0f} GiB available",
            file=sys.stderr,
        )
        return 2

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="stopchurn-bench-"))
    sandboxes: list[Sandbox] = []
    try:
        report = bench(args, tmp, sandboxes)
    finally:
        for sandbox in sandboxes:
            sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - started
    report["load"] = (load_before, os.getloadavg()[0])
    text = render(report, args, command, wall)
    print()
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"(written to {Path(args.out).name})")
    return 0


def commit_baseline(frame: pd.DataFrame, root: Path, url: str) -> Path:
    """Commit ``frame`` as the snapshot without sending it (preparation, never timed)."""
    opts = dataclasses.replace(options(500, 1), initial_load="baseline")
    client = StopChurnClient(url, TOKEN)
    try:
        run_sync(frame, SnapshotStore(root, BRAND_ID, TABLE), client, opts, run_ms=RUN_MS)
    finally:
        client.close()
    return root


def bench(args: argparse.Namespace, tmp: Path, sandboxes: list[Sandbox]) -> dict[str, Any]:
    rep: dict[str, Any] = {}
    sandbox = Sandbox()
    sandboxes.append(sandbox)
    print(f"sandbox up (separate process, pid {sandbox.proc.pid})", flush=True)
    committed = bench_in_process(args, tmp, sandbox, sandboxes, rep)  # its frames are released on return
    gc.collect()

    # 6. peak RSS, each scenario in a fresh process
    print("peak RSS (fresh child processes) ...", flush=True)
    sandbox.reset()
    rep["rss_churn"] = run_child("churn", copy_root(committed, tmp / "child-churn"), sandbox.url, args)
    print(f"  churn run: {fmt_bytes(rep['rss_churn']['peak_during_run'])}", flush=True)
    if not args.large:
        sandbox.reset()
        rep["rss_first_load"] = run_child("first-load", fresh_dir(tmp, "child-fl"), sandbox.url, args)
        print(f"  first load: {fmt_bytes(rep['rss_first_load']['peak_during_run'])}", flush=True)
    sandbox.reset()
    return rep


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


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(rep: dict[str, Any], args: argparse.Namespace, command: str, wall: float) -> str:
    n, reps, large = args.rows, args.reps, args.large
    churn: Churn = rep["churn"]
    floor, churn_run = rep["floor"], rep["churn_run"]
    fl, fl_floor = rep.get("first_load"), rep.get("first_load_floor")
    naive, naive_nd = rep.get("naive"), rep.get("naive_nd")
    floor_nd, churn_nd = rep["floor_nd"], rep["churn_nd"]
    at_1m = n == 1_000_000
    m = machine()

    def sb(t: Timing) -> str:
        return f"{t.sandbox_median:.2f}" if t.sandbox_cpu else "-"

    out = [
        f"# Benchmark results: {n:,} rows{' (large mode)' if large else ''}",
        "",
        f"- Command: `{command}` (`make {'bench-large' if large else 'bench'}` runs it with `.venv/bin/python`)",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; the whole benchmark took {wall:.0f} s",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['os']}",
        f"- Python {m['python']}; polars {m['polars']}, pandas {m['pandas']}, pyarrow {m['pyarrow']}, "
        f"numpy {m['numpy']}, orjson {m['orjson']}, requests {m['requests']}",
        f"- Table: {n:,} rows x 12 columns: `id` int64 key; 2 int64; 2 float64 (one 5% NaN); 3 strings (one 10% null); "
        f"2 UTC timestamps (one 3% null); bool; `preferences`, a dict of 3 keys per row. In memory (pandas, deep) "
        f"{fmt_bytes(rep['input_bytes'])}, of which the dict column {fmt_bytes(rep['input_dict_bytes'])}.",
        f"- Churn: {churn.updated:,} updated (1%), {churn.inserted:,} inserted (0.5%), "
        f"{churn.deleted:,} deleted (0.5%).",
        f"- Engine settings: chunk_size={args.chunk_size}, max_concurrent_requests={args.concurrency}, "
        "max_delete_fraction=1.0. The sandbox runs in its own process on 127.0.0.1 (no latency added).",
        f"- Seconds: median of {reps} repetition(s)"
        + (" (min-max in brackets)" if reps > 1 else "")
        + ". CPU s: CPU seconds of the measuring process (all threads); sandbox CPU s: of the server process. "
        f"Both share the machine's {m['cores']} cores. 1-minute load average {rep['load'][0]:.2f} at the start, "
        f"{rep['load'][1]:.2f} at the end (anything else running on the machine shows up in the spread).",
        "",
        "| # | scenario | seconds | CPU s | sandbox CPU s | notes |",
        "|---|---|---|---|---|---|",
        _row(
            1,
            "floor: read the committed snapshot Parquet file + `hash_rows()`",
            floor.cell(),
            f"{floor.own_median:.2f}",
            "-",
            f"snapshot file {fmt_bytes(rep['snapshot_bytes'])} (zstd)",
        ),
        _row(
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
            _row(
                3,
                f"**this project, first load**: {n:,} inserts end to end",
                fl.cell(),
                f"{fl.own_median:.2f}",
                sb(fl),
                f"{fl.result.chunks} chunks, {fmt_bytes(fl.result.bytes)} of JSON",
            ),
            _row(
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
        out.append(_row(3, "first load", "not run in --large", "", "", "the base table is committed as a baseline"))
    if naive:
        out.append(
            _row(
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
        out.append(_row(4, "naive peer", "not run" + (" in --large (use --naive)" if large else ""), "", "", ""))

    ratio_floor = churn_run.median / floor.median
    ratio_naive = naive.median / churn_run.median if naive else None
    ratio_fl = fl.median / fl_floor.median if fl and fl_floor else None
    rss_c, rss_f = rep["rss_churn"], rep.get("rss_first_load")
    scale_note = "" if at_1m else f" (set at 1M rows; this run has {n:,})"
    out += [
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        _row("churn run within 2x of the floor (1)", f"{ratio_floor:.2f}x", verdict(ratio_floor <= 2)),
        _row(
            "churn run >= 10x faster than the naive peer (4 / 2)",
            f"{ratio_naive:.2f}x" if ratio_naive else "not run",
            verdict(ratio_naive >= 10 if ratio_naive else None),
        ),
        _row(
            "first load within 2x of its floor (3 / 3f)",
            f"{ratio_fl:.2f}x" if ratio_fl else "not run",
            verdict(ratio_fl <= 2 if ratio_fl else None),
        ),
    ]
    for label, r in (("churn run", rss_c), ("first load", rss_f)):
        if r is None:
            out.append(_row(f"peak RSS <= 1 GB at 1M rows, {label}", "not run", "n/a"))
            continue
        peak = r["peak_during_run"]
        out.append(
            _row(
                f"peak RSS <= 1 GB at 1M rows, {label}{scale_note}",
                fmt_bytes(peak),
                verdict(peak <= GB) if at_1m else "n/a",
            )
        )
    if large:
        peak = rss_c["peak_during_run"]
        big = n >= 10_000_000
        out.append(
            _row(
                "10M-row churn run < 30 s" + ("" if big else f" (this run has {n:,} rows)"),
                f"{churn_run.median:.1f} s",
                verdict(churn_run.median < 30) if big else "n/a",
            )
        )
        out.append(
            _row(
                "10M-row churn run peak RSS < 8 GB" + ("" if big else f" (this run has {n:,} rows)"),
                fmt_bytes(peak),
                verdict(peak < 8 * GB) if big else "n/a",
            )
        )

    out += [
        "",
        "## The nested dict column, separately",
        "",
        "The same churn on the table without `preferences` (11 columns; its own committed snapshot):",
        "",
        "| scenario | seconds | CPU s | ratio |",
        "|---|---|---|---|",
        _row("floor, no dict column", floor_nd.cell(), f"{floor_nd.own_median:.2f}", ""),
        _row(
            "this project, churn run, no dict column",
            churn_nd.cell(),
            f"{churn_nd.own_median:.2f}",
            f"{churn_nd.median / floor_nd.median:.2f}x the floor",
        ),
    ]
    if naive_nd:
        out.append(
            _row(
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
        "## Memory (each scenario in a fresh process)",
        "",
        "| scenario | RSS after imports | RSS after building the input frame | peak while building it | "
        "peak during the run | run peak above the input |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("churn run", rss_c), ("first load", rss_f)):
        if r is not None:
            out.append(
                _row(
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
        "",
        f"## Delivery: sequential vs parallel ({rep['parallel_rows']:,}-row first load, a second sandbox adds 50 ms "
        f"to every request, {rep['parallel_chunks']} chunks, 1 repetition)",
        "",
        "| max_concurrent_requests | seconds | speedup |",
        "|---|---|---|",
    ]
    seq = rep["parallel"][1].median
    for workers, timing in rep["parallel"].items():
        out.append(_row(workers, f"{timing.median:.2f}", f"{seq / timing.median:.2f}x"))
    out += [
        "",
        f"Latency alone costs {rep['parallel_chunks'] * 0.05:.0f} s sequentially ({rep['parallel_chunks']} x 50 ms).",
        "",
        "Definitions: the churn floor reads the snapshot file the store committed and hashes every row; it does not "
        "convert the pandas source, diff, encode JSON or send. The naive peer compares column by column with "
        "vectorised pandas operations (kinder to it than a row-wise `apply`) and sends with one plain session, "
        "one request at a time.",
    ]
    for key, title in (("profile_churn", "churn run"), ("profile_first_load", "first load")):
        if key in rep:
            out += ["", f"## Profile: {title} (cProfile, one run, main thread)", "", "```", rep[key], "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
