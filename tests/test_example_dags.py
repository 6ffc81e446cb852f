"""The example DAGs parse cleanly, cheaply (no network, no user code) and have the expected shape.

Running them end to end against the sandbox is in ``test_operator_e2e.py``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

#: Runs on every supported Airflow version (make test-matrix): the example DAGs must parse on each.
pytestmark = pytest.mark.matrix

EXAMPLE_DAGS = Path(__file__).resolve().parent.parent / "example_dags"
EXPECTED = {
    "example_stopchurn_sql_nightly": ["sync_users"],
    "example_stopchurn_asset_etl": ["build_user_segments"],
    "example_stopchurn_asset_sync": ["sync_user_segments"],
    "example_stopchurn_asset_report": ["report_sync"],
    "example_stopchurn_xcom": ["build_frame", "sync_channel_consents"],
    "example_stopchurn_onboarding": ["export_users"],
    "example_stopchurn_events": ["send_deposits"],
}


@pytest.fixture(scope="module")
def dagbag() -> Any:
    """The example DAGs parsed while any network connection would fail."""
    from airflow_plugin import dag_bag

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("parsing a DAG file must not open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        return dag_bag(EXAMPLE_DAGS)


def test_no_import_errors_or_warnings(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert dagbag.captured_warnings == {}


def test_expected_dags_and_tasks(dagbag: Any) -> None:
    assert set(dagbag.dag_ids) == set(EXPECTED)
    for dag_id, task_ids in EXPECTED.items():
        assert sorted(dagbag.dags[dag_id].task_ids) == sorted(task_ids), dag_id


def test_every_dag_is_documented_and_tagged(dagbag: Any) -> None:
    for dag in dagbag.dags.values():
        assert dag.doc_md, dag.dag_id
        assert "stopchurn" in dag.tags


def test_nightly_sql_dag(dagbag: Any) -> None:
    dag = dagbag.dags["example_stopchurn_sql_nightly"]
    assert dag.catchup is False
    assert dag.schedule == "@daily"
    op = dag.task_dict["sync_users"]
    assert (op.table_name, op.sql_conn_id, op.stopchurn_conn_id) == ("user", "stopchurn_demo_db", "stopchurn_default")
    assert op.brand_id is None  # taken from the StopChurn connection's extras
    query = (EXAMPLE_DAGS / "sql" / "users.sql").read_text()
    assert op.sql in ("sql/users.sql", query)  # the DagBag already read the template file
    for alias in (
        "marketingPreferences.email",
        "marketingPreferences.phone",
        "systemPreferences.email",
        "systemPreferences.phone",
    ):
        assert f'AS "{alias}"' in query


def test_asset_dags(dagbag: Any) -> None:
    etl = dagbag.dags["example_stopchurn_asset_etl"]
    sync = dagbag.dags["example_stopchurn_asset_sync"]
    (outlet,) = etl.task_dict["build_user_segments"].outlets
    assert list(sync.timetable.asset_condition.objects) == [outlet]  # scheduled on what the ETL produces
    op = sync.task_dict["sync_user_segments"]
    assert op.sql_conn_id == "stopchurn_demo_db"
    # the sync's outlet is the StopChurn table, which the report DAG is scheduled on
    (table,) = op.outlets
    assert table.uri == "stopchurn://marketplace.stopchurn.com/1/userSegment"
    report = dagbag.dags["example_stopchurn_asset_report"]
    assert list(report.timetable.asset_condition.objects) == [table]


SYNC_TASKS = {
    "example_stopchurn_sql_nightly": "sync_users",
    "example_stopchurn_asset_sync": "sync_user_segments",
    "example_stopchurn_xcom": "sync_channel_consents",
}


@pytest.mark.parametrize(("dag_id", "task_id"), SYNC_TASKS.items())
def test_sync_dags_queue_runs_and_approve_mass_deletes_by_param(dagbag: Any, dag_id: str, task_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert dag.max_active_runs == 1  # a UI trigger beside the scheduled run queues instead of racing for the lock
    param = dag.params.get_param("approve_mass_delete")
    assert param.value is False and param.schema["type"] == "boolean"
    op = dag.task_dict[task_id]
    assert op.allow_large_changes == "{{ params.approve_mass_delete }}"
    from airflow_provider_stopchurn.operators.stopchurn import RETRY_DEFAULTS

    # the operator's default: a retry settles and sends the rest
    assert (op.retries, op.retry_exponential_backoff) == (3, RETRY_DEFAULTS["retry_exponential_backoff"])


def test_xcom_dag(dagbag: Any) -> None:
    from airflow.sdk.definitions.xcom_arg import XComArg

    dag = dagbag.dags["example_stopchurn_xcom"]
    op = dag.task_dict["sync_channel_consents"]
    assert isinstance(op.dataframe, XComArg)
    assert op.upstream_task_ids == {"build_frame"}
    assert op.primary_key == ["userId", "channel"]


def test_onboarding_dag_exports_what_the_nightly_dag_syncs(dagbag: Any) -> None:
    export = dagbag.dags["example_stopchurn_onboarding"].task_dict["export_users"]
    nightly = dagbag.dags["example_stopchurn_sql_nightly"].task_dict["sync_users"]
    for attr in ("table_name", "sql", "sql_conn_id", "primary_key", "snapshot_uri", "brand_id", "stopchurn_conn_id"):
        assert getattr(export, attr) == getattr(nightly, attr), attr
    assert dagbag.dags["example_stopchurn_onboarding"].schedule is None  # run once, by hand


def test_events_dag(dagbag: Any) -> None:
    op = dagbag.dags["example_stopchurn_events"].task_dict["send_deposits"]
    assert (op.user_id_column, op.name, op.event_key, op.watermark_column) == (
        "user_id",
        "DEPOSIT",
        ["deposit_id"],
        "created_ms",
    )
    assert ":since_ms" in (EXAMPLE_DAGS / "sql" / "deposits.sql").read_text()


def test_dag_files_name_no_machine_paths() -> None:
    for path in [*EXAMPLE_DAGS.glob("*.py"), *EXAMPLE_DAGS.glob("sql/*.sql")]:
        text = path.read_text()
        assert "/tmp" not in text, path
        assert "/home/" not in text, path
        assert "127.0.0.1" not in text, path
        assert "demo-key" not in text, path


def test_operator_constructor_does_no_io(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Building the operator with an unreachable connection, a poisoned callable and a remote snapshot URI
    touches nothing: no connection lookup, no network, no file, no call."""
    from airflow.sdk import DAG

    from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator

    def poisoned() -> Any:
        raise AssertionError("the source callable was called at DAG parse time")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the operator constructor opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("AIRFLOW_CONN_UNREACHABLE", '{"conn_type": "stopchurn", "host": "https://10.255.255.1"}')
    monkeypatch.chdir(tmp_path)
    with DAG("no_io", schedule=None):
        StopChurnUpdateOperator(
            task_id="from_callable",
            table_name="account",
            dataframe=poisoned,
            stopchurn_conn_id="unreachable",
            snapshot_uri="s3://bucket-that-does-not-exist/prefix",
        )
        StopChurnUpdateOperator(
            task_id="from_sql",
            table_name="account",
            sql="SELECT * FROM accounts",
            sql_conn_id="no_such_connection",
            stopchurn_conn_id="no_such_connection_either",
        )
    assert list(tmp_path.iterdir()) == []


def test_every_example_dag_queues_its_runs(dagbag: Any) -> None:
    """A trigger beside the scheduled run ("unpause on trigger" starts both) queues instead of racing for a lock."""
    assert dagbag.dags
    for dag in dagbag.dags.values():
        assert dag.max_active_runs == 1, dag.dag_id


def _demo() -> Any:
    """demo/run_demo.py as a module (it imports no Airflow)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stopchurn_run_demo", EXAMPLE_DAGS.parent / "demo" / "run_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_events_example_query_runs_on_the_demo_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo's source database has the ``deposits`` table the events example reads, with rows to send."""
    import random
    import sqlite3

    demo = _demo()
    monkeypatch.setattr(demo, "SOURCE_DB", tmp_path / "app.db")
    demo.create_source(random.Random(demo.SEED))
    query = (EXAMPLE_DAGS / "sql" / "deposits.sql").read_text()
    with sqlite3.connect(tmp_path / "app.db") as db:
        cursor = db.execute(query, {"since_ms": 0, "since": "1970-01-01 00:00:00"})
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
        users = {row[0] for row in db.execute("SELECT id FROM users")}
        latest = max(r[3] for r in rows)
        later = db.execute(query, {"since_ms": latest, "since": None}).fetchall()
    assert names == ["deposit_id", "user_id", "amount", "created_ms"]
    assert len(rows) >= 100
    assert {r[0] for r in rows} == set(range(1, len(rows) + 1))  # one event key per deposit
    assert {r[1] for r in rows} <= users  # each deposit belongs to a user StopChurn knows
    assert all(isinstance(r[2], int | float) and r[2] > 0 for r in rows)
    assert 0 < len(later) < len(rows)  # the window's start filters


def test_the_readme_lists_every_table_the_examples_read() -> None:
    readme = (EXAMPLE_DAGS.parent / "README.md").read_text()
    section = readme[readme.index("| `stopchurn_demo_db`") :].split("\n\n")[0]
    for table in ("users", "deposits"):
        assert f"`{table}`" in section, table


def test_onboarding_dag_approves_replacing_the_snapshot_by_param(dagbag: Any) -> None:
    """The Trigger dialog's Run Parameters approve one export over an existing snapshot, as the update examples
    approve a mass delete."""
    dag = dagbag.dags["example_stopchurn_onboarding"]
    param = dag.params.get_param("approve_replace_snapshot")
    assert param.value is False and param.schema["type"] == "boolean"
    op = dag.task_dict["export_users"]
    assert op.replace_snapshot == "{{ params.approve_replace_snapshot }}"
    assert "replace_snapshot" in op.template_fields


def test_example_dags_speak_airflow_3() -> None:
    """Airflow 3.3 has one Trigger button whose dialog shows Run Parameters."""
    for path in EXAMPLE_DAGS.glob("*.py"):
        assert "w/ config" not in path.read_text(), path
