"""Shape a table with pandas in an upstream task and hand the DataFrame to the operator through XCom.

``build_frame`` turns the ``users`` table into one row per user and channel (a composite key), and the
operator receives its result as ``dataframe=build_frame()``. Rows have no ``id`` column, so the operator
derives it from the key: ``"<user_id>:<channel>"``. A mass delete waits for approval: press Trigger
and switch on ``approve_mass_delete`` under Run Parameters.
"""

from __future__ import annotations

import pandas as pd
import pendulum
from airflow.sdk import BaseHook, Param, dag, task

from airflow_provider_stopchurn.operators.stopchurn import StopChurnUpdateOperator


@task
def build_frame() -> pd.DataFrame:
    hook = BaseHook.get_connection("stopchurn_demo_db").get_hook()
    users = hook.get_df("SELECT id, marketing_email, marketing_sms FROM users", df_type="pandas")
    channels = users.rename(columns={"id": "userId", "marketing_email": "email", "marketing_sms": "sms"}).melt(
        id_vars="userId", var_name="channel", value_name="optedIn"
    )
    channels["optedIn"] = channels["optedIn"].astype(bool)
    return channels


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
def example_stopchurn_xcom() -> None:
    StopChurnUpdateOperator(
        task_id="sync_channel_consents",
        table_name="channelConsent",
        dataframe=build_frame(),
        primary_key=["userId", "channel"],
        allow_large_changes="{{ params.approve_mass_delete }}",  # the Trigger dialog's Run Parameters approve one run
    )


example_stopchurn_xcom()
