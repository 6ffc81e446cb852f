"""End to end from PostgreSQL: a DAG run (``dag.test()``) syncs a table of many column types to the sandbox,
several times with random inserts, updates and deletes in between; after every run StopChurn's table equals
the database table, value for value, in the documented JSON forms (computed here independently of the
provider's encoder)."""

from __future__ import annotations

import datetime as dt
import json
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pendulum
import pytest
from airflow_plugin import run_dag, task_states, xcom_return
from helpers_db_e2e import Customers, customers_dag
from operator_fixtures import sandbox_fixture

from airflow_provider_stopchurn.sandbox import SandboxServer

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("airflow_db")]

BRAND = 42
RUNS = 4
sandbox = sandbox_fixture(BRAND)

DDL = """
CREATE TABLE customers (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    score numeric(12, 2),
    active boolean NOT NULL,
    visits integer,
    tags text[],
    profile jsonb,
    seen_at timestamptz,
    birthday date
)
"""


def _row(rng: random.Random, key: int) -> dict[str, Any]:
    return {
        "id": key,
        "name": rng.choice(["Ana", "Bo", "Chloé", 'Dan "the man"']) + f" {key}",
        "score": None if rng.random() < 0.2 else Decimal(rng.randint(-10_000, 10_000)) / 4,
        "active": rng.random() < 0.5,
        "visits": None if rng.random() < 0.3 else rng.randint(0, 1000),
        "tags": rng.choice([None, [], ["a"], ["a", "b"]]),
        "profile": rng.choice([None, {"tier": "gold", "n": rng.randint(0, 9)}, {"nested": {"x": [1, 2]}}]),
        "seen_at": None
        if rng.random() < 0.2
        else dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=rng.randint(0, 10**7)),
        "birthday": rng.choice([None, dt.date(1990, 5, 17), dt.date(2001, 1, 1)]),
    }


def _expected_json(row: dict[str, Any]) -> dict[str, Any]:
    """The row as StopChurn must receive it (docs/values.md: Values)."""
    out = dict(row)
    out["score"] = None if row["score"] is None else float(row["score"])  # quarters: exact in binary
    out["seen_at"] = None if row["seen_at"] is None else int(row["seen_at"].timestamp() * 1000)
    out["birthday"] = (
        None
        if row["birthday"] is None
        else int(dt.datetime.combine(row["birthday"], dt.time(), dt.UTC).timestamp() * 1000)
    )
    return out


def _write(server: Any, rows: dict[int, dict[str, Any]]) -> None:
    with server.connect() as conn:
        conn.execute("DELETE FROM customers")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO customers VALUES (%(id)s, %(name)s, %(score)s, %(active)s, %(visits)s, %(tags)s, "
                "%(profile)s::jsonb, %(seen_at)s, %(birthday)s)",
                [dict(r, profile=None if r["profile"] is None else json.dumps(r["profile"])) for r in rows.values()],
            )


def test_postgres_table_stays_in_step_through_dag_runs(
    sandbox: SandboxServer, postgres_database: Any, postgres_database_conn_id: str, tmp_path: Path
) -> None:
    table = Customers(postgres_database, DDL, _row)
    rows = table.rows
    dag = customers_dag("pg_e2e", postgres_database_conn_id, tmp_path)
    for day in range(RUNS):
        _write(postgres_database, rows)
        dagrun = run_dag(dag, logical_date=pendulum.datetime(2025, 1, 1).add(days=day))
        assert str(dagrun.state) == "success", task_states(dagrun)
        summary = xcom_return(dagrun, "sync")
        inserted, updated, deleted = table.changes()
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == (inserted, updated, deleted)
        assert {r["id"]: r for r in sandbox.rows(BRAND, "customers")} == {k: _expected_json(r) for k, r in rows.items()}
        table.sent()
        table.churn()
