"""Assets in and out of a StopChurn sync: sync as soon as the ETL is done, report what StopChurn received.

* ``example_stopchurn_asset_etl`` rebuilds the ``user_segments`` table in the ``stopchurn_demo_db`` database and
  declares it as an asset.
* ``example_stopchurn_asset_sync`` is scheduled on that asset. It sends the changes to StopChurn's ``userSegment``
  table (a table defined in StopChurn's Back Office) and declares the StopChurn table as its outlet,
  ``stopchurn_asset(1, "userSegment")`` (``stopchurn://marketplace.stopchurn.com/1/userSegment``). On success
  the asset event carries the run's counts in its extra: ``inserted``, ``updated``, ``deleted``, ``unchanged``,
  ``quarantined``, ``chunks``, ``bytes``, ``dry_run``...
* ``example_stopchurn_asset_report`` is scheduled on the StopChurn table and reads those counts from the event
  that triggered it (a run started by hand reads the table's latest event instead).

The asset names the brand, so the sync task names it too (``brand_id=1``) rather than taking the connection's.
A mass delete stops the sync; approve one run: press Trigger and switch on ``approve_mass_delete`` under Run
Parameters.
"""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import Asset, Param, dag, task

from airflow_provider_stopchurn.hooks.assets import stopchurn_asset
from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator

BRAND_ID = 1
USER_SEGMENTS = Asset("stopchurn_demo_user_segments")
STOPCHURN_USER_SEGMENTS = stopchurn_asset(BRAND_ID, "userSegment")


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
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
    max_active_runs=1,  # runs of one table queue up instead of waiting for each other's lock
    params={
        "approve_mass_delete": Param(
            False, type="boolean", description="Let this run delete more than half of the table (or empty it)."
        )
    },
    doc_md=__doc__,
    tags=["stopchurn", "example"],
)
def example_stopchurn_asset_sync() -> None:
    StopChurnUpdateOperator(
        task_id="sync_user_segments",
        table_name="userSegment",
        brand_id=BRAND_ID,
        sql="SELECT id, segment, status FROM user_segments",
        sql_conn_id="stopchurn_demo_db",
        allow_large_changes="{{ params.approve_mass_delete }}",
        inlets=[USER_SEGMENTS],  # lineage: the asset the rows come from
        outlets=[STOPCHURN_USER_SEGMENTS],  # the event of this asset carries the run's counts
    )


@dag(
    schedule=[STOPCHURN_USER_SEGMENTS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # a trigger beside the scheduled run queues instead of waiting for the lock
    doc_md=__doc__,
    tags=["stopchurn", "example"],
)
def example_stopchurn_asset_report() -> None:
    @task(inlets=[STOPCHURN_USER_SEGMENTS])
    def report_sync(triggering_asset_events: Any = None, inlet_events: Any = None) -> dict[str, Any]:
        events = list(triggering_asset_events[STOPCHURN_USER_SEGMENTS]) if triggering_asset_events else []
        if not events:  # started by hand: the latest event of the table
            events = [inlet_events[STOPCHURN_USER_SEGMENTS][-1]]
        extra = events[-1].extra
        logging.getLogger(__name__).info(
            "StopChurn's userSegment table: %s inserted, %s updated, %s deleted, %s rows rejected.",
            extra["inserted"],
            extra["updated"],
            extra["deleted"],
            extra["quarantined"],
        )
        return {key: extra[key] for key in ("inserted", "updated", "deleted", "quarantined", "dry_run")}

    report_sync()


example_stopchurn_asset_etl()
example_stopchurn_asset_sync()
example_stopchurn_asset_report()
