"""StopChurnUpdateOperator with ``diff_location="warehouse"``: its arguments, the connection types the diff runs in,
and DAG runs (``dag.test()``) on real PostgreSQL and DuckDB warehouses against the sandbox.

After every run StopChurn's table must equal the source table (``assert_sandbox_matches``), the counts must be the
changes made between the runs (computed here, independently of the engine), the Airflow guard must record each
commit, and the API key and the database password must appear nowhere: no log record, nothing printed, no XCom, no
snapshot file, no asset event. Nothing of the project is mocked.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import pandas as pd
import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import run_dag, task_states, xcom_return
from helpers_sync import Churn, assert_sandbox_matches, change_counts, expected_rows, update_requests
from pushdown_engines import Engine

from airflow_provider_stopchurn.hooks._compat import AirflowFailException
from airflow_provider_stopchurn.hooks.assets import stopchurn_asset
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore

pytestmark = pytest.mark.usefixtures("airflow_db")

BRAND = 7
TABLE = "subscription"
KEY = "sk-WAREHOUSE-LEAKCHECK-4e5f6a7b8c"
PG_PASSWORD = "pg-WH-LEAKCHECK-3c2b1a/+@%:"
NEEDLES = (KEY, PG_PASSWORD, quote(PG_PASSWORD, safe=""), "LEAKCHECK")
START = pendulum.datetime(2025, 1, 1, tz="UTC")
FRAME = pd.DataFrame({"id": [1, 2, 3], "name": ["a", "b", "c"]})
CONTEXT: dict[str, Any] = {"run_id": "manual__pushdown", "ti": None}
_dag_ids = itertools.count(1)


def _op(**kwargs: Any) -> StopChurnUpdateOperator:
    kwargs.setdefault("task_id", "sync")
    kwargs.setdefault("table_name", TABLE)
    return StopChurnUpdateOperator(**kwargs)


@pytest.fixture
def sandbox(
    stopchurn_sandbox_factory: Callable[..., SandboxServer], airflow_conn: Callable[..., None]
) -> SandboxServer:
    sb = stopchurn_sandbox_factory(token=KEY, record=True)
    airflow_conn(
        "stopchurn_default", conn_type="stopchurn", host=sb.url, password=KEY, extra={"brand_id": BRAND, "timeout": 10}
    )
    return sb


# --- the constructor ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataframe": FRAME, "diff_location": "warehouse"}, "needs a SQL source"),
        ({"sql": "SELECT 1", "sql_conn_id": "db", "diff_location": "cloud"}, "must be 'worker' or 'warehouse'"),
        (
            {"sql": ["CREATE TEMP TABLE t AS SELECT 1", "SELECT * FROM t"], "sql_conn_id": "db"},
            "one SELECT query, got a list of 2",
        ),
        ({"sql": "SELECT 1", "sql_conn_id": "db", "state_schema": " "}, "state_schema must be a schema name"),
    ],
)
def test_constructor_rejects_bad_warehouse_arguments(kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("diff_location", "warehouse")
    with pytest.raises(ValueError, match=message):
        _op(**kwargs)


def test_warehouse_arguments_are_templated_and_the_constructor_does_no_io() -> None:
    fields = set(StopChurnUpdateOperator.template_fields)
    assert {"diff_location", "state_schema"} <= fields
    with DAG("pushdown_parse", schedule=None):
        op = _op(sql="SELECT * FROM t", sql_conn_id="does_not_exist", diff_location="warehouse")
        later = _op(task_id="later", dataframe=FRAME, diff_location="{{ params.where }}")  # checked once rendered
    assert (op.diff_location, op.state_schema) == ("warehouse", "stopchurn_state")
    assert _op(dataframe=FRAME).diff_location == "worker"
    assert later.diff_location == "{{ params.where }}"


def test_a_rendered_diff_location_is_checked_before_anything_runs(
    sandbox: SandboxServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with DAG(f"pushdown_render_{next(_dag_ids)}", schedule=None, start_date=START, params={"where": "worker"}) as dag:
        _op(dataframe=FRAME, snapshot_uri=str(tmp_path), diff_location="{{ params.where }}", retries=0)
    assert str(run_dag(dag, logical_date=START).state) == "success"
    assert len(sandbox.rows(BRAND, TABLE)) == 3
    requests = update_requests(sandbox)
    capfd.readouterr()
    failed = run_dag(dag, logical_date=START.add(days=1), run_conf={"where": "warehouse"})
    assert str(failed.state) == "failed"
    assert "diff_location='warehouse' needs a SQL source" in "".join(capfd.readouterr())
    assert update_requests(sandbox) == requests


# --- connection types --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("connection", "parameters", "message"),
    [
        ({"conn_type": "sqlite", "host": "{tmp}/app.db"}, None, "SQLite has no MD5 function"),
        ({"conn_type": "mysql", "host": "127.0.0.1", "login": "u"}, None, "MySQL/MariaDB are not supported"),
        ({"conn_type": "spark", "host": "local[1]"}, None, "SparkWarehouse"),
        ({"conn_type": "spark_connect", "host": "sc://localhost"}, None, "SparkWarehouse"),
        ({"conn_type": "oracle", "host": "db.example"}, None, "supported: postgres, duckdb, snowflake"),
        ({"conn_type": "duckdb"}, None, "names no database file"),
        ({"conn_type": "duckdb", "host": "{tmp}/wh.duckdb"}, {"n": 1}, "only supported on PostgreSQL"),
    ],
)
def test_connections_the_diff_cannot_run_in_fail_without_retry(
    connection: dict[str, Any],
    parameters: Any,
    message: str,
    sandbox: SandboxServer,
    airflow_conn: Callable[..., None],
    tmp_path: Path,
) -> None:
    fields = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in connection.items()}
    airflow_conn("pushdown_db", **fields)
    op = _op(
        sql="SELECT * FROM src WHERE id > %(n)s" if parameters else "SELECT * FROM src",
        sql_conn_id="pushdown_db",
        parameters=parameters,
        snapshot_uri=str(tmp_path / "snapshots"),
        diff_location="warehouse",
    )
    with pytest.raises(AirflowFailException, match=message):
        op.execute(CONTEXT)
    assert update_requests(sandbox) == 0
    assert not (tmp_path / "app.db").exists()  # nothing was opened


# --- DuckDB ------------------------------------------------------------------------------------------------------
def _load_duckdb(path: Path, frame: pd.DataFrame) -> None:
    with duckdb.connect(str(path)) as con:
        con.register("frame_in", frame)
        con.execute("CREATE OR REPLACE TABLE src AS SELECT * FROM frame_in")


def _duckdb_dag(root: Path, conn_id: str, **kwargs: Any) -> DAG:
    with DAG(
        f"pushdown_duckdb_{next(_dag_ids)}",
        schedule=None,
        start_date=START,
        params={"where": "warehouse", "schema": "sc_state"},
    ) as dag:
        _op(
            sql="SELECT * FROM src",
            sql_conn_id=conn_id,
            snapshot_uri=str(root),
            diff_location="{{ params.where }}",
            state_schema="{{ params.schema }}",
            chunk_size=40,
            retries=0,
            outlets=[stopchurn_asset(BRAND, TABLE)],
            **kwargs,
        )
    return dag


def _commit_records(store: SnapshotStore) -> list[dict[str, Any]]:
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    prefix = f"stopchurn_commit__{BRAND}__{TABLE}__"
    with create_session() as session:
        values = [json.loads(v.val) for v in session.scalars(select(Variable)) if v.key.startswith(prefix)]
    return [v for v in values if v["location"] == store.location]


def test_duckdb_dag_runs_keep_stopchurn_in_step_and_the_guard_records_them(
    sandbox: SandboxServer, airflow_conn: Callable[..., None], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "warehouse.duckdb"
    airflow_conn("pushdown_duck", conn_type="duckdb", host=str(db))
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, BRAND, TABLE)
    dag = _duckdb_dag(root, "pushdown_duck")
    churn = Churn(11, 200, with_json=False)
    frame = churn.frame
    before: dict[Any, Any] = {}
    for day in range(3):
        if day:
            frame = churn.step()
        _load_duckdb(db, frame)
        dagrun = run_dag(dag, logical_date=START.add(days=day))
        assert str(dagrun.state) == "success", task_states(dagrun)
        summary = xcom_return(dagrun, "sync")
        after = expected_rows(frame)
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == change_counts(before, after)
        assert_sandbox_matches(sandbox, frame, brand_id=BRAND, table=TABLE)
        current = store.read_current()
        assert current is not None and current["state"]["diff_location"] == "warehouse"
        assert [r["version"] for r in _commit_records(store)] == [current["version"]]
        before = after
    with duckdb.connect(str(db)) as con:  # the rendered state_schema holds the state table
        (rows,) = con.execute('SELECT COUNT(*) FROM sc_state."b7_subscription"').fetchone()
    assert rows == len(frame)
    requests = update_requests(sandbox)
    unchanged = run_dag(dag, logical_date=START.add(days=3))
    assert xcom_return(unchanged, "sync")["unchanged"] == len(frame)
    assert update_requests(sandbox) == requests

    # another worker: the snapshot store is gone. The guard stops the run before the warehouse is read.
    shutil.move(root, tmp_path / "elsewhere")
    _load_duckdb(db, churn.step())
    capfd.readouterr()
    stopped = run_dag(dag, logical_date=START.add(days=4))
    assert str(stopped.state) == "failed"
    assert "snapshot store is behind what Airflow recorded" in "".join(capfd.readouterr())
    assert update_requests(sandbox) == requests


def test_duckdb_dry_run_counts_in_the_warehouse_and_changes_nothing(
    sandbox: SandboxServer, airflow_conn: Callable[..., None], tmp_path: Path
) -> None:
    db = tmp_path / "warehouse.duckdb"
    airflow_conn("pushdown_duck", conn_type="duckdb", host=str(db))
    churn = Churn(12, 60, with_json=False)
    _load_duckdb(db, churn.frame)
    args = {"sql": "SELECT * FROM src", "sql_conn_id": "pushdown_duck", "snapshot_uri": str(tmp_path / "snapshots")}
    first = _op(diff_location="warehouse", **args).execute(CONTEXT)
    assert first["inserted"] == 60
    old = expected_rows(churn.frame)
    frame = churn.step()
    _load_duckdb(db, frame)
    current = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE).read_current()
    requests = update_requests(sandbox)
    dry = _op(diff_location="warehouse", dry_run=True, **args).execute(CONTEXT)
    assert dry["dry_run"] and (dry["inserted"], dry["updated"], dry["deleted"]) == change_counts(
        old, expected_rows(frame)
    )
    assert dry["samples"]
    assert update_requests(sandbox) == requests
    assert SnapshotStore(tmp_path / "snapshots", BRAND, TABLE).read_current() == current


def test_a_worker_diffed_table_does_not_switch_silently(
    sandbox: SandboxServer, airflow_conn: Callable[..., None], tmp_path: Path
) -> None:
    """A table synced on the worker, then run with diff_location='warehouse' (and back): refused, with the repair."""
    db = tmp_path / "warehouse.duckdb"
    airflow_conn("pushdown_duck", conn_type="duckdb", host=str(db))
    _load_duckdb(db, FRAME)
    args = {"sql": "SELECT * FROM src", "sql_conn_id": "pushdown_duck", "snapshot_uri": str(tmp_path / "snapshots")}
    with duckdb.connect(str(db)) as con:  # the worker path reads DuckDB through... its own DataFrame here
        frame = con.execute("SELECT * FROM src").df()
    _op(dataframe=frame, snapshot_uri=args["snapshot_uri"]).execute(CONTEXT)
    with pytest.raises(AirflowFailException, match=r"(?s)worker diff.*stopchurn reconcile --reset"):
        _op(diff_location="warehouse", **args).execute(CONTEXT)
    other = tmp_path / "other"
    _op(diff_location="warehouse", **{**args, "snapshot_uri": str(other)}).execute(CONTEXT)
    with pytest.raises(AirflowFailException, match="diffed in the warehouse"):
        _op(dataframe=frame, snapshot_uri=str(other)).execute(CONTEXT)


# --- PostgreSQL --------------------------------------------------------------------------------------------------
def _files_text(root: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def _asset_event_extras(dagrun: Any) -> list[dict[str, Any]]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(AssetEvent.extra).where(
            AssetEvent.source_dag_id == dagrun.dag_id, AssetEvent.source_run_id == dagrun.run_id
        )
        return [dict(e) for e in session.scalars(query)]


@pytest.mark.postgres
def test_postgres_dag_runs_diff_in_the_warehouse_and_leak_no_secret(
    sandbox: SandboxServer,
    postgres_database: Any,
    airflow_conn: Callable[..., None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    db = postgres_database  # trusts every password: a recognisable one goes into the connection
    airflow_conn(
        "pushdown_pg", conn_type="postgres", host=db.host, port=db.port, login=db.user, password=PG_PASSWORD,
        schema=db.dbname, extra={"application_name": "stopchurn pushdown"},
    )  # fmt: skip
    engine = Engine("postgres", db)
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, BRAND, TABLE)
    caplog.set_level(logging.DEBUG)
    with DAG(f"pushdown_pg_{next(_dag_ids)}", schedule=None, start_date=START) as dag:
        _op(
            sql="SELECT * FROM customers WHERE id >= %(min_id)s",  # inlined as a literal, as the ADBC path does
            parameters={"min_id": 10},
            sql_conn_id="pushdown_pg",
            snapshot_uri=str(root),
            diff_location="warehouse",
            state_schema="pushdown_state",
            chunk_size=25,
            retries=0,
            outlets=[stopchurn_asset(BRAND, TABLE)],
        )
    churn = Churn(21, 150, with_json=False)
    frame = churn.frame
    before: dict[Any, Any] = {}
    summaries, extras = [], []
    for day in range(4):
        if day:
            frame = churn.step()
        engine.load(frame, "customers")
        dagrun = run_dag(dag, logical_date=START.add(days=day))
        assert str(dagrun.state) == "success", task_states(dagrun)
        summary = xcom_return(dagrun, "sync")
        source = frame[frame["id"] >= 10]
        after = expected_rows(source)
        assert (summary["inserted"], summary["updated"], summary["deleted"]) == change_counts(before, after)
        assert summary["inserted"] + summary["updated"] + summary["deleted"] > 0
        assert_sandbox_matches(sandbox, source, brand_id=BRAND, table=TABLE)
        (event,) = _asset_event_extras(dagrun)
        assert event["inserted"] == summary["inserted"] and event["deleted"] == summary["deleted"]
        current = store.read_current()
        assert current is not None and [r["version"] for r in _commit_records(store)] == [current["version"]]
        summaries.append(summary)
        extras.append(event)
        before = after
    with db.connect() as conn:
        (rows,) = conn.execute('SELECT COUNT(*) FROM pushdown_state."b7_subscription"').fetchone()
    assert rows == len(source)

    printed = capfd.readouterr()
    records = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    assert "Running statement" in records  # the scan is not vacuous: the warehouse's statements were logged
    for where, text in {
        "log records": records,
        "stdout": printed.out,
        "stderr": printed.err,
        "xcom": json.dumps(summaries, default=str),
        "asset event extras": json.dumps(extras, default=str),
        "snapshot files": _files_text(root),
    }.items():
        assert not [n for n in NEEDLES if n in text], f"a secret leaked into {where}"
