"""The warehouse diff's former import path, kept for code written against it: use :mod:`.warehouse` instead.

Importing it warns (``DeprecationWarning``) and gives the same names as :mod:`airflow_provider_stopchurn.warehouse`.
"""

from __future__ import annotations

import warnings

from airflow_provider_stopchurn.warehouse import (
    DbApiWarehouse,
    DuckDBWarehouse,
    PostgresWarehouse,
    StateDriftError,
    Warehouse,
    WarehouseSource,
    reconcile,
    run_warehouse_sync,
    settle_state,
)

warnings.warn(
    "airflow_provider_stopchurn.pushdown moved to airflow_provider_stopchurn.warehouse; import it from there.",
    DeprecationWarning,
    stacklevel=2,
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
