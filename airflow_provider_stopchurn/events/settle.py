"""Settling an event plan: what StopChurn acknowledged joins the ledger; the rest is read from the source again.

**Events have no diff to recompute**, so a plan is finished rather than re-planned:

* a crash, or a failure that a retry may fix (retries exhausted on 408/429/5xx/network errors, a lost lock),
  leaves the plan and its acknowledgements in the store; the next try (or the next run) sends the chunks not
  acknowledged, from the plan, then commits it and only then reads the source again;
* a permanent failure (400, 401, 413 of a single event) *settles* the plan (:func:`settle_event_plan`): the keys
  of the acknowledged chunks join the ledger, the watermark stays where it was, and the plan is dropped. The next
  run reads the same window again, the ledger drops what StopChurn acknowledged, and the rest is sent once the
  cause is fixed;
* so does the ``SETTLE_AFTER_FAILED_TRIES``-th try of a plan that StopChurn answered with a retryable error (a
  chunk it keeps failing with a 5xx must not hold the stream back for ever, and the next read must see a source
  fixed meanwhile); each such try leaves an empty mark in the plan's folder. A lost lock or a crash is no try.
  ``stopchurn settle --stream`` settles a pending plan by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from airflow_provider_stopchurn.events.ledger import KEY, LEDGER_KINDS, WATERMARK, StreamState, committed_ledger
from airflow_provider_stopchurn.events.plan import EVENT_PLAN_FORMAT, is_event_plan
from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.store import Plan, SnapshotStore


@dataclass
class EventSettled:
    """What settling an event plan did."""

    plan_id: str
    acknowledged_chunks: int
    total_chunks: int
    #: events of the acknowledged chunks, now in the ledger (never sent again)
    recorded_events: int = 0
    #: events of the other chunks: the next run reads the window again and sends those the source still returns
    unacknowledged_events: int = 0
    committed: bool = False
    ledger_keys: int = 0
    watermark_ms: int | None = None


def settle_event_plan(
    store: SnapshotStore, plan: Plan, *, lock: Any = None, run: Mapping[str, Any] | None = None
) -> EventSettled:
    """Commit what StopChurn acknowledged of an event plan and drop the rest.

    The keys of the acknowledged chunks join the ledger (they are never sent again); the watermark stays where it
    was before the plan, so the next run reads the same window again and sends the other events, re-planned from
    the source (a chunk that was sent but not acknowledged may then reach StopChurn twice). Nothing acknowledged:
    the plan is dropped. Crash-safe as a commit is: the ledger is written before ``CURRENT`` names it.

    :param lock: the stream's lock, held by the caller (checked before the commit).
    :param run: the run record kept in ``CURRENT`` (see ``SnapshotStore.commit``).
    """
    acked = store.acked(plan)
    result = EventSettled(plan.plan_id, len(acked), len(plan.chunks))
    total = plan.chunks[-1][1] if plan.chunks else 0
    result.recorded_events = sum(plan.chunks[c][1] - plan.chunks[c][0] for c in acked if c < len(plan.chunks))
    result.unacknowledged_events = total - result.recorded_events
    if plan.meta.get("plan_format") != EVENT_PLAN_FORMAT:
        store.discard_plan(plan)  # written by another version: its events are read from the source again
        return result
    base = StreamState.of_record(plan.meta["base_state"])
    result.watermark_ms = base.watermark_ms
    if not acked:
        store.discard_plan(plan)
        return result
    changes = store.read_changes(plan)
    mask = np.zeros(changes.height, dtype=bool)
    for chunk in acked:
        start, end = plan.chunks[chunk]
        mask[start:end] = True
    ledger = pl.concat(
        [committed_ledger(store.read_committed()), changes.filter(pl.Series(mask)).select(KEY, WATERMARK)]
    )
    version = store.write_snapshot(ledger)
    state = StreamState(base.watermark_ms, plan.meta["state"]["event_key"], base.covered_ms)
    store.commit(
        version,
        base_version=plan.base_version,
        kinds=dict(LEDGER_KINDS),
        key_columns=[KEY],
        rows=ledger.height,
        plan_id=plan.plan_id,
        lock=lock,
        run=run,
        state=state.record(),
    )
    store.delete_snapshot(plan.target_version)
    result.committed = True
    result.ledger_keys = ledger.height
    return result


def settle_pending_event_plan(store: SnapshotStore, *, holder: str, lock_ttl_s: float = 600.0) -> EventSettled | None:
    """Settle the stream's pending plan under its lock, as a run would (``stopchurn settle --stream``).

    Returns None when no plan is pending. A plan of another kind (a table's) or another brand is refused.
    """
    with store.lock(holder, ttl_s=lock_ttl_s) as lock, lock.heartbeat():
        plan = store.pending_plan()
        if plan is None:
            return None
        if not is_event_plan(plan.meta) or plan.meta.get("brand_id", store.brand_id) != store.brand_id:
            raise StopChurnConfigError(
                f"The pending plan in {store.location} is not an event plan of brand {store.brand_id}; nothing was "
                "changed."
            )
        return settle_event_plan(store, plan, lock=lock)


__all__ = ["EventSettled", "settle_event_plan", "settle_pending_event_plan"]
