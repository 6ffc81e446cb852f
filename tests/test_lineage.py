"""OpenLineage metadata of a sync: the SQL's tables (and asset inlets) in, the StopChurn table out, counts as facets.

Checked with the OpenLineage provider's own classes and serializer, on SQLite and PostgreSQL sources, on
success and failure, through the real OpenLineage listener of an ``airflow dags test`` run (file transport),
and without the provider (the operator imports nothing from it then).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Asset
from airflow_plugin import point_stopchurn_default

from airflow_provider_stopchurn.hooks._compat import AirflowFailException
from airflow_provider_stopchurn.hooks.assets import stopchurn_asset
from airflow_provider_stopchurn.operators.lineage import EVENT_EXTRA_KEYS
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
from airflow_provider_stopchurn.sandbox import SandboxServer

pytestmark = pytest.mark.usefixtures("airflow_db")

ROOT = Path(__file__).resolve().parent.parent
CONTEXT: dict[str, Any] = {"run_id": "manual__lineage", "ti": None}
UPSTREAM = Asset("postgres://warehouse.example:5432/analytics/public/users")  # an inlet OpenLineage can name


def _serialized(lineage: Any) -> str:
    from openlineage.client.serde import Serde

    return json.dumps(
        {
            "inputs": [Serde.to_dict(d) for d in lineage.inputs],
            "outputs": [Serde.to_dict(d) for d in lineage.outputs],
            "run": {k: Serde.to_dict(v) for k, v in lineage.run_facets.items()},
            "job": {k: Serde.to_dict(v) for k, v in lineage.job_facets.items()},
        }
    )


@pytest.fixture
def app_db(tmp_path: Path, airflow_conn: Callable[..., None]) -> Path:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?)", [(i, f"u{i}@example.com") for i in range(1, 26)])
    airflow_conn("lineage_app_db", conn_type="sqlite", host=str(path))
    return path


def _sync(tmp_path: Path, **kwargs: Any) -> StopChurnUpdateOperator:
    return StopChurnUpdateOperator(
        task_id="sync",
        table_name="account",
        sql="SELECT u.id, u.email FROM users u WHERE u.id > 0",
        sql_conn_id="lineage_app_db",
        snapshot_uri=str(tmp_path / "snapshots"),
        inlets=[UPSTREAM],
        **kwargs,
    )


def test_lineage_on_complete_sqlite(stopchurn_conn: SandboxServer, app_db: Path, tmp_path: Path) -> None:
    from airflow.providers.common.compat.openlineage.facet import OutputDataset, OutputStatisticsOutputDatasetFacet

    op = _sync(tmp_path)
    summary = op.execute(CONTEXT)
    lineage = op.get_openlineage_facets_on_complete(None)

    inputs = {(d.namespace, d.name) for d in lineage.inputs}
    assert inputs == {
        (f"sqlite://{app_db}", "users"),  # parsed from the SQL, named under the connection (no database info)
        ("postgres://warehouse.example:5432", "analytics.public.users"),  # the inlet, through its converter
    }
    (output,) = lineage.outputs
    host = stopchurn_conn.url.removeprefix("http://")
    assert isinstance(output, OutputDataset)
    assert (output.namespace, output.name) == (f"stopchurn://{host}", "1/account")  # the connection's API host
    stats = output.outputFacets["outputStatistics"]
    assert isinstance(stats, OutputStatisticsOutputDatasetFacet)
    assert (stats.rowCount, stats.size) == (25, summary["bytes"])
    facet = json.loads(_serialized(lineage))["run"]["stopchurn_sync"]
    assert {k: facet[k] for k in EVENT_EXTRA_KEYS} == {k: summary[k] for k in EVENT_EXTRA_KEYS}
    assert stopchurn_conn.token not in _serialized(lineage)


def test_lineage_output_follows_a_declared_outlet(stopchurn_conn: SandboxServer, app_db: Path, tmp_path: Path) -> None:
    """With the table declared as an outlet, lineage names it as Airflow's asset graph does."""
    op = _sync(tmp_path, outlets=[stopchurn_asset(1, "account")])
    op.execute(CONTEXT)
    (output,) = op.get_openlineage_facets_on_complete(None).outputs
    assert (output.namespace, output.name) == ("stopchurn://marketplace.stopchurn.com", "1/account")


def test_lineage_on_failure(
    stopchurn_sandbox: SandboxServer, airflow_conn: Callable[..., None], app_db: Path, tmp_path: Path
) -> None:
    point_stopchurn_default(airflow_conn, stopchurn_sandbox, 1, password="sk-LINEAGE-WRONG-KEY-0123")
    op = _sync(tmp_path)
    with pytest.raises(AirflowFailException):
        op.execute(CONTEXT)
    lineage = op.get_openlineage_facets_on_failure(None)
    assert [(d.name) for d in lineage.outputs] == ["1/account"]
    assert lineage.outputs[0].outputFacets == {}  # nothing counted as delivered
    assert "stopchurn_sync" not in lineage.run_facets
    assert "users" in {d.name for d in lineage.inputs}
    assert "sk-LINEAGE-WRONG-KEY-0123" not in _serialized(lineage)


def test_dataframe_source_has_only_its_inlets_as_inputs(stopchurn_conn: SandboxServer, tmp_path: Path) -> None:
    import pandas as pd

    op = StopChurnUpdateOperator(
        task_id="sync",
        table_name="account",
        dataframe=pd.DataFrame({"id": [1, 2]}),
        snapshot_uri=str(tmp_path),
        inlets=[UPSTREAM, Asset("name_only_asset")],  # a name without a URI scheme cannot be named in OpenLineage
    )
    op.execute(CONTEXT)
    lineage = op.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in lineage.inputs] == [
        ("postgres://warehouse.example:5432", "analytics.public.users")
    ]
    assert lineage.outputs[0].outputFacets["outputStatistics"].rowCount == 2


@pytest.mark.postgres
def test_lineage_on_complete_postgres(
    stopchurn_conn: SandboxServer, postgres_database: Any, postgres_database_conn_id: str, tmp_path: Path
) -> None:
    """A hook with OpenLineage database info: inputs are named as common.sql's own operators name them."""
    postgres_database.execute(
        "CREATE TABLE customers (id int PRIMARY KEY, name text)",
        "INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 5) g",
    )
    op = StopChurnUpdateOperator(
        task_id="sync",
        table_name="customer",
        sql="SELECT id, name FROM customers",
        sql_conn_id=postgres_database_conn_id,
        snapshot_uri=str(tmp_path),
    )
    op.execute(CONTEXT)
    lineage = op.get_openlineage_facets_on_complete(None)
    server = postgres_database
    assert [(d.namespace, d.name) for d in lineage.inputs] == [
        (f"postgres://{server.host}:{server.port}", f"{server.dbname}.public.customers")
    ]
    assert lineage.job_facets["sql"].query.strip() == "SELECT id, name FROM customers"


def test_without_the_openlineage_provider_nothing_is_imported() -> None:
    code = """
import sys
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator
op = StopChurnUpdateOperator(task_id="t", table_name="account", dataframe=lambda: None)
loaded = sorted(m for m in sys.modules if m.startswith("openlineage") or m.startswith("airflow.providers.openlineage."))
assert loaded in ([], ["airflow.providers.openlineage.get_provider_info"]), loaded  # discovery reads its info only
for name in [m for m in sys.modules if "openlineage" in m]:
    del sys.modules[name]
sys.modules["airflow.providers.openlineage"] = None  # as if it were not installed
sys.modules["openlineage"] = None
assert op.get_openlineage_facets_on_complete(None) is None
assert op.get_openlineage_facets_on_failure(None) is None
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_openlineage_listener_of_a_real_dag_run(stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    """``airflow dags test`` of the asset example with OpenLineage's file transport: the events carry our lineage."""
    home = tmp_path / "airflow-home"  # a metadata DB of its own: this run's snapshots stay out of other tests
    home.mkdir()
    app_db = tmp_path / "app.db"
    with sqlite3.connect(app_db) as conn:
        conn.execute("CREATE TABLE user_segments (id INTEGER, segment TEXT, status TEXT)")
        conn.executemany("INSERT INTO user_segments VALUES (?, 'quiet', 'active')", [(i,) for i in range(1, 13)])
    events_file = tmp_path / "openlineage.json"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW_CONN_STOPCHURN_DEFAULT": json.dumps(
            {"conn_type": "stopchurn", "host": stopchurn_sandbox.url, "password": stopchurn_sandbox.token}
        ),
        "AIRFLOW_CONN_STOPCHURN_DEMO_DB": json.dumps({"conn_type": "sqlite", "host": str(app_db)}),
    }
    for command in (["db", "migrate"], ["dags", "test", "example_stopchurn_asset_sync", "2025-01-02"]):
        proc = subprocess.run(
            [sys.executable, "-m", "airflow", *command], capture_output=True, text=True, timeout=240, env=env
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert stopchurn_sandbox.token not in events_file.read_text()
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    [complete] = [
        e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith(".sync_user_segments")
    ]
    assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [(f"sqlite://{app_db}", "user_segments")]
    [output] = complete["outputs"]
    assert (output["namespace"], output["name"]) == ("stopchurn://marketplace.stopchurn.com", "1/userSegment")
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 12
    facet = complete["run"]["facets"]["stopchurn_sync"]
    assert (facet["inserted"], facet["brand_id"], facet["table_name"]) == (12, 1, "userSegment")
