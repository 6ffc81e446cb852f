"""What a command reaches through Airflow: an object store, a SQL source or a warehouse by connection id.

Airflow is imported inside these functions only, when a command is given ``--conn-id``, ``--sql`` or
``reconcile --sql-conn-id``."""

from __future__ import annotations

from typing import Any


def object_storage_path(uri: str, conn_id: str) -> Any:
    """``uri`` as Airflow's ``ObjectStoragePath`` with the connection ``conn_id``."""
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(uri, conn_id=conn_id)


def read_sql(conn_id: str, sql: str) -> Any:
    """A SQL query's result as the engine's source: Arrow batches, read as the operator reads them."""
    from airflow_provider_stopchurn.operators._source import read_sql as read_connection

    return read_connection(conn_id, sql)


def warehouse_of_connection(conn_id: str) -> Any:
    """The warehouse of an Airflow connection, built as the operator builds it for ``diff_location='warehouse'``."""
    from airflow_provider_stopchurn.operators._warehouse import warehouse_for_connection

    return warehouse_for_connection(conn_id)
