"""A real multi-worker deployment, end to end: Airflow's CeleryExecutor with two workers, each with its own
``AIRFLOW_HOME`` (its own local disk), PostgreSQL as the metadata database, Redis as the broker, snapshots on an
S3 server (moto), and the StopChurn sandbox (``tests/deploy_harness.py`` starts and stops them all).

Marked ``deploy``: excluded from ``make test``, run by ``make test-deploy``. Without redis-server (or PostgreSQL's
binaries) the tests skip, unless ``STOPCHURN_REQUIRE_DEPLOY=1`` (CI): then they fail.

Each scenario has its own DAG file and table. Which worker runs a try is decided by Celery queues: a scenario's
queue is moved from one worker to the other (``Deployment.route``) between tries or runs. Where namespaces are
allowed (root), worker 2 runs as a second machine (its own host name, its own disk at worker 1's AIRFLOW_HOME
path); the scenarios assert what each layout implies (``Deployment.separate_hosts``).
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_harness import BRAND, Deployment, DeployUnavailable, running_deployment, wait_for
from pg_server import PostgresUnavailable

from airflow_provider_stopchurn.sandbox import FaultConfig

pytestmark = pytest.mark.deploy

REQUIRE_ENV = "STOPCHURN_REQUIRE_DEPLOY"

SNAPSHOTS_S3 = "s3://stopchurn-snapshots/deploy"

# (a): 3,000 rows in chunks of 100, two requests in flight at most
A_ROWS, A_CHUNK, A_CONCURRENT = 3000, 100, 2
A_LOCK_TTL = 30
# (c): 1,500 rows in chunks of 100, one request at a time per run (so any overlap would be between the runs)
C_ROWS, C_CHUNK = 1500, 100

_DAG_TEMPLATE = '''\
"""Written by tests/test_deploy.py."""
import os
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pendulum
from airflow.sdk import DAG

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator

SHARED = Path(os.environ["STOPCHURN_DEPLOY_SHARED"])
if {snapshot_uri!r}.startswith("s3://"):
    # the amazon provider (which registers s3:// for ObjectStoragePath) is not installed here: attach s3fs itself
    import s3fs
    from airflow.sdk.io import attach

    attach("s3", fs=s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]))


def source(context):
    """The table; a marker (this process's pid) tells the test which try read it, and where."""
    ti = context["ti"]
    marker = SHARED / f"{{ti.dag_id}}__{{context['run_id']}}__{{ti.try_number}}.pid"
    marker.write_text(str(os.getpid()))
    ids = list(range(1, {rows} + 1))
    return pd.DataFrame(
        {{"id": ids, "plan": [f"plan-{{i % 7}}" for i in ids], "score": [i * 3 for i in ids], "source": {tag!r}}}
    )


with DAG(
    {dag_id!r},
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
):
    StopChurnUpdateOperator(
        task_id="sync",
        table_name={table!r},
        dataframe=source,
        stopchurn_conn_id={conn!r},
        snapshot_uri={snapshot_uri!r},
        queue={queue!r},
        chunk_size={chunk},
        max_concurrent_requests={concurrent},
        lock_wait_s=120,
        lock_ttl_s={ttl},
        retries=1,
        retry_delay=timedelta(seconds=2),
    )
'''

DAGS: dict[str, dict[str, Any]] = {
    "deploy_a": dict(
        table="a_accounts",
        queue="scen_a",
        rows=A_ROWS,
        chunk=A_CHUNK,
        concurrent=A_CONCURRENT,
        snapshot_uri=SNAPSHOTS_S3,
        tag="a",
        # a short lease, so that a retry on another host finds the killed try's lock expired within the test
        # (short request timeouts on this connection, so that the lease can still fence every request)
        conn="stopchurn_short",
        ttl=A_LOCK_TTL,
    ),
    "deploy_b": dict(table="b_accounts", queue="scen_b", rows=50, chunk=100, concurrent=1, snapshot_uri="", tag="b"),
    "deploy_c_w1": dict(
        table="c_accounts", queue="w1", rows=C_ROWS, chunk=C_CHUNK, concurrent=1, snapshot_uri=SNAPSHOTS_S3, tag="c_w1"
    ),
    "deploy_c_w2": dict(
        table="c_accounts", queue="w2", rows=C_ROWS, chunk=C_CHUNK, concurrent=1, snapshot_uri=SNAPSHOTS_S3, tag="c_w2"
    ),
}


def write_dags(folder: Path) -> None:
    for dag_id, spec in DAGS.items():
        spec = {"conn": "stopchurn_default", "ttl": 3600, **spec}
        (folder / f"{dag_id}.py").write_text(_DAG_TEMPLATE.format(dag_id=dag_id, **spec))


def expected_rows(dag_id: str) -> list[dict[str, Any]]:
    spec = DAGS[dag_id]
    return [
        {"id": i, "plan": f"plan-{i % 7}", "score": i * 3, "source": spec["tag"]} for i in range(1, spec["rows"] + 1)
    ]


def stopchurn_rows(deploy: Deployment, table: str) -> list[dict[str, Any]]:
    return [{k: row[k] for k in ("id", "plan", "score", "source")} for row in deploy.sandbox.rows(BRAND, table)]


@pytest.fixture(scope="module")
def deploy() -> Iterator[Deployment]:
    try:
        with running_deployment(write_dags) as deployment:
            for dag_id in DAGS:
                deployment.wait_dag(dag_id)
            yield deployment
    except (DeployUnavailable, PostgresUnavailable) as err:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but the deployment cannot run: {err}", pytrace=False)
        pytest.skip(f"deployment unavailable: {err}")


def marker(deploy: Deployment, dag_id: str, run_id: str, try_number: int) -> Path:
    return deploy.shared / f"{dag_id}__{run_id}__{try_number}.pid"


def log_text(path: Path | None) -> str:
    return path.read_text(errors="replace") if path is not None else ""


# --- (a) a try killed mid-delivery is retried on the other worker and settles from the shared store ------------
def test_killed_try_is_retried_on_the_other_worker_and_settles_from_s3(deploy: Deployment) -> None:
    dag_id, run_id, table = "deploy_a", "a1", DAGS["deploy_a"]["table"]
    deploy.route("scen_a", "w1")
    deploy.sandbox.set_faults(FaultConfig(latency=1.0))  # a slow StopChurn: the delivery would take 15 s
    before = deploy.sandbox.stats()["accepted_requests"]
    deploy.trigger(dag_id, run_id)
    pid = int(wait_for("try 1 to read its source", lambda: marker(deploy, dag_id, run_id, 1).read_text(), 120))
    deploy.route("scen_a", "w2")  # try 1 runs on worker 1; its retry can only be taken by worker 2
    # mid-delivery: some chunks acknowledged, the next requests held on their way, and the task process killed
    wait_for("chunks of try 1", lambda: deploy.sandbox.stats()["accepted_requests"] - before >= 4, 120, 0.05)
    deploy.request_log.hold()
    delivered_before_kill = deploy.sandbox.stats()["accepted_requests"] - before
    os.kill(pid, signal.SIGKILL)
    deploy.sandbox.set_faults(FaultConfig())
    deploy.request_log.release()

    assert deploy.wait_run(dag_id, run_id) == "success", deploy.diagnostics()
    task = deploy.task(dag_id, run_id)
    assert task is not None
    assert task["try_number"] == 2
    # try 1 ran on worker 1, try 2 on worker 2: each worker logs under its own AIRFLOW_HOME
    assert deploy.task_log("w1", dag_id, run_id, 1) is not None
    assert deploy.task_log("w2", dag_id, run_id, 1) is None
    assert deploy.task_log("w2", dag_id, run_id, 2) is not None
    assert deploy.task_log("w1", dag_id, run_id, 2) is None
    assert int(marker(deploy, dag_id, run_id, 2).read_text()) != pid
    retry_log = log_text(deploy.task_log("w2", dag_id, run_id, 2))
    if deploy.separate_hosts:
        # another host cannot tell whether the holder's process lives: the retry waited for the lease to expire
        assert "Waiting up to" in retry_log, retry_log[-3000:]
        assert "Breaking the lock" in retry_log and "it expired at" in retry_log, retry_log[-3000:]
    else:
        assert "Breaking the lock" in retry_log and "on this host is gone" in retry_log, retry_log[-3000:]
    assert 0 < delivered_before_kill < A_ROWS // A_CHUNK

    # StopChurn holds the source, and only the chunks in flight at the kill were sent twice
    assert stopchurn_rows(deploy, table) == expected_rows(dag_id)
    applied = collections.Counter(row_id for kind, brand, name, row_id in deploy.sandbox.received() if name == table)
    assert set(applied) == set(range(1, A_ROWS + 1))
    resent = sum(count - 1 for count in applied.values())
    assert resent <= A_CONCURRENT * A_CHUNK, f"{resent} updates applied twice"
    # the retry settled try 1's acknowledged chunks from the S3 store (worker 2's disk never saw them)
    summary = deploy.xcom(dag_id, run_id)
    assert summary["settled_chunks"] >= 1, summary
    assert summary["inserted"] == A_ROWS, summary
    assert not (deploy.homes["w2"] / "stopchurn").exists()


# --- (b) the default local snapshot_uri, on the worker without the snapshot: refused by the guard -------------
def test_default_local_store_is_refused_on_the_worker_without_the_snapshot(deploy: Deployment) -> None:
    dag_id, table = "deploy_b", DAGS["deploy_b"]["table"]
    deploy.route("scen_b", "w1")
    deploy.trigger(dag_id, "b1")
    assert deploy.wait_run(dag_id, "b1") == "success", deploy.diagnostics()
    assert stopchurn_rows(deploy, table) == expected_rows(dag_id)
    assert any((deploy.homes["w1"] / "stopchurn" / "snapshots").rglob("CURRENT"))
    assert deploy.variables("stopchurn_commit__"), "the commit was not recorded in Airflow's metadata DB"
    requests_before = deploy.sandbox.stats()["requests"]

    deploy.route("scen_b", "w2")
    deploy.trigger(dag_id, "b2")
    assert deploy.wait_run(dag_id, "b2") == "failed"
    task = deploy.task(dag_id, "b2")
    assert task is not None
    assert task["try_number"] == 1  # permanent: not retried (the same worker would find the same store)
    text = log_text(deploy.task_log("w2", dag_id, "b2", 1))
    if deploy.separate_hosts:
        # the same AIRFLOW_HOME path on both machines: the same location, whose store here lacks the commit
        assert "SnapshotBehindError" in text, text[-3000:]
    else:
        # two AIRFLOW_HOME paths on one machine: the recorded location is another one
        assert "SnapshotLocationError" in text, text[-3000:]
    # refused before the source was read and before anything was sent or written
    assert not marker(deploy, dag_id, "b2", 1).exists()
    assert deploy.sandbox.stats()["requests"] == requests_before
    assert not list((deploy.homes["w2"] / "stopchurn" / "snapshots").rglob("CURRENT"))


# --- (c) two runs of one table on the two workers never send at once ---------------------------------------------
def test_two_runs_of_one_table_on_two_workers_never_send_at_once(deploy: Deployment) -> None:
    table = DAGS["deploy_c_w1"]["table"]
    deploy.request_log.clear()
    deploy.request_log.hold()  # the first run to take the lock waits here until the other waits for the lock
    try:
        deploy.trigger("deploy_c_w1", "c1")
        deploy.trigger("deploy_c_w2", "c2")

        def both_under_way() -> bool:
            """One run waits for the other's lock, or (were there no lock) both read their source."""
            logs = [log_text(deploy.task_log(w, f"deploy_c_{w}", f"c{w[1]}", 1)) for w in ("w1", "w2")]
            if any("lock_wait_s" in text for text in logs):
                return True
            return all(marker(deploy, f"deploy_c_{w}", f"c{w[1]}", 1).exists() for w in ("w1", "w2"))

        wait_for("both runs to be under way", both_under_way, 180, 0.5)
    finally:
        deploy.request_log.release()
    assert deploy.wait_run("deploy_c_w1", "c1") == "success", deploy.diagnostics()
    assert deploy.wait_run("deploy_c_w2", "c2") == "success", deploy.diagnostics()
    for dag_id, run_id, worker in (("deploy_c_w1", "c1", "w1"), ("deploy_c_w2", "c2", "w2")):
        assert deploy.task_log(worker, dag_id, run_id, 1) is not None
        assert deploy.task(dag_id, run_id)["try_number"] == 1  # type: ignore[index]

    requests = sorted(deploy.request_log.snapshot(), key=lambda r: r.started)
    assert all(len(r.sources) == 1 for r in requests)
    runs = [next(iter(r.sources)) for r in requests]
    assert set(runs) == {"c_w1", "c_w2"}
    # no request of one run overlaps any request of the other
    for i, first in enumerate(requests):
        for second in requests[i + 1 :]:
            if first.sources != second.sources:
                assert first.ended <= second.started, (first, second)
    # the runs sent one after the other: the sources switch once
    switches = sum(1 for a, b in itertools.pairwise(runs) if a != b)
    assert switches == 1, runs
    # StopChurn holds the table of the run that sent last
    assert stopchurn_rows(deploy, table) == expected_rows(f"deploy_{runs[-1]}")
