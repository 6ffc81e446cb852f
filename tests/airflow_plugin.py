"""Pytest plugin: a real Airflow metadata DB, connections from env vars, and ``dag.test()`` for test DAGs.

Enable it with ``pytest_plugins = ["airflow_plugin"]`` in ``conftest.py`` (or ``pytest -p airflow_plugin``).

``dag.test()`` re-parses the configured DAG bundles and refuses a DAG it did not find there ("the dag is not
serialized"), so a DAG built inside a test cannot run as it is. The ``airflow_db`` fixture therefore adds a
second local bundle, a temporary folder holding one DAG file that publishes the DAGs registered in
:data:`TEST_DAGS`; :func:`run_dag` registers a DAG there before calling ``dag.test()``. The project's
``example_dags/`` stays the ``dags-folder`` bundle, so the example DAGs run through ``dag.test()`` too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: DAGs built by tests, by dag id; the DAG file of the test bundle publishes them.
TEST_DAGS: dict[str, Any] = {}

TEST_BUNDLE = "stopchurn-test-dags"

# The DAG processor skips files that mention neither "airflow" nor "dag" (safe mode): this text does both.
_REGISTRY_DAG_FILE = '''"""Airflow DAGs built by the tests (see tests/airflow_plugin.py)."""

import airflow_plugin

globals().update(airflow_plugin.TEST_DAGS)
'''


@pytest.fixture(scope="session")
def airflow_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Create the metadata DB once per session and add the test DAG bundle; yields the bundle's folder."""
    folder = tmp_path_factory.mktemp("test-dags")
    (folder / "registered_test_dags.py").write_text(_REGISTRY_DAG_FILE)
    bundles = [
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}},
        {
            "name": TEST_BUNDLE,
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(folder)},
        },
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
        from airflow.utils import db

        db.initdb()
        yield folder


@pytest.fixture(autouse=True)
def _fresh_commit_records(request: pytest.FixtureRequest) -> None:
    """Each test that uses the metadata DB starts without commit records, as a fresh deployment would.

    Airflow keeps one store location per brand and table (operators/commit_guard.py): tests that sync the same
    table from their own temporary folders would otherwise find the table's store recorded elsewhere.
    """
    if "airflow_db" not in request.fixturenames:
        return
    request.getfixturevalue("airflow_db")
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(Variable).where(Variable.key.like("stopchurn\\_commit\\_\\_%", escape="\\")))


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    """Define connection ``conn_id`` as an ``AIRFLOW_CONN_<ID>`` env var (JSON form) for this test."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


@pytest.fixture
def airflow_conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``airflow_conn(conn_id, conn_type=..., host=..., ...)`` sets a connection for the current test."""

    def setter(conn_id: str, **fields: Any) -> None:
        set_connection(monkeypatch, conn_id, **fields)

    return setter


def point_stopchurn_default(
    airflow_conn: Callable[..., None], sandbox: Any, brand_id: int, *, password: str | None = None, **extra: Any
) -> Any:
    """Point ``stopchurn_default`` at ``sandbox``, ``brand_id`` in the extras; returns the sandbox.

    :param airflow_conn: the test's ``airflow_conn`` fixture.
    :param sandbox: the sandbox server.
    :param brand_id: the brand the connection names.
    :param password: the API key the connection holds (None: the sandbox's own, which it accepts).
    :param extra: more extras of the connection (``max_retries``, ``timeout``, ...).
    """
    fields = {
        "conn_type": "stopchurn",
        "host": sandbox.url,
        "password": sandbox.token if password is None else password,
    }
    airflow_conn("stopchurn_default", **fields, extra={"brand_id": brand_id, **extra})
    return sandbox


@pytest.fixture
def stopchurn_conn(stopchurn_sandbox: Any, airflow_conn: Callable[..., None]) -> Any:
    """``stopchurn_default`` pointing at the test's sandbox, brand 1 in the extras; yields the sandbox."""
    return point_stopchurn_default(airflow_conn, stopchurn_sandbox, 1)


def run_dag(dag: Any, logical_date: Any = None, **kwargs: Any) -> Any:
    """Run ``dag`` once with ``dag.test()`` (tasks in this process) and return the DagRun.

    Needs the ``airflow_db`` fixture. DAGs from ``example_dags/`` run as they are; others are registered in
    the test bundle first.
    """
    dags_folder = Path(os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", "")).resolve()
    if dags_folder not in Path(dag.fileloc or "").resolve().parents:
        TEST_DAGS[dag.dag_id] = dag
    return dag.test(logical_date=logical_date, **kwargs)


def airflow_version() -> tuple[int, int]:
    """The installed Airflow's ``(major, minor)``, read without importing Airflow (which loads its config)."""
    from importlib.metadata import version

    major, minor = version("apache-airflow-core").split(".")[:2]
    return int(major), int(minor)


def dag_bag(folder: str | Path) -> Any:
    """A ``DagBag`` of ``folder`` (Airflow 3.3 moved the class to ``airflow.dag_processing.dagbag``)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.2 and older
        from airflow.models.dagbag import DagBag
    return DagBag(dag_folder=str(folder))


def xcom_return(dagrun: Any, task_id: str) -> Any:
    """The return value (XCom ``return_value``) of ``task_id`` in ``dagrun``, or None."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = XComModel.get_many(run_id=dagrun.run_id, dag_ids=dagrun.dag_id, task_ids=task_id, key="return_value")
        row = session.scalars(query).first()
        return None if row is None else XComModel.deserialize_value(row)


def task_states(dagrun: Any) -> dict[str, str]:
    """``task_id -> state`` of every task instance of ``dagrun``."""
    from airflow.utils.session import create_session

    with create_session() as session:
        return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances(session=session)}
