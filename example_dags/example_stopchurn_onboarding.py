"""Onboard a brand: write the ``users`` table as StopChurn's historical-upload files and record it as the baseline.

StopChurn takes a brand's existing data as JSON files uploaded by hand in its Back Office before any update may
flow. ``export_users`` writes them (``part-00001.json``, ... and a ``manifest.json`` with each file's rows, bytes and
SHA-256) under ``<output_uri>/<brand_id>/user/<run>/`` and commits the very rows it wrote as the snapshot of the
nightly update DAG (``example_stopchurn_sql_nightly``: same table, brand and snapshot location). The steps:

1. trigger this DAG once;
2. upload every part file in StopChurn's Back Office (historical load of the ``user`` table);
3. turn on the nightly DAG: its first run sends only what changed in ``users`` since the export.

Without ``output_uri`` the files go to ``$AIRFLOW_HOME/stopchurn/exports``; in production point it at an object
store (``output_uri="s3://<bucket>/stopchurn-export"``, ``output_conn_id="aws_default"``), and use the same shared
``snapshot_uri`` as the update DAG. A second export of a table that already has a snapshot is refused: it would
hide the changes the update DAG has not sent yet. To replace the snapshot on purpose (the files of this export are
going to be uploaded), press Trigger and switch on ``approve_replace_snapshot`` under Run Parameters: it approves
that one run.

Each run writes its own folder, named after the run (``20261207T005212Z-manual-3f9a1c``); a retry of the run
rewrites it.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from airflow_provider_stopchurn.operators.stopchurn import StopChurnHistoricalExportOperator


@dag(
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two exports of one table queue up instead of waiting for each other's lock
    params={
        "approve_replace_snapshot": Param(
            False,
            type="boolean",
            description="Replace the table's snapshot with this export (its files are going to be uploaded).",
        )
    },
    doc_md=__doc__,
    tags=["stopchurn", "example"],
)
def example_stopchurn_onboarding() -> None:
    StopChurnHistoricalExportOperator(
        task_id="export_users",
        table_name="user",
        sql="sql/users.sql",  # the nightly DAG's query: the same rows, encoded the same way
        sql_conn_id="stopchurn_demo_db",
        primary_key="id",
        replace_snapshot="{{ params.approve_replace_snapshot }}",  # the Trigger dialog's Run Parameters approve one run
    )


example_stopchurn_onboarding()
