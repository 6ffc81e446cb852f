"""Sync a StopChurn table as soon as the ETL that builds it has finished, through an Airflow Asset.

``example_stopchurn_asset_etl`` rebuilds the ``user_segments`` table in the ``stopchurn_demo_db`` database and
declares the asset as its outlet; ``example_stopchurn_asset_sync`` is scheduled on that asset and sends the
changes to StopChurn's ``userSegment`` table (a table defined in StopChurn's Back Office).
"""

from __future__ import annotations

import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import Asset, dag

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator

USER_SEGMENTS = Asset("stopchurn_demo_user_segments")


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    doc_md=__doc__,
    tags=["stopchurn", "example"],
)
def example_stopchurn_asset_etl() -> None:
    SQLExecuteQueryOperator(
        task_id="build_user_segments",
        conn_id="stopchurn_demo_db",
        sql=[
            "DROP TABLE IF EXISTS user_segments",
            """
            CREATE TABLE user_segments AS
            SELECT id,
                   CASE WHEN status = 'active' AND marketing_email = 1 THEN 'engaged'
                        WHEN status = 'active' THEN 'quiet'
                        ELSE 'lapsed' END AS segment,
                   status
            FROM users
            """,
        ],
        outlets=[USER_SEGMENTS],
    )


@dag(
    schedule=[USER_SEGMENTS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    doc_md=__doc__,
    tags=["stopchurn", "example"],
)
def example_stopchurn_asset_sync() -> None:
    StopChurnUpdateOperator(
        task_id="sync_user_segments",
        table_name="userSegment",
        sql="SELECT id, segment, status FROM user_segments",
        sql_conn_id="stopchurn_demo_db",
    )


example_stopchurn_asset_etl()
example_stopchurn_asset_sync()
