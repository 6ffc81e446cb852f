"""What a run's history record must never do: order runs by a worker's clock, keep a source's password, grow
without bound while runs keep failing without the table's lock, or hide the whole history behind one record it
cannot show.

Real parts only: the sandbox StopChurn server on 127.0.0.1, real stores in a temporary folder, a real PostgreSQL
driver's error, and the ``stopchurn`` command.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_events import recorded_run_options
from helpers_sync import BRAND, T0, TABLE, make_client, options

from airflow_provider_stopchurn import cli
from airflow_provider_stopchurn.exceptions import SnapshotLockedError
from airflow_provider_stopchurn.options import RunInfo
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

N = 20


def table(qty: int = 0) -> pd.DataFrame:
    ids = np.arange(1, N + 1)
    return pd.DataFrame({"id": ids, "qty": ids * 0 + qty})


def run(frame: Any, store: SnapshotStore, sb: SandboxServer, tick: int, **opts: Any) -> Any:
    opts.setdefault("chunk_size", 5)
    return run_sync(frame, store, make_client(sb), options(**opts), run_ms=T0 + 1000 * tick)


def try_of(run_id: str, number: int) -> dict[str, Any]:
    return {"run_key": f"dag.task run {run_id} map -1", "run_info": RunInfo("dag", "task", run_id, number)}


def history_folder(root: Path) -> Path:
    return root / str(BRAND) / TABLE / "history"


def test_a_record_written_after_one_from_a_worker_whose_clock_runs_ahead_is_still_the_newest(
    sb: SandboxServer, tmp_path: Path
) -> None:
    """Two workers whose clocks differ by minutes: try 1 fails on the worker ahead, try 2 succeeds on the other.
    The newest record must be try 2's (the page and ``stopchurn history`` show the run's last ending from it), and
    pruning must not remove the record just written."""
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, sb, 0, **try_of("r0", 1))
    other = store.table_lock("dag.task run r1 map -1 on the other worker")
    other.acquire()
    try:
        with pytest.raises(SnapshotLockedError):
            run(table(qty=1), store, sb, 1, lock_wait_s=0, **try_of("r1", 1))
    finally:
        other.release()
    # try 1's record, named by the worker whose clock runs ten minutes ahead of this one
    failed = max(history_folder(tmp_path).iterdir())
    ahead = datetime.now(UTC) + timedelta(minutes=10)
    failed.rename(failed.with_name(ahead.strftime("%Y%m%dT%H%M%S%fZ") + "-0a0a0a0a.json"))
    store.history_limit = 2
    run(table(qty=1), store, sb, 2, **try_of("r1", 2))
    newest = store.read_history(1)[0]
    assert (newest["status"], newest["try_number"]) == ("success", 2)
    assert [r["try_number"] for r in store.read_history()] == [2, 1]


def test_a_source_error_that_quotes_a_dsn_with_its_password_is_recorded_without_it(
    sb: SandboxServer, tmp_path: Path
) -> None:
    """A DataFrame factory connecting with a mistyped DSN: the driver (libpq through psycopg2) quotes the whole DSN,
    password included, in its error's first line. Airflow masks its connections' passwords in the log only; the
    record is a file the StopChurn page shows."""
    psycopg2 = pytest.importorskip("psycopg2")
    password = "s3cr3t-Pw-4711"
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, sb, 0)

    def source() -> pd.DataFrame:
        psycopg2.connect(f"postgres+psycopg2://alice:{password}@127.0.0.1:1/shop")
        raise AssertionError("unreachable")

    with pytest.raises(psycopg2.ProgrammingError) as info:
        run(source, store, sb, 1, **try_of("r1", 1))
    assert password in str(info.value)  # the driver's own message does quote it
    entry = store.read_history(1)[0]
    assert (entry["status"], entry["error_type"]) == ("failed", "ProgrammingError")
    assert "alice" in entry["error"] and "127.0.0.1" in entry["error"]  # still says which DSN
    text = "".join(path.read_text() for path in history_folder(tmp_path).iterdir())
    assert password not in text


@pytest.mark.parametrize(
    "line",
    [
        "could not connect to mysql://root:hunter2-secret@db.internal:3306/shop",
        'missing "=" after "host=db.internal password=hunter2-secret user=x" in connection info string',
        "connection failed: host='db' password='hunter2-secret' dbname='shop'",
    ],
)
def test_first_line_takes_passwords_out_of_urls_and_key_value_dsns(line: str) -> None:
    from airflow_provider_stopchurn.store.history import first_line

    shown = first_line(RuntimeError(line + "\nsecond line"))
    assert "hunter2-secret" not in shown
    assert "db" in shown and "***" in shown


def test_runs_that_keep_failing_on_a_busy_lock_keep_the_history_bounded(sb: SandboxServer, tmp_path: Path) -> None:
    """A lock held for long (a run waiting on a slow source) while a minutely DAG fails at once on it, try after
    try: no run that holds the lock ends to prune, yet the history must stay bounded."""
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, sb, 0)
    store.history_limit = 3
    other = store.table_lock("a long run")
    other.acquire()
    try:
        for tick in range(1, 13):
            with pytest.raises(SnapshotLockedError):
                run(table(qty=tick), store, sb, tick, lock_wait_s=0, **try_of(f"r{tick}", 1))
        names = sorted(history_folder(tmp_path).iterdir())
    finally:
        other.release()
    assert len(names) <= 2 * store.history_limit
    # the newest failures are the ones kept
    assert store.read_history(1)[0]["run_id"] == "r12"


def history_text(root: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["history", str(root), "--brand", str(BRAND), "--table", TABLE])
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize(
    "newer",
    [
        {"approved_deletes": [{"run_id": "r9", "deletes": 3, "rows_before": 4}]},
        {"http_retries": {"timeouts": 1, "5xx": 2}},
        {"duration_s": "PT1.5S"},
    ],
    ids=["approvals-as-a-list", "retries-by-cause", "duration-as-text"],
)
def test_one_record_of_a_newer_version_does_not_hide_the_history(
    sb: SandboxServer, tmp_path: Path, newer: dict[str, Any]
) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, sb, 0, **try_of("r0", 1))
    written = store.read_history(1)[0]
    later = datetime.now(UTC) + timedelta(seconds=1)
    name = later.strftime("%Y%m%dT%H%M%S%fZ") + "-0b0b0b0b.json"
    (history_folder(tmp_path) / name).write_text(json.dumps({**written, "run_id": "r-newer", **newer}))
    code, text = history_text(tmp_path)
    assert code == 0, text
    assert len([line for line in text.splitlines() if "  sync  success" in line]) == 2


@pytest.mark.parametrize(
    "newer",
    [
        {"finished_at": 1_780_000_000_000},  # epoch milliseconds
        {"status": "failed", "error": "x", "never_sent": float("nan")},  # Python's json writes and reads NaN
        {"try_number": float("inf")},
    ],
    ids=["finished-in-epoch-ms", "nan-count", "infinite-try"],
)
def test_the_page_shows_a_store_whose_history_holds_a_record_of_a_newer_version(
    tmp_path: Path, newer: dict[str, Any]
) -> None:
    from airflow_provider_stopchurn.plugins.model import Run, SyncTask
    from airflow_provider_stopchurn.plugins.page import render_page
    from airflow_provider_stopchurn.plugins.stores import inspect_stores

    store = SnapshotStore(tmp_path, BRAND, TABLE)
    now = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
    base = {"kind": "sync", "status": "success", "dag_id": "nightly", "task_id": "sync", "run_id": "r1"}
    store.append_history({**base, "finished_at": now.isoformat(), "inserted": 3})
    store.append_history({**base, "finished_at": now.isoformat(), **newer})
    (state,) = inspect_stores({(store.location, BRAND, TABLE): tmp_path}).values()
    assert len(state.history) == 2 and state.history_error is None
    task = SyncTask("nightly", "sync", "StopChurnUpdateOperator", table_name=TABLE, brand_id=BRAND)
    run = Run("r1", now, "success", 1, None, brand_id=BRAND, table_name=TABLE, store_key=state.key)
    run.records = list(state.history)
    task.runs.append(run)
    task.stores, task.store = [state], state
    html = render_page([task], selected=None, airflow_base="/", user="ann", now=now)
    assert "History: the newest 2 records" in html


def test_a_run_stopped_by_airflows_execution_timeout_is_recorded(sb: SandboxServer, tmp_path: Path) -> None:
    """``execution_timeout`` stops a task with ``AirflowTaskTimeout``, a ``BaseException``: the run ends (the lock
    is released on the way out) and Airflow marks it failed, so its record must say so, not leave the page a
    "no record of this run" with the reason only in Airflow's log."""
    import time

    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import timeout

    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, sb, 0)

    def slow_source() -> pd.DataFrame:
        for _ in range(60):  # a query that takes longer than the task may run
            time.sleep(1)
        raise AssertionError("the timeout did not stop the run")

    with pytest.raises(AirflowTaskTimeout), timeout(1, "Timeout"):
        run(slow_source, store, sb, 1, **try_of("r1", 1))
    entry = store.read_history(1)[0]
    assert (entry["status"], entry["error_type"], entry["run_id"]) == ("failed", "AirflowTaskTimeout", "r1")
    assert entry["error"].startswith("Timeout")
    assert store.read_lock() is None


def test_an_event_retry_records_the_chunks_it_settled_of_its_earlier_try(sb: SandboxServer, tmp_path: Path) -> None:
    """Try 1 of an events run delivers 2 chunks, then StopChurn fails: try 2 settles those 2 (counted in
    ``events_sent``) and sends the rest. Its record's ``settled_chunks`` (what the page and ``stopchurn history``
    show as "settled from an earlier try") must be those 2, for events as for updates."""

    from helpers_sync import FailAfter

    from airflow_provider_stopchurn.events.engine import run_events
    from airflow_provider_stopchurn.events.ledger import event_store
    from airflow_provider_stopchurn.events.options import EventOptions
    from airflow_provider_stopchurn.exceptions import TransientDeliveryError
    from airflow_provider_stopchurn.sandbox import FaultConfig

    hour = pd.Timedelta(hours=1)
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    ids = np.arange(1, 21)
    frame = pd.DataFrame({"deposit_id": ids, "user_id": ids + 100, "created_at": [t0 + i * hour for i in range(20)]})
    store = event_store(tmp_path, BRAND, "deposits")
    now_ms = int((t0 + 100 * hour).timestamp() * 1000)

    def opts(number: int) -> EventOptions:
        return recorded_run_options(BRAND, number, max_concurrent_requests=1)

    with pytest.raises(TransientDeliveryError):
        run_events(frame, store, FailAfter(make_client(sb), sb, 2), opts(1), stream="deposits", now_ms=now_ms)
    sb.set_faults(FaultConfig())
    summary = run_events(frame, store, make_client(sb), opts(2), stream="deposits", now_ms=now_ms)
    assert summary.sent == 20 and summary.resumed_chunks == 3  # 2 of 5 chunks were acknowledged in try 1
    entry = store.read_history(1)[0]
    assert (entry["status"], entry["try_number"], entry["events_sent"]) == ("success", 2, 20)
    assert entry["settled_chunks"] == 2


def test_a_half_written_newest_record_does_not_empty_the_newest_n(sb: SandboxServer, tmp_path: Path) -> None:
    """A record file cut short (a copy of the store interrupted, a filesystem without atomic renames): the
    records before it are still the newest ones readable, for ``read_history(n)`` and ``stopchurn history -n``."""
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    for tick in range(3):
        run(table(qty=tick), store, sb, tick, **try_of(f"r{tick}", 1))
    later = datetime.now(UTC) + timedelta(seconds=1)
    (history_folder(tmp_path) / (later.strftime("%Y%m%dT%H%M%S%fZ") + "-0c0c0c0c.json")).write_text('{"kind": "sy')
    assert [r["run_id"] for r in store.read_history(2)] == ["r2", "r1"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["history", str(tmp_path), "--brand", str(BRAND), "--table", TABLE, "-n", "1"]) == 0
    assert "No runs recorded yet" not in out.getvalue() and "  sync  success" in out.getvalue()


def test_a_record_after_one_named_at_the_end_of_time_is_still_written(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    folder = history_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "99991231T235959999999Z-0d0d0d0d.json").write_text('{"kind": "sync", "run_id": "r-far"}')
    store.append_history({"kind": "sync", "run_id": "r-now"})
    assert sorted(r["run_id"] for r in store.read_history()) == ["r-far", "r-now"]
