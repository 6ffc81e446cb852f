"""The warehouse side of ``--pushdown``: the churn in SQL, the generated tables in DuckDB and Spark, and the counting
warehouse that logs every query, its seconds and the bytes that cross the database boundary."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from harness import BRAND_ID, Phases, timed_items
from synthetic import SQL_EXTRA, SQL_TABLE, Churn, random_names

from airflow_provider_stopchurn.store import SnapshotStore

TABLE = SQL_TABLE
EXTRA = SQL_EXTRA
QUERY = f"SELECT * FROM {TABLE}"
STATE_SCHEMA = "stopchurn_state"
STATE_TABLE = f"b{BRAND_ID}_{TABLE}"  # warehouse/sql.py state_table_name(BRAND_ID, TABLE)


# ---------------------------------------------------------------------------------------------------------------
# the churn, the same in every warehouse: 0.5% updated, 0.25% deleted, 0.25% inserted
# ---------------------------------------------------------------------------------------------------------------
def churn_of(n: int) -> Churn:
    return Churn(inserted=n // 400, updated=len(range(11, n, 200)), deleted=len(range(3, n, 400)))


def _update_sql(div: str, prefs: str) -> str:
    """The UPDATE of the churn (every updated row changes its score; some also status, quantity, balance or
    preferences). ``div``: the dialect's integer division; ``prefs``: the new preferences (sms flipped)."""
    return (
        f"UPDATE {TABLE} SET score = score + 0.5, "
        f"status = CASE WHEN (id {div} 200) % 2 = 0 THEN "
        "(CASE WHEN status = 'active' THEN 'churned' ELSE 'active' END) ELSE status END, "
        f"quantity = quantity + CASE WHEN (id {div} 200) % 3 = 0 THEN 1 ELSE 0 END, "
        f"balance = CASE WHEN (id {div} 200) % 5 = 0 THEN balance + 1 ELSE balance END, "
        f"preferences = CASE WHEN (id {div} 200) % 4 = 0 THEN {prefs} ELSE preferences END "
        "WHERE id % 200 = 11"
    )


def churn_sql(dialect: str, n: int) -> list[str]:
    """Statements that apply the churn (PostgreSQL and DuckDB: in one transaction)."""
    prefs = {
        "postgres": "jsonb_set(preferences, '{sms}', to_jsonb(NOT (preferences->>'sms')::boolean))",
        "duckdb": "json_object('email', (preferences->>'email')::BOOLEAN, 'sms', NOT (preferences->>'sms')::BOOLEAN, "
        "'frequency', preferences->>'frequency')",
    }[dialect]
    return [
        f"DELETE FROM {TABLE} WHERE id % 400 = 3",
        _update_sql("/" if dialect == "postgres" else "//", prefs),
        f"INSERT INTO {TABLE} SELECT * FROM {EXTRA} WHERE id < {n + n // 400}",
    ]


def spark_churn_sql(n: int) -> list[str]:
    """Spark's file tables cannot DELETE or UPDATE: the churned table is written beside it and renamed."""
    upd = "id % 200 = 11"
    columns = (
        f"CAST(quantity + CASE WHEN {upd} AND (id div 200) % 3 = 0 THEN 1 ELSE 0 END AS INT) AS quantity",
        "price",
        f"CASE WHEN {upd} THEN score + 0.5 ELSE score END AS score",
        f"CAST(CASE WHEN {upd} AND (id div 200) % 5 = 0 THEN balance + 1 ELSE balance END AS DECIMAL(14,2)) AS balance",
        "name",
        "email",
        f"CASE WHEN {upd} AND (id div 200) % 2 = 0 THEN "
        "(CASE WHEN status = 'active' THEN 'churned' ELSE 'active' END) ELSE status END AS status",
        "signup_at",
        "last_seen_at",
        "is_vip",
        f"CASE WHEN {upd} AND (id div 200) % 4 = 0 THEN named_struct('email', preferences.email, 'sms', "
        "NOT preferences.sms, 'frequency', preferences.frequency) ELSE preferences END AS preferences",
    )
    return [
        f"DROP TABLE IF EXISTS {TABLE}_churned",
        f"CREATE TABLE {TABLE}_churned USING parquet AS SELECT id, {', '.join(columns)} FROM {TABLE} "
        f"WHERE id % 400 <> 3 UNION ALL SELECT * FROM {EXTRA} WHERE id < {n + n // 400}",
        f"DROP TABLE {TABLE}",
        f"ALTER TABLE {TABLE}_churned RENAME TO {TABLE}",
    ]


# ---------------------------------------------------------------------------------------------------------------
# generated tables in DuckDB and Spark (12 columns like synthetic.py's PostgreSQL table; SQL, nothing crosses Python)
# ---------------------------------------------------------------------------------------------------------------
def _names_sql(open_: str, close: str) -> str:
    return open_ + ", ".join(f"'{name}'" for name in random_names()) + close


def duckdb_select(start: int, count: int) -> str:
    """``count`` rows from id ``start``: every value a function of (id, column) through DuckDB's ``hash``."""

    def h(k: int) -> str:
        return f"(hash(i, {k}) >> 1)::BIGINT"

    names = _names_sql("[", "]")
    name = f"{names}[({h(7)} % 225) + 1]"
    signup = f"1577836800 + ({h(10)} % 157680000000) / 1000.0"
    return f"""SELECT i AS id,
  ({h(1)} % 1000)::INTEGER AS quantity,
  CASE WHEN {h(2)} % 100 < 5 THEN NULL ELSE round(({h(3)} % 20000) / 100.0, 2) END AS price,
  ({h(4)} % 1000000000) / 1000000000.0 AS score,
  CASE WHEN {h(5)} % 100 < 2 THEN NULL ELSE (({h(6)} % 10000000) / 100.0)::DECIMAL(14,2) END AS balance,
  {name} AS name,
  CASE WHEN {h(8)} % 100 < 10 THEN NULL ELSE lower({name}) || '.' || i || '@example.com' END AS email,
  ['active', 'trial', 'paused', 'churned', 'pending'][({h(9)} % 5) + 1] AS status,
  to_timestamp({signup}) AS signup_at,
  CASE WHEN {h(11)} % 100 < 3 THEN NULL ELSE to_timestamp({signup} + ({h(12)} % 7776000000) / 1000.0) END
    AS last_seen_at,
  {h(13)} % 10 = 0 AS is_vip,
  json_object('email', {h(14)} % 10 < 7, 'sms', {h(15)} % 10 < 3,
              'frequency', ['daily', 'weekly', 'monthly', 'never'][({h(16)} % 4) + 1]) AS preferences
FROM range({start}, {start + count}) AS r(i)"""


def spark_select(start: int, count: int) -> str:
    """The same columns in Spark SQL (``xxhash64``); ``preferences`` is a struct (Spark has no JSON type)."""

    def h(k: int) -> str:
        return f"pmod(xxhash64(id, {k}), 4611686018427387903)"

    names = _names_sql("array(", ")")
    name = f"element_at({names}, CAST(pmod({h(7)}, 225) AS INT) + 1)"
    signup = f"1577836800000 + pmod({h(10)}, 157680000000)"
    return f"""SELECT id,
  CAST(pmod({h(1)}, 1000) AS INT) AS quantity,
  CASE WHEN pmod({h(2)}, 100) < 5 THEN NULL ELSE CAST(pmod({h(3)}, 20000) AS DOUBLE) / 100 END AS price,
  CAST(pmod({h(4)}, 1000000000) AS DOUBLE) / 1000000000 AS score,
  CASE WHEN pmod({h(5)}, 100) < 2 THEN NULL ELSE CAST(pmod({h(6)}, 10000000) / 100 AS DECIMAL(14,2)) END AS balance,
  {name} AS name,
  CASE WHEN pmod({h(8)}, 100) < 10 THEN NULL ELSE concat(lower({name}), '.', id, '@example.com') END AS email,
  element_at(array('active', 'trial', 'paused', 'churned', 'pending'), CAST(pmod({h(9)}, 5) AS INT) + 1) AS status,
  timestamp_millis({signup}) AS signup_at,
  CASE WHEN pmod({h(11)}, 100) < 3 THEN NULL ELSE timestamp_millis({signup} + pmod({h(12)}, 7776000000)) END
    AS last_seen_at,
  pmod({h(13)}, 10) = 0 AS is_vip,
  named_struct('email', pmod({h(14)}, 10) < 7, 'sms', pmod({h(15)}, 10) < 3,
               'frequency', element_at(array('daily', 'weekly', 'monthly', 'never'), CAST(pmod({h(16)}, 4) AS INT) + 1))
    AS preferences
FROM range({start}, {start + count})"""


def duckdb_connect(path: str | Path, memory_limit: str | None) -> Any:
    import duckdb

    return duckdb.connect(str(path), config={"memory_limit": memory_limit} if memory_limit else {})


def generate_duckdb(path: Path, n: int, memory_limit: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with duckdb_connect(path, memory_limit) as con:
        con.execute(f"CREATE TABLE {TABLE} AS {duckdb_select(0, n)}")
        con.execute(f"CREATE TABLE {EXTRA} AS {duckdb_select(n, n // 200)}")
        con.execute("CHECKPOINT")
    return {"seconds": time.perf_counter() - t0, "file_bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------------------------
# what crosses the database boundary, and where the run's time goes, query by query
# ---------------------------------------------------------------------------------------------------------------
#: (regular expression searched in the SQL with its quotes removed, label): the first match names the query
_KINDS = tuple(
    (re.compile(pattern), label)
    for pattern, label in (
        (r"LIMIT 0", "probe: the source's columns (LIMIT 0)"),
        # the narrow diff (a run that may write, on PostgreSQL and DuckDB): written once, counted, joined back
        (r"CREATE (UNLOGGED )?TABLE \S+__diff_\w+ AS", "diff once: full outer join + row hash, changed keys written"),
        (r"__sc_in_state, COUNT", "counts: GROUP BY op over the narrow diff"),
        # PostgreSQL: EXISTS (.. AS k WHERE ..); DuckDB: JOIN (SELECT DISTINCT .. WHERE .. IS NOT NULL) AS k
        (
            r"__diff_\w+ (AS k WHERE|WHERE \S+ IS NOT NULL\) AS k)",
            "changed rows: the changed keys joined back to the source and the state",
        ),
        (r"DROP TABLE IF EXISTS \S+__diff_", "the narrow diff's scratch table dropped"),
        (r"AS repeated_keys", "key check: NULL and repeated keys (a GROUP BY over the source)"),
        (r"GROUP BY d\.__sc_op", "counts: full outer join with the state table, row hash, GROUP BY op"),
        (r"WHERE d\.__sc_op IS NOT NULL", "changed rows: the same full outer join, changed rows returned"),
        (r"LEFT JOIN", "baseline rows: every source row + hash, joined to the state table"),
        (r"'insert' AS __sc_op", "every source row + hash (baseline / first load)"),
        (r"INSERT INTO \S+__next", "baseline: insert a staged batch into the new state table"),
        (r"WHERE (NOT )?EXISTS", "settle: apply the staged changes to the state table"),
        (r"RENAME TO", "swap the new state table in, bookkeeping row"),
        (r"COUNT\(\*\) FROM __stopchurn_source AS s$", "count the source's rows"),
        (r"__meta", "bookkeeping row (read or write)"),
    )
)


OTHER = "DDL and other statements"


def classify(sql: str) -> str:
    plain = re.sub(r'[`"]', "", sql).strip()
    return next((label for pattern, label in _KINDS if pattern.search(plain)), OTHER)


@dataclass
class QueryStat:
    calls: int = 0
    seconds: float = 0.0
    rows: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class QueryLog:
    def __init__(self) -> None:
        self.stats: dict[str, QueryStat] = {}

    def __call__(self, label: str) -> QueryStat:
        stat = self.stats.setdefault(label, QueryStat())
        stat.calls += 1
        return stat

    def table(self) -> list[list[Any]]:
        return [[k, s.calls, s.seconds, s.rows, s.bytes_out, s.bytes_in] for k, s in self.stats.items()]

    def total(self, index: int) -> Any:
        return sum(row[index] for row in self.table())


def counted(batches: Any, stat: QueryStat) -> Iterator[pa.RecordBatch]:
    """``batches`` passed through: the time spent producing each (the database's share), rows and Arrow bytes."""

    def add_seconds(seconds: float) -> None:
        stat.seconds += seconds

    with contextlib.closing(timed_items(batches, add_seconds)) as timed:
        for batch in timed:
            stat.rows += batch.num_rows
            stat.bytes_out += batch.nbytes
            yield batch


class CountingWarehouse:
    """A warehouse of ``warehouse/databases.py`` (or ``SparkWarehouse``) with every call timed and classified, and
    the Arrow bytes of every batch it returns and every table it loads counted."""

    def __init__(self, inner: Any, log: QueryLog) -> None:
        self.inner = inner
        self.log = log
        self.dialect = inner.dialect
        self.transactions = inner.transactions

    def batches(self, sql: str) -> Iterator[pa.RecordBatch]:
        return counted(self.inner.batches(sql), self.log(classify(sql)))

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        stat = self.log(classify(sql))
        t0 = time.perf_counter()
        try:
            out: list[tuple[Any, ...]] = self.inner.rows(sql)
        finally:
            stat.seconds += time.perf_counter() - t0
        stat.rows += len(out)
        stat.bytes_out += len(orjson.dumps(out, default=str))  # a few values: their text size
        return out

    def execute(self, statements: Sequence[str]) -> None:
        stat = self.log(next((k for k in map(classify, statements) if k != OTHER), OTHER))
        t0 = time.perf_counter()
        try:
            self.inner.execute(statements)
        finally:
            stat.seconds += time.perf_counter() - t0

    def load(self, table: str, data: pa.Table) -> None:
        stat = self.log("load: an Arrow table into a staging table")
        t0 = time.perf_counter()
        try:
            self.inner.load(table, data)
        finally:
            stat.seconds += time.perf_counter() - t0
        stat.rows += data.num_rows
        stat.bytes_in += data.nbytes

    def close(self) -> None:
        self.inner.close()


def pushdown_phases() -> Phases:
    """Time and measure the pushdown engine's top-level steps in this process (``harness.Phases``)."""
    # wrapped where the run looks them up: the warehouse sync's module
    from airflow_provider_stopchurn.warehouse import sync

    phases = Phases()
    phases.wrap(sync, "check_state", "check the state table against the store")
    phases.wrap(sync, "_source_schema", "the source's columns (probe query)")
    phases.wrap(sync, "_check_keys", "key checks in SQL (NULL and repeated keys)")
    phases.wrap(sync, "_decide", "diff in SQL (the narrow diff, or a counts query) + safeguards")
    phases.wrap(
        sync,
        "_plan_frame",
        "changed rows: the query, read and encoded in the worker",
        lambda frame: int(frame.estimated_size()),
    )
    phases.wrap(SnapshotStore, "write_plan", "write the plan (snapshot store)")
    phases.wrap(sync, "deliver_and_settle", "encode updates + send, acknowledgements recorded (deliver_and_settle)")
    phases.wrap(sync, "settle_state", "settle: stage the acknowledged rows, apply them to the state table, commit")
    phases.wrap(sync, "_baseline", "baseline: every row read, encoded in the worker, written to the state table")
    return phases
