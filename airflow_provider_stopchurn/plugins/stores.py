"""Reading the snapshot stores the page's runs used: lock, pending plan, quarantined rows and run history.

Everything is read through the store's public API and nothing is written. :func:`inspect_stores` reads several
stores at once, bounded in time, so that a store that hangs (an object store that does not answer) is reported as
such and the page still shows the rest. Quarantined rows are kept by id, change type and StopChurn's reason, not by
their content. It imports nothing from Airflow.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from typing import Any

from airflow_provider_stopchurn.plugins.model import PendingPlan, StoreState
from airflow_provider_stopchurn.store import SnapshotStore

#: Quarantined rows listed per store (the count is always the full one).
QUARANTINE_ROWS = 20
#: History records read per store (one small file each): the kept runs of a task using it, a few tries of some.
HISTORY_RECORDS = 60
#: How long the page waits for all snapshot stores together before it reports the rest as not answering.
STORE_TIMEOUT_S = 5.0


def inspect_store(
    root: Any, brand_id: int, table_name: str, *, rows: int = QUARANTINE_ROWS, history: int = 0
) -> StoreState:
    """Read the lock, the pending plan and the newest quarantine file of one store, and with ``history`` its
    newest ``history`` records. Writes nothing."""
    store = SnapshotStore(root, brand_id, table_name)
    state = StoreState(location=store.location, brand_id=brand_id, table_name=table_name)
    try:
        state.lock = store.read_lock()
        plan = store.pending_plan(cleanup=False)
        if plan is not None:
            state.plan = PendingPlan(plan.plan_id, len(store.acked(plan)), len(plan.chunks))
        records = store.read_quarantine()
        state.quarantined_total = len(records)
        state.quarantined = [_rejection(record) for record in records[:rows]]
    except Exception as err:  # any storage error: the page says so and shows the rest
        state.error = f"{type(err).__name__}: {err}"
    if history > 0:
        try:
            state.history = read_store_history(root, brand_id, table_name, history)
        except Exception as err:
            state.history_error = f"{type(err).__name__}: {err}"
    return state


def read_store_history(root: Any, brand_id: int, table_name: str, limit: int = HISTORY_RECORDS) -> list[dict[str, Any]]:
    """The newest ``limit`` history records of one store, newest first (one small file each: an object store
    answers them one request at a time, so :func:`inspect_stores` reads them beside the rest)."""
    return SnapshotStore(root, brand_id, table_name).read_history(limit)


def _rejection(record: Mapping[str, Any]) -> dict[str, Any]:
    """A quarantined row as the page shows it: its id, the change and StopChurn's reason (not its content)."""
    update = record.get("update")
    update = update if isinstance(update, dict) else {}
    data = update.get("data")
    data = data if isinstance(data, dict) else {}
    return {"id": record.get("id", data.get("id")), "change": update.get("type"), "reason": record.get("reason")}


def inspect_stores(
    targets: Mapping[tuple[str, int, str], Any], *, timeout_s: float = STORE_TIMEOUT_S, history: int = HISTORY_RECORDS
) -> dict[tuple[str, int, str], StoreState]:
    """Inspect several stores at once, keyed ``(location, brand_id, table_name)`` with the root as value, and read
    the newest ``history`` records of each beside it.

    A store (or its history) that has not answered after ``timeout_s`` (an object store that hangs) is reported as
    such; its reader thread is left to finish on its own.
    """
    if not targets:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, 2 * len(targets)), thread_name_prefix="stopchurn")
    try:
        futures = {key: pool.submit(inspect_store, root, key[1], key[2]) for key, root in targets.items()}
        histories = {
            key: pool.submit(read_store_history, root, key[1], key[2], history) for key, root in targets.items()
        }
        pending: list[concurrent.futures.Future[Any]] = [*futures.values(), *histories.values()]
        concurrent.futures.wait(pending, timeout=timeout_s)
        late = f"no answer within {timeout_s:g} s"
        states = {}
        for key, future in futures.items():
            if future.done():
                states[key] = future.result()
            else:
                future.cancel()
                states[key] = StoreState(location=key[0], brand_id=key[1], table_name=key[2], error=late)
            reading = histories[key]
            if not reading.done():
                reading.cancel()
                states[key].history_error = late
            elif reading.exception() is not None:
                error = reading.exception()
                states[key].history_error = f"{type(error).__name__}: {error}"
            else:
                states[key].history = reading.result()
        return states
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
