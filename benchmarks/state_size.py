"""The state table's size, per representation of the last delivered row, beside the source table (PostgreSQL and
DuckDB, the benchmark's generated tables).

    python benchmarks/state_size.py --rows 1000000 [--engines postgres,duckdb] [--candidates]

Without ``--candidates``: a baseline run of the engine as it is (``initial_load='baseline'``) fills the state table,
and its size is printed beside the source's. With ``--candidates``: the rows the engine encodes (the same
canonical rows, row JSON and hashes) are also written into one table per candidate representation, to compare
their sizes before one is built (PostgreSQL: ``pg_total_relation_size``, with the key's hash index; DuckDB: the
size of a database file holding that table alone, after a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pushdown_sql import EXTRA, QUERY, STATE_SCHEMA, TABLE, duckdb_connect, generate_duckdb  # noqa: E402

from airflow_provider_stopchurn.encode.records import json_fragment  # noqa: E402
from airflow_provider_stopchurn.options import SyncOptions  # noqa: E402
from airflow_provider_stopchurn.update.sync import canonical_source  # noqa: E402
from airflow_provider_stopchurn.warehouse import sql as S  # noqa: E402
from airflow_provider_stopchurn.warehouse.changes import _encode_batch  # noqa: E402

BRAND = 1
MB = 1_000_000
SEP = "\x1f"


def _options() -> SyncOptions:
    return SyncOptions(brand_id=BRAND, table_name=TABLE, key_columns=("id",), initial_load="baseline")


def candidate_batches(warehouse: Any, state: S.StateTable) -> Any:
    """Per source batch, the columns of every candidate: key text, hex hash, createdAt, row JSON, and the row's
    values alone (each column's JSON text, joined by a separator), with and without the key's own value."""
    options = _options()
    with closing(warehouse.batches(state.probe(QUERY))) as probe:
        columns = next(iter(probe)).schema.names
    for batch in warehouse.batches(state.first_load(QUERY, columns)):
        frame, _ = _encode_batch(batch, columns, options, {}, 1_700_000_000_000)
        canon = canonical_source(pa.Table.from_batches([batch]).select(columns), options)
        fragments = [
            json_fragment(c, canon.kinds[c], canon.frame.schema[c], decimal_as_string=options.decimal_as_string)
            for c in canon.frame.columns
        ]
        values = canon.frame.select(
            pl.concat_str([pl.lit("1\x1e"), pl.concat_str(fragments, separator=SEP)]).alias("values"),
            pl.concat_str([pl.lit("1\x1e"), pl.concat_str(fragments[1:], separator=SEP)]).alias("values_nokey"),
        )
        yield pl.concat(
            [
                frame.select(
                    pl.col(S.key_text(0)).alias("k"),
                    pl.col("hash").alias("h"),
                    pl.col("created_at").alias("c"),
                    pl.col("row").alias("row"),
                ),
                values,
            ],
            how="horizontal",
        ).to_arrow()


#: candidate -> (its columns' SQL types, the SELECT of them from the staged columns); {bin}: the hash as 16 bytes
CANDIDATES = {
    "today: key, hex hash, createdAt, row JSON": ("k TEXT, h TEXT, c BIGINT, r TEXT", "k, h, c, row"),
    "values only (JSON texts of the columns, names kept once)": (
        "k TEXT, h TEXT, c BIGINT, r TEXT",
        'k, h, c, "values"',
    ),
    "values without the key's": ("k TEXT, h TEXT, c BIGINT, r TEXT", "k, h, c, values_nokey"),
    "values, hash as 16 bytes": ("k TEXT, h {blob}, c BIGINT, r TEXT", 'k, {bin}, c, "values"'),
    "values without the key's, hash as 16 bytes": ("k TEXT, h {blob}, c BIGINT, r TEXT", "k, {bin}, c, values_nokey"),
    "no row at all (lower bound)": ("k TEXT, h TEXT, c BIGINT", "k, h, c"),
    "no row, hash as 16 bytes (lower bound)": ("k TEXT, h {blob}, c BIGINT", "k, {bin}, c"),
}


def postgres(n: int, candidates: bool) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import pg_server
    from synthetic import load_sql_table

    from airflow_provider_stopchurn.source.sql import postgres_uri
    from airflow_provider_stopchurn.warehouse import PostgresWarehouse

    with pg_server.running_postgres() as server:
        t0 = time.perf_counter()
        table = load_sql_table(server, n)
        print(
            f"[postgres] {n:,} rows loaded in {time.perf_counter() - t0:.0f} s; source {table.table_bytes / MB:.0f} MB"
        )
        uri = postgres_uri(host=server.host, port=server.port, login=server.user, password=None, database=server.dbname)
        warehouse = PostgresWarehouse(uri)
        state = S.StateTable(STATE_SCHEMA, S.state_table_name(BRAND, TABLE), ("id",), "postgres")
        _engine_baseline(warehouse, state, "postgres")
        size = warehouse.rows(f"SELECT pg_total_relation_size('{STATE_SCHEMA}.{state.name}')")[0][0]
        print(f"[postgres] engine's state table: {size / MB:.0f} MB = {size / table.table_bytes:.2f}x the source")
        if candidates:
            warehouse.execute(["CREATE SCHEMA IF NOT EXISTS cand"])
            made = []
            for i, (label, (types, select)) in enumerate(CANDIDATES.items()):
                types = types.format(blob="BYTEA")
                warehouse.execute([f"CREATE TABLE cand.t{i} ({types})"])
                made.append((i, label, select.format(bin="decode(h, 'hex')")))
            for data in candidate_batches(warehouse, state):
                warehouse.load("__stage", data)
                warehouse.execute([f"INSERT INTO cand.t{i} SELECT {sel} FROM __stage" for i, _, sel in made])
            for i, label, _ in made:
                warehouse.execute([f"CREATE INDEX ON cand.t{i} USING hash (k)"])
                with server.connect() as conn:  # autocommit: VACUUM runs outside a transaction
                    conn.execute(f"VACUUM (ANALYZE) cand.t{i}")
                    size = conn.execute(f"SELECT pg_total_relation_size('cand.t{i}')").fetchone()[0]
                    avg = conn.execute(f"SELECT avg(pg_column_size(t.*)) FROM cand.t{i} AS t").fetchone()[0]
                print(f"  {label}: {size / MB:.0f} MB = {size / table.table_bytes:.2f}x (row {float(avg):.0f} B)")
        warehouse.close()


def _engine_baseline(warehouse: Any, state: S.StateTable, dialect: str) -> None:
    """The state table as the engine writes it: a baseline run into a throwaway snapshot store."""
    from airflow_provider_stopchurn.store import SnapshotStore
    from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync

    class _Keep:  # the run closes its warehouse: this one is measured after it
        def __init__(self, inner: Any) -> None:
            self.inner, self.dialect, self.transactions = inner, inner.dialect, inner.transactions

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def close(self) -> None:
            pass

    with tempfile.TemporaryDirectory() as root:
        store = SnapshotStore(Path(root), BRAND, TABLE)
        t0 = time.perf_counter()
        source = WarehouseSource(QUERY, _Keep(warehouse), state_schema=STATE_SCHEMA)
        summary = run_warehouse_sync(source, store, object(), _options(), run_ms=1_700_000_000_000)  # type: ignore[arg-type]
        print(f"[{dialect}] engine baseline: {time.perf_counter() - t0:.0f} s, {summary.unchanged:,} rows recorded")


def duckdb(n: int, candidates: bool) -> None:
    from airflow_provider_stopchurn.warehouse import DuckDBWarehouse

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.duckdb"
        generate_duckdb(src, n, "4GB")
        with duckdb_connect(src, None) as con:
            con.execute(f"DROP TABLE {EXTRA}")
            con.execute("CHECKPOINT")
        source_bytes = src.stat().st_size
        print(f"[duckdb] {n:,} rows generated; file with the source alone {source_bytes / MB:.1f} MB")
        con = duckdb_connect(src, None)
        warehouse = DuckDBWarehouse(con)
        state = S.StateTable(STATE_SCHEMA, S.state_table_name(BRAND, TABLE), ("id",), "duckdb")
        _engine_baseline(warehouse, state, "duckdb")
        con.execute("CHECKPOINT")
        both = src.stat().st_size
        print(
            f"[duckdb] file with the engine's state table: {both / MB:.1f} MB: state "
            f"{(both - source_bytes) / MB:.1f} MB = {(both - source_bytes) / source_bytes:.2f}x the source"
        )
        if candidates:
            files = {}
            for i, label in enumerate(CANDIDATES):
                files[i] = Path(tmp) / f"cand{i}.duckdb"
                con.execute(f"ATTACH '{files[i]}' AS c{i}")
                types, _ = CANDIDATES[label]
                con.execute(f"CREATE TABLE c{i}.t ({types.format(blob='BLOB')})")
            for data in candidate_batches(warehouse, state):
                con.register("__stage", data)
                for i, label in enumerate(CANDIDATES):
                    sel = CANDIDATES[label][1].format(bin="unhex(h)")
                    con.execute(f"INSERT INTO c{i}.t SELECT {sel} FROM __stage")
                con.unregister("__stage")
            for i, label in enumerate(CANDIDATES):
                con.execute(f"CHECKPOINT c{i}")
                con.execute(f"DETACH c{i}")
                size = files[i].stat().st_size
                print(f"  {label}: {size / MB:.1f} MB = {size / source_bytes:.2f}x")
        con.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--engines", default="postgres,duckdb")
    parser.add_argument("--candidates", action="store_true")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {' '.join(sys.argv)}")
    for engine in args.engines.split(","):
        {"postgres": postgres, "duckdb": duckdb}[engine](args.rows, args.candidates)


if __name__ == "__main__":
    main()
