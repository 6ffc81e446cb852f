"""The diff inside the warehouse (``diff_location="warehouse"``): SQL sources too large for one worker are diffed
where they live, and only changed rows leave the database. No Airflow import; the run is ``sync.py``."""

from airflow_provider_stopchurn.warehouse.databases import DbApiWarehouse, DuckDBWarehouse, PostgresWarehouse, Warehouse
from airflow_provider_stopchurn.warehouse.reconcile import reconcile
from airflow_provider_stopchurn.warehouse.settle import settle_state
from airflow_provider_stopchurn.warehouse.source import WarehouseSource
from airflow_provider_stopchurn.warehouse.state import StateDriftError
from airflow_provider_stopchurn.warehouse.sync import run_warehouse_sync

__all__ = [
    "DbApiWarehouse",
    "DuckDBWarehouse",
    "PostgresWarehouse",
    "StateDriftError",
    "Warehouse",
    "WarehouseSource",
    "reconcile",
    "run_warehouse_sync",
    "settle_state",
]
