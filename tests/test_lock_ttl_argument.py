"""``lock_ttl_s`` on the update operator: the lease of the table lock, which bounds how long a run killed on another
machine blocks the table (its process cannot be seen there, so only the lease's expiry frees the table).

The deployment test (``tests/test_deploy.py``) retries a killed try on a second machine with a short lease; these
check that the argument reaches the lock and is validated, through real runs (``dag.test()``) and the sandbox.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import run_dag

from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.sandbox import SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")

START = pendulum.datetime(2025, 1, 1, tz="UTC")
_dag_ids = itertools.count(1)


def run_with_ttl(root: Path, lock_ttl_s: Any) -> str:
    """One run with ``lock_ttl_s`` and no task retry; the task's state."""
    from airflow.utils.session import create_session

    frame = pd.DataFrame({"id": [1, 2, 3], "plan": ["free", "pro", "team"]})
    with DAG(f"lock_ttl_{next(_dag_ids)}", schedule=None, start_date=START, catchup=False) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name="account",
            dataframe=lambda: frame,
            snapshot_uri=str(root),
            lock_ttl_s=lock_ttl_s,
            retries=0,
            retry_delay=timedelta(0),
        )
    dagrun = run_dag(dag, logical_date=START)
    with create_session() as session:
        (ti,) = dagrun.get_task_instances(session=session)
        return str(ti.state)


def test_a_lease_too_short_for_a_request_is_refused_before_sending(
    stopchurn_conn: SandboxServer, tmp_path: Path
) -> None:
    """The client's default timeouts (10 s connect + 30 s read) cannot be fenced by a 5 s lease: nothing is sent."""
    assert run_with_ttl(tmp_path / "short", 5) == "failed"
    assert stopchurn_conn.stats()["requests"] == 0


def test_a_lease_long_enough_syncs(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    assert run_with_ttl(tmp_path / "long", 60) == "success"
    assert len(stopchurn_conn.rows(1, "account")) == 3


@pytest.mark.parametrize("value", [0, -1, True, "60", 86_401])
def test_sync_options_refuse_a_bad_lease(value: Any) -> None:
    with pytest.raises(StopChurnConfigError, match="lock_ttl_s must be"):
        SyncOptions(brand_id=1, table_name="account", lock_ttl_s=value)
