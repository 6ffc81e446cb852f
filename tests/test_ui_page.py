"""The StopChurn page and the StopChurn connection form in the real Airflow UI, driven by a real browser.

The module runs a few real syncs first (``dag.test()`` against the sandbox, in the test session's AIRFLOW_HOME):

* ``ui_page_users``: three runs of table ``uiUser`` (a first load, a day of changes, a day with a row StopChurn
  rejects: quarantined); its store's lock is then held by a person, as during a manual repair;
* ``ui_page_accounts``: a run StopChurn stops halfway (a row refused with ``on_rejected_rows="fail"``), which
  leaves a pending plan with two of its four chunks acknowledged;
* ``ui_private_secrets``: one run, in a DAG that user ``outsider`` may not read (``ui_auth_manager``).

Then it starts ``airflow api-server`` on 127.0.0.1 against that database (simple auth manager, the users' passwords
in the generated password file of AIRFLOW_HOME, connection testing enabled) and a headless Chromium
(``ui_plugin``), logs in through the login form, and checks the page, the chart, the stores, the auth filtering,
the connection form and its Test button. Screenshots go to ``.artifacts/ui/`` (paths printed).
``STOPCHURN_UPDATE_DOCS_SCREENSHOT=1`` also refreshes the README's screenshot, ``docs/stopchurn-page.png``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import run_dag, task_states, xcom_return
from helpers_sync import BRAND, TABLE, deterministic_table, wait_until
from ui_plugin import TESTS

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.snapshot import SnapshotStore

pytestmark = [pytest.mark.usefixtures("airflow_db"), pytest.mark.browser]

START = pendulum.datetime(2025, 3, 1, tz="UTC")
TOKEN = "ui-test-key"
CONN_ID = "stopchurn_ui_test"
USERS_DAG, USERS_TASK, USERS_TABLE = "ui_page_users", "sync_users", "uiUser"
ACCOUNTS_DAG, ACCOUNTS_TASK, ACCOUNTS_TABLE = "ui_page_accounts", "sync_accounts", TABLE
PRIVATE_DAG, PRIVATE_TASK, PRIVATE_TABLE = "ui_private_secrets", "sync_secrets", "uiSecret"
CRASH_WORKER = TESTS / "crash_worker.py"
CRASH_HOLDER = "crash-worker"  # the holder crash_worker.py names
KEY_VAR = "STOPCHURN_UI_TEST_KEY"
#: What the three runs of ui_page_users send: (inserted, updated, deleted, rejected).
USERS_COUNTS = [(30, 0, 0, 0), (3, 5, 2, 0), (3, 2, 0, 1)]
REJECTED_USER = 107
DOCS_SCREENSHOT = TESTS.parent / "docs" / "stopchurn-page.png"
TIMEOUT_MS = 30_000


def users(ids: range | list[int], plan: str = "free") -> pd.DataFrame:
    ids = list(ids)
    return pd.DataFrame(
        {
            "id": ids,
            "email": [f"user{i}@example.com" for i in ids],
            "plan": [plan] * len(ids),
            "seats": [1 + i % 5 for i in ids],
        }
    )


@dataclass
class Syncs:
    """What the module's DAG runs left: their summaries, the stores, the sandbox."""

    sandbox: SandboxServer
    snapshots: Path
    summaries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    states: dict[str, list[str]] = field(default_factory=dict)

    def store(self, table: str) -> SnapshotStore:
        return SnapshotStore(self.snapshots, BRAND, table)


def sync_dag(dag_id: str, task_id: str, table: str, source: Any, snapshots: Path, **kwargs: Any) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START, catchup=False) as dag:
        StopChurnUpdateOperator(
            task_id=task_id,
            table_name=table,
            brand_id=BRAND,
            dataframe=source,
            stopchurn_conn_id=CONN_ID,
            snapshot_uri=str(snapshots),
            retries=0,
            **kwargs,
        )
    return dag


def run(syncs: Syncs, dag: DAG, task_id: str, day: int) -> None:
    dagrun = run_dag(dag, logical_date=START.add(days=day))
    syncs.states.setdefault(dag.dag_id, []).append(str(dagrun.state))
    summary = xcom_return(dagrun, task_id)
    if summary is not None:
        syncs.summaries.setdefault(dag.dag_id, []).append(summary)
    else:
        assert str(dagrun.state) == "failed", task_states(dagrun)


def kill_mid_delivery(sandbox: SandboxServer, snapshots: Path) -> None:
    """Run crash_worker.py (another table content, 20 chunks) against the accounts store and SIGKILL it once
    StopChurn acknowledged three chunks."""
    sandbox.set_faults(FaultConfig(latency=0.2))
    accepted = sandbox.stats()["accepted_requests"]
    proc = subprocess.Popen(
        [sys.executable, str(CRASH_WORKER), sandbox.url, KEY_VAR, str(snapshots), "2", "200", "10"],
        env={**os.environ, KEY_VAR: TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=TESTS,
    )
    try:
        progressed = wait_until(
            lambda: sandbox.stats()["accepted_requests"] >= accepted + 3 or proc.poll() is not None, timeout_s=60
        )
        assert progressed and proc.poll() is None, "the worker ended, or made no progress within 60 s"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        sandbox.set_faults(FaultConfig())
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def syncs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Syncs]:
    snapshots = tmp_path_factory.mktemp("ui-snapshots")
    with SandboxServer(token=TOKEN) as sandbox, pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            f"AIRFLOW_CONN_{CONN_ID.upper()}",
            json.dumps({"conn_type": "stopchurn", "host": sandbox.url, "password": TOKEN}),
        )
        result = Syncs(sandbox, snapshots)

        # ui_page_users: a first load, a day of changes, a day with a rejected row
        frame = {"now": users(range(1, 31))}
        dag = sync_dag(
            USERS_DAG, USERS_TASK, USERS_TABLE, lambda: frame["now"].copy(), snapshots, on_rejected_rows="quarantine"
        )
        run(result, dag, USERS_TASK, 0)
        day2 = frame["now"][~frame["now"]["id"].isin([29, 30])].copy()
        day2.loc[day2["id"].isin([1, 2, 3, 4, 5]), "plan"] = "pro"
        frame["now"] = pd.concat([day2, users([101, 102, 103])], ignore_index=True)
        run(result, dag, USERS_TASK, 1)
        day3 = frame["now"].copy()
        day3.loc[day3["id"].isin([6, 7]), "plan"] = "team"
        frame["now"] = pd.concat([day3, users([105, 106, REJECTED_USER, 108])], ignore_index=True)
        sandbox.reject_ids([REJECTED_USER])
        run(result, dag, USERS_TASK, 2)
        sandbox.reject_ids([])

        # ui_page_accounts: a first load, then a run StopChurn stops (a refused row, on_rejected_rows="fail")
        accounts_frame = {"now": deterministic_table(1, 200)}
        accounts = sync_dag(
            ACCOUNTS_DAG,
            ACCOUNTS_TASK,
            ACCOUNTS_TABLE,
            lambda: accounts_frame["now"].copy(),
            snapshots,
            chunk_size=5,
            max_concurrent_requests=1,
            on_rejected_rows="fail",
        )
        run(result, accounts, ACCOUNTS_TASK, 0)
        changed = accounts_frame["now"].copy()
        changed.loc[changed["id"] < 20, "qty"] += 1
        accounts_frame["now"] = changed
        sandbox.reject_ids([12])
        run(result, accounts, ACCOUNTS_TASK, 1)
        sandbox.reject_ids([])
        # ... and a worker killed mid-delivery (SIGKILL): its pending plan and its lock stay in the store
        kill_mid_delivery(sandbox, snapshots)

        # ui_private_secrets: a DAG that RESTRICTED_USER may not read
        private = sync_dag(PRIVATE_DAG, PRIVATE_TASK, PRIVATE_TABLE, lambda: users(range(1, 6)), snapshots)
        run(result, private, PRIVATE_TASK, 0)

        yield result


def test_the_runs_left_what_the_page_must_show(syncs: Syncs) -> None:
    counts = [(s["inserted"], s["updated"], s["deleted"], s["quarantined"]) for s in syncs.summaries[USERS_DAG]]
    assert counts == USERS_COUNTS
    assert syncs.states[ACCOUNTS_DAG] == ["success", "failed"]
    accounts = syncs.store(ACCOUNTS_TABLE)
    plan = accounts.pending_plan(cleanup=False)
    assert plan is not None and len(plan.chunks) == 20
    assert 2 <= len(accounts.acked(plan)) <= 4
    assert accounts.read_lock()["holder"] == CRASH_HOLDER
    assert [r["id"] for r in syncs.store(USERS_TABLE).read_quarantine()] == [REJECTED_USER]
    assert syncs.store(USERS_TABLE).read_lock() is None
