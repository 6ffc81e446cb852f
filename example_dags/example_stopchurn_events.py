"""Every hour, send the new deposits of an application database to StopChurn as ``DEPOSIT`` events.

Each row of ``sql/deposits.sql`` becomes ``{"brandId": .., "userId": "<user_id>", "name": "DEPOSIT", "value":
<amount>}``. The query reads from the last delivered ``created_ms`` minus six hours (the ``since_ms`` parameter),
so a deposit committed late, up to six hours after its timestamp, is still sent; the ledger of the deposit ids
delivered in that window drops the ones an earlier run sent already, so each deposit is sent once (a request whose
answer was lost is sent again: StopChurn's API has no idempotency key).

Connections: ``stopchurn_default`` (the brand in its extras) and ``stopchurn_demo_db`` (any SQL connection).
"""

from __future__ import annotations

import datetime

import pendulum
from airflow.sdk import dag

from airflow_provider_stopchurn.operators.stopchurn import StopChurnEventOperator


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # a trigger beside the scheduled run queues instead of waiting for the lock
    doc_md=__doc__,
    tags=["stopchurn", "example"],
)
def example_stopchurn_events() -> None:
    StopChurnEventOperator(
        task_id="send_deposits",
        sql="sql/deposits.sql",
        sql_conn_id="stopchurn_demo_db",
        user_id_column="user_id",
        name="DEPOSIT",
        value_column="amount",
        event_key="deposit_id",
        watermark_column="created_ms",
        lookback=datetime.timedelta(hours=6),
    )


example_stopchurn_events()
