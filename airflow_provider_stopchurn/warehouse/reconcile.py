"""Repairing drift between the state table and the snapshot store: the ``stopchurn reconcile`` command."""

from __future__ import annotations

from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse.settle import settle_state
from airflow_provider_stopchurn.warehouse.source import DIFF_LOCATION, ROW_HASH, WarehouseSource
from airflow_provider_stopchurn.warehouse.state import StateDriftError, prepare_state, read_meta

__all__ = ["reconcile"]


def reconcile(source: WarehouseSource, store: SnapshotStore, options: SyncOptions, *, action: str) -> str:
    """Repair drift between the state table and the snapshot store (the ``stopchurn reconcile`` command).

    ``adopt-state``: the state table is right; ``CURRENT`` takes its token (any pending plan is dropped).
    ``reset``: drop the state table and the store's record; the next run is a first load (or, with
    ``initial_load='baseline'``, records the source without sending).
    """
    state = source.state(options)
    warehouse = source.warehouse
    try:
        with store.lock("stopchurn-reconcile", ttl_s=options.lock_ttl_s, wait_s=0) as lock:
            if action == "adopt-state":
                prepare_state(warehouse, state)
            pending = store.pending_plan(cleanup=False)
            if action == "adopt-state" and pending is not None:
                meta = read_meta(warehouse, state)
                if meta is not None and meta.token == pending.target_version:
                    # the state table already holds that plan (a crash before CURRENT): finish it, nothing resent
                    settle_state(store, pending, store.acks(pending), warehouse, state, lock=lock)
                    return f"The state table {state.display} held plan {pending.plan_id}; it is now committed."
            if pending is not None:
                store.discard_plan(pending)
                if pending.meta.get("baseline") and warehouse.transactions:
                    warehouse.execute([state.r(f"DROP TABLE IF EXISTS {state.for_plan(pending.plan_id).next}")])
            if action == "reset":
                warehouse.execute(state.drop())
                current = store.read_current()
                if current is not None:
                    store.forget_current(lock=lock)
                return f"Dropped {state.display} and the store's record of {options.table_name!r}."
            meta = read_meta(warehouse, state)
            if meta is None:
                raise StateDriftError(f"The state table {state.display} does not exist: nothing to adopt; use --reset.")
            current = store.read_current()
            store.commit(
                meta.token,
                base_version=None if current is None else str(current["version"]),
                kinds=(current or {}).get("kinds") or {},
                key_columns=list(meta.key_columns),
                rows=meta.rows,
                plan_id=meta.plan_id,
                row_hash=ROW_HASH,
                lock=lock,
                state={"diff_location": DIFF_LOCATION, "state_table": state.display},
            )
            return f"The store now records {state.display} (token {meta.token}, {meta.rows} rows) as delivered."
    finally:
        warehouse.close()
