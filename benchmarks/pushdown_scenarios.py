"""The three ``--pushdown`` scenarios: PostgreSQL (pushdown vs the local engine), DuckDB, Spark local mode."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from harness import PostgresCpu, Sandbox, copy_root, fmt_bytes, fresh_dir
from pushdown_children import (
    check_again,
    check_run,
    require_ok,
    run_pd_child,
    sample_ids,
    sample_sql,
    spark_session_module,
    state_copy,
    verify_sandbox,
)
from pushdown_sql import STATE_SCHEMA, STATE_TABLE, TABLE, churn_of, churn_sql, duckdb_connect, generate_duckdb
from synthetic import load_sql_table


# ---------------------------------------------------------------------------------------------------------------
# scenario 1: PostgreSQL, pushdown vs the local engine
# ---------------------------------------------------------------------------------------------------------------
def bench_postgres(
    args: argparse.Namespace,
    tmp: Path,
    sandbox: Sandbox,
    server: Any,
    rep: dict[str, Any],
    paths: tuple[str, ...] = ("local", "postgres"),
) -> None:
    """Baseline, churn, churn run and second run of each of ``paths`` (``local``: the worker path through the
    operator's SQL read; ``postgres``: the pushdown, with PostgreSQL's own diff query beside its churn runs)."""
    n = args.rows
    pg = PostgresCpu(server)
    print(f"[postgres] loading {n:,} rows (+ {n // 200:,} spare rows) with COPY ...", flush=True)
    table = load_sql_table(server, n)
    rep["pg_table"] = table
    print(f"  {table.load_s:.1f} s, table {fmt_bytes(table.table_bytes)}", flush=True)
    roots = {engine: fresh_dir(tmp, {"local": "pg-local", "postgres": "pg-pushdown"}[engine]) for engine in paths}
    runs: dict[str, list[dict[str, Any]]] = {}
    rep["pg_runs"] = runs

    def child(key: str, engine: str, mode: str, kind: str = "pd-run") -> dict[str, Any]:
        sandbox.reset()
        sb0, db0 = sandbox.cpu(), pg.cpu()
        got = run_pd_child(
            kind,
            args,
            engine=engine,
            mode=mode,
            root=roots.get(engine),
            url=sandbox.url,
            memory_cap=getattr(args, "memory_cap", None),
        )
        got["sandbox_cpu"], got["db_cpu"] = sandbox.cpu() - sb0, pg.cpu() - db0
        got["sandbox_requests"] = sandbox.stats()["requests"]
        runs.setdefault(key, []).append(got)
        above = got["peak_during_run"] - got["rss_before_run"]
        if kind == "pd-join":
            print(f"  {key}: {got['seconds']:.2f} s ({got['changed']:,} changed rows)", flush=True)
            return got
        out = sum(q[4] for q in got["queries"])
        print(
            f"  {key}: {got['seconds']:.2f} s, peak +{fmt_bytes(above)}, {fmt_bytes(out)} out of the "
            f"database, (ins, upd, del) = ({got['inserted']:,}, {got['updated']:,}, {got['deleted']:,})",
            flush=True,
        )
        return got

    print("[postgres] baselines (initial_load='baseline': the table recorded as delivered, nothing sent) ...")
    for engine in paths:
        got = child(f"{engine} baseline", engine, "baseline")
        if not got["baseline"] or got["chunks"] or got["unchanged"] != n:
            raise RuntimeError(f"{engine} baseline: {got}")
    if "postgres" in paths:
        with server.connect() as conn:
            size = f"pg_total_relation_size('{STATE_SCHEMA}.{STATE_TABLE}')"
            rep["pg_state_bytes"] = int(conn.execute(f"SELECT {size}").fetchone()[0])
        rep["pg_state_parts"] = state_parts(server)
    churn = churn_of(n)
    rep["pg_churn"] = churn
    print("[postgres] applying the churn with SQL ...", flush=True)
    t0 = time.perf_counter()
    with server.connect(autocommit=False) as conn:
        counts = [conn.execute(statement).rowcount for statement in churn_sql("postgres", n)]
        conn.commit()
    server.execute(f"VACUUM (ANALYZE) {TABLE}")
    rep["pg_churn_s"] = time.perf_counter() - t0
    if tuple(counts) != (churn.deleted, churn.updated, churn.inserted):
        raise RuntimeError(f"the churn changed (deleted, updated, inserted) = {counts}, expected {churn}")
    sample = sample_ids(n)
    from airflow_provider_stopchurn.source.sql import postgres_uri, read_postgres

    uri = postgres_uri(host=server.host, port=server.port, login=server.user, password=None, database=server.dbname)
    source = pa.Table.from_batches(list(read_postgres(uri, sample_sql(sample))))
    reps = args.reps or 1
    saved: dict[str, Path] = {}
    if reps > 1:  # each repetition starts from the same state: the snapshot roots and the state table
        saved = {engine: copy_root(root, tmp / f"{root.name}-saved") for engine, root in roots.items()}
        if "postgres" in paths:
            server.execute(*state_copy("postgres", save=True))
    changed = churn.inserted + churn.updated + churn.deleted
    print(f"[postgres] PostgreSQL's own diff query (pushdown only), churn runs of {paths} ({reps} repetition(s)) ...")
    for i in range(reps):
        if i:
            for engine, root in roots.items():
                copy_root(saved[engine], root)
            if "postgres" in paths:
                server.execute(*state_copy("postgres", save=False))
        if "postgres" in paths:
            got = child("join", "postgres", "parts" if i == 0 else "join", kind="pd-join")
            if got["changed"] != changed:
                raise RuntimeError(
                    f"PostgreSQL's own diff query counted {got['changed']:,} changed rows, not {changed:,}"
                )
        for engine in paths:
            got = child(f"{engine} churn", engine, "churn")
            check_run(f"{engine} churn run", got, churn)
            got["verify"] = verify_sandbox(sandbox.url, source, sample, churn)
            require_ok(f"{engine} churn run", got["verify"])
    print("[postgres] second runs (nothing changed) ...", flush=True)
    for engine in paths:
        got = child(f"{engine} again", engine, "again")
        check_again(f"{engine} second run", got, got["sandbox_requests"])
    sandbox.reset()


def state_parts(server: Any) -> dict[str, int]:
    """Where the state table's bytes are: each column's (the sum of ``pg_column_size``, as stored, compressed where
    PostgreSQL compresses it), its indexes', and the whole relation's (the rest: row headers, free space)."""
    name = f'"{STATE_SCHEMA}"."{STATE_TABLE}"'
    with server.connect() as conn:
        columns = [
            str(row[0])
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "ORDER BY ordinal_position",
                (STATE_SCHEMA, STATE_TABLE),
            )
        ]
        sums = ", ".join(f'COALESCE(SUM(pg_column_size("{c}")), 0)' for c in columns)
        sizes = conn.execute(f"SELECT {sums} FROM {name}").fetchone() if columns else ()
        indexes = conn.execute(f"SELECT pg_indexes_size('{name}'), pg_total_relation_size('{name}')").fetchone()
    return {
        **{f"column {c}": int(v) for c, v in zip(columns, sizes, strict=True)},
        "indexes": int(indexes[0]),
        "total": int(indexes[1]),
    }


# ---------------------------------------------------------------------------------------------------------------
# scenario 2: DuckDB
# ---------------------------------------------------------------------------------------------------------------
def bench_duckdb(args: argparse.Namespace, tmp: Path, sandbox: Sandbox, rep: dict[str, Any]) -> None:
    n = args.duckdb_rows
    path = tmp / "warehouse.duckdb"
    root = fresh_dir(tmp, "duckdb-pushdown")
    print(f"[duckdb] generating {n:,} rows (+ {n // 200:,} spare rows) in {path.name} ...", flush=True)
    rep["duckdb_gen"] = generate_duckdb(path, n, args.duckdb_memory_limit)
    print(f"  {rep['duckdb_gen']['seconds']:.1f} s, file {fmt_bytes(rep['duckdb_gen']['file_bytes'])}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    rep["duckdb_runs"] = runs

    def child(key: str, kind: str = "pd-run", mode: str | None = None) -> dict[str, Any]:
        sandbox.reset()
        sb0 = sandbox.cpu()
        got = run_pd_child(kind, args, engine="duckdb", mode=mode, root=root, url=sandbox.url, db=path)
        got["sandbox_cpu"] = sandbox.cpu() - sb0
        got["sandbox_requests"] = sandbox.stats()["requests"]
        runs.setdefault(key, []).append(got)
        above = got["peak_during_run"] - got["rss_before_run"]
        print(f"  {key}: {got['seconds']:.2f} s, peak +{fmt_bytes(above)}", flush=True)
        return got

    print("[duckdb] baseline (initial_load='baseline') ...", flush=True)
    got = child("baseline", mode="baseline")
    if not got["baseline"] or got["unchanged"] != n:
        raise RuntimeError(f"duckdb baseline: {got}")
    rep["duckdb_state_file_bytes"] = path.stat().st_size
    churn = churn_of(n)
    rep["duckdb_churn"] = churn
    print("[duckdb] applying the churn with SQL ...", flush=True)
    t0 = time.perf_counter()
    with duckdb_connect(path, args.duckdb_memory_limit) as con:
        con.execute("BEGIN TRANSACTION")
        counts = [int(con.execute(s).fetchone()[0]) for s in churn_sql("duckdb", n)]
        con.execute("COMMIT")
        sample = sample_ids(n)
        relation = con.sql(sample_sql(sample))
        source = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        if args.reps and args.reps > 1:
            for statement in state_copy("duckdb", save=True):
                con.execute(statement)
    rep["duckdb_churn_s"] = time.perf_counter() - t0
    if tuple(counts) != (churn.deleted, churn.updated, churn.inserted):
        raise RuntimeError(f"the churn changed (deleted, updated, inserted) = {counts}, expected {churn}")
    reps = args.reps or 1
    saved = copy_root(root, tmp / "duckdb-pushdown-saved") if reps > 1 else root
    print(f"[duckdb] DuckDB's own join and the churn run, alternating ({reps} repetition(s)) ...", flush=True)
    for i in range(reps):
        if i:
            copy_root(saved, root)
            with duckdb_connect(path, args.duckdb_memory_limit) as con:
                for statement in state_copy("duckdb", save=False):
                    con.execute(statement)
        got = child("join", kind="pd-join", mode="parts" if i == 0 else "join")
        if got["changed"] != churn.inserted + churn.updated + churn.deleted:
            raise RuntimeError(f"DuckDB's own join counted {got['changed']:,} changed rows, expected {churn}")
        got = child("churn", mode="churn")
        check_run("duckdb churn run", got, churn)
        got["verify"] = verify_sandbox(sandbox.url, source, sample, churn)
        require_ok("duckdb churn run", got["verify"])
    print("[duckdb] second run (nothing changed) ...", flush=True)
    got = child("again", mode="again")
    check_again("duckdb second run", got, got["sandbox_requests"])
    rep["duckdb_file_bytes"] = path.stat().st_size
    sandbox.reset()
    path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# scenario 3: Spark local mode (one child process: the in-memory catalog lives as long as its session)
# ---------------------------------------------------------------------------------------------------------------
def spark_unavailable() -> str | None:
    try:
        import pyspark
    except ImportError as err:
        return f"pyspark is not installed ({err})"
    try:
        from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse  # noqa: F401
    except ImportError as err:
        return f"airflow_provider_stopchurn/warehouse/spark.py is missing ({err})"
    if spark_session_module().find_java() is None:
        return f"no Java runtime for Spark {pyspark.__version__} ($JAVA_HOME/bin/java or java on PATH)"
    return None


def bench_spark(args: argparse.Namespace, tmp: Path, sandbox: Sandbox, rep: dict[str, Any]) -> None:
    n = args.spark_rows
    root = fresh_dir(tmp, "spark-pushdown")
    print(f"[spark] local mode: {n:,} rows; generation, baseline, churn run, second run in one child ...", flush=True)
    got = run_pd_child("pd-spark", args, rows=n, root=root, url=sandbox.url, sandbox_pid=sandbox.proc.pid)
    rep["spark"] = got
    churn = churn_of(n)
    rep["spark_churn"] = churn
    runs = got["runs"]
    for key, r in runs.items():
        above = r["peak_during_run"] - r["rss_before_run"]
        print(f"  {key}: {r['seconds']:.2f} s, peak +{fmt_bytes(above)}", flush=True)
    if not runs["baseline"]["baseline"] or runs["baseline"]["unchanged"] != n:
        raise RuntimeError(f"spark baseline: {runs['baseline']}")
    check_run("spark churn run", runs["churn"], churn)
    require_ok("spark churn run", got["verify"])
    check_again("spark second run", runs["again"], runs["again"]["sandbox_requests"])
    sandbox.reset()
