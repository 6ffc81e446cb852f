"""The diff inside the warehouse (``diff_location="warehouse"``): SQL sources too large for one worker are diffed
where they live, and only changed rows leave the database. No Airflow import; see ``engine.py``."""

from airflow_provider_stopchurn.warehouse.databases import DbApiWarehouse, DuckDBWarehouse, PostgresWarehouse, Warehouse
from airflow_provider_stopchurn.warehouse.engine import (
    StateDriftError,
    WarehouseSource,
    reconcile,
    run_warehouse_sync,
    settle_state,
)

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
