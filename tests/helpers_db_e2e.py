"""What the database end-to-end tests share: a customers table that changes between DAG runs, and the DAG that syncs
it from a database connection."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator

#: A key beyond float precision: it must arrive exact.
BIG = 2**53 + 1

#: Makes one random row of the table for a key.
RowMaker = Callable[[random.Random, int], dict[str, Any]]

_dag_ids = itertools.count(1)


class Customers:
    """The rows of the customers table (120 random ones and :data:`BIG`), by key, and what the last run sent.

    :param database: the test database; the table is created there, empty (the test writes the rows).
    :param ddl: the ``CREATE TABLE customers`` statement of the database's column types.
    :param make_row: makes a random row of those types.
    """

    def __init__(self, database: Any, ddl: str, make_row: RowMaker) -> None:
        database.execute(ddl)
        self.make_row = make_row
        self.rng = random.Random(2026)
        self.keys = itertools.count(1)
        self.rows = {k: make_row(self.rng, k) for k in (next(self.keys) for _ in range(120))}
        self.rows[BIG] = make_row(self.rng, BIG)
        self.previous: dict[int, dict[str, Any]] = {}

    def changes(self) -> tuple[int, int, int]:
        """Rows inserted, updated and deleted since :meth:`sent` was last called."""
        rows, previous = self.rows, self.previous
        inserted = len(rows.keys() - previous.keys())
        deleted = len(previous.keys() - rows.keys())
        updated = sum(1 for k in rows.keys() & previous.keys() if rows[k] != previous[k])
        return inserted, updated, deleted

    def sent(self) -> None:
        """The rows as they are now reached StopChurn: later changes count from here."""
        self.previous = {k: dict(r) for k, r in self.rows.items()}

    def churn(self) -> None:
        """Update some rows (a few only in one column), delete some (never :data:`BIG`), insert some."""
        rng, rows = self.rng, self.rows
        for k in rng.sample(sorted(rows), 15):
            rows[k] = (
                self.make_row(rng, k) if rng.random() < 0.5 else dict(rows[k], visits=(rows[k]["visits"] or 0) + 1)
            )
        for k in rng.sample(sorted(k for k in rows if k != BIG), 8):
            del rows[k]
        for k in (next(self.keys) for _ in range(10)):
            rows[k] = self.make_row(rng, k)


def customers_dag(name: str, sql_conn_id: str, tmp_path: Path, **operator_kwargs: Any) -> DAG:
    """A DAG whose task ``sync`` reads ``customers`` (ids above a parameter) through ``sql_conn_id`` and syncs it in
    chunks of 25.

    :param name: names the DAG.
    :param sql_conn_id: the database's Airflow connection.
    :param tmp_path: the test's folder; the store goes to ``snapshots`` in it.
    :param operator_kwargs: more operator arguments.
    """
    with DAG(f"{name}_{next(_dag_ids)}", schedule=None, start_date=pendulum.datetime(2025, 1, 1)) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name="customers",
            sql="SELECT * FROM customers WHERE id > %(min_id)s",
            parameters={"min_id": 0},
            sql_conn_id=sql_conn_id,
            snapshot_uri=str(tmp_path / "snapshots"),
            chunk_size=25,
            **operator_kwargs,
        )
    return dag
