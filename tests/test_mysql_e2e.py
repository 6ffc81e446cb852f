"""End to end from MariaDB: a DAG run (``dag.test()``) syncs a table of common MySQL column types to the sandbox,
several times with random inserts, updates and deletes in between; after every run StopChurn's table equals the
database table, value for value, in the documented JSON forms (computed here independently of the provider's
encoder). The JSON column is named in ``json_columns`` (MariaDB's JSON is LONGTEXT); a last run over the same
rows, with the JSON text reformatted, sends nothing."""

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

pytestmark = [pytest.mark.mysql, pytest.mark.usefixtures("airflow_db")]

BRAND = 42
RUNS = 4
sandbox = sandbox_fixture(BRAND)

DDL = """
CREATE TABLE customers (
    id BIGINT PRIMARY KEY,
    name VARCHAR(80) NOT NULL,
    score DECIMAL(12, 2),
    active TINYINT(1) NOT NULL,
    visits INT,
    ratio DOUBLE,
    profile JSON,
    seen_at TIMESTAMP NULL,
    birthday DATE
)
"""


def _row(rng: random.Random, key: int) -> dict[str, Any]:
    return {
        "id": key,
        "name": rng.choice(["Ana", "Bo", "Chloé", 'Dan "the man"', ""]) + f" {key}",
        "score": None if rng.random() < 0.2 else Decimal(rng.randint(-10_000, 10_000)) / 4,
        "active": int(rng.random() < 0.5),
        "visits": None if rng.random() < 0.3 else rng.randint(0, 1000),
        "ratio": None if rng.random() < 0.3 else rng.choice([0.1, 1.5, -2.25, 1e-7]),
        "profile": rng.choice([None, {"tier": "gold", "n": rng.randint(0, 9)}, {"nested": {"x": [1, 2]}}, []]),
        "seen_at": None
        if rng.random() < 0.2
        else dt.datetime(2025, 1, 1) + dt.timedelta(seconds=rng.randint(0, 10**7)),  # UTC
        "birthday": rng.choice([None, dt.date(1990, 5, 17), dt.date(2001, 1, 1), dt.date(1969, 7, 20)]),
    }


def _expected_json(row: dict[str, Any]) -> dict[str, Any]:
    """The row as StopChurn must receive it (docs/values.md: Values)."""
    out = dict(row)
    out["score"] = None if row["score"] is None else float(row["score"])  # quarters: exact in binary
    out["seen_at"] = None if row["seen_at"] is None else int(row["seen_at"].replace(tzinfo=dt.UTC).timestamp() * 1000)
    out["birthday"] = (
        None
        if row["birthday"] is None
        else int(dt.datetime.combine(row["birthday"], dt.time(), dt.UTC).timestamp() * 1000)
    )
    return out  # active stays 0/1: TINYINT(1) is an integer


def _write(server: Any, rows: dict[int, dict[str, Any]], *, indent: int | None = None) -> None:
    conn = server.connect()
    try:
        cursor = conn.cursor()
        cursor.execute("SET time_zone = '+00:00'")
        cursor.execute("DELETE FROM customers")
        cursor.executemany(
            "INSERT INTO customers VALUES (%(id)s, %(name)s, %(score)s, %(active)s, %(visits)s, %(ratio)s, "
            "%(profile)s, %(seen_at)s, %(birthday)s)",
            [
                dict(r, profile=None if r["profile"] is None else json.dumps(r["profile"], indent=indent))
                for r in rows.values()
            ],
        )
    finally:
        conn.close()


def test_mysql_table_stays_in_step_through_dag_runs(
    sandbox: SandboxServer, mysql_database: Any, mysql_conn_id: str, tmp_path: Path
) -> None:
    table = Customers(mysql_database, DDL, _row)
    rows = table.rows
    dag = customers_dag("mysql_e2e", mysql_conn_id, tmp_path, json_columns=["profile"])
    for day in range(RUNS + 1):
        last = day == RUNS  # the same rows again, the JSON text reformatted: nothing to send
        _write(mysql_database, rows, indent=2 if last else None)
        dagrun = run_dag(dag, logical_date=pendulum.datetime(2025, 1, 1).add(days=day))
        assert str(dagrun.state) == "success", task_states(dagrun)
        summary = xcom_return(dagrun, "sync")
        inserted, updated, deleted = table.changes()
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == (inserted, updated, deleted)
        if last:
            assert (inserted, updated, deleted) == (0, 0, 0)
        assert {r["id"]: r for r in sandbox.rows(BRAND, "customers")} == {k: _expected_json(r) for k, r in rows.items()}
        table.sent()
        if day < RUNS - 1:  # the last run reads the rows of the one before
            table.churn()
