"""The source database's password never leaks from the ADBC path: not in logs, errors, XCom, files or reprs.

The connection URI holds the password (percent-encoded), and libpq quotes parts of a URI in some of its error
messages. Real DAG runs (``dag.test()``) read a real PostgreSQL with a recognisable password (the test server
trusts every password, so a read succeeds) and fail to connect in two ways; every logger is at DEBUG. Then the
password, raw or encoded, must appear in no log record, nothing printed, no XCom and no snapshot file, and a
connection error must carry no driver exception (whose text may hold it) as its cause or context.
"""

from __future__ import annotations

import itertools
import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pendulum
import pytest
from airflow.sdk import DAG
from airflow_plugin import run_dag, xcom_return
from leak_scan import Captured, files_text
from operator_fixtures import sandbox_fixture
from pg_server import _free_port

from airflow_provider_stopchurn.exceptions import SourceConnectionError
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator, read_sql
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.source.canonical import canonicalize_source

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("airflow_db")]

PASSWORD = "pg-LEAKCHECK-7a6b5c/+@%:"
NEEDLES = (PASSWORD, quote(PASSWORD, safe=""), "LEAKCHECK", "7a6b5c")
CONN_ID = "stopchurn_secret_pg"
_ids = itertools.count(1)


def _leaks(text: str) -> list[str]:
    return [needle for needle in NEEDLES if needle in text]


sandbox = sandbox_fixture(5, max_retries=0)


def _set_pg(airflow_conn: Callable[..., None], db: Any, path: str) -> None:
    port, extra = db.port, {"application_name": "stopchurn secrets"}
    if path == "refused":
        port = _free_port()  # nothing listens there
    elif path == "bad-extra":
        extra["sslmode"] = "bogus"  # libpq refuses the URI's parameter
    airflow_conn(
        CONN_ID, conn_type="postgres", host=db.host, port=port, login=db.user, password=PASSWORD, schema=db.dbname,
        extra=extra,
    )  # fmt: skip


@pytest.mark.parametrize("path", ["success", "refused", "bad-extra", "query-error"])
def test_password_never_appears_in_logs_xcom_or_files(
    path: str,
    sandbox: SandboxServer,
    postgres_database: Any,
    airflow_conn: Callable[..., None],
    tmp_path: Path,
    captured: Captured,
) -> None:
    postgres_database.execute(
        "CREATE TABLE accounts AS SELECT g AS id, 'name ' || g AS name FROM generate_series(1, 30) g"
    )
    _set_pg(airflow_conn, postgres_database, path)
    root = tmp_path / "snapshots"
    with DAG(f"secrets_pg_{next(_ids)}", schedule=None, start_date=pendulum.datetime(2025, 1, 1)) as dag:
        StopChurnUpdateOperator(
            task_id="sync",
            table_name="account",
            sql="SELECT * FROM no_such_table" if path == "query-error" else "SELECT * FROM accounts",
            sql_conn_id=CONN_ID,
            snapshot_uri=str(root),
            retries=0,  # a connection error is retryable; one try is what this test scans
        )
    captured.start()
    dagrun = run_dag(dag)

    assert str(dagrun.state) == ("success" if path == "success" else "failed")
    if path == "success":
        assert len(sandbox.rows(5, "account")) == 30
    printed = captured.printed()
    records = captured.records()
    assert records  # something was logged at all, so the scan is not vacuous
    if path in ("refused", "bad-extra"):
        assert "Could not connect to PostgreSQL" in records + printed.out + printed.err
    files = files_text(root)
    for where, text in {
        "log records": records,
        "stdout": printed.out,
        "stderr": printed.err,
        "xcom": json.dumps(xcom_return(dagrun, "sync"), default=str),
        "snapshot files": files,
    }.items():
        assert _leaks(text) == [], f"the password leaked into {where}"


@pytest.mark.parametrize("path", ["refused", "bad-extra"])
def test_a_connection_error_carries_no_driver_exception(
    path: str, postgres_database: Any, airflow_conn: Callable[..., None]
) -> None:
    _set_pg(airflow_conn, postgres_database, path)
    with pytest.raises(SourceConnectionError) as caught:
        canonicalize_source(read_sql(CONN_ID, "SELECT 1 AS id"), key_columns=["id"])
    error = caught.value
    assert error.__cause__ is None and error.__context__ is None
    assert not error.permanent  # a retry may reach the database
    text = "".join(traceback.format_exception(error)) + repr(error) + str(error.args)
    assert "postgresql://postgres:***@" in text  # says where, without the password
    assert _leaks(text) == []
