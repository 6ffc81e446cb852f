"""Attacks on reading PostgreSQL a batch ahead and converting JSON one distinct text at a time.

Each test pins one behaviour the change must keep: the error a source with invalid JSON text gets is the one of its
first invalid row (as when every row was parsed on its own), whatever order a hash table lists the distinct texts in;
a task Airflow stops with SIGTERM, or a SIGINT (Ctrl-C, or the one Airflow's supervisor forwards), cancels the query
its reader waits on, as the driver cancels it when the engine's thread reads.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pendulum
import pyarrow as pa
import pytest
from airflow.sdk import DAG
from airflow_plugin import run_dag, task_states
from operator_fixtures import sandbox_fixture
from pg_sessions import wait_for, waits

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator, read_sql
from airflow_provider_stopchurn.source.arrow_values import convert_arrow_column
from airflow_provider_stopchurn.source.canonical import canonicalize_source
from airflow_provider_stopchurn.source.read_ahead import THREAD_NAME
from airflow_provider_stopchurn.source.sql import postgres_uri, read_postgres

sandbox = sandbox_fixture(22)


def json_column(texts: list[str | None]) -> pa.Array:
    """Texts as an ``arrow.json`` column, as the ADBC driver delivers json/jsonb."""
    return pa.ExtensionArray.from_storage(pa.json_(), pa.array(texts, pa.string()))


def test_invalid_json_text_is_reported_for_its_first_row_every_time() -> None:
    # two different invalid texts, repeated (so the column is converted one distinct text at a time); the first
    # row's text is the one a row-by-row read reports, and a failed run must say the same thing on every try
    column = json_column(["[", "{"] * 3 + ["1"] * 6)
    messages = set()
    for _ in range(20):
        with pytest.raises(SourceDataError) as error:
            convert_arrow_column("v", column)
        messages.add(str(error.value))
    assert messages == {"Column 'v' holds text that is not one JSON value: Expecting value: line 1 column 2 (char 1)."}


# --- SIGTERM: Airflow 3 calls the operator's on_kill() from its handler and raises nothing in the task's thread ----


@pytest.mark.postgres
def test_sigterm_cancels_the_query_of_the_running_read(postgres_database: Any, postgres_database_conn_id: str) -> None:
    operator = StopChurnUpdateOperator(
        task_id="sync", table_name="account", sql="SELECT 1 AS id", sql_conn_id=postgres_database_conn_id
    )

    def on_term(_signum: int, _frame: Any) -> None:  # what Airflow 3.3's task runner does on SIGTERM
        operator.on_kill()

    def terminate() -> None:  # the supervisor stops the task while its query runs on the server
        wait_for(waits, postgres_database, lambda waits: "PgSleep" in waits)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    stopper = threading.Thread(target=terminate)
    stopper.start()
    try:
        # the query would hold its session for 20 s (and on the server after the task was killed): it is cancelled
        with pytest.raises(Exception, match="canceling statement due to user request"):
            canonicalize_source(
                lambda: read_sql(postgres_database_conn_id, "SELECT 1 AS id FROM pg_sleep(20)"), key_columns=["id"]
            )
    finally:
        stopper.join()
        signal.signal(signal.SIGTERM, previous)
    assert [thread for thread in threading.enumerate() if thread.name == THREAD_NAME] == []
    assert wait_for(waits, postgres_database, lambda waits: waits == []) == []


@pytest.mark.postgres
def test_sigint_cancels_the_query_of_the_running_read(postgres_database: Any) -> None:
    """polars (imported by every run) installs its SIGINT handler with SA_RESTART: a thread blocked in a plain wait
    is not woken by the signal, so the engine's thread must not wait for the reader without a bound. Read in the
    engine's thread, ADBC cancelled the query on SIGINT itself."""
    import polars as pl

    pl.DataFrame({"a": [1]}).sum()  # polars' SIGINT handler is in place, as in a task
    db = postgres_database
    uri = postgres_uri(host=db.host, port=db.port, login=db.user, password=None, database=db.dbname)
    outcome: dict[str, bool] = {}

    def interrupt() -> None:  # Ctrl-C, or Airflow's supervisor forwarding the SIGINT it got
        wait_for(waits, db, lambda waits: "PgSleep" in waits)
        os.kill(os.getpid(), signal.SIGINT)
        outcome["cancelled"] = "PgSleep" not in wait_for(waits, db, lambda waits: "PgSleep" not in waits)
        if not outcome["cancelled"]:  # end the 600 s query ourselves, so that the test ends
            with db.connect() as conn:
                conn.execute(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                    "AND datname = current_database()"
                )

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    try:
        with pytest.raises((KeyboardInterrupt, OSError)):
            canonicalize_source(lambda: read_postgres(uri, "SELECT 1 AS id FROM pg_sleep(600)"), key_columns=["id"])
    finally:
        interrupter.join()
    assert outcome == {"cancelled": True}, "the query ran on after SIGINT until something else cancelled it"
    assert [thread for thread in threading.enumerate() if thread.name == THREAD_NAME] == []
    assert wait_for(waits, db, lambda waits: waits == []) == []


@pytest.mark.postgres
@pytest.mark.usefixtures("airflow_db", "sandbox")
def test_a_task_airflow_sigterms_while_its_query_runs_fails_and_cancels_it(
    postgres_database: Any, postgres_database_conn_id: str, tmp_path: Path
) -> None:
    """A real task run (``dag.test()`` runs it here, with Airflow's own SIGTERM handler): the supervisor's SIGTERM
    (the run was marked failed, its heartbeat was lost, the worker shuts down) stops the query, not its end."""
    with DAG("review_sigterm", schedule=None, start_date=pendulum.datetime(2025, 1, 1)) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name="account",
            sql="SELECT 1 AS id FROM pg_sleep(20)",
            sql_conn_id=postgres_database_conn_id,
            snapshot_uri=str(tmp_path / "snapshots"),
            retries=0,
        )

    def terminate() -> None:
        wait_for(waits, postgres_database, lambda waits: "PgSleep" in waits)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    stopper = threading.Thread(target=terminate)
    stopper.start()
    try:
        dagrun = run_dag(dag, logical_date=pendulum.datetime(2025, 1, 1))
    finally:
        stopper.join()
        signal.signal(signal.SIGTERM, previous)
    assert task_states(dagrun) == {"sync": "failed"}  # before, the query ran its 20 s and the run went on
    assert wait_for(waits, postgres_database, lambda waits: waits == []) == []
