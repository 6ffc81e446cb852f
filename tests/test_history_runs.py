"""Every run that ends leaves a record in its store's history, failed ones included, with what the StopChurn page
and ``stopchurn history`` show: the error's first line, the try, what was settled from an earlier try, what a
stopped delivery left unsent apart from what it sent without an answer, an approved mass delete, and the counts of
event and export runs.

Real parts only: the sandbox StopChurn server on 127.0.0.1, real stores (local folders, ``memory://``), DuckDB for
the diff in the warehouse, and real stops: a worker process killed with SIGKILL, and a store that refuses every
write from the moment its sender dies (``dying_fs``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dying_fs import DieAfter, DyingMemoryFileSystem, Killed
from helpers_events import recorded_run_options
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    FailAfter,
    assert_sandbox_matches,
    deterministic_table,
    make_client,
    options,
    tree_digest,
)
from upath import UPath
from worker_harness import accepted_or_ended, reaped, start_worker

from airflow_provider_stopchurn import cli
from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.exceptions import (
    SafeguardError,
    SnapshotLockedError,
    SourceDataError,
    StopChurnAuthError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.options import RunInfo
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.store.history import record_refusal
from airflow_provider_stopchurn.update.sync import run_sync
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, WarehouseSource, run_warehouse_sync

TESTS = Path(__file__).resolve().parent
WORKER = "crash_worker.py"
KEY_VAR = "STOPCHURN_HISTORY_TEST_KEY"
N = 40


def table(qty: int = 0, n: int = N) -> pd.DataFrame:
    ids = np.arange(1, n + 1)
    return pd.DataFrame({"id": ids, "qty": ids * 0 + qty})


def try_of(run_id: str, number: int) -> dict[str, Any]:
    """The options an operator passes for one try of a DAG run."""
    return {"run_key": f"dag.task run {run_id} map -1", "run_info": RunInfo("dag", "task", run_id, number)}


def run(frame: Any, store: SnapshotStore, sender: Any, tick: int, **opts: Any) -> Any:
    opts.setdefault("chunk_size", 5)
    opts.setdefault("max_concurrent_requests", 1)
    return run_sync(frame, store, sender, options(**opts), run_ms=T0 + 1000 * tick)


def newest(store: SnapshotStore) -> dict[str, Any]:
    return store.read_history(1)[0]


def history_text(store: SnapshotStore, root: Any) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["history", str(root), "--brand", str(store.brand_id), "--table", store.table_name])
    assert code == 0
    return out.getvalue()


# --- item 7: every run that ends is recorded ------------------------------------------------------------------
def test_every_ending_is_recorded_with_its_first_error_line(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, make_client(sb), 0, **try_of("r0", 1))
    assert len(store.read_history()) == 1

    # nothing changed: a success, recorded; nothing but its record is written
    before = {k: v for k, v in tree_digest(tmp_path).items() if "/history/" not in k}
    run(table(), store, make_client(sb), 1, **try_of("r1", 1))
    assert {k: v for k, v in tree_digest(tmp_path).items() if "/history/" not in k} == before
    entry = newest(store)
    assert (entry["status"], entry["inserted"], entry["unchanged"], entry["chunks"]) == ("success", 0, N, 0)
    assert (entry["run_id"], entry["try_number"], entry["dag_id"], entry["task_id"]) == ("r1", 1, "dag", "task")

    failures: list[tuple[type[BaseException], Any]] = [
        # the mass-delete guard, before anything is sent
        (SafeguardError, lambda: run(table().head(5), store, make_client(sb), 2, **try_of("r2", 1))),
        # a source error: two rows with one key
        (SourceDataError, lambda: run(pd.concat([table(), table().head(1)]), store, make_client(sb), 3)),
        # a chunk StopChurn rejects (on_rejected_rows="fail")
        (StopChurnRejectedError, lambda: _rejected(sb, store)),
    ]
    for kind, failing in failures:
        with pytest.raises(kind) as info:
            failing()
        entry = newest(store)
        assert (entry["status"], entry["error_type"]) == ("failed", kind.__name__)
        assert entry["error"] == str(info.value).strip().splitlines()[0]
        assert entry["version"] == store.read_current()["version"]  # type: ignore[index]
    assert newest(store)["http_retries"] == 0 and "retries" not in newest(store)
    assert len(store.read_history()) == 5


def _rejected(sb: SandboxServer, store: SnapshotStore) -> None:
    sb.reject_ids({1})
    try:
        run(table(qty=3), store, make_client(sb), 4)
    finally:
        sb.reject_ids(set())


def test_a_refused_key_is_recorded_without_any_key(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, make_client(sb), 0)
    wrong = "sc_live_" + uuid.uuid4().hex  # sent in the request's header, refused with 401
    with pytest.raises(StopChurnAuthError):
        run(table(qty=1), store, make_client(sb, api_key=wrong), 1, **try_of("r1", 2))
    entry = newest(store)
    assert (entry["status"], entry["error_type"], entry["try_number"]) == ("failed", "StopChurnAuthError", 2)
    assert entry["error"]
    # StopChurn applied nothing of the refused chunk: it is counted as not sent, not as maybe applied
    assert (entry["never_sent"], entry["unacknowledged"]) == (N, 0)
    text = "".join(path.read_text() for path in (tmp_path / str(BRAND) / TABLE / "history").iterdir())
    assert wrong not in text and sb.token not in text and "Bearer" not in text
    assert wrong[8:] not in text


def test_a_busy_lock_is_recorded_and_nothing_else_of_the_store_is_touched(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    store.history_limit = 2  # an append that pruned would remove the oldest record
    for tick in range(2):
        run(table(qty=tick), store, make_client(sb), tick)
    other = store.table_lock("another run")
    other.acquire()
    try:
        before = tree_digest(tmp_path)
        with pytest.raises(SnapshotLockedError) as info:
            run(table(qty=9), store, make_client(sb), 5, lock_wait_s=0, **try_of("r5", 1))
        after = tree_digest(tmp_path)
    finally:
        other.release()
    added = set(after) - set(before)
    # one file more, its own record; the other run's lock, the snapshot and the older records are as they were
    assert len(added) == 1 and "/history/" in next(iter(added))
    assert {k: after[k] for k in before} == before
    entry = newest(store)
    assert (entry["status"], entry["error_type"]) == ("failed", "SnapshotLockedError")
    assert entry["error"] == str(info.value).splitlines()[0]
    assert entry["version"] is None and entry["rows"] is None  # the store was another run's: not read
    assert len(store.read_history()) == 3
    run(table(qty=9), store, make_client(sb), 6)  # the next run holding the lock prunes to the bound
    assert len(store.read_history()) == 2


def test_a_guard_refusal_is_recorded_only_in_a_store_that_exists(sb: SandboxServer, tmp_path: Path) -> None:
    from airflow_provider_stopchurn.operators.commit_guard import SnapshotLocationError

    opts = options(**try_of("r1", 1))
    missing = SnapshotStore(tmp_path / "elsewhere", BRAND, TABLE)
    record_refusal(missing, opts, "sync", SnapshotLocationError("This run's snapshot_uri is not the recorded one.\n"))
    assert not (tmp_path / "elsewhere").exists()  # no store is created where there is none

    store = SnapshotStore(tmp_path / "here", BRAND, TABLE)
    run(table(), store, make_client(sb), 0)
    record_refusal(store, opts, "sync", SnapshotLocationError("This run's snapshot_uri is not the recorded one.\nx"))
    entry = newest(store)
    assert (entry["status"], entry["error_type"], entry["run_id"]) == ("failed", "SnapshotLocationError", "r1")
    assert entry["error"] == "This run's snapshot_uri is not the recorded one."


def test_cli_history_shows_failed_runs_tries_settled_chunks_and_http_retries(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, make_client(sb), 0)
    with pytest.raises(SafeguardError) as info:
        run(table().head(5), store, make_client(sb), 1, **try_of("r1", 3))
    # a record written before the rename of `retries`, read as HTTP retries
    old = dict(newest(store), status="success", error=None, error_type=None, retries=7, try_number=None)
    del old["http_retries"]
    store.append_history(old)
    text = history_text(store, tmp_path)
    header, old_row, failed_row, *rest = text.splitlines()
    assert " retries" not in header.replace("http retries", "")

    def cell(row: str, name: str) -> str:  # columns are left-aligned under their header
        start = header.index(f"  {name}  ") + 2
        return row[start:].split("  ", maxsplit=1)[0].strip()

    assert (cell(old_row, "http retries"), cell(old_row, "try"), cell(old_row, "status")) == ("7", "-", "success")
    assert (cell(failed_row, "status"), cell(failed_row, "try"), cell(failed_row, "settled")) == ("failed", "3", "0")
    assert rest[0].strip() == f"error: {str(info.value).splitlines()[0]}"


# --- items 8 and 12: a killed try and its retry -----------------------------------------------------------------
def test_a_killed_try_and_its_retry_report_the_try_and_what_was_settled(
    stopchurn_sandbox_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows, chunk = 1200, 40
    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.01))
    root = tmp_path / "snapshots"
    key = "dag.task run r-kill map -1"
    proc = start_worker(WORKER, sb.url, KEY_VAR, root, 5, rows, chunk, key, 1, key_var=KEY_VAR, token=sb.token)
    with reaped(proc):
        reached = accepted_or_ended(sb, proc, 7)
        assert reached and proc.poll() is None, "the worker ended or stalled before the kill"
        proc.send_signal(signal.SIGKILL)
    store = SnapshotStore(root, BRAND, TABLE)
    assert store.read_history() == []  # a killed try records nothing: it is dead
    plan = store.pending_plan(cleanup=False)
    assert plan is not None
    acked = len(store.acks(plan))
    assert acked >= 6

    source = deterministic_table(5, rows)
    caplog.set_level(logging.INFO)
    summary = run_sync(
        source,
        store,
        make_client(sb),
        options(chunk_size=chunk, max_concurrent_requests=1, run_key=key, run_info=RunInfo("dag", "task", "r-kill", 2)),
        run_ms=T0,
    )
    assert_sandbox_matches(sb, source)
    assert (summary.try_number, summary.settled_chunks) == (2, acked)
    assert f"settled {acked} chunks from an earlier try" in caplog.text
    assert "(try 2)" in summary.line()
    # the table once: the rows the killed try delivered are inserted by the DAG run, not unchanged too
    assert summary.inserted + summary.updated + summary.deleted + summary.unchanged == rows
    assert (summary.inserted, summary.unchanged) == (rows, 0)
    # the settle of the killed try tells the one chunk it had in flight from those it never sent
    in_flight = chunk  # max_concurrent_requests=1
    never = rows - acked * chunk - in_flight
    assert (
        f"{in_flight} updates sent without an acknowledgement and {never} never sent (both sent again next run)"
        in caplog.text
    )
    assert "uncertain" not in caplog.text
    entry = newest(store)
    assert (entry["try_number"], entry["settled_chunks"], entry["run_id"]) == (2, acked, "r-kill")
    assert (entry["inserted"], entry["unchanged"], entry["status"]) == (rows, 0, "success")


@pytest.mark.usefixtures("revive")
def test_a_killed_try_in_the_warehouse_counts_the_table_once(sb: SandboxServer, tmp_path: Path) -> None:
    """The diff in the warehouse (DuckDB): the rows a killed try delivered are not counted again as unchanged."""
    import duckdb

    database = tmp_path / "wh.duckdb"
    rows = 60
    with duckdb.connect(str(database)) as con:
        con.register("frame_in", table(qty=1, n=rows))
        con.execute("CREATE TABLE src AS SELECT * FROM frame_in")
    name = f"stopchurn-history/{uuid.uuid4().hex}"

    def sync(store: SnapshotStore, sender: Any, number: int) -> Any:
        return run_warehouse_sync(
            WarehouseSource("SELECT * FROM src", DuckDBWarehouse(str(database))),
            store,
            sender,
            options(chunk_size=5, max_concurrent_requests=1, **try_of("r-wh", number)),
            run_ms=T0,
        )

    with pytest.raises(Killed):
        sync(SnapshotStore(UPath(f"dyingmem://{name}"), BRAND, TABLE), DieAfter(make_client(sb), 4), 1)
    DyingMemoryFileSystem.dead = False  # a new process, on the store the dead one left
    store = SnapshotStore(UPath(f"memory://{name}"), BRAND, TABLE)
    store.break_lock()  # the dead run's lock
    summary = sync(store, make_client(sb), 2)
    assert_sandbox_matches(sb, table(qty=1, n=rows))
    assert summary.settled_chunks == 4
    assert summary.inserted + summary.updated + summary.deleted + summary.unchanged == rows
    assert (summary.inserted, summary.unchanged) == (rows, 0)


def test_a_stopped_delivery_counts_never_sent_apart_from_unacknowledged(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, make_client(sb), 0)
    with pytest.raises(TransientDeliveryError):  # 3 chunks acknowledged, then StopChurn answers 500
        run(table(qty=1), store, FailAfter(make_client(sb), sb, 3), 1, **try_of("r1", 1))
    sb.set_faults(FaultConfig())
    entry = newest(store)
    # the fourth chunk was sent and not acknowledged (a 500 may follow a write); the four after it never left
    assert (entry["status"], entry["updated"], entry["unacknowledged"], entry["never_sent"]) == ("failed", 15, 5, 20)
    assert "not delivered: 5 updates sent without an acknowledgement, 20 never sent" in history_text(store, tmp_path)


# --- item 13: an approved mass delete ---------------------------------------------------------------------------
def test_an_approved_mass_delete_is_recorded(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    first = run(table(), store, make_client(sb), 0)
    assert first.approved_deletes is None and newest(store)["approved_deletes"] is None
    summary = run(table().head(10), store, make_client(sb), 1, allow_large_changes=True, **try_of("r-approve", 1))
    assert summary.deleted == N - 10
    approved = {"run_id": "r-approve", "deletes": N - 10, "rows_before": N}
    assert summary.approved_deletes == approved
    assert summary.as_dict()["approved_deletes"] == approved  # what the operator puts in XCom
    assert newest(store)["approved_deletes"] == approved
    assert f"mass delete approved by run r-approve: {N - 10} of {N} rows" in history_text(store, tmp_path)
    # a run that deletes little needs no approval: none recorded though the option is still set
    again = run(table().head(9), store, make_client(sb), 2, allow_large_changes=True)
    assert again.approved_deletes is None and newest(store)["approved_deletes"] is None


# --- item 10: events and export runs record their own counts ------------------------------------------------------
def test_event_runs_record_their_own_counts(sb: SandboxServer, tmp_path: Path) -> None:
    hour = pd.Timedelta(hours=1)
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    frame = pd.DataFrame(
        {
            "deposit_id": np.arange(1, 11),
            "user_id": np.arange(1, 11) + 100,
            "created_at": [t0 + i * hour for i in range(10)],
        }
    )
    store = event_store(tmp_path, BRAND, "deposits")
    opts = recorded_run_options(BRAND, 1)
    now_ms = int((t0 + 100 * hour).timestamp() * 1000)
    summary = run_events(
        pd.concat([frame, frame.head(2)]), store, make_client(sb), opts, stream="deposits", now_ms=now_ms
    )
    entry = newest(store)
    assert (entry["kind"], entry["status"], entry["try_number"]) == ("events", "success", 1)
    # the ledger keeps the keys of the lookback behind the watermark (07:00 to 09:00)
    assert (
        (entry["events_sent"], entry["duplicates"], entry["ledger_size"])
        == (10, 2, 3)
        == (
            summary.sent,
            summary.duplicates,
            summary.ledger_keys,
        )
    )
    assert entry["watermark"] == summary.watermark and entry["watermark"].startswith("2025-01-01T09:00")
    assert (entry["before_window"], entry["held_future"], entry["chunks"]) == (0, 0, 3)
    assert "inserted" not in entry  # not an update run's count
    with pytest.raises(StopChurnAuthError):
        later = frame.assign(deposit_id=frame["deposit_id"] + 100)  # new events, so a request is made
        run_events(later, store, make_client(sb, api_key="wrong-key"), opts, stream="deposits", now_ms=now_ms)
    failed = newest(store)
    assert (failed["kind"], failed["status"], failed["error_type"]) == ("events", "failed", "StopChurnAuthError")
    assert "events: 10 sent, 2 duplicates" in history_text(store, tmp_path / "events")


def test_export_runs_record_their_own_counts(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    opts = ExportOptions(brand_id=BRAND, table_name=TABLE, run_id="r1", run_info=RunInfo("dag", "export", "r1", 1))
    summary = run_export(table(), store, tmp_path / "export", opts, run_ms=T0)
    entry = newest(store)
    assert (entry["kind"], entry["status"], entry["run_id"]) == ("export", "success", "r1")
    assert (entry["rows_exported"], entry["files"], entry["bytes_exported"]) == (N, 1, summary.bytes)
    assert entry["bytes_exported"] > 0 and entry["version"] == summary.snapshot_version
    # the replace refusal is a safeguard: recorded as a failed export
    with pytest.raises(SafeguardError) as info:
        run_export(table(), store, tmp_path / "export", ExportOptions(brand_id=BRAND, table_name=TABLE), run_ms=T0)
    failed = newest(store)
    assert (failed["kind"], failed["status"]) == ("export", "failed")
    line = str(info.value).splitlines()[0]
    assert failed["error"] == (line if len(line) <= 500 else line[:497] + "...")  # a first line, bounded
