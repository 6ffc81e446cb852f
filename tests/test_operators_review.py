"""The event and export operators with a lock wait, default retries and a 15-minute lease, tried where they may break.

* A run that waited for the lock reads its clock when it has the lock: a clock read before the wait may be
  minutes behind a watermark another run committed meanwhile, and the events of that span would be sent again.
* An export try that lost its lease (paused past it, a zombie) writes nothing more into the folder its retry
  wrote: the folder is named after the DAG run, the same for every try.
* Two DAGs whose runs have the same run id (the same schedule) export the same table to the same output into two
  folders, never one.
* ``replace_snapshot`` rendered from a param: every false spelling never replaces; a value that is neither true
  nor false is refused naming it.

Real parts only: the sandbox API, real stores on disk, real processes paused with SIGSTOP, real DAG runs.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pendulum
import polars as pl
import pytest
from helpers_sync import BRAND, T0, make_client, wait_until
from ops_review_worker import EXPORT_TABLE, STREAM, event_options, export_frame
from worker_harness import start_worker

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore

WORKER = "ops_review_worker.py"
KEY_VAR = "STOPCHURN_OPS_REVIEW_TEST_KEY"
START = pendulum.datetime(2025, 1, 1, tz="UTC")


def _start(args: list[str], stderr: Any, sb: SandboxServer | None = None) -> subprocess.Popen[str]:
    return start_worker(WORKER, *args, key_var=KEY_VAR, token=None if sb is None else sb.token, stderr=stderr)


def _outcome(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert lines, out
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- events: the clock of a run that waited ---------------------------------------------------------------------
def test_an_events_run_that_waited_for_the_lock_does_not_resend_what_a_later_run_delivered(
    stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """Run B waits for the stream's lock; meanwhile a run C that started later takes it first (B polls with a
    growing pause) and delivers ten events, its watermark after B's clock minus a minute. When B then gets the
    lock it must judge the committed watermark by the time it got the lock: with the clock it read before waiting,
    the watermark looks "after the run's clock", B reads from its old clock and sends again the events the ledger
    had already pruned."""
    sb = stopchurn_sandbox_factory(record=True)
    root = tmp_path / "state"
    rows_path = tmp_path / "rows.parquet"
    store = event_store(root, BRAND, STREAM)
    holder = store.table_lock("first-run", ttl_s=120)
    holder.acquire()
    err_path = tmp_path / "waiting-run.err"
    with err_path.open("w") as err_file:
        proc = _start(["events", sb.url, KEY_VAR, str(root), str(rows_path)], err_file, sb)
    try:
        assert wait_until(lambda: "lock_wait_s" in err_path.read_text() or proc.poll() is not None, 120, 0.05)
        seen = time.time()  # B read its clock before it said it waits
        assert proc.poll() is None, (proc.communicate(timeout=10), err_path.read_text())
        proc.send_signal(signal.SIGSTOP)  # B between two polls; C comes first
        holder.release()
        base_ms = int(seen * 1000) - 60_000
        # five events a second after B's clock minus a minute, five a second later: C's watermark is the later
        # second, and C's ledger keeps only the keys at or after it (no lookback)
        rows = pl.DataFrame(
            {
                "id": list(range(1, 11)),
                "user_id": [f"u{i}" for i in range(1, 11)],
                "at": [base_ms + 1_000] * 5 + [base_ms + 2_000] * 5,
            }
        )
        rows.write_parquet(rows_path)
        assert wait_until(lambda: time.time() >= seen + 2.5, 10)  # C's clock minus a minute passes both seconds
        later = run_events(rows, store, make_client(sb), event_options("later-run", lock_wait_s=0), stream=STREAM)
        assert later.sent == 10
        assert wait_until(lambda: time.time() >= seen + 3.0, 10)  # B takes the lock after this
    finally:
        proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err_path.read_text())
    waited = _outcome(out)
    assert Counter(e["userId"] for e in sb.events(BRAND)) == {f"u{i}": 1 for i in range(1, 11)}, waited
    assert waited["sent"] == 0


# --- export: a zombie try and its retry -------------------------------------------------------------------------
def test_an_export_try_that_lost_its_lease_leaves_its_retrys_folder_whole(tmp_path: Path) -> None:
    """A try is paused (SIGSTOP) while it reads the source, past its lease; the retry of the same DAG run breaks
    the expired lease, writes the run's folder (the same name for every try) with its manifest and commits. When
    the paused try wakes it must stop before it writes a file: else it removes the retry's manifest and rewrites
    the part files, and the folder no longer matches the committed baseline."""
    root, output, go = tmp_path / "snapshots", tmp_path / "exports", tmp_path / "go"
    run_id = "manual__2026-12-07T00:52:12.345678+00:00"
    run_key = f"onboarding.export run {run_id} map -1"
    store = SnapshotStore(root, BRAND, EXPORT_TABLE)
    with (tmp_path / "zombie.err").open("w") as err_file:
        proc = _start(["export", str(root), str(output), run_id, run_key, str(go), "3"], err_file)
    try:
        assert wait_until(lambda: Path(f"{go}.reading").exists() or proc.poll() is not None, 120, 0.05)
        assert proc.poll() is None, proc.communicate(timeout=10)
        proc.send_signal(signal.SIGSTOP)
        assert wait_until(lambda: float((store.read_lock() or {}).get("expires_at", 0)) < time.time(), 30, 0.05)
        retry = ExportOptions(
            brand_id=BRAND, table_name=EXPORT_TABLE, run_id=run_id, run_key=run_key, holder="retry", lock_wait_s=0
        )
        summary = run_export(export_frame(), store, output, retry, run_ms=T0 + 1)
        go.write_text("go")
    finally:
        proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, (tmp_path / "zombie.err").read_text())
    assert _outcome(out)["error"] == "SnapshotLockedError", out
    folder = Path(summary.output_uri)
    assert (folder / "manifest.json").exists(), sorted(p.name for p in folder.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert hashlib.sha256((folder / entry["name"]).read_bytes()).hexdigest() == entry["sha256"], entry
    committed = store.read_committed()
    assert committed is not None and committed.version == summary.snapshot_version


# --- export folders of two DAGs ---------------------------------------------------------------------------------
@pytest.mark.usefixtures("airflow_db")
def test_two_dags_exporting_one_table_to_one_output_never_share_a_folder(tmp_path: Path) -> None:
    """Two DAGs whose runs have the same run id (the same schedule; here the same manual run time) export one
    table to one store and one output, the second replacing the first's baseline on purpose. The second must not
    write over the first's files and manifest (a person may be uploading them): each DAG run its own folder."""
    from airflow.sdk import DAG
    from airflow_plugin import run_dag, task_states, xcom_return

    from airflow_provider_stopchurn.operators.stopchurn import StopChurnHistoricalExportOperator

    output = tmp_path / "exports"
    summaries = []
    for number, rows in ((1, 10), (2, 4)):
        frame = pl.DataFrame({"id": list(range(1, rows + 1)), "email": [f"u{i}@example.com" for i in range(rows)]})
        with DAG(f"ops_review_export_{number}", schedule=None, start_date=START, catchup=False) as dag:
            StopChurnHistoricalExportOperator(
                task_id="export",
                table_name=EXPORT_TABLE,
                brand_id=BRAND,
                dataframe=frame.to_pandas(),
                output_uri=str(output),
                snapshot_uri=str(tmp_path / "snapshots"),
                replace_snapshot=number == 2,
                retries=0,
            )
        dagrun = run_dag(dag, logical_date=START, run_after=START)
        assert str(dagrun.state) == "success", task_states(dagrun)
        summaries.append((dagrun.run_id, xcom_return(dagrun, "export")))
    (first_run, first), (second_run, second) = summaries
    assert first_run == second_run
    assert first["output_uri"] != second["output_uri"]
    manifest = json.loads((Path(first["output_uri"]) / "manifest.json").read_text())
    assert manifest["rows"] == 10


# --- replace_snapshot from a param ------------------------------------------------------------------------------
@pytest.mark.usefixtures("airflow_db")
def test_replace_snapshot_rendered_false_never_replaces_and_a_bad_value_is_refused_naming_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``replace_snapshot="{{ params.replace }}"``: a string param may render "False", "false", "0", "" or
    "None", none of which replaces; "yes please" is neither true nor false and fails naming the argument and
    the value (permanently: a retry would render it the same)."""
    from airflow.sdk import DAG, Param
    from airflow_plugin import run_dag, task_states

    from airflow_provider_stopchurn.operators.stopchurn import StopChurnHistoricalExportOperator

    frame = pl.DataFrame({"id": [1, 2, 3], "email": ["a@example.com", "b@example.com", "c@example.com"]})
    snapshots = tmp_path / "snapshots"
    with DAG(
        "ops_review_replace_param",
        schedule=None,
        start_date=START,
        catchup=False,
        params={"replace": Param("False", type="string")},
    ) as dag:
        StopChurnHistoricalExportOperator(
            task_id="export",
            table_name=EXPORT_TABLE,
            brand_id=BRAND,
            dataframe=frame.to_pandas(),
            output_uri=str(tmp_path / "exports"),
            snapshot_uri=str(snapshots),
            replace_snapshot="{{ params.replace }}",
            retries=0,
        )
    first = run_dag(dag, logical_date=START)
    assert str(first.state) == "success", task_states(first)
    store = SnapshotStore(snapshots, BRAND, EXPORT_TABLE)
    committed = store.read_committed()
    assert committed is not None
    for day, value in enumerate(["False", "false", "0", "", "None"], start=1):
        capfd.readouterr()
        dagrun = run_dag(dag, logical_date=START.add(days=day), run_conf={"replace": value})
        assert str(dagrun.state) == "failed", (value, task_states(dagrun))
        assert "Export refused" in capfd.readouterr().out, value
        latest = store.read_committed()
        assert latest is not None and latest.version == committed.version, value  # never replaced
    capfd.readouterr()
    dagrun = run_dag(dag, logical_date=START.add(days=9), run_conf={"replace": "yes please"})
    assert str(dagrun.state) == "failed", task_states(dagrun)
    printed = capfd.readouterr().out
    assert "AirflowFailException" in printed and "replace_snapshot must be true or false, got 'yes please'" in printed
    latest = store.read_committed()
    assert latest is not None and latest.version == committed.version


def test_the_export_folder_is_one_per_task_run_and_the_same_for_each_of_its_tries() -> None:
    """The folder's hash covers the DAG, task, run id and map index (the run key), never the try."""
    from airflow_provider_stopchurn.export.folder import export_folder_name

    run_id = "scheduled__2026-12-07T00:00:00+00:00"
    key = f"onboarding.export run {run_id} map -1"
    folder = export_folder_name(run_id, key=key)
    assert folder.startswith("20261207T000000Z-scheduled-")
    assert export_folder_name(run_id, key=key) == folder  # every try
    others = {
        export_folder_name(run_id, key=f"other_dag.export run {run_id} map -1"),
        export_folder_name(run_id, key=f"onboarding.export run {run_id} map 1"),
    }
    assert folder not in others and len(others) == 2
    assert export_folder_name("my custom run").startswith("my-custom-run-")  # a run id without a time
