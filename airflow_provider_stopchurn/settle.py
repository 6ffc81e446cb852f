"""Settling a plan: commit exactly what StopChurn acknowledged, whatever happened to the rest.

What StopChurn holds after any delivery, complete or not, is *the committed (base) snapshot + the changes of the
acknowledged chunks - the rows StopChurn rejected inside them*. :func:`settle` computes that table and commits it:

- every chunk acknowledged, nothing rejected: the plan's target snapshot is committed as it is;
- nothing acknowledged: the plan is dropped, the base stays committed;
- otherwise: base rows whose change was not applied are kept, the applied rows are taken from the target, and
  the result is written as a new snapshot and committed.

Each step is crash-safe: the settled snapshot file is written before the ``CURRENT`` pointer names it (with the
plan's id, so a crash between the commit and the removal of ``PLAN`` is recognised), and nothing else is changed.
Settling the same plan twice gives the same table. After a settle, the next plan diffs the current source against
it, so a row whose change was not applied (not sent, in flight at a crash, or rejected) is sent again.

Column types stay those of the target when the base's are compatible (same columns, kinds equal up to all-null
columns and int/float); across an incompatible schema change the kept base rows are marked dirty (``DIRTY_HASH``)
so the next run resends them rather than trusting values converted to the new types.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import polars as pl

from airflow_provider_stopchurn.diff import BASE_ROW, DIRTY_HASH, ROW_HASH, TARGET_ROW, data_columns, with_hashes
from airflow_provider_stopchurn.plan import PLAN_FORMAT, UPDATE, kind_changes
from airflow_provider_stopchurn.snapshot import CREATED_AT, HASH_1, HASH_2, OP, Committed, Plan, SnapshotStore

log = logging.getLogger(__name__)


@dataclass
class Settled:
    """What settling a plan committed."""

    plan_id: str
    acked_chunks: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)
    quarantine_uri: str | None = None
    version: str | None = None


def settle(
    store: SnapshotStore,
    plan: Plan,
    acks: Mapping[int, Sequence[Mapping[str, Any]]],
    *,
    lock: Any = None,
    run: Callable[[Settled], Mapping[str, Any]] | None = None,
) -> Settled:
    """Commit what StopChurn acknowledged of ``plan`` (``acks``: chunk -> its rejection records).

    :param run: given what this settle delivered, the run record to keep in ``CURRENT`` (see ``SnapshotStore.commit``).
    """
    result = Settled(plan.plan_id, acked_chunks=len(acks))
    if plan.meta.get("plan_format") != PLAN_FORMAT:
        log.warning(
            "Dropping the pending plan %s in %s, written by an older version of this provider; its changes are "
            "diffed and sent again.",
            plan.plan_id,
            store.location,
        )
        store.discard_plan(plan)
        return result
    total = plan.chunks[-1][1] if plan.chunks else 0
    applied = np.zeros(total, dtype=bool)
    for chunk in acks:
        start, end = plan.chunks[chunk]
        applied[start:end] = True
    rejected = sorted({int(r["position"]) for records in acks.values() for r in records})
    applied[rejected] = False
    positions = None if plan.changes_from_target else store.read_changes(plan)
    result.rejections = _rejection_records(acks, positions)
    _count(result, applied, positions)

    if not acks:
        store.discard_plan(plan)
        return result
    if result.rejections:
        result.quarantine_uri = store.write_quarantine(plan.plan_id, result.rejections)
    kinds = dict(plan.meta["kinds"])
    keys = list(plan.meta["key_columns"])
    if applied.all():
        store.commit(
            plan.target_version,
            base_version=plan.base_version,
            kinds=kinds,
            key_columns=keys,
            rows=int(plan.meta.get("target_rows", -1)),
            plan_id=plan.plan_id,
            row_hash=plan.meta.get("row_hash"),
            lock=lock,
            run=run(result) if run is not None else None,
        )
        result.version = plan.target_version
        return result

    frame = _settled_frame(store, plan, applied, positions)
    version = store.write_snapshot(frame)
    store.commit(
        version,
        base_version=plan.base_version,
        kinds=kinds,
        key_columns=keys,
        rows=frame.height,
        plan_id=plan.plan_id,
        row_hash=ROW_HASH,
        lock=lock,
        run=run(result) if run is not None else None,
    )
    store.delete_snapshot(plan.target_version)
    result.version = version
    log.info(
        "Settled plan %s of %r: %d of %d chunks acknowledged, %d rows rejected; committed %s.",
        plan.plan_id,
        store.table_name,
        len(acks),
        len(plan.chunks),
        len(rejected),
        version,
    )
    return result


def preview(store: SnapshotStore, plan: Plan, acks: Mapping[int, Sequence[Mapping[str, Any]]]) -> Committed | None:
    """The snapshot :func:`settle` would commit for ``plan``, built in memory (a dry run writes nothing)."""
    committed = store.read_committed()
    if plan.meta.get("plan_format") != PLAN_FORMAT or not acks:
        return committed
    total = plan.chunks[-1][1] if plan.chunks else 0
    applied = np.zeros(total, dtype=bool)
    for chunk in acks:
        start, end = plan.chunks[chunk]
        applied[start:end] = True
    applied[sorted({int(r["position"]) for records in acks.values() for r in records})] = False
    positions = None if plan.changes_from_target else store.read_changes(plan)
    frame = (
        store.read_snapshot(plan.target_version) if applied.all() else _settled_frame(store, plan, applied, positions)
    )
    return Committed(
        store,
        kinds=dict(plan.meta["kinds"]),
        key_columns=plan.meta["key_columns"],
        version=plan.target_version,
        rows=frame.height,
        row_hash=ROW_HASH if not applied.all() else plan.meta.get("row_hash"),
        frame=frame,
    )


def _count(result: Settled, applied: np.ndarray, positions: pl.DataFrame | None) -> None:
    if positions is None:
        result.inserted = int(applied.sum())
        return
    ops = positions.get_column(OP).filter(pl.Series(applied)).value_counts()
    counts = dict(zip(ops.get_column(OP).to_list(), ops.get_column("count").to_list(), strict=True))
    result.inserted = int(counts.get("insert", 0))
    result.updated = int(counts.get("update", 0))
    result.deleted = int(counts.get("delete", 0))


def _rejection_records(
    acks: Mapping[int, Sequence[Mapping[str, Any]]], positions: pl.DataFrame | None
) -> list[dict[str, Any]]:
    records = [dict(r) for chunk in sorted(acks) for r in acks[chunk]]
    if positions is not None:
        for record in records:
            record["update"] = orjson.loads(positions.get_column(UPDATE)[int(record["position"])])
    return records


def _settled_frame(
    store: SnapshotStore, plan: Plan, applied: np.ndarray, positions: pl.DataFrame | None
) -> pl.DataFrame:
    """Base rows whose change was not applied + target rows whose change was."""
    target = store.read_snapshot(plan.target_version)
    index = pl.Series(np.flatnonzero(applied), dtype=pl.Int64)
    if positions is None:
        take, remove = index, pl.Series([], dtype=pl.Int64)
    else:
        done = positions[index]
        take = done.get_column(TARGET_ROW).drop_nulls()
        remove = done.get_column(BASE_ROW).drop_nulls()
    new_rows = target[take]
    if plan.base_version is None:
        return new_rows
    committed = store.read_committed()
    base_kinds = dict(committed.kinds) if committed is not None else {}
    base = store.read_snapshot(plan.base_version)
    keep = np.ones(base.height, dtype=bool)
    keep[remove.to_numpy()] = False
    kept = base.filter(pl.Series(keep))
    columns = [*data_columns(target), CREATED_AT]
    kept = kept.select(
        [
            pl.col(c).cast(target.schema[c], strict=False)
            if c in kept.columns
            else pl.lit(None, target.schema[c]).alias(c)
            for c in columns
        ]
    )
    if kind_changes(base_kinds, dict(plan.meta["kinds"])):
        kept = kept.with_columns(
            pl.lit(DIRTY_HASH, dtype=target.schema[HASH_1]).alias(HASH_1),
            pl.lit(DIRTY_HASH, dtype=target.schema[HASH_2]).alias(HASH_2),
        )
        kept = kept.filter(pl.all_horizontal([pl.col(k).is_not_null() for k in plan.meta["key_columns"]]))
    else:
        kept = with_hashes(kept)
    return pl.concat([kept.select(target.columns), with_hashes(new_rows.select(columns))])


__all__ = ["Settled", "preview", "settle"]
