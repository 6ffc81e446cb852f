"""The operators write the DAG, task, DAG run and try into each run's history record, and the summary in XCom carries
the try and an approved mass delete: real DAG runs (``dag.test()``), a real metadata DB, the sandbox API."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from airflow.sdk import DAG, Param
from airflow_plugin import run_dag, task_states, xcom_return
from test_operator_e2e import START, new_dag_id, outage_then_retry_dag, run_ok, users_frame

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_a_failed_try_and_its_retry_are_both_recorded_with_their_try(
    stopchurn_sandbox: SandboxServer, airflow_conn: Callable[..., None], tmp_path: Path
) -> None:
    sandbox = stopchurn_sandbox
    dag, _ = outage_then_retry_dag(sandbox, airflow_conn, "history_retry", tmp_path / "snapshots")
    dagrun = run_dag(dag, logical_date=START)
    assert str(dagrun.state) == "success", task_states(dagrun)
    summary = xcom_return(dagrun, "sync")
    assert (summary["try_number"], summary["settled_chunks"], summary["inserted"]) == (2, 2, 50)

    retry, failed = SnapshotStore(tmp_path / "snapshots", 1, "account").read_history()  # newest first
    for entry in (retry, failed):
        assert (entry["dag_id"], entry["task_id"], entry["run_id"]) == (dag.dag_id, "sync", dagrun.run_id)
    assert (failed["status"], failed["try_number"], failed["error_type"]) == ("failed", 1, "TransientDeliveryError")
    assert failed["error"] and "\n" not in failed["error"]
    # chunk 3 was sent and not acknowledged; chunks 4 and 5 never left
    assert (failed["inserted"], failed["unacknowledged"], failed["never_sent"], failed["http_retries"]) == (
        20,
        10,
        20,
        1,
    )
    assert (retry["status"], retry["try_number"], retry["settled_chunks"]) == ("success", 2, 2)
    assert (retry["inserted"], retry["error"]) == (50, None)
    assert sandbox.token not in json.dumps([retry, failed])


def test_a_mass_delete_approved_in_the_trigger_dialog_is_in_the_summary_and_the_history(
    stopchurn_conn: SandboxServer, tmp_path: Path
) -> None:
    state = {"frame": users_frame(random.Random(3), 40)}
    with DAG(
        new_dag_id("history_approve"),
        schedule=None,
        start_date=START,
        catchup=False,
        params={"approve_mass_delete": Param(False, type="boolean")},
    ) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name="account",
            dataframe=lambda: state["frame"],
            snapshot_uri=str(tmp_path / "snapshots"),
            allow_large_changes="{{ params.approve_mass_delete }}",
        )
    assert run_ok(dag, 0)["approved_deletes"] is None
    state["frame"] = state["frame"].head(4)
    dagrun = run_dag(dag, logical_date=START.add(days=1), run_conf={"approve_mass_delete": True})
    assert str(dagrun.state) == "success", task_states(dagrun)
    approved = {"run_id": dagrun.run_id, "deletes": 36, "rows_before": 40}
    assert xcom_return(dagrun, "sync")["approved_deletes"] == approved
    assert SnapshotStore(tmp_path / "snapshots", 1, "account").read_history(1)[0]["approved_deletes"] == approved


def test_a_run_refused_for_another_store_location_is_recorded_only_where_a_store_exists(
    stopchurn_conn: SandboxServer, tmp_path: Path
) -> None:
    """SnapshotLocationError: the snapshot_uri named is not the table's recorded store. The refusal is recorded in
    the store named when it holds a snapshot (the StopChurn page reads it), and never creates one."""
    import shutil

    frame = users_frame(random.Random(4), 10)
    first, second = tmp_path / "first", tmp_path / "second"

    def dag_at(root: Path) -> DAG:
        with DAG(new_dag_id("history_moved"), schedule=None, start_date=START, catchup=False) as dag:
            StopChurnUpdateOperator(
                task_id="sync", table_name="account", dataframe=lambda: frame, snapshot_uri=str(root)
            )
        return dag

    run_ok(dag_at(first), 0)
    refused = run_dag(dag_at(second), logical_date=START.add(days=1))
    assert str(refused.state) == "failed"
    assert not second.exists()  # no store (nor history) where there was none
    shutil.copytree(first, second)  # a copy, not moved on purpose (no move_store_from): still refused
    dag = dag_at(second)
    refused = run_dag(dag, logical_date=START.add(days=2))
    assert str(refused.state) == "failed"
    entry = SnapshotStore(second, 1, "account").read_history(1)[0]
    assert (entry["status"], entry["error_type"], entry["kind"]) == ("failed", "SnapshotLocationError", "sync")
    assert (entry["dag_id"], entry["run_id"], entry["try_number"]) == (dag.dag_id, refused.run_id, 1)
    assert len(SnapshotStore(first, 1, "account").read_history()) == 1  # the recorded store is not touched
