"""The multi-worker guard end to end: real DAG runs (``dag.test()``), a real metadata DB, the sandbox API.

Another worker is simulated the way it looks from a worker: the snapshot folder is gone (moved away), or it
holds an older copy. Airflow's record of the last commit lives in the metadata DB; the tests read it there
(an Airflow Variable whose key starts with ``stopchurn_commit__<brand>__<table>__``), not through the operator.
"""

from __future__ import annotations

import itertools
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import run_dag, xcom_return

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore

pytestmark = pytest.mark.usefixtures("airflow_db")

START = pendulum.datetime(2025, 1, 1, tz="UTC")
BRAND = 1  # the brand of the stopchurn_conn fixture's connection
TABLE = "account"
_dag_ids = itertools.count(1)


# --- helpers ---------------------------------------------------------------------------------------------------
class Source:
    """A table that changes between runs, and how often the operator read it."""

    def __init__(self, n: int) -> None:
        self.frame = pd.DataFrame({"id": list(range(1, n + 1)), "plan": ["free"] * n})
        self.reads = 0

    def __call__(self) -> pd.DataFrame:
        self.reads += 1
        return self.frame.copy()

    def change(self) -> tuple[int, int]:
        """Update the first row and add one: ``(updated, inserted)``."""
        frame = self.frame.copy()
        frame.loc[0, "plan"] = "pro" if frame.loc[0, "plan"] != "pro" else "team"
        new_id = int(frame["id"].max()) + 1
        self.frame = pd.concat([frame, pd.DataFrame({"id": [new_id], "plan": ["free"]})], ignore_index=True)
        return 1, 1


def sync_dag(name: str, source: Source, root: Path, **kwargs: Any) -> DAG:
    """One sync task; ``retries=1`` without delay, so a retryable failure would show as a second try."""
    with DAG(f"guard_{name}_{next(_dag_ids)}", schedule=None, start_date=START, catchup=False, params={}) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name=TABLE,
            dataframe=source,
            snapshot_uri=str(root),
            retries=1,
            retry_delay=timedelta(0),
            **kwargs,
        )
    return dag


def run(dag: DAG, day: int, **kwargs: Any) -> tuple[str, int, dict[str, Any] | None]:
    """Run ``dag`` for day ``day``: ``(task state, its try number, its summary or None)``."""
    from airflow.utils.session import create_session

    dagrun = run_dag(dag, logical_date=START.add(days=day), **kwargs)
    with create_session() as session:
        (ti,) = dagrun.get_task_instances(session=session)
        state, tries = str(ti.state), ti.try_number
    return state, tries, xcom_return(dagrun, "sync") if state == "success" else None


def run_ok(dag: DAG, day: int, **kwargs: Any) -> dict[str, Any]:
    state, _, summary = run(dag, day, **kwargs)
    assert state == "success"
    assert summary is not None
    return summary


def records(root: Path) -> dict[str, dict[str, Any]]:
    """Airflow's commit records of brand 1 / account (key -> parsed value), read from the metadata DB."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    prefix = f"stopchurn_commit__{BRAND}__{TABLE}__"
    with create_session() as session:
        found = {v.key: json.loads(v.val) for v in session.scalars(select(Variable)) if v.key.startswith(prefix)}
    # Records of other tests' stores share the prefix: keep the ones of this store.
    return {key: value for key, value in found.items() if value["location"] == f"{root}/{BRAND}/{TABLE}"}


def the_record(root: Path) -> dict[str, Any]:
    found = records(root)
    assert len(found) == 1, found
    return next(iter(found.values()))


def delete_records(root: Path) -> None:
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    keys = list(records(root))
    with create_session() as session:
        session.execute(delete(Variable).where(Variable.key.in_(keys)))


def committed(root: Path) -> tuple[str, int | None]:
    snapshot = SnapshotStore(root, BRAND, TABLE).read_committed()
    assert snapshot is not None
    return snapshot.version, snapshot.rows


def refused(capfd: pytest.CaptureFixture[str]) -> str:
    """The task log's text since the last call (dag.test() prints it)."""
    out = capfd.readouterr()
    return out.out + out.err


@pytest.fixture
def sandbox(stopchurn_conn: SandboxServer) -> SandboxServer:
    return stopchurn_conn


# --- tests -----------------------------------------------------------------------------------------------------
def test_consecutive_runs_record_each_commit(sandbox: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    source = Source(20)
    dag = sync_dag("consecutive", source, root)
    for day in range(3):
        summary = run_ok(dag, day)
        record = the_record(root)
        assert (record["version"], record["rows"]) == committed(root)
        assert record["location"] == summary["snapshot_uri"] == f"{root}/{BRAND}/{TABLE}"
        assert record["written_by"].startswith(f"{dag.dag_id}.sync run ")
        assert set(record) == {"version", "rows", "location", "written_by", "recorded_at"}
        source.change()
    assert record["rows"] == 22
    assert sandbox.token not in json.dumps(records(root))


@pytest.mark.matrix  # Variables read and written, a failure without retry: on every supported Airflow
def test_a_worker_without_the_snapshot_stops_before_sending(
    sandbox: SandboxServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "snapshots"
    source = Source(30)
    dag = sync_dag("moved", source, root)
    run_ok(dag, 0)
    before, reads, recorded = sandbox.stats(), source.reads, the_record(root)
    source.change()

    elsewhere = tmp_path / "on-the-first-worker"
    shutil.move(root, elsewhere)  # this worker's disk has no snapshot
    refused(capfd)
    state, tries, _ = run(dag, 1)
    assert (state, tries) == ("failed", 1)  # AirflowFailException: no second try despite retries=1
    log = refused(capfd)
    assert "AirflowFailException" in log
    assert "finds no snapshot there" in log
    assert recorded["version"] in log
    assert "snapshot_uri" in log
    assert "s3://" in log
    assert "accept_missing_snapshot=True" in log
    assert "stopchurn_commit__1__account__" in log
    assert sandbox.stats() == before  # nothing sent
    assert source.reads == reads  # the source was not even read
    assert not root.exists()  # nothing written (no lock, no plan)
    assert the_record(root) == recorded

    shutil.move(elsewhere, root)  # the snapshot is back: the next run sends only the changes
    summary = run_ok(dag, 2)
    assert (summary["inserted"], summary["updated"], summary["deleted"]) == (1, 1, 0)


def test_an_older_snapshot_copy_stops(
    sandbox: SandboxServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root, old_copy = tmp_path / "snapshots", tmp_path / "old-copy"
    source = Source(25)
    dag = sync_dag("older", source, root)
    run_ok(dag, 0)
    old_version, _ = committed(root)
    shutil.copytree(root, old_copy)
    source.change()
    run_ok(dag, 1)
    recorded = the_record(root)
    assert recorded["version"] > old_version

    shutil.rmtree(root)
    shutil.copytree(old_copy, root)  # a worker whose disk holds the first snapshot only
    source.change()
    before = sandbox.stats()
    # Another DAG syncing the same table into the same store shares the record.
    other = sync_dag("older_other", source, root)
    refused(capfd)
    state, tries, _ = run(other, 2)
    assert (state, tries) == ("failed", 1)
    log = refused(capfd)
    assert f"finds an older snapshot {old_version} (25 rows) there" in log
    assert f"{recorded['version']} (26 rows)" in log
    assert sandbox.stats() == before
    assert committed(root) == (old_version, 25)  # the old copy is left as it was
    assert the_record(root) == recorded


@pytest.mark.parametrize("initial_load", ["send", "baseline"])
def test_accept_missing_snapshot_rebaselines_for_one_run(
    sandbox: SandboxServer, tmp_path: Path, initial_load: str
) -> None:
    """The flag comes from a DAG param, so one triggered run approves the rebaseline; later runs are guarded."""
    root = tmp_path / "snapshots"
    source = Source(40)
    dag = sync_dag(
        "accept",
        source,
        root,
        initial_load=initial_load,
        accept_missing_snapshot="{{ params.get('rebaseline', False) }}",
    )
    run_ok(dag, 0)
    first = the_record(root)
    shutil.rmtree(root)

    assert run(dag, 1)[0] == "failed"  # without the param
    requests = sandbox.stats()["requests"]
    summary = run_ok(dag, 2, run_conf={"rebaseline": True})
    if initial_load == "send":
        assert summary["inserted"] == 40  # the whole table again, as asked
        assert sandbox.stats()["requests"] > requests
    else:
        assert summary["baseline"] is True
        assert sandbox.stats()["requests"] == requests  # recorded without sending
    rebased = the_record(root)
    assert (rebased["version"], rebased["rows"]) == committed(root)
    assert rebased["version"] != first["version"]

    source.change()
    summary = run_ok(dag, 3)  # guarded again, and the store matches the new record
    assert (summary["inserted"], summary["updated"]) == (1, 1)
    assert the_record(root)["version"] == committed(root)[0]


def test_accept_missing_snapshot_over_an_older_copy(sandbox: SandboxServer, tmp_path: Path) -> None:
    root, old_copy = tmp_path / "snapshots", tmp_path / "old-copy"
    source = Source(10)
    dag = sync_dag("accept_older", source, root)
    run_ok(dag, 0)
    shutil.copytree(root, old_copy)
    source.change()
    run_ok(dag, 1)
    shutil.rmtree(root)
    shutil.copytree(old_copy, root)

    approve = sync_dag("accept_older_once", source, root, accept_missing_snapshot=True)
    summary = run_ok(approve, 2)  # diffs against the old copy: resends the changes of run 1
    assert (summary["inserted"], summary["updated"], summary["deleted"]) == (1, 1, 0)
    assert the_record(root)["version"] == committed(root)[0]
    assert run_ok(dag, 3)["unchanged"] == 11


def test_deleting_the_record_rebaselines(sandbox: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    source = Source(15)
    dag = sync_dag("forget", source, root)
    run_ok(dag, 0)
    shutil.rmtree(root)
    assert run(dag, 1)[0] == "failed"

    delete_records(root)
    summary = run_ok(dag, 2)  # a first load again
    assert summary["inserted"] == 15
    assert the_record(root)["version"] == committed(root)[0]


def test_dry_run_checks_but_never_records(sandbox: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    source = Source(12)
    dry = sync_dag("dry", source, root, dry_run=True)
    real = sync_dag("dry_real", source, root)

    assert run_ok(dry, 0)["inserted"] == 12
    assert records(root) == {}  # nothing to record, and nothing recorded

    run_ok(real, 1)
    delete_records(root)
    source.change()
    plan = run_ok(dry, 2)
    assert (plan["inserted"], plan["updated"]) == (1, 1)
    assert records(root) == {}  # a dry run never writes the record, even when it is missing

    run_ok(real, 3)
    recorded = the_record(root)
    shutil.rmtree(root)
    requests = sandbox.stats()["requests"]
    assert run(dry, 4)[0] == "failed"  # but it checks
    assert sandbox.stats()["requests"] == requests
    assert the_record(root) == recorded


def test_a_failed_run_records_what_it_committed(sandbox: SandboxServer, tmp_path: Path) -> None:
    """A quarantine run over ``max_rejected_rows`` fails after committing the rest: the record follows."""
    root = tmp_path / "snapshots"
    source = Source(8)
    dag = sync_dag("failed", source, root, on_rejected_rows="quarantine", max_rejected_rows=0, chunk_size=2)
    run_ok(dag, 0)
    first = the_record(root)
    source.change()
    sandbox.reject_ids({9})  # the new row
    state, _, _ = run(dag, 1)
    assert state == "failed"
    version, _ = committed(root)
    assert version != first["version"]  # the run committed before it failed
    assert the_record(root)["version"] == version


# --- one store per table: a moved snapshot_uri, two DAGs with two locations -------------------------------------
def test_a_moved_snapshot_uri_is_refused_until_the_move_is_named(
    sandbox: SandboxServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    old_root, new_root = tmp_path / "old-store", tmp_path / "new-store"
    source = Source(20)
    run_ok(sync_dag("before_move", source, old_root), 0)
    recorded = the_record(old_root)
    source.change()

    # the DAG now points at an empty new location: it would take itself for a first load and resend every row
    moved = sync_dag("after_move", source, new_root)
    before, reads = sandbox.stats(), source.reads
    refused(capfd)
    state, tries, _ = run(moved, 1)
    assert (state, tries) == ("failed", 1)  # permanent: no second try
    log = refused(capfd)
    assert "is synced through a snapshot store at another location. Nothing was read or sent." in log
    assert f"{old_root}/{BRAND}/{TABLE}" in log and f"{new_root}/{BRAND}/{TABLE}" in log
    assert "move_store_from" in log
    assert sandbox.stats() == before and source.reads == reads and not new_root.exists()
    # accept_missing_snapshot is no way around it: it does not move a table's store
    state, _, _ = run(sync_dag("after_move_accept", source, new_root, accept_missing_snapshot=True), 2)
    assert state == "failed" and sandbox.stats() == before
    assert the_record(old_root) == recorded

    # named on purpose, but the files were not copied: the new store is checked like any other
    state, _, _ = run(sync_dag("move_uncopied", source, new_root, move_store_from=str(old_root)), 3)
    assert state == "failed" and "finds no snapshot there" in refused(capfd)
    assert sandbox.stats() == before and the_record(old_root) == recorded

    shutil.copytree(old_root, new_root)
    plan = run_ok(sync_dag("move_dry", source, new_root, move_store_from=str(old_root), dry_run=True), 4)
    assert (plan["inserted"], plan["updated"]) == (1, 1)
    assert the_record(old_root) == recorded  # a dry run checks the move but records nothing
    summary = run_ok(sync_dag("move", source, new_root, move_store_from=str(old_root)), 4)
    assert (summary["inserted"], summary["updated"], summary["deleted"]) == (1, 1, 0)  # only the changes
    assert the_record(new_root)["version"] == committed(new_root)[0]
    assert records(old_root) == {}  # one record per table: it follows the store

    # from now on the old location is the other one
    before = sandbox.stats()
    state, _, _ = run(sync_dag("stale_dag", source, old_root), 5)
    assert state == "failed" and sandbox.stats() == before
    assert run_ok(sync_dag("move_kept", source, new_root, move_store_from=str(old_root)), 6)["unchanged"] == 21


def test_two_dags_with_two_locations_for_one_table_the_second_is_refused(
    sandbox: SandboxServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    first_root, second_root = tmp_path / "dag-a", tmp_path / "backfill-b"
    source = Source(10)
    first, second = sync_dag("two_a", source, first_root), sync_dag("two_b", source, second_root)
    run_ok(first, 0)
    source.change()
    before = sandbox.stats()
    refused(capfd)
    assert run(second, 1)[:2] == ("failed", 1)
    assert "at another location" in refused(capfd)
    assert sandbox.stats() == before and not second_root.exists()
    summary = run_ok(first, 2)  # the table's own store goes on
    assert (summary["inserted"], summary["updated"]) == (1, 1)
    assert run(second, 3)[0] == "failed"


def test_a_record_of_an_earlier_release_is_carried_over(sandbox: SandboxServer, tmp_path: Path) -> None:
    """Records were once kept per location: the table's first run after an upgrade reads its location's one."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    from airflow_provider_stopchurn.operators.commit_guard import legacy_record_key, record_key

    root = tmp_path / "snapshots"
    source = Source(12)
    dag = sync_dag("legacy", source, root)
    run_ok(dag, 0)
    value = json.dumps(the_record(root))
    location = f"{root}/{BRAND}/{TABLE}"
    with create_session() as session:
        session.execute(delete(Variable).where(Variable.key == record_key(BRAND, TABLE)))
        session.add(Variable(key=legacy_record_key(BRAND, TABLE, location), val=value))
    shutil.rmtree(root)
    assert run(dag, 1)[0] == "failed"  # the old record still guards the store
    assert the_record(root) == json.loads(value)
