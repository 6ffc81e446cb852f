"""Every night, bring StopChurn's ``user`` table in step with the ``users`` table of an application database.

Connections:

* ``stopchurn_default`` (type ``stopchurn``): host = API base URL, password = API key, extra
  ``{"brand_id": 1}`` (the brand comes from here, so the DAG names none);
* ``stopchurn_demo_db``: any Airflow SQL connection; here SQLite, whose database file is the connection's host.

The query lives in ``sql/users.sql``: its dotted aliases (``marketing_email AS "marketingPreferences.email"``)
become the nested ``marketingPreferences`` / ``systemPreferences`` objects StopChurn's ``user`` table needs.
Each run sends only the rows inserted, updated or deleted since the previous run.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
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
    )


example_stopchurn_sql_nightly()
