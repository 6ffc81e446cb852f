"""What a warehouse run works with: the SQL source diffed where it lives, the run's context, and the names its
plans and commits record in the snapshot store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.settle import Settled
from airflow_provider_stopchurn.update.sync import SyncSummary
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.databases import Warehouse
from airflow_provider_stopchurn.warehouse.sqlparts import schema_name

__all__ = ["DIFF_LOCATION", "PLAN_FORMAT", "ROW_HASH", "WarehouseSource"]

#: Names the row hash of a warehouse-diffed table in ``CURRENT`` (``row_hash``): the local engine never compares it.
ROW_HASH = "warehouse-md5-v1"
PLAN_FORMAT = "warehouse-1"
DIFF_LOCATION = "warehouse"


@dataclass(frozen=True)
class WarehouseSource:
    """A SQL source diffed where it lives: ``sql`` (one SELECT) on ``warehouse``, state kept in ``state_schema``."""

    sql: str
    warehouse: Warehouse
    state_schema: str = "stopchurn_state"

    def state(self, options: SyncOptions) -> S.StateTable:
        name = S.state_table_name(options.brand_id, options.table_name, self.warehouse.dialect)
        older = S.state_table_name(options.brand_id, options.table_name)  # before names were shortened
        return S.StateTable(
            schema_name(self.state_schema, self.warehouse.dialect),
            name,
            tuple(options.key_columns),
            self.warehouse.dialect,
            older_name=older if older != name else "",
        )


@dataclass
class _Run:
    """What one run works with (keeps the helpers' argument lists short)."""

    query: str
    warehouse: Warehouse
    state: S.StateTable
    store: SnapshotStore
    options: SyncOptions
    summary: SyncSummary
    run_ms: int
    lock: Any = None

    def record(self, settled: Settled | None = None) -> dict[str, Any] | None:
        return self.summary.run_record(self.options.run_key, settled, self.summary.settled_chunks)
