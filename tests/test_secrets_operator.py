"""The API key never leaves the connection: real DAG runs (``dag.test()``), every logger at DEBUG.

A recognisable key is used for a successful sync, a sync StopChurn rejects (400), a 5xx outage and a refused
key (401). After each run the key must appear in no captured log record, nothing the process printed, no XCom,
no file under the snapshot root, no asset event's extra and no OpenLineage facet.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import point_stopchurn_default, run_dag, xcom_return
from leak_scan import Captured
from leak_scan import files_text as _files_text
from operator_fixtures import sandbox_fixture

from airflow_provider_stopchurn.hooks.assets import stopchurn_asset
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")

KEY = "sk-OPERATOR-LEAKCHECK-5f4e3d2c1b"
_ids = itertools.count(1)


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"id": range(n), "name": [f"name {i}" for i in range(n)]})


def _dag(snapshot_root: Path, frame: pd.DataFrame) -> DAG:
    with DAG(f"secrets_operator_{next(_ids)}", schedule=None, start_date=pendulum.datetime(2025, 1, 1)) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name="account",
            dataframe=frame,
            snapshot_uri=str(snapshot_root),
            chunk_size=10,
            retries=1,  # a retryable failure (the outage) runs a second try, at once
            retry_delay=timedelta(0),
            outlets=[stopchurn_asset(3, "account")],
        )
    return dag


sandbox = sandbox_fixture(3, token=KEY, max_retries=1, timeout=5)


@pytest.mark.parametrize("path", ["success", "rejected", "outage", "wrong_key"])
def test_key_never_appears_in_logs_xcom_or_files(
    path: str, sandbox: SandboxServer, airflow_conn: Callable[..., None], tmp_path: Path, captured: Captured
) -> None:
    root = tmp_path / "snapshots"
    frame = _frame(40)
    if path == "rejected":
        sandbox.reject_ids({"7"})
    elif path == "outage":
        sandbox.set_faults(FaultConfig(seed=1, error_rate=1.0))
    elif path == "wrong_key":
        # the connection now holds a different recognisable key, which the sandbox refuses
        point_stopchurn_default(airflow_conn, sandbox, 3, password=KEY + "-old")
    captured.start()
    dag = _dag(root, frame)
    dagrun = run_dag(dag)

    expected_state = "success" if path == "success" else "failed"
    assert str(dagrun.state) == expected_state
    if path == "success":
        assert len(sandbox.rows(3, "account")) == 40
    else:
        stats = sandbox.stats()  # the failure really happened at StopChurn's side
        assert stats["unauthorized"] == 1 if path == "wrong_key" else stats["requests"] >= 1, stats  # 401: one request

    extras = _asset_event_extras(dagrun)
    assert ('"inserted": 40' in extras) == (path == "success")  # the success run's event carries its counts
    lineage = _lineage_after_a_direct_run(dag.task_dict["sync"])
    printed = captured.printed()
    records = captured.records()
    summary = json.dumps(xcom_return(dagrun, "sync"), default=str)
    assert records  # something was logged at all, so the scan is not vacuous
    for where, text in {
        "log records": records,
        "stdout": printed.out,
        "stderr": printed.err,
        "xcom": summary,
        "snapshot files": _files_text(root) if root.exists() else "",
        "asset event extras": extras,
        "OpenLineage facets": lineage,
    }.items():
        assert KEY not in text, f"the API key leaked into {where}"


def _asset_event_extras(dagrun: Any) -> str:
    """The extras of the asset events this DAG run emitted."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(AssetEvent.extra).where(
            AssetEvent.source_dag_id == dagrun.dag_id, AssetEvent.source_run_id == dagrun.run_id
        )
        return json.dumps([dict(e) for e in session.scalars(query)])


def _lineage_after_a_direct_run(op: StopChurnUpdateOperator) -> str:
    """The operator's OpenLineage metadata, serialized as OpenLineage sends it, after one more run of it."""
    from openlineage.client.serde import Serde

    try:
        op.execute({"run_id": "manual__secrets", "ti": None})
        lineage = op.get_openlineage_facets_on_complete(None)
    except Exception:
        lineage = op.get_openlineage_facets_on_failure(None)
    parts = [*lineage.inputs, *lineage.outputs, *lineage.run_facets.values(), *lineage.job_facets.values()]
    assert lineage.outputs, "the scan must not be vacuous"
    return json.dumps([Serde.to_dict(p) for p in parts])
