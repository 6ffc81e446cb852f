"""Benchmark of the StopChurn sync engine against its floor and a naive hand-written peer.

Usage::

    python benchmarks/run.py --rows 1000000              # make bench (writes benchmarks/RESULTS.md)
    python benchmarks/run.py --rows 10000000 --large     # make bench-large (writes benchmarks/RESULTS-large.md)
    python benchmarks/run.py --rows 100000 --reps 1      # quick check
    python benchmarks/run.py --events --export           # events and historical export only (RESULTS-events-export.md)
    python benchmarks/run.py --pushdown --rows 10000000  # make bench-pushdown: the diff in the warehouse (pushdown.py)

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
import importlib.metadata
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
FRAME_CHILDREN = ("churn", "first-load")
SQL_CHILDREN = ("sql-floor", "sql-first-load", "sql-churn")
#: memory the SQL part needs per row of the table (the largest child run; measured at 1M rows)
SQL_BYTES_PER_ROW = 1_300
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
# SQL source: a real PostgreSQL, started as the tests start theirs (tests/pg_server.py)
# ---------------------------------------------------------------------------------------------------------------
SQL_TABLE = "bench"
SQL_EXTRA = "bench_extra"  # the rows the churn inserts, loaded with the table (COPY), copied in with SQL
SQL_QUERY = f"SELECT * FROM {SQL_TABLE}"
PG_CONN_ID = "stopchurn_bench_pg"
PG_CONN_ENV = f"AIRFLOW_CONN_{PG_CONN_ID.upper()}"
SQL_LOAD_ROWS = 500_000  # rows generated and sent per COPY piece
SQL_COLUMNS = (
    ("id", "bigint NOT NULL"),
    ("quantity", "integer NOT NULL"),
    ("price", "double precision"),  # 5% NULL
    ("score", "double precision NOT NULL"),
    ("balance", "numeric(14,2)"),  # 2% NULL
    ("name", "text NOT NULL"),
    ("email", "text"),  # 10% NULL
    ("status", "text NOT NULL"),
    ("signup_at", "timestamptz NOT NULL"),
    ("last_seen_at", "timestamptz"),  # 3% NULL
    ("is_vip", "boolean NOT NULL"),
    ("preferences", "jsonb NOT NULL"),  # an object of 3 keys per row
)
# 1% updated (every one changes its score; some also status, quantity, balance or preferences), 0.5% deleted
# (disjoint from the updated ones), 0.5% inserted: one transaction
SQL_CHURN = (
    f"DELETE FROM {SQL_TABLE} WHERE id % 200 = 3",
    f"""UPDATE {SQL_TABLE} SET
        score = score + 0.5,
        status = CASE WHEN (id / 100) % 2 = 0 THEN
                     (CASE WHEN status = 'active' THEN 'churned' ELSE 'active' END) ELSE status END,
        quantity = quantity + CASE WHEN (id / 100) % 3 = 0 THEN 1 ELSE 0 END,
        balance = CASE WHEN (id / 100) % 5 = 0 THEN balance + 1 ELSE balance END,
        preferences = CASE WHEN (id / 100) % 4 = 0 THEN
                          jsonb_set(preferences, '{{sms}}', to_jsonb(NOT (preferences->>'sms')::boolean))
                      ELSE preferences END
        WHERE id % 100 = 11""",
    f"INSERT INTO {SQL_TABLE} SELECT * FROM {SQL_EXTRA}",
)


def pg_server_module() -> Any:
    """``tests/pg_server.py``: the test suite's PostgreSQL starter (one code path for both)."""
    tests_dir = str(HERE.parent / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import pg_server

    return pg_server


def sql_rows(start: int, n: int, seed: int) -> pl.DataFrame:
    """``n`` rows of the SQL table from id ``start``, as the text COPY reads (numpy, seeded; vectorised)."""
    rng = np.random.default_rng(seed)
    names = _names()

    def nulls(fraction: float) -> pl.Series:
        return pl.Series(rng.random(n) < fraction)

    signup = rng.integers(0, _FIVE_YEARS_MS, n) + _EPOCH_2020_MS
    frame = pl.DataFrame(
        {
            "id": np.arange(start, start + n, dtype=np.int64),
            "quantity": rng.integers(0, 1_000, n, dtype=np.int32),
            "price": np.round(rng.gamma(2.0, 20.0, n), 2),
            "price_null": nulls(0.05),
            "score": rng.random(n),
            "cents": rng.integers(0, 10_000_000, n, dtype=np.int64),
            "balance_null": nulls(0.02),
            "name": pl.Series(names[rng.integers(0, len(names), n)].tolist(), dtype=pl.String),
            "email_null": nulls(0.10),
            "status": pl.Series(_STATUSES[rng.integers(0, len(_STATUSES), n)].tolist(), dtype=pl.String),
            "signup_ms": signup,
            "last_seen_ms": signup + rng.integers(0, 90 * 86_400_000, n),
            "last_seen_null": nulls(0.03),
            "is_vip": rng.random(n) < 0.1,
            "pref_email": rng.random(n) < 0.7,
            "pref_sms": rng.random(n) < 0.3,
            "pref_freq": pl.Series(np.array(_FREQUENCIES)[rng.integers(0, len(_FREQUENCIES), n)].tolist()),
        }
    )

    def when_not(null: str, value: pl.Expr) -> pl.Expr:
        return pl.when(pl.col(null)).then(None).otherwise(value)

    def ts(col: str) -> pl.Expr:
        return pl.from_epoch(col, time_unit="ms").dt.to_string("%Y-%m-%d %H:%M:%S%.3f+00")

    return frame.select(
        "id",
        "quantity",
        when_not("price_null", pl.col("price")).alias("price"),
        "score",
        when_not(
            "balance_null",
            pl.concat_str(
                (pl.col("cents") // 100).cast(pl.String),
                pl.lit("."),
                (pl.col("cents") % 100).cast(pl.String).str.zfill(2),
            ),
        ).alias("balance"),
        "name",
        when_not(
            "email_null",
            pl.concat_str(pl.col("name").str.to_lowercase(), pl.lit("."), pl.col("id"), pl.lit("@example.com")),
        ).alias("email"),
        "status",
        ts("signup_ms").alias("signup_at"),
        when_not("last_seen_null", ts("last_seen_ms")).alias("last_seen_at"),
        "is_vip",
        pl.concat_str(
            pl.lit('{"email": '),
            pl.col("pref_email").cast(pl.String),
            pl.lit(', "sms": '),
            pl.col("pref_sms").cast(pl.String),
            pl.lit(', "frequency": "'),
            pl.col("pref_freq"),
            pl.lit('"}'),
        ).alias("preferences"),
    )


@dataclass
class SqlTable:
    load_s: float
    server_version: str = ""
    churn_s: float = float("nan")
    table_bytes: int = 0
    churn: Churn | None = None


def load_sql_table(server: Any, n: int) -> SqlTable:
    """Create the table and the churn's extra rows, load both with COPY, add the key, VACUUM ANALYZE."""
    columns = ", ".join(f"{name} {kind}" for name, kind in SQL_COLUMNS)
    names = ", ".join(name for name, _ in SQL_COLUMNS)
    t0 = time.perf_counter()
    with server.connect() as conn:
        for table in (SQL_TABLE, SQL_EXTRA):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            # no autovacuum between the measured reads: the table is vacuumed explicitly after each change
            conn.execute(f"CREATE TABLE {table} ({columns}) WITH (autovacuum_enabled = false)")
        for table, first, count in ((SQL_TABLE, 0, n), (SQL_EXTRA, n, n // 200)):
            with conn.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT csv)") as copy:
                for start in range(first, first + count, SQL_LOAD_ROWS):
                    piece = sql_rows(start, min(SQL_LOAD_ROWS, first + count - start), SEED + start)
                    copy.write(piece.write_csv(include_header=False))
        conn.execute(f"ALTER TABLE {SQL_TABLE} ADD PRIMARY KEY (id)")
        conn.execute(f"VACUUM (ANALYZE) {SQL_TABLE}")
        size = conn.execute(f"SELECT pg_total_relation_size('{SQL_TABLE}')").fetchone()[0]
        version = conn.execute("SHOW server_version").fetchone()[0]
    return SqlTable(load_s=time.perf_counter() - t0, table_bytes=int(size), server_version=str(version).split()[0])


def apply_sql_churn(server: Any, table: SqlTable) -> Churn:
    """The churn, as SQL in one transaction, then VACUUM ANALYZE; the counts are the statements' row counts."""
    t0 = time.perf_counter()
    with server.connect(autocommit=False) as conn:
        deleted, updated, inserted = (conn.execute(statement).rowcount for statement in SQL_CHURN)
        conn.commit()
    server.execute(f"VACUUM (ANALYZE) {SQL_TABLE}")
    table.churn_s = time.perf_counter() - t0
    table.churn = Churn(inserted=inserted, updated=updated, deleted=deleted)
    return table.churn


class PostgresCpu:
    """CPU seconds of the PostgreSQL server: the postmaster, its live children and those it has reaped (each
    connection's backend)."""

    def __init__(self, server: Any) -> None:
        with server.connect() as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        parent = psutil.Process(backend).parent()
        if parent is None:
            raise RuntimeError("cannot find the PostgreSQL postmaster")
        self.ps = parent

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.ps.children():
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total


def airflow_environment(tmp: Path, server: Any | None) -> None:
    """A throwaway AIRFLOW_HOME (set before anything imports Airflow) and, with a server, the Airflow connection
    the operator's SQL path reads (``AIRFLOW_CONN_<ID>``); child processes inherit both."""
    home = tmp / "airflow-home"
    home.mkdir(exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home / 'airflow.db'}"
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    if server is not None:
        os.environ[PG_CONN_ENV] = server.airflow_connection_json()


def sql_floor(uri: Any, phases: Phases | None = None) -> tuple[int, int]:
    """The floor: ADBC reads the whole table into Arrow, polars hashes every row."""
    import adbc_driver_postgresql.dbapi as adbc_postgres

    phases = phases or Phases()
    with phases.step("ADBC read into Arrow"):
        with adbc_postgres.connect(uri.reveal()) as conn, conn.cursor() as cur:
            cur.execute(SQL_QUERY)
            table = cur.fetch_arrow_table()
        arrow_bytes = table.nbytes
    with phases.step("polars from_arrow + hash_rows()"):
        frame = pl.from_arrow(table)
        del table
        rows = int(frame.hash_rows().len())  # type: ignore[union-attr]
    return rows, arrow_bytes


def sql_engine_run(root: Path, url: str, chunk_size: int, concurrency: int) -> SyncSummary:
    """This project through the operator's SQL path: ``run_sync`` with the source the operator builds for
    ``sql=`` + ``sql_conn_id=`` (``lambda: read_sql(conn_id, sql)``), the read included."""
    from airflow_provider_stopchurn.operators.stopchurn import read_sql

    client = StopChurnClient(url, TOKEN)
    try:
        return run_sync(
            lambda: read_sql(PG_CONN_ID, SQL_QUERY),
            SnapshotStore(root, BRAND_ID, TABLE),
            client,
            options(chunk_size, concurrency),
            run_ms=RUN_MS,
        )
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    sandbox_cpu: list[float] = field(default_factory=list)
    own_cpu: list[float] = field(default_factory=list)
    db_cpu: list[float] = field(default_factory=list)
    children: list[dict[str, Any]] = field(default_factory=list)
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

    @property
    def db_median(self) -> float:
        return statistics.median(self.db_cpu) if self.db_cpu else float("nan")

    @property
    def median_child(self) -> dict[str, Any]:
        """The repetition whose seconds are the median (the lower middle one for an even count)."""
        return sorted(self.children, key=lambda c: c["seconds"])[(len(self.children) - 1) // 2]

    @property
    def peak_child(self) -> dict[str, Any]:
        """The repetition with the highest peak RSS above its start."""
        return max(self.children, key=lambda c: c["peak_during_run"] - c["rss_before_run"])

    @property
    def peak_above_start(self) -> int:
        """The highest peak RSS above the RSS before the run, over the repetitions (fresh child processes)."""
        return max(c["peak_during_run"] - c["rss_before_run"] for c in self.children)

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


class Phases:
    """Seconds and peak RSS of the top-level steps of one run, measured inside the (child) process that runs it.

    :meth:`wrap` replaces an engine function by one that times its top-level calls (one row per call, in the
    order they ran). VmHWM is read and reset at every step boundary, so each step's peak is its own and the run's
    peak is the highest of all segments (the steps and the gaps between them). Costs microseconds per step."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []  # [label, seconds, peak RSS (absolute), size of what the step returned]
        self.gap_peak = 0
        self.depth = 0
        self.read_s = 0.0

    def _segment(self) -> int:
        peak = _vm_hwm_bytes() or 0
        _reset_hwm()
        return peak

    @contextlib.contextmanager
    def step(self, label: str) -> Any:
        if self.depth:  # nested: counted in the enclosing step
            yield []
            return
        self.gap_peak = max(self.gap_peak, self._segment())
        self.depth += 1
        row: list[Any] = [label, 0.0, 0, None]
        t0 = time.perf_counter()
        try:
            yield row
        finally:
            self.depth -= 1
            row[1] = time.perf_counter() - t0
            row[2] = self._segment()
            self.rows.append(row)

    def wrap(self, owner: Any, name: str, label: str, size: Callable[[Any], int] | None = None) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.step(label) as row:
                result = original(*args, **kwargs)
                if size is not None and row:
                    row[3] = size(result)
                return result

        setattr(owner, name, timed)

    def timed_batches(self, batches: Any) -> Any:
        """The source's batches, the time spent producing them (the database read) added to ``read_s``."""
        it = iter(batches)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    self.read_s += time.perf_counter() - t0
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def peak(self) -> int:
        return max(self.gap_peak, self._segment(), *(int(row[2]) for row in self.rows))

    def table(self, start: int) -> list[list[Any]]:
        """``[label, seconds, peak RSS above start, bytes of the frame the step returned or None]`` per step."""
        return [[label, seconds, int(peak) - start, size] for label, seconds, peak, size in self.rows]


def engine_phases() -> Phases:
    """Time and measure the engine's steps in this process (a child run's)."""
    from airflow_provider_stopchurn import sync

    phases = Phases()
    phases.wrap(
        sync,
        "canonicalize_source",
        "read + canonicalize the source",
        lambda canon: int(canon.frame.estimated_size()),
    )
    phases.wrap(
        sync,
        "make_plan",
        "diff (make_plan; reads the committed snapshot)",
        lambda plan: int(plan.target.estimated_size()),
    )
    phases.wrap(SnapshotStore, "write_snapshot", "write the new snapshot")
    phases.wrap(sync, "deliver", "encode + send (deliver)")
    phases.wrap(sync, "settle", "settle + commit")
    return phases


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
    phases = engine_phases()
    hwm_reset = _reset_hwm()
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
    """Run one scenario in a fresh process (this script with ``--child``) and return what it printed."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
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


def sql_child_main(args: argparse.Namespace) -> int:
    """One SQL scenario in a fresh process: its seconds, CPU seconds and peak RSS above the RSS before it, as one
    JSON line (or, with ``--profile``, its cProfile summary instead)."""
    # imported before the start, as in a worker that runs the operator: Airflow (through the operator's module),
    # the postgres hook and the ADBC driver
    import adbc_driver_postgresql.dbapi  # noqa: F401
    from airflow.providers.postgres.hooks.postgres import PostgresHook  # noqa: F401

    from airflow_provider_stopchurn.operators.stopchurn import read_sql  # noqa: F401
    from airflow_provider_stopchurn.sources import postgres_uri

    conn = json.loads(os.environ[PG_CONN_ENV])
    uri = postgres_uri(
        host=conn["host"], port=conn["port"], login=conn["login"], password=None, database=conn["schema"]
    )
    from airflow_provider_stopchurn.operators import _source as operator_module

    phases = Phases()
    run: Callable[[], Any]
    if args.child == "sql-floor":
        run = lambda: sql_floor(uri, phases)  # noqa: E731
    else:
        if not args.profile:
            phases = engine_phases()
            reader = operator_module.read_postgres
            operator_module.read_postgres = lambda *a, **kw: phases.timed_batches(reader(*a, **kw))
        root, url = Path(args.root), str(args.url)
        run = lambda: sql_engine_run(root, url, args.chunk_size, args.concurrency)  # noqa: E731
    if args.profile:
        print("CHILD-RESULT " + json.dumps({"profile": profile_top(run)}), flush=True)
        return 0
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    hwm_reset = _reset_hwm()
    cpu0 = _own_cpu()
    t0 = time.perf_counter()
    got = run()
    elapsed = time.perf_counter() - t0
    cpu = _own_cpu() - cpu0
    peak = phases.peak() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result: dict[str, Any] = {
        "seconds": elapsed,
        "cpu": cpu,
        "rss_before_run": rss_before,
        "peak_during_run": peak,
        "peak_source": "VmHWM, reset before the run" if hwm_reset else "ru_maxrss (process lifetime)",
        "phases": phases.table(rss_before),
        "read_s": phases.read_s,
    }
    if args.child == "sql-floor":
        result["rows"], result["arrow_bytes"] = got
    else:
        result.update(inserted=got.inserted, updated=got.updated, deleted=got.deleted, chunks=got.chunks)
        result["bytes"] = got.bytes
    print("CHILD-RESULT " + json.dumps(result), flush=True)
    return 0


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
        "adbc": _version("adbc-driver-postgresql"),
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
    import pushdown  # benchmarks/pushdown.py: the warehouse-diff scenarios (--pushdown)

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
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sql-only", action="store_true", help="only the SQL scenarios (PostgreSQL source)")
    which.add_argument("--no-sql", action="store_true", help="only the DataFrame scenarios (no PostgreSQL needed)")
    parser.add_argument(
        "--child", choices=[*FRAME_CHILDREN, *SQL_CHILDREN, "export", *pushdown.CHILDREN], help=argparse.SUPPRESS
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    pushdown.add_arguments(parser)
    args = parser.parse_args()
    if args.child in pushdown.CHILDREN:
        return pushdown.child_main(args)
    if args.pushdown:
        return pushdown.main(args)
    if args.child == "export":
        return export_child_main(args)
    if args.child in SQL_CHILDREN:
        return sql_child_main(args)
    if args.child:
        return child_main(args)
    args.reps = args.reps or (1 if args.large else 3)
    if args.events or args.export:
        return events_export_main(args)
    if args.out is None:
        args.out = str(HERE / ("RESULTS-large.md" if args.large else "RESULTS.md"))
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    # rough need in bytes (measured at 1M rows): the DataFrame part ~1.5 KB per row for this process's frames and
    # runs, then the same in a child process after this one released its frames; the SQL part (afterwards, each
    # run in a child process) ~SQL_BYTES_PER_ROW
    need = max(0 if args.sql_only else args.rows * 1_700, 0 if args.no_sql else args.rows * SQL_BYTES_PER_ROW)
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
        with contextlib.ExitStack() as stack:
            server = None
            if not args.no_sql:  # first, so that a missing PostgreSQL fails the run before anything is measured
                pg = pg_server_module()
                try:
                    server = stack.enter_context(pg.running_postgres())
                except pg.PostgresUnavailable as err:
                    print(
                        f"error: the SQL scenarios need a PostgreSQL server and none can run here: {err}. Install "
                        "the server binaries (Debian: apt-get install postgresql) or pass --no-sql.",
                        file=sys.stderr,
                    )
                    return 2
                print(f"PostgreSQL up on {server.host}:{server.port} (started as the tests start theirs)", flush=True)
            airflow_environment(tmp, server)
            report = bench(args, tmp, sandboxes, server)
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


def bench(args: argparse.Namespace, tmp: Path, sandboxes: list[Sandbox], server: Any | None) -> dict[str, Any]:
    rep: dict[str, Any] = {}
    sandbox = Sandbox()
    sandboxes.append(sandbox)
    print(f"sandbox up (separate process, pid {sandbox.proc.pid})", flush=True)
    if not args.sql_only:
        bench_frames(args, tmp, sandbox, sandboxes, rep)
    if server is not None:
        bench_sql(args, tmp, sandbox, server, rep)
    return rep


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


def bench_sql(args: argparse.Namespace, tmp: Path, sandbox: Sandbox, server: Any, rep: dict[str, Any]) -> None:
    """The SQL source on PostgreSQL; every run in a fresh child process, which measures its own seconds, CPU and
    peak RSS above the RSS before the run.

    Load the table (COPY); first loads (each into a fresh snapshot root; the last one's root is the committed state
    of the churn runs); the churn as SQL; then per repetition the floor and a churn run, alternating, so that the
    machine's other load weighs on both alike."""
    n, reps = args.rows, args.reps
    pg = PostgresCpu(server)
    print(f"SQL: loading {n:,} rows (+ {n // 200:,} for the churn's inserts) with COPY ...", flush=True)
    table = load_sql_table(server, n)
    rep["sql_table"] = table
    print(f"  {table.load_s:.1f} s, table {fmt_bytes(table.table_bytes)}", flush=True)
    first_load, floor, churn_run = Timing(), Timing(), Timing()
    rep.update(sql_first_load=first_load, sql_floor=floor, sql_churn=churn_run)
    roots: list[Path] = []

    def child(timing: Timing, label: str, kind: str, rep_no: int, root: Path | None = None) -> dict[str, Any]:
        sb0, db0 = sandbox.cpu(), pg.cpu()
        got = run_child(kind, args, root=root, url=sandbox.url)
        if kind != "sql-floor":
            timing.sandbox_cpu.append(sandbox.cpu() - sb0)
        timing.db_cpu.append(pg.cpu() - db0)
        timing.seconds.append(got["seconds"])
        timing.own_cpu.append(got["cpu"])
        timing.children.append(got)
        timing.result = got
        above = got["peak_during_run"] - got["rss_before_run"]
        print(f"  {label}: rep {rep_no + 1}/{reps}: {got['seconds']:.2f} s, peak +{fmt_bytes(above)}", flush=True)
        return got

    print("SQL first load (fresh child processes) ...", flush=True)
    for i in range(reps):
        sandbox.reset()
        for old in roots:
            shutil.rmtree(old, ignore_errors=True)
        roots = [fresh_dir(tmp, f"sql-fl-{i}")]
        got = child(first_load, "first load", "sql-first-load", i, roots[0])
        check_counts("SQL first load", Churn(got["inserted"], got["updated"], got["deleted"]), Churn(n, 0, 0))
    committed = roots[0]
    if args.profile and not args.large:  # as for the DataFrame source, --large profiles the churn run only
        print("SQL first load, profiled ...", flush=True)
        sandbox.reset()
        prof_root = fresh_dir(tmp, "sql-prof-fl")
        rep["profile_sql_first_load"] = run_child(
            "sql-first-load", args, root=prof_root, url=sandbox.url, profile=True
        )["profile"]
        shutil.rmtree(prof_root, ignore_errors=True)

    print("SQL: applying the churn with SQL ...", flush=True)
    churn = apply_sql_churn(server, table)
    print(
        f"  {churn.updated:,} updated, {churn.inserted:,} inserted, {churn.deleted:,} deleted ({table.churn_s:.1f} s)",
        flush=True,
    )
    print("SQL floor and churn run, alternating (fresh child processes) ...", flush=True)
    for i in range(reps):
        got = child(floor, "floor", "sql-floor", i)
        if got["rows"] != n - churn.deleted + churn.inserted:
            raise RuntimeError(f"SQL floor read {got['rows']:,} rows")
        sandbox.reset()
        root = copy_root(committed, tmp / "sql-churn-root")
        got = child(churn_run, "churn run", "sql-churn", i, root)
        check_counts("SQL churn run", Churn(got["inserted"], got["updated"], got["deleted"]), churn)
    if args.profile:
        print("SQL churn run, profiled ...", flush=True)
        sandbox.reset()
        root = copy_root(committed, tmp / "sql-churn-root")
        rep["profile_sql_churn"] = run_child("sql-churn", args, root=root, url=sandbox.url, profile=True)["profile"]
    sandbox.reset()
    shutil.rmtree(tmp / "sql-churn-root", ignore_errors=True)
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


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _above(nbytes: float) -> str:
    return f"+{fmt_bytes(nbytes)}"


def phase_table(phases: list[list[Any]], total_peak: int, what: str = "above start") -> list[str]:
    """The steps of one run: seconds and each step's own peak RSS."""
    out = [f"| step | seconds | peak RSS {what} during the step | frame it returned |", "|---|---|---|---|"]
    for label, seconds, peak, size in phases:
        out.append(_row(label, f"{seconds:.2f}", _above(peak), fmt_bytes(size) if size else ""))
    out.append(_row("whole run (highest)", "", _above(total_peak), ""))
    return out


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
            _row(
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
                _row(
                    f"{label}: peak RSS above the start of the run <= {fmt_bytes(rss_limit)}{note}",
                    _above(above),
                    verdict(ok),
                )
            )
            if ok is False:
                misses.append(memory_bound(label, timing.peak_child, above))
    if "churn_run" in rep:
        for label, r in (("churn run", rep.get("rss_churn")), ("first load", rep.get("rss_first_load"))):
            if r is None:
                out.append(
                    _row(
                        f"DataFrame path, {label}: peak RSS above the caller's input <= 300 MB at 1M rows",
                        "not run" + (" in --large" if args.large else ""),
                        "n/a",
                    )
                )
                continue
            above = r["peak_during_run"] - r["rss_after_frames"]
            ok = above <= 300 * MB if scale == "1M" else None
            out.append(
                _row(
                    f"DataFrame path, {label}: peak RSS above the caller's input <= 300 MB at 1M rows"
                    + ("" if scale == "1M" else f" (this run has {n:,})"),
                    _above(above),
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
        return f"{label}, memory: {_above(above)} {what} (no step breakdown)"
    top = max(phases, key=lambda r: r[2])
    return (
        f"{label}, memory: {_above(above)} {what} at the highest repetition. The peak is reached in the step "
        f"'{top[0]}'; each step's own peak: {_steps_text(phases, 2, _above)}.{_sizes_text(phases)}"
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
            _row(
                label,
                before_s,
                f"{_above(before_rss)} above start",
                timing.cell(),
                f"{_above(timing.peak_above_start)} above start",
            )
        )
    ratio = churn.median / floor.median
    out.append(_row("SQL churn run / floor", "about 13x (7.4-13.9x)", "", f"{ratio:.2f}x", ""))
    for label, key in (("churn run", "rss_churn"), ("first load", "rss_first_load")):
        r = rep.get(key)
        if r is not None:
            out.append(
                _row(
                    f"DataFrame {label}: peak RSS above the caller's input",
                    "",
                    f"{_above(FRAME_BEFORE[label])} above input",
                    "",
                    f"{_above(r['peak_during_run'] - r['rss_after_frames'])} above input",
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


def render_sql(rep: dict[str, Any], args: argparse.Namespace) -> list[str]:
    n = args.rows
    table: SqlTable = rep["sql_table"]
    churn = table.churn or Churn(0, 0, 0)
    floor, churn_run, fl = rep["sql_floor"], rep["sql_churn"], rep["sql_first_load"]

    def sb(t: Timing) -> str:
        return f"{t.sandbox_median:.2f}" if t.sandbox_cpu else "-"

    last_floor, last_churn, last_fl = floor.median_child, churn_run.median_child, fl.median_child
    out = [
        "",
        f"## SQL source: PostgreSQL {table.server_version}",
        "",
        "- Server: a throwaway PostgreSQL on 127.0.0.1 of this machine, started by `tests/pg_server.py` as the "
        "test suite starts its own (initdb into a temporary directory, fsync off, shared_buffers 32MB); its CPU "
        "seconds are the PostgreSQL CPU s column.",
        f"- Table `{SQL_TABLE}`: {n:,} rows x 12 columns: `id` bigint key; integer; 2 double precision (one 5% "
        "NULL); numeric(14,2) (2% NULL); 3 text (one 10% NULL); 2 timestamptz (one 3% NULL); boolean; jsonb (an "
        f"object of 3 keys). {fmt_bytes(table.table_bytes)} with its key. Loaded with `COPY ... FROM STDIN` "
        f"(CSV generated with polars) in {table.load_s:.1f} s, with the key and `VACUUM ANALYZE`.",
        f"- Churn, applied with SQL in one transaction after the first loads and before the floor and churn runs: "
        f"`UPDATE` of {churn.updated:,} rows (1%; each changes its score, some also status, quantity, balance or "
        f"preferences), `DELETE` of {churn.deleted:,} (0.5%), `INSERT ... SELECT` of {churn.inserted:,} (0.5%) "
        f"({table.churn_s:.1f} s with `VACUUM ANALYZE`).",
        "- Source of the runs: the operator's own SQL path. `run_sync` gets `lambda: read_sql(conn_id, "
        f'"{SQL_QUERY}")`, the source `StopChurnUpdateOperator(sql=..., sql_conn_id=...)` builds, with `read_sql` '
        f"from `operators/stopchurn.py`; the connection is `{PG_CONN_ENV}` (Airflow's JSON form) in the "
        "benchmark's environment, so each run goes Airflow connection -> `postgres_uri` -> "
        "`sources.read_postgres` (ADBC) -> the engine, as in a task.",
        "- Each run in a fresh child process, which measures its own seconds, CPU seconds and peak RSS. Peak RSS "
        "above start: VmHWM, reset just before the run, minus the RSS then (after importing Airflow, the "
        "operator's module, the postgres hook and the ADBC driver, as in a worker); the highest of the "
        "repetitions. Order: the first loads (each into a fresh snapshot root; the last one's root is the "
        "committed state of the churn runs), the churn, then per repetition the floor and a churn run alternately.",
        "",
        "| # | scenario | seconds | ratio to the floor | CPU s | PostgreSQL CPU s | sandbox CPU s | "
        "peak RSS above start | notes |",
        "|---|---|---|---|---|---|---|---|---|",
        _row(
            "S1",
            "floor: ADBC reads the table into Arrow (`fetch_arrow_table`), polars `from_arrow` + `hash_rows()`",
            floor.cell(),
            "1.00x",
            f"{floor.own_median:.2f}",
            f"{floor.db_median:.2f}",
            "-",
            _above(floor.peak_above_start),
            f"Arrow table {fmt_bytes(last_floor['arrow_bytes'])}",
        ),
        _row(
            "S2",
            "**SQL churn run** through the operator's SQL path: read, canonicalize, diff, encode, send, commit",
            churn_run.cell(),
            f"**{churn_run.median / floor.median:.2f}x**",
            f"{churn_run.own_median:.2f}",
            f"{churn_run.db_median:.2f}",
            sb(churn_run),
            f"**{_above(churn_run.peak_above_start)}**",
            f"{last_churn['chunks']} chunks",
        ),
        _row(
            "S3",
            f"**SQL first load** through the operator's SQL path: {n:,} inserts, read included",
            fl.cell(),
            f"{fl.median / floor.median:.2f}x",
            f"{fl.own_median:.2f}",
            f"{fl.db_median:.2f}",
            sb(fl),
            f"**{_above(fl.peak_above_start)}**",
            f"{last_fl['chunks']} chunks, {fmt_bytes(last_fl['bytes'])} of JSON",
        ),
        "",
        "| scenario | RSS before the run | peak during the run | peak above start, each repetition |",
        "|---|---|---|---|",
    ]
    for label, timing in (("floor", floor), ("churn run", churn_run), ("first load", fl)):
        out.append(
            _row(
                label,
                fmt_bytes(statistics.median(c["rss_before_run"] for c in timing.children)),
                fmt_bytes(max(c["peak_during_run"] for c in timing.children)),
                ", ".join(_above(c["peak_during_run"] - c["rss_before_run"]) for c in timing.children),
            )
        )
    for label, child in (("floor", last_floor), ("churn run", last_churn), ("first load", last_fl)):
        above = child["peak_during_run"] - child["rss_before_run"]
        extra = ""
        if "read_s" in child and label != "floor":
            extra = f"; {child['read_s']:.2f} s of its source step were spent waiting for ADBC's batches"
        out += ["", f"Steps of the SQL {label} (its median repetition, {child['seconds']:.2f} s{extra}):", ""]
        out += phase_table(child["phases"], above)
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
        "### Earlier targets (set before issue 10)",
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
        "### The nested dict column, separately",
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
        "### Memory (each scenario in a fresh process)",
        "",
        "| scenario | RSS after imports | RSS after building the input frame | peak while building it | "
        "peak during the run | peak above input |",
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
    return out


if __name__ == "__main__":
    sys.exit(main())
