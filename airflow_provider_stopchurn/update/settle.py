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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from airflow_provider_stopchurn.options import shape_changes
from airflow_provider_stopchurn.store import CREATED_AT, HASH_1, HASH_2, OP, Committed, Plan, SnapshotStore
from airflow_provider_stopchurn.store.lock import TableLock
from airflow_provider_stopchurn.update.diff import (
    BASE_ROW,
    DIRTY_HASH,
    DIRTY_INSERT,
    DIRTY_UPDATE,
    ROW_HASH,
    TARGET_ROW,
    data_columns,
    with_hashes,
)
from airflow_provider_stopchurn.update.plan import PLAN_FORMAT, RunPlan, kind_changes

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
    #: updates not acknowledged: sent without an answer (StopChurn may have applied them), and never sent (or
    #: refused whole); both are sent again by the next run. For a plan a killed run left, the chunks it may have
    #: had in flight are bounded by the plan's ``max_concurrent_requests`` (chunks are started in order).
    unacknowledged: int = 0
    never_sent: int = 0


_NOT_APPLIED, APPLIED, _UNCERTAIN = 0, 1, 2


def _status(plan: Plan, acks: Mapping[int, Sequence[Mapping[str, Any]]], uncertain: Iterable[int] | None) -> np.ndarray:
    """Per update of the plan: applied, not applied, or uncertain (its request may have been applied)."""
    total = int(plan.meta.get("total_updates", plan.chunks[-1][1] if plan.chunks else 0))
    status = np.full(total, _NOT_APPLIED, dtype=np.int8)
    unknown = set(range(len(plan.chunks))) - set(acks) if uncertain is None else set(uncertain) - set(acks)
    for chunk in unknown:
        start, end = plan.chunks[chunk]
        status[start:end] = _UNCERTAIN
    for chunk in acks:
        start, end = plan.chunks[chunk]
        status[start:end] = APPLIED
    rejected = sorted({int(r["position"]) for records in acks.values() for r in records if not r.get("transient")})
    status[rejected] = _NOT_APPLIED  # StopChurn refused that one update on its own: certainly not applied
    held = sorted({int(r["position"]) for records in acks.values() for r in records if r.get("transient")})
    status[held] = _UNCERTAIN  # it failed alone with a retryable error: it may have been applied
    return status


def settle(
    store: SnapshotStore,
    plan: Plan,
    acks: Mapping[int, Sequence[Mapping[str, Any]]],
    *,
    uncertain: Iterable[int] | None = None,
    lock: Any = None,
    run: Callable[[Settled], Mapping[str, Any] | None] | None = None,
    target: pl.DataFrame | None = None,
) -> Settled:
    """Commit what StopChurn acknowledged of ``plan`` (``acks``: chunk -> its rejection records).

    :param uncertain: chunks whose request was sent but not acknowledged (a timeout, a lost answer, a 5xx, a
        chunk split on 413 or bisected that failed after a part of it was applied). None: every chunk not
        acknowledged (a plan a crash left). A held update (acknowledged with its chunk as ``transient``) is
        uncertain too.
        The rows of these chunks are recorded dirty, so the next run sends their current state again.
    :param run: given what this settle delivered, the run record to keep in ``CURRENT`` (see ``SnapshotStore.commit``).
    :param target: the plan's target snapshot when the caller holds it in memory (else it is read when needed).
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
    status = _status(plan, acks, uncertain)
    positions = None if plan.changes_from_target else store.read_changes(plan)
    result.rejections = _rejection_records(acks)
    _count(result, status == APPLIED, positions)
    count_unsent(result, plan, acks, uncertain, status)

    # the rows still rejected: this plan's refusals and the earlier ones it did not resolve (even if it applied
    # nothing, so a run whose only change was refused again still says where its rows are)
    if lock is not None:
        lock.check()  # a run that lost the table writes nothing more
    result.quarantine_uri = store.write_quarantine(plan.plan_id, result.rejections)
    if not (status != _NOT_APPLIED).any():
        store.discard_plan(plan)
        return result
    kinds = dict(plan.meta["kinds"])
    keys = list(plan.meta["key_columns"])
    record = run(result) if run is not None else None
    if (status == APPLIED).all():
        store.commit(
            plan.target_version,
            base_version=plan.base_version,
            kinds=kinds,
            key_columns=keys,
            rows=int(plan.meta.get("target_rows", -1)),
            plan_id=plan.plan_id,
            row_hash=plan.meta.get("row_hash"),
            lock=lock,
            run=record,
            shape=plan.meta.get("shape"),
            frame=target,
        )
        result.version = plan.target_version
        return result

    settled = _settled_frame(store, plan, status, positions, target)
    frame = settled.frame
    version = store.write_snapshot(frame)
    store.commit(
        version,
        base_version=plan.base_version,
        kinds=settled.kinds,
        key_columns=keys,
        rows=frame.height,
        plan_id=plan.plan_id,
        row_hash=settled.row_hash,
        lock=lock,
        run=record,
        shape=settled.shape,
        frame=frame,
    )
    store.delete_snapshot(plan.target_version)
    result.version = version
    log.info(
        "Settled plan %s of %r: %d of %d chunks acknowledged, %d rows rejected, %d updates sent without an "
        "acknowledgement and %d never sent (both sent again next run); committed %s.",
        plan.plan_id,
        store.table_name,
        len(acks),
        len(plan.chunks),
        len(result.rejections),
        result.unacknowledged,
        result.never_sent,
        version,
    )
    return result


def commit_unsent(
    store: SnapshotStore,
    plan: RunPlan,
    *,
    base_version: str | None,
    lock: TableLock,
    shape: Mapping[str, Any] | None,
    run: Mapping[str, Any] | None = None,
    written: tuple[str, int] | None = None,
) -> str:
    """Commit ``plan``'s target as the table's snapshot when nothing of it is to be sent (a baseline, or hashes
    rewritten): write the snapshot file, then point ``CURRENT`` at it under ``lock``. Returns the new version.

    :param written: the version and rows of the target when it is written already (a streamed plan).
    """
    version, rows = written if written is not None else (store.write_snapshot(plan.target), plan.target.height)
    store.commit(
        version,
        base_version=base_version,
        kinds=plan.kinds,
        key_columns=plan.key_columns,
        rows=rows,
        plan_id=None,
        row_hash=ROW_HASH,
        lock=lock,
        run=run,
        shape=shape,
        frame=plan.target if written is None else None,
    )
    return version


def preview(store: SnapshotStore, plan: Plan, acks: Mapping[int, Sequence[Mapping[str, Any]]]) -> Committed | None:
    """The snapshot :func:`settle` would commit for a plan a crash left, built in memory (a dry run writes nothing)."""
    committed = store.read_committed()
    if plan.meta.get("plan_format") != PLAN_FORMAT:
        return committed
    status = _status(plan, acks, None)
    if not (status != _NOT_APPLIED).any():
        return committed
    positions = None if plan.changes_from_target else store.read_changes(plan)
    if (status == APPLIED).all():
        settled = _Frame(
            store.read_snapshot(plan.target_version),
            dict(plan.meta["kinds"]),
            plan.meta.get("row_hash"),
            plan.meta.get("shape"),
        )
    else:
        settled = _settled_frame(store, plan, status, positions)
    return Committed(
        store,
        kinds=settled.kinds,
        key_columns=plan.meta["key_columns"],
        version=plan.target_version,
        rows=settled.frame.height,
        row_hash=settled.row_hash,
        frame=settled.frame,
        shape=settled.shape,
    )


def count_unsent(
    result: Settled,
    plan: Plan,
    acks: Mapping[int, Sequence[Mapping[str, Any]]],
    uncertain: Iterable[int] | None,
    status: np.ndarray,
) -> None:
    """Tell the updates sent without an acknowledgement from those never sent (the protocol resends both alike).

    A delivery starts chunks in order, at most ``max_concurrent_requests`` at a time: of a plan a killed run left,
    the chunks not acknowledged before its last acknowledged one were sent, and at most that many after it. A plan
    without the bound (written by an older version) counts every chunk not acknowledged as sent.
    """
    chunks = plan.chunks
    if uncertain is not None:
        sent = set(uncertain) - set(acks)
    else:
        missing = [c for c in range(len(chunks)) if c not in acks]
        bound = plan.meta.get("max_concurrent_requests")
        if bound is None:
            sent = set(missing)
        else:
            last = max(acks, default=-1)
            sent = {c for c in missing if c < last} | set([c for c in missing if c > last][: max(1, int(bound))])
    held = sum(1 for records in acks.values() for r in records if r.get("transient"))
    result.unacknowledged = sum(chunks[c][1] - chunks[c][0] for c in sent if c < len(chunks)) + held
    result.never_sent = max(0, int((status != APPLIED).sum()) - len(result.rejections) - result.unacknowledged)


def _count(result: Settled, applied: np.ndarray, positions: pl.DataFrame | None) -> None:
    if positions is None:
        result.inserted = int(applied.sum())
        return
    ops = positions.get_column(OP).filter(pl.Series(applied)).value_counts()
    counts = dict(zip(ops.get_column(OP).to_list(), ops.get_column("count").to_list(), strict=True))
    result.inserted = int(counts.get("insert", 0))
    result.updated = int(counts.get("update", 0))
    result.deleted = int(counts.get("delete", 0))


def _rejection_records(acks: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The updates StopChurn refused (400); held ones (``transient``: failing alone, maybe applied) are not."""
    return [dict(r) for chunk in sorted(acks) for r in acks[chunk] if not r.get("transient")]


def _marked(frame: pl.DataFrame, mark: int, like: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        pl.lit(DIRTY_HASH, dtype=like.schema[HASH_1]).alias(HASH_1),
        pl.lit(mark, dtype=like.schema[HASH_2]).alias(HASH_2),
    )


@dataclass(frozen=True)
class _Frame:
    """A settled snapshot and what describes its rows: their kinds, row-hash function and shape options."""

    frame: pl.DataFrame
    kinds: dict[str, str]
    row_hash: str | None
    shape: dict[str, Any] | None


def _settled_frame(
    store: SnapshotStore,
    plan: Plan,
    status: np.ndarray,
    positions: pl.DataFrame | None,
    target: pl.DataFrame | None = None,
) -> _Frame:
    """Base rows whose change was not applied + target rows whose change was; uncertain ones marked dirty."""
    if target is None:
        target = store.read_snapshot(plan.target_version)
    keys = list(plan.meta["key_columns"])
    kinds, shape = dict(plan.meta["kinds"]), plan.meta.get("shape")
    if positions is None:  # a first load: update i is target row i, an insert
        positions = pl.DataFrame(
            {
                OP: ["insert"] * len(status),
                BASE_ROW: pl.Series([None] * len(status), dtype=pl.Int64),
                TARGET_ROW: pl.Series(np.arange(len(status)), dtype=pl.Int64),
            }
        )
    flags = pl.Series("__sc_status", status)
    marked = positions.select(OP, BASE_ROW, TARGET_ROW).with_columns(flags)
    # the old id of a row whose id changed is a delete sharing its base row with the row's upsert: when that
    # delete was not applied (refused, or uncertain) the old id may still be at StopChurn, and only the base row
    # names it. The base row is kept (as a delete not applied, or uncertain, keeps it) instead of the new one, so
    # the next run deletes the old id again and writes the new one again.
    not_deleted = marked.filter((pl.col(OP) == "delete") & (pl.col("__sc_status") != APPLIED)).get_column(BASE_ROW)
    blocked = (
        ((pl.col(OP) != "delete") & pl.col(BASE_ROW).is_in(not_deleted.drop_nulls().implode())).fill_null(False)
        if plan.meta.get("deletes_first") and not_deleted.len()
        else pl.lit(False)
    )
    marked = marked.filter(~blocked)
    applied = marked.filter(pl.col("__sc_status") == APPLIED)
    unsure = marked.filter(pl.col("__sc_status") == _UNCERTAIN)
    unsure_upserts = unsure.filter(pl.col(OP) != "delete")
    unsure_deletes = unsure.filter(pl.col(OP) == "delete")
    columns = [*data_columns(target), CREATED_AT]
    parts = [with_hashes(target[applied.get_column(TARGET_ROW).drop_nulls()].select(columns))]
    for op, mark in (("insert", DIRTY_INSERT), ("update", DIRTY_UPDATE)):
        rows = unsure_upserts.filter(pl.col(OP) == op).get_column(TARGET_ROW)
        parts.append(_marked(target[rows].select(columns), mark, target))
    if plan.base_version is None:
        return _Frame(
            _one_row_per_key(pl.concat([p.select(target.columns) for p in parts]), keys), kinds, ROW_HASH, shape
        )
    committed = store.read_committed()
    base_kinds = dict(committed.kinds) if committed is not None else {}
    base = store.read_snapshot(plan.base_version)
    replaced = pl.concat([applied.get_column(BASE_ROW), unsure.get_column(BASE_ROW)]).drop_nulls()
    keep = np.ones(base.height, dtype=bool)
    keep[replaced.to_numpy()] = False
    kept_base = base.filter(pl.Series(keep))
    maybe_deleted = base[unsure_deletes.get_column(BASE_ROW)]
    if any(base.schema[k] != target.schema[k] for k in keys):
        new = pl.concat([p.select(target.columns) for p in parts])
        old = pl.concat([kept_base, _marked(maybe_deleted, DIRTY_UPDATE, base)])
        return _across_key_types(store, plan, new, old, committed, _Frame(new, kinds, ROW_HASH, shape))
    kept = _as_target(kept_base, target, columns)
    shape_changed = committed is not None and shape_changes(committed.shape, shape or {}, columns)
    if kind_changes(base_kinds, kinds) or shape_changed:
        # values converted to the new types, or rows sent in another shape, may not be what StopChurn holds:
        # resend them next run
        kept = _marked(kept, DIRTY_UPDATE, target)
        kept = kept.filter(pl.all_horizontal([pl.col(k).is_not_null() for k in keys]))
    else:
        # rehash in the target's dtypes, but a row still dirty from an earlier settle stays dirty
        was_dirty = kept_base.get_column(HASH_1) == DIRTY_HASH
        old_hashes = kept_base.select(HASH_1, HASH_2).cast(target.select(HASH_1, HASH_2).schema)
        kept = with_hashes(kept).with_columns(
            pl.when(was_dirty).then(old_hashes.get_column(h)).otherwise(pl.col(h)).alias(h) for h in (HASH_1, HASH_2)
        )
    parts.append(kept)
    parts.append(_marked(_as_target(maybe_deleted, target, columns), DIRTY_UPDATE, target))
    return _Frame(_one_row_per_key(pl.concat([p.select(target.columns) for p in parts]), keys), kinds, ROW_HASH, shape)


def _across_key_types(
    store: SnapshotStore,
    plan: Plan,
    new: pl.DataFrame,
    old: pl.DataFrame,
    committed: Committed | None,
    as_target: _Frame,
) -> _Frame:
    """Settle a plan whose key columns changed type: its rows name other ids than the base's (``3`` vs ``"3"``).

    A snapshot has one type per column, so old and new ids are never recorded together (an old id cast to the
    new type would name another id, or collide with a new one). The plan's deletes were all settled before its
    first insert was sent (``deletes_first``): while no new row may have reached StopChurn, the base rows still
    there are kept in their own types, and the next run deletes them; once new rows were sent, every delete was
    acknowledged, except one StopChurn refused, and the new rows are recorded.
    """
    if not new.height and committed is not None:
        return _Frame(old, dict(committed.kinds), committed.row_hash, committed.shape)
    if old.height:
        log.warning(
            "Plan %s of %r changed the type of its key columns; %d rows of the old type are no longer tracked: the "
            "ids the source still has are sent again next run, and an old id StopChurn refused to delete (see the "
            "quarantine file) may remain there.",
            plan.plan_id,
            store.table_name,
            old.height,
        )
    return as_target


def _one_row_per_key(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """A settled snapshot holds each key once (a commit refuses one that does not). Should two rows name one key,
    one is kept, marked dirty, so the next run sends that key's current state (or deletes it) again."""
    if frame.select(keys).n_unique() == frame.height:  # half the cost of marking; the common case
        return frame
    twice = frame.select(keys).is_duplicated()
    log.error("A settled snapshot held %d rows of repeated keys; they are sent again next run.", int(twice.sum()))
    again = frame.filter(twice).unique(subset=keys, keep="first", maintain_order=True)
    return pl.concat([frame.filter(~twice), _marked(again, DIRTY_UPDATE, frame)])


def _as_target(frame: pl.DataFrame, target: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Base rows in the target's columns and dtypes (a column the base lacks is null)."""
    return frame.select(
        [
            pl.col(c).cast(target.schema[c], strict=False)
            if c in frame.columns
            else pl.lit(None, target.schema[c]).alias(c)
            for c in columns
        ]
    )


__all__ = ["Settled", "count_unsent", "preview", "settle"]
