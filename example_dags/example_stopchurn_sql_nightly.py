"""Every night, bring StopChurn's ``user`` table in step with the ``users`` table of an application database.

Connections:

* ``stopchurn_default`` (type ``stopchurn``): host = API base URL, password = API key, extra
  ``{"brand_id": 1}`` (the brand comes from here, so the DAG names none);
* ``stopchurn_demo_db``: any Airflow SQL connection; here SQLite, whose database file is the connection's host.

The query lives in ``sql/users.sql``: its dotted aliases (``marketing_email AS "marketingPreferences.email"``)
become the nested ``marketingPreferences`` / ``systemPreferences`` objects StopChurn's ``user`` table needs.
Each run sends only the rows inserted, updated or deleted since the previous run.

A run that would delete more than half of the table (or all of it) stops before sending anything. To approve
one such run: press Trigger and switch on ``approve_mass_delete`` under Run Parameters.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # runs of one table queue up instead of waiting for each other's lock
    params={
        "approve_mass_delete": Param(
            False, type="boolean", description="Let this run delete more than half of the table (or empty it)."
        )
    },
    doc_md=__doc__,
    tags=["stopchurn", "example"],
)
def example_stopchurn_sql_nightly() -> None:
    StopChurnUpdateOperator(
        task_id="sync_users",
        table_name="user",
        sql="sql/users.sql",
        sql_conn_id="stopchurn_demo_db",
        primary_key="id",
        allow_large_changes="{{ params.approve_mass_delete }}",  # the Trigger dialog's Run Parameters approve one run
    )


example_stopchurn_sql_nightly()
