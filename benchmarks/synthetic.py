"""The deterministic synthetic data (numpy, seeded): the DataFrame table and its churn, and the SQL table loaded into
PostgreSQL with the churn applied by one SQL transaction."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

SEED = 20240601


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
_SYLLABLES = np.array(["an", "bel", "cor", "da", "el", "fi", "gra", "ho", "is", "jo", "ka", "li", "mar", "no", "ol"])
_STATUSES = np.array(["active", "trial", "paused", "churned", "pending"], dtype=object)
_FREQUENCIES = ("daily", "weekly", "monthly", "never")
_EPOCH_2020_MS = 1_577_836_800_000
_FIVE_YEARS_MS = 5 * 365 * 86_400_000


def random_names() -> np.ndarray:
    """225 first names made of two syllables (deterministic, no word list needed)."""
    a, b = np.meshgrid(_SYLLABLES, _SYLLABLES, indexing="ij")
    return np.char.capitalize(np.char.add(a.ravel(), b.ravel())).astype(object)


def make_table(n: int, seed: int = SEED, id_start: int = 0) -> pd.DataFrame:
    """``n`` rows x 12 columns: ints, floats with NaN, strings, nullable strings, timestamps, bools, dicts."""
    rng = np.random.default_rng(seed)
    ids = np.arange(id_start, id_start + n, dtype=np.int64)
    names = random_names()
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
# SQL source: the table loaded into PostgreSQL (started by harness.pg_server_module) and its churn
# ---------------------------------------------------------------------------------------------------------------
SQL_TABLE = "bench"
SQL_EXTRA = "bench_extra"  # the rows the churn inserts, loaded with the table (COPY), copied in with SQL
SQL_QUERY = f"SELECT * FROM {SQL_TABLE}"
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


def sql_rows(start: int, n: int, seed: int) -> pl.DataFrame:
    """``n`` rows of the SQL table from id ``start``, as the text COPY reads (numpy, seeded; vectorised)."""
    rng = np.random.default_rng(seed)
    names = random_names()

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
