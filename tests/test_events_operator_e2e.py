"""StopChurnEventOperator end to end: real DAG runs (``dag.test()``), a real metadata DB, the sandbox API.

Each DAG run's events are compared with what the sandbox received, per event: each event key must arrive once,
across re-runs, overlapping windows, task retries and failures, with the API key nowhere in logs or XCom.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import point_stopchurn_default, run_dag, task_states, xcom_return
from helpers_events import deposit_options, hourly_deposits
from leak_scan import Captured, files_text
from operator_fixtures import brand_fixture, sandbox_fixture

from airflow_provider_stopchurn.operators.stopchurn import StopChurnEventOperator
from airflow_provider_stopchurn.sandbox import SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")

START = pendulum.datetime(2025, 1, 1, tz="UTC")
KEY = "sk-EVENTS-LEAKCHECK-0a9b8c7d"
_ids = itertools.count(1)
brand = brand_fixture(300)
sandbox = sandbox_fixture(token=KEY, max_retries=0, timeout=5)


def deposits(first: int, last: int) -> pd.DataFrame:
    """Deposits ``first..last`` (inclusive), deposit i made at START + i hours."""
    return hourly_deposits(first, last, START)


def events_of(brand: int, frame: pd.DataFrame) -> Counter[str]:
    """The events StopChurn should hold for deposit rows, written out from the rows."""
    return Counter(
        json.dumps({"brandId": brand, "userId": u, "name": "DEPOSIT", "value": int(a)}, sort_keys=True)
        for u, a in zip(frame["user_id"], frame["amount"], strict=True)
    )


def received(sb: SandboxServer, brand: int) -> Counter[str]:
    return Counter(json.dumps(e, sort_keys=True) for e in sb.events(brand))


def events_dag(name: str, **kwargs: Any) -> DAG:
    kwargs.setdefault("user_id_column", "user_id")
    kwargs.setdefault("name", "DEPOSIT")
    kwargs.setdefault("value_column", "amount")
    kwargs.setdefault("event_key", "deposit_id")
    kwargs.setdefault("watermark_column", "created_at")
    kwargs.setdefault("lookback", dt.timedelta(hours=6))
    # the operator retries by default, 2 minutes apart, which dag.test() waits out: a test that wants a retry says so
    kwargs.setdefault("retries", 0)
    with DAG(f"events_{name}_{next(_ids)}", schedule=None, start_date=START, catchup=False) as dag:
        StopChurnEventOperator(task_id="send", **kwargs)
    return dag


def run(dag: DAG, day: int, state: str = "success") -> Any:
    dagrun = run_dag(dag, logical_date=START.add(days=day))
    assert str(dagrun.state) == state, task_states(dagrun)
    return dagrun


def test_daily_runs_with_overlapping_windows_send_each_deposit_once(
    sandbox: SandboxServer, brand: int, tmp_path: Path
) -> None:
    windows = [(0, 20), (10, 40), (10, 40), (35, 60)]  # overlapping reads and one re-run of the same rows
    state = {"frame": deposits(0, 0)}
    seen: list[Any] = []

    def read(context: Any, since: dt.datetime) -> pd.DataFrame:
        seen.append(since)
        return state["frame"]

    dag = events_dag("daily", dataframe=read, state_uri=str(tmp_path / "state"), chunk_size=7)
    for day, (first, last) in enumerate(windows):
        state["frame"] = deposits(first, last)
        summary = xcom_return(run(dag, day), "send")
        assert summary["brand_id"] == brand  # from the connection's extras
        assert summary["stream"] == f"{dag.dag_id}.send"
    assert received(sandbox, brand) == events_of(brand, deposits(0, 60))
    assert seen[0] == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # the first run reads everything
    assert seen[1] == START + dt.timedelta(hours=20 - 6)  # then from the watermark minus the lookback
    assert summary["watermark"] == "2025-01-03T12:00:00.000Z"
    assert set(summary) >= {"sent", "duplicates", "chunks", "bytes", "retries", "watermark", "before_window"}
    assert summary["sent"] == 20 and summary["duplicates"] == 6


def test_sql_source_gets_the_window_as_named_parameters(
    sandbox: SandboxServer, brand: int, tmp_path: Path, airflow_conn: Callable[..., None]
) -> None:
    db = tmp_path / "app.db"
    airflow_conn("events_db", conn_type="sqlite", host=str(db))

    def write(frame: pd.DataFrame) -> None:
        table = frame.assign(created_ms=[int(t.timestamp() * 1000) for t in frame["created_at"]]).drop(
            columns=["created_at"]
        )
        with sqlite3.connect(db) as conn:
            table.to_sql("deposits", conn, if_exists="replace", index=False)

    dag = events_dag(
        "sql",
        sql="SELECT deposit_id, user_id, amount, created_ms FROM deposits WHERE created_ms >= :since_ms",
        sql_conn_id="events_db",
        watermark_column="created_ms",
        state_uri=str(tmp_path / "state"),
    )
    write(deposits(0, 30))
    first = xcom_return(run(dag, 0), "send")
    assert first["sent"] == 31 and first["since"] is None
    write(deposits(0, 45))  # the table grew; the query returns only rows from 24:00 on
    second = xcom_return(run(dag, 1), "send")
    assert second["since"] == "2025-01-02T00:00:00.000Z"
    assert (second["sent"], second["duplicates"], second["before_window"]) == (15, 7, 0)  # the SQL filtered
    assert received(sandbox, brand) == events_of(brand, deposits(0, 45))


def test_a_task_retry_resumes_the_plan_and_sends_each_event_once(
    sandbox: SandboxServer, brand: int, tmp_path: Path
) -> None:
    frame = deposits(0, 49)
    calls: list[int] = []

    def read() -> pd.DataFrame:
        calls.append(1)
        if len(calls) == 1:  # the first try: StopChurn acknowledges 3 requests, then answers 503
            sandbox.queue_pass(3)
            sandbox.queue_response(503, {"statusCode": 503, "message": "Service Unavailable"})
        return frame

    dag = events_dag(
        "retry",
        dataframe=read,
        state_uri=str(tmp_path / "state"),
        chunk_size=10,
        max_concurrent_requests=1,
        retries=1,
        retry_delay=dt.timedelta(0),
    )
    dagrun = run(dag, 0)
    summary = xcom_return(dagrun, "send")
    assert summary["resumed_chunks"] == 2  # the second try sent the two chunks the first could not
    assert summary["sent"] == 50  # the DAG run's whole delivery, both tries
    assert received(sandbox, brand) == events_of(brand, frame)
    assert sandbox.stats()["accepted_requests"] == 5


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (401, {"statusCode": 401, "message": "Invalid client api token", "error": "Unauthorized"}, "API key"),
        (400, {"statusCode": 400, "message": "Event reception failed: bad value", "error": "Bad Request"}, "bad val"),
    ],
)
def test_permanent_errors_fail_without_retry(
    sandbox: SandboxServer,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    status: int,
    body: dict[str, Any],
    message: str,
) -> None:
    sandbox.queue_response(status, body)
    dag = events_dag(
        f"perm{status}",
        dataframe=deposits(0, 9),
        state_uri=str(tmp_path / "state"),
        retries=3,
        retry_delay=dt.timedelta(0),
    )
    dagrun = run(dag, 0, state="failed")
    assert task_states(dagrun) == {"send": "failed"}
    assert sandbox.stats()["requests"] == 1  # no HTTP retry, no task retry
    printed = capfd.readouterr().out
    assert "AirflowFailException: StopChurn" in printed and message in printed


def test_dry_run_sends_and_writes_nothing(sandbox: SandboxServer, brand: int, tmp_path: Path) -> None:
    state = tmp_path / "state"
    dag = events_dag("dry", dataframe=deposits(0, 9), state_uri=str(state), dry_run=True)
    summary = xcom_return(run(dag, 0), "send")
    assert (summary["dry_run"], summary["sent"]) == (True, 10)
    assert summary["samples"][0] == {"brandId": brand, "userId": "u0", "name": "DEPOSIT", "value": 0}
    assert sandbox.stats()["requests"] == 0 and not state.exists()


@pytest.mark.parametrize("path", ["success", "outage", "wrong_key"])
def test_key_never_appears_in_logs_xcom_or_files(
    path: str, sandbox: SandboxServer, airflow_conn: Callable[..., None], tmp_path: Path, captured: Captured
) -> None:
    root = tmp_path / "state"
    if path == "outage":
        sandbox.queue_pass(1)
        for _ in range(5):
            sandbox.queue_response(500, {"statusCode": 500, "message": "down"})
    elif path == "wrong_key":
        point_stopchurn_default(airflow_conn, sandbox, 1, password=KEY + "-old")
    captured.start()
    dagrun = run_dag(events_dag("secrets", dataframe=deposits(0, 30), state_uri=str(root), chunk_size=10))
    assert str(dagrun.state) == ("success" if path == "success" else "failed")
    printed = captured.printed()
    records = captured.records()
    files = files_text(root)
    assert records
    for where, text in {
        "log records": records,
        "stdout": printed.out,
        "stderr": printed.err,
        "xcom": json.dumps(xcom_return(dagrun, "send"), default=str),
        "state files": files,
    }.items():
        assert KEY not in text, f"the API key leaked into {where}"


def test_a_worker_without_the_ledger_stops_before_sending(sandbox: SandboxServer, brand: int, tmp_path: Path) -> None:
    state = tmp_path / "state"
    dag = events_dag("guard", dataframe=deposits(0, 9), state_uri=str(state))
    run(dag, 0)

    shutil.rmtree(state)  # another worker's disk: the ledger is not there
    requests = sandbox.stats()["requests"]
    run(dag, 1, state="failed")
    assert sandbox.stats()["requests"] == requests
    assert received(sandbox, brand) == events_of(brand, deposits(0, 9))


def test_a_second_run_of_the_stream_started_together_waits_for_the_lock_and_succeeds(
    sandbox: SandboxServer, brand: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What "unpause on trigger" does: the scheduled run and the triggered one start together. The second waits
    for the stream's lock (the operator's default ``lock_wait_s``) instead of failing at once, then reads after
    the first committed: each deposit reaches StopChurn once, and the first run sent nothing after releasing."""
    import threading

    from helpers_sync import make_client

    from airflow_provider_stopchurn.events.engine import run_events
    from airflow_provider_stopchurn.events.ledger import event_store

    state = tmp_path / "state"
    caplog.set_level(logging.WARNING, logger="airflow_provider_stopchurn.store.snapshots")
    dag = events_dag("together", dataframe=lambda: deposits(0, 29), state_uri=str(state), retries=0)
    first: dict[str, Any] = {}

    def first_source(window: Any) -> pd.DataFrame:
        # read under the lock: hold it until the DAG run's try is seen waiting for it (bounded)
        for _ in range(600):
            if any("lock_wait_s" in r.getMessage() for r in caplog.records):
                first["saw_wait"] = True
                break
            threading.Event().wait(0.1)
        return deposits(0, 19)

    def first_run() -> None:
        options = deposit_options(
            brand,
            watermark_column="created_at",
            lookback=dt.timedelta(hours=6),
            holder=f"{dag.dag_id}.send run scheduled__2025-01-01 try 1",
        )
        store = event_store(state, brand, f"{dag.dag_id}.send")
        try:
            first["summary"] = run_events(first_source, store, make_client(sandbox), options, stream=store.table_name)
        except Exception as err:  # examined below
            first["error"] = err

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert _wait_for_lock(state, brand, f"{dag.dag_id}.send")
        second = xcom_return(run(dag, 0), "send")  # fails at once without a lock wait
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in first, first.get("error")
    assert first.get("saw_wait"), "the DAG run never waited for the lock"
    assert first["summary"].sent == 20
    # read after the first run committed: its 20 deposits are duplicates or before the window, not sent again
    assert (second["sent"], second["duplicates"] + second["before_window"]) == (10, 20)
    assert received(sandbox, brand) == events_of(brand, deposits(0, 29))  # each deposit once


def _wait_for_lock(state: Path, brand: int, stream: str) -> bool:
    """Whether the stream's LOCK appeared within 60 s."""
    import threading

    from airflow_provider_stopchurn.events.ledger import event_store

    store = event_store(state, brand, stream)
    for _ in range(600):
        if store.read_lock() is not None:
            return True
        threading.Event().wait(0.1)
    return False
