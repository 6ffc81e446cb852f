"""The warehouse diff's statements alone on PostgreSQL, before and after the key checks joined the narrow diff's
pass: the floor (PostgreSQL's own single-pass diff), the older key check + narrow diff, and the narrow diff that
checks the keys itself, run in turn on one server so each repetition's ratios share its load.

    python benchmarks/narrow_keys.py --rows 1000000 --reps 5 --old /path/to/older/checkout

``--old`` is a checkout whose ``airflow_provider_stopchurn/warehouse/sql.py`` writes the older statements (it is
loaded from that file under another name); this checkout's package writes the new ones. The table and its churn
are the benchmark's (``synthetic.py``); the state table is written in SQL with the engine's row hash.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]

import synthetic  # noqa: E402
from pg_server import running_postgres  # noqa: E402

from airflow_provider_stopchurn.warehouse import sql as new_sql  # noqa: E402
from airflow_provider_stopchurn.warehouse.databases import PostgresWarehouse  # noqa: E402

QUERY = f"SELECT * FROM {synthetic.SQL_TABLE}"
SCRATCH = '"st"."scratch"'


def _older(checkout: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        "older_sql", checkout / "airflow_provider_stopchurn" / "warehouse" / "sql.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["older_sql"] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _timed(conn: Any, statements: list[str]) -> float:
    conn.execute("DROP TABLE IF EXISTS " + SCRATCH)
    t0 = time.perf_counter()
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--old", type=Path, required=True)
    args = parser.parse_args()
    old_sql = _older(args.old)
    columns = [name for name, _ in synthetic.SQL_COLUMNS]
    new = new_sql.StateTable("st", "state", ("id",), "postgres")
    old = old_sql.StateTable("st", "state", ("id",), "postgres")
    row_hash = new_sql.row_hash_sql(columns)
    state = f"{new.qualified} AS t"
    floor = new_sql.render(
        f"WITH n AS (SELECT CAST(s.id AS TEXT) AS k, {row_hash} AS h FROM {new_sql.q(new_sql.SOURCE)} AS s), "
        f"d AS (SELECT CASE WHEN n.k IS NULL THEN 'delete' WHEN t.{new_sql.q(new_sql.HASH)} IS NULL THEN 'insert' "
        f"WHEN n.h <> t.{new_sql.q(new_sql.HASH)} THEN 'update' END AS op FROM n FULL OUTER JOIN {state} "
        "ON n.k = t.id) SELECT COUNT(*) FROM d WHERE op IS NOT NULL",
        "postgres",
        source=QUERY,
    )
    with running_postgres() as server:
        table = synthetic.load_sql_table(server, args.rows)
        with server.connect() as conn:
            for statement in PostgresWarehouse.session_setup:
                conn.execute(statement)
            conn.execute("CREATE SCHEMA st")
            conn.execute(
                f"CREATE TABLE {new.qualified} AS SELECT CAST(s.id AS TEXT) AS id, {row_hash} AS "
                f"{new_sql.q(new_sql.HASH)}, CAST(0 AS BIGINT) AS {new_sql.q(new_sql.CREATED)}, "
                f"CAST(row_to_json(s) AS TEXT) AS {new_sql.q(new_sql.ROW)} FROM {synthetic.SQL_TABLE} AS s"
            )
            conn.execute(new.create_index())
            conn.execute(f"VACUUM ANALYZE {new.qualified}")
        churn = synthetic.apply_sql_churn(server, table)
        print(f"{args.rows:,} rows, churn {churn}; PostgreSQL {table.server_version}", flush=True)
        runs: dict[str, list[float]] = {
            "floor": [],
            "key check": [],
            "older diff": [],
            "new diff": [],
            "new diff, JIT as configured": [],
        }
        with server.connect(autocommit=True) as conn:
            for statement in PostgresWarehouse.session_setup:
                conn.execute(statement)
            for rep in range(args.reps):
                runs["floor"].append(_timed(conn, [floor]))
                runs["key check"].append(_timed(conn, [old.key_check(QUERY)]))
                runs["older diff"].append(_timed(conn, old.diff_into(SCRATCH, QUERY, columns, update_all=False)))
                statements = new.diff_into(SCRATCH, QUERY, columns, update_all=False)
                runs["new diff"].append(_timed(conn, statements))
                jit_as_configured = [s for s in statements if not s.startswith("SET LOCAL jit")]
                runs["new diff, JIT as configured"].append(_timed(conn, jit_as_configured))
                line = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items())
                print(f"rep {rep + 1}: {line}", flush=True)
    floors = runs["floor"]
    for name, seconds in runs.items():
        ratios = [s / f for s, f in zip(seconds, floors, strict=True)]
        print(
            f"{name}: median {statistics.median(seconds):.2f} s, min {min(seconds):.2f} s; "
            f"per repetition / its floor: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}"
        )
    before = [(k + d) / f for k, d, f in zip(runs["key check"], runs["older diff"], floors, strict=True)]
    print(f"older key check + diff / floor: median {statistics.median(before):.2f}, min {min(before):.2f}")


if __name__ == "__main__":
    main()
