"""Planning a run, without I/O beyond reading the committed snapshot: schema policy, safeguards, the change frame
and its encoding into chunked updates.

:func:`make_plan` turns a canonical source and the committed snapshot into a :class:`RunPlan`: the target snapshot,
one encoded update per change in send order (deletes, updates, inserts; each by key) and the chunk ranges. Each
update keeps its row's position in the base and target snapshots (``BASE_ROW`` / ``TARGET_ROW``), so the plan can
be settled after any partial delivery (``settle.py``). Deletes are encoded with the committed snapshot's kinds and
columns (a deleted row goes out as it was last delivered), inserts and updates with the source's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import polars as pl

from airflow_provider_stopchurn.encode.chunks import bodies_bytes, plan_chunks
from airflow_provider_stopchurn.encode.records import encode_rows, encode_updates
from airflow_provider_stopchurn.exceptions import SafeguardError, SourceDataError
from airflow_provider_stopchurn.options import SyncOptions, shape_changes
from airflow_provider_stopchurn.source.frame import Canonical
from airflow_provider_stopchurn.store import CREATED_AT, OP, UPDATED_AT, Committed
from airflow_provider_stopchurn.update.diff import (
    BASE_ROW,
    ROW_HASH,
    TARGET_ROW,
    SnapshotDiff,
    data_columns,
    diff_snapshot,
    first_load,
    like_chunks,
)
from airflow_provider_stopchurn.update.ids import reconcile_ids
from airflow_provider_stopchurn.update.safeguards import APPROVE_HINT, approval, check_safeguards
from airflow_provider_stopchurn.update.window import Rows, Window

log = logging.getLogger(__name__)

#: Version of the plan files this module writes; a pending plan of another version is re-planned.
PLAN_FORMAT = 2
UPDATE = "__sc_update"
_NUMERIC = {"int", "float"}
#: rows encoded at a time: the row JSON of one batch is held beside the window's updates (about 300 bytes a row)
_ENCODE_BATCH = 50_000


@dataclass(frozen=True)
class Part:
    """A run of updates of one op, in send order: rows with createdAt (+ positions), encoded with ``kinds``.

    :param op: ``delete``, ``update`` or ``insert``.
    :param frame: the rows (a frame, or rows read a slice at a time).
    :param kinds: the kinds the rows are encoded with.
    """

    op: str
    frame: Rows
    kinds: Mapping[str, str]


@dataclass
class RunPlan:
    """Everything one delivery needs. The updates are encoded window by window (:meth:`windows`), never all at once."""

    target: pl.DataFrame
    kinds: dict[str, str]
    key_columns: list[str]
    #: per update: OP, BASE_ROW, TARGET_ROW; None for a first load (update i is target row i)
    positions: pl.DataFrame | None
    parts: list[Part] = field(default_factory=list)
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    #: record ``target`` as delivered without sending anything, on purpose (initial_load="baseline", rebaseline)
    baseline: bool = False
    #: nothing to send, but the snapshot must be rewritten (new kinds or another row-hash function)
    rewrite: bool = False
    schema_change: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def changes(self) -> int:
        return self.inserted + self.updated + self.deleted

    def windows(self, options: SyncOptions, run_ms: int) -> Iterator[Window]:
        """The updates in send order, ``rows`` at a time: each window encoded and cut into chunks.

        Only one window of update JSON exists at a time. Chunk ranges are positions in the whole plan.
        """
        rows = options.window_rows
        offset = 0
        pending: list[pl.Series] = []
        held = 0
        for part in self.parts:
            if pending and part.op != "delete" and self.meta.get("deletes_first"):
                # a window is delivered whole before the next is sent: every delete is settled before any insert
                yield encoded_window(offset, pending, options)
                offset, pending, held = offset + held, [], 0
            start = 0
            while start < part.frame.height:  # a window may span parts: chunks pack across ops as before
                take = min(rows - held, part.frame.height - start)
                batch = _with_updated_at(part.frame.slice(start, take), options, run_ms, part.op)
                pending.append(_encode(batch, part.kinds, options))
                held += take
                start += take
                if held == rows:
                    yield encoded_window(offset, pending, options)
                    offset, pending, held = offset + held, [], 0
        if pending:
            yield encoded_window(offset, pending, options)


def encoded_window(offset: int, encoded: list[pl.Series], options: SyncOptions) -> Window:
    updates = encoded[0] if len(encoded) == 1 else pl.concat(encoded, rechunk=False)
    sizes = updates.str.len_bytes().to_numpy()
    chunks = plan_chunks(sizes, chunk_size=options.chunk_size, max_chunk_bytes=options.max_chunk_bytes)
    return Window(offset, updates, [(offset + a, offset + b) for a, b in chunks], bodies_bytes(sizes, chunks))


# --- schema policy -------------------------------------------------------------------------------------------
def _compatible(old: str, new: str) -> bool:
    return old == new or "null" in (old, new) or {old, new} <= _NUMERIC


def schema_changes(committed: Committed, canon: Canonical, options: SyncOptions | None = None) -> dict[str, Any]:
    """Columns added, removed or retyped between the snapshot and the source, and shape options changed since the
    snapshot was sent (``options``; ``SHAPE_OPTIONS``) ({} when none)."""
    change = kind_changes(committed.kinds, canon.kinds, committed.key_columns, canon.key_columns)
    if options is not None:
        shape = shape_changes(committed.shape, options.shape(), [*committed.kinds, *canon.kinds])
        if shape:
            change["options"] = shape
    return change


def kind_changes(
    old: Mapping[str, str], new: Mapping[str, str], old_keys: Any = None, new_keys: Any = None
) -> dict[str, Any]:
    added = [c for c in new if c not in old]
    removed = [c for c in old if c not in new]
    retyped = {c: f"{old[c]} -> {new[c]}" for c in new if c in old and not _compatible(old[c], new[c])}
    change: dict[str, Any] = {}
    if added:
        change["added"] = added
    if removed:
        change["removed"] = removed
    if retyped:
        change["retyped"] = retyped
    if old_keys is not None and tuple(old_keys) != tuple(new_keys):
        change["key_columns"] = f"{list(old_keys)} -> {list(new_keys)}"
    return change


def describe(change: Mapping[str, Any]) -> str:
    parts = []
    for what in ("added", "removed"):
        if what in change:
            parts.append(f"{what} {change[what]}")
    if "retyped" in change:
        parts.append("retyped " + ", ".join(f"{c} ({t})" for c, t in change["retyped"].items()))
    if "key_columns" in change:
        parts.append(f"key columns {change['key_columns']}")
    if "options" in change:
        parts.append("options " + ", ".join(f"{name} ({t})" for name, t in change["options"].items()))
    return "; ".join(parts)


def align(canon: Canonical, base: Committed | None) -> pl.DataFrame:
    """The source with its all-null ('null' kind) columns cast to the snapshot's dtype, so stored types stay."""
    new = canon.frame
    if base is None:
        return new
    typed = [c for c in new.columns if canon.kinds[c] == "null" and base.kinds.get(c, "null") != "null"]
    if not typed:
        return new
    schema = base.columns(typed).schema
    return new.with_columns([pl.col(c).cast(schema[c]) for c in typed])


def kinds_after(canon: Canonical, base_kinds: Mapping[str, str]) -> dict[str, str]:
    return {c: (base_kinds.get(c, k) if k == "null" else k) for c, k in canon.kinds.items()}


def timestamp_column(canon: Canonical, name: str | None, role: str) -> pl.Series | None:
    """A named createdAt/updatedAt column as epoch ms, or None."""
    if name is None:
        return None
    if name not in canon.kinds:
        raise SourceDataError(f"{role} column {name!r} is not in the source (columns: {list(canon.kinds)}).")
    if canon.kinds[name] not in ("timestamp", "date", "int", "null"):
        raise SourceDataError(
            f"{role} column {name!r} must hold datetimes or epoch milliseconds, not {canon.kinds[name]} values."
        )
    return canon.frame.get_column(name).cast(pl.Int64)


# --- the plan ------------------------------------------------------------------------------------------------
def make_plan(canon: Canonical, committed: Committed | None, options: SyncOptions, run_ms: int) -> RunPlan:
    """Diff ``canon`` against ``committed`` under the run's options; raise before anything is sent."""
    keys = list(canon.key_columns)
    created = timestamp_column(canon, options.created_at_column, "created_at")
    timestamp_column(canon, options.updated_at_column, "updated_at")  # validated now, used when encoding
    base_kinds: dict[str, str] = dict(committed.kinds) if committed is not None else {}
    kinds = kinds_after(canon, base_kinds)
    meta = plan_meta(options, kinds, keys, run_ms)

    update_all = False
    schema_change = None
    if committed is not None:
        change = schema_changes(committed, canon, options)
        if change:
            schema_change = {"policy": options.on_schema_change, **change}
            if options.on_schema_change == "fail":
                raise SafeguardError(
                    f"The columns of brand {options.brand_id} table {options.table_name!r} changed; nothing was "
                    "sent.\n"
                    f"Source vs snapshot: {describe(change)}.\n"
                    "Set on_schema_change='update_all' to send every row with its new columns, or 'rebaseline' to "
                    "record the new table without sending."
                )
            log.warning(
                "Schema change on %r (%s), policy on_schema_change=%r.",
                options.table_name,
                describe(change),
                options.on_schema_change,
            )
            if options.on_schema_change == "rebaseline":
                return _baseline(canon, committed, kinds, keys, created, run_ms, meta, schema_change)
            update_all = True

    if committed is None:
        target = first_load(canon.frame, created=created, run_ms=run_ms)
        if options.initial_load == "baseline":
            plan = _empty(target, kinds, keys, meta, baseline=True)
            plan.unchanged = target.height
            return plan
        parts = [Part("insert", target, kinds)] if target.height else []
        return RunPlan(target, kinds, keys, None, parts, inserted=target.height, meta=meta)

    new_data = align(canon, committed)
    by_hash = not update_all and committed.row_hash == ROW_HASH and base_kinds == canon.kinds
    diff = diff_snapshot(
        new_data, committed, keys, created=created, run_ms=run_ms, by_hash=by_hash, update_all=update_all
    )
    approved = check_safeguards(diff.deleted.height, canon.frame.height, committed, options)
    return plan_from_diff(RunPlan, diff, committed, kinds, keys, meta, approved, schema_change=schema_change)


#: A kind of plan (:class:`RunPlan`, or one that adds to it).
P = TypeVar("P", bound=RunPlan)


def plan_from_diff(
    plan_type: type[P],
    diff: SnapshotDiff,
    committed: Committed,
    kinds: dict[str, str],
    keys: list[str],
    meta: dict[str, Any],
    approved: dict[str, int] | None,
    *,
    schema_change: dict[str, Any] | None = None,
) -> P:
    """The plan of a diff against ``committed``, its safeguards passed: ids reconciled, the order of deletes, and
    the change parts in send order (or the empty plan, rewritten only if the snapshot's kinds or hash changed).

    :param plan_type: the plan's class.
    :param diff: the source against the committed snapshot (``diff_snapshot``, or the streamed diff).
    :param committed: the committed snapshot diffed against.
    :param kinds: the plan's kinds (``kinds_after``).
    :param keys: the key columns.
    :param meta: the plan's meta (:func:`plan_meta`); the approval and the order of deletes are added to it.
    :param approved: the mass delete ``check_safeguards`` let through, or None.
    :param schema_change: the schema change being sent (``update_all``), or None.
    """
    if approved is not None:
        meta["approved_deletes"] = approved
    ids_moved = False
    if "id" in committed.kinds:  # every snapshot this provider writes has one; StopChurn keys rows by it
        diff, ids_moved = reconcile_ids(diff, committed, keys)
    retyped = _keys_retyped(diff, keys)
    if ids_moved or retyped:
        meta["deletes_first"] = True
    if retyped:  # an old id not deleted cannot be tracked beside the new ones: nothing new goes before all are
        meta["keys_retyped"] = True
    plan = plan_type(diff.target, kinds, keys, None, meta=meta, unchanged=diff.unchanged)
    if diff.inserted.height + diff.updated.height + diff.deleted.height == 0:
        # nothing to send; the snapshot is rewritten only if its kinds or hash function changed
        plan.rewrite = not (committed.kinds == kinds and committed.row_hash == ROW_HASH)
        return plan
    plan.parts, plan.positions = _change_parts(diff, committed.kinds, kinds)
    plan.inserted, plan.updated, plan.deleted = diff.inserted.height, diff.updated.height, diff.deleted.height
    plan.schema_change = schema_change
    return plan


def _keys_retyped(diff: SnapshotDiff, keys: list[str]) -> bool:
    """Whether a key column's type changed (``1`` -> ``"1"``: other ids) while the snapshot holds rows.

    Such a plan deletes the old ids and inserts the new ones. Its deletes are all settled before any insert is
    sent, so a plan stopped part-way never leaves old and new ids to be recorded together in one typed snapshot.
    """
    if not diff.deleted.height:
        return False
    old = diff.deleted.schema  # deleted rows as last delivered: the snapshot's dtypes
    return any(old[k] != diff.target.schema[k] for k in keys)


def _baseline(
    canon: Canonical,
    committed: Committed,
    kinds: dict[str, str],
    keys: list[str],
    created: pl.Series | None,
    run_ms: int,
    meta: dict[str, Any],
    schema_change: dict[str, Any],
) -> RunPlan:
    """Record the source as delivered (rebaseline), keeping each known key's createdAt."""
    new_data = align(canon, committed)
    diff = diff_snapshot(new_data, committed, keys, created=created, run_ms=run_ms, by_hash=True, update_all=True)
    plan = _empty(diff.target, kinds, keys, meta, baseline=True)
    plan.unchanged = canon.frame.height
    plan.schema_change = schema_change
    return plan


def _empty(
    target: pl.DataFrame, kinds: dict[str, str], keys: list[str], meta: dict[str, Any], *, baseline: bool
) -> RunPlan:
    return RunPlan(target, kinds, keys, None, [], baseline=baseline, meta=meta)


def _with_updated_at(frame: pl.DataFrame, options: SyncOptions, run_ms: int, op: str) -> pl.DataFrame:
    """The rows with their op and updatedAt: the named column for inserts and updates, else the run's time."""
    if options.updated_at_column is not None and op != "delete":
        upd = frame.get_column(options.updated_at_column).cast(pl.Int64).fill_null(run_ms)
    else:
        upd = pl.repeat(run_ms, frame.height, dtype=pl.Int64, eager=True)
    ops = pl.repeat(op, frame.height, dtype=pl.String, eager=True)  # both cut like the frame (like_chunks)
    return frame.with_columns(like_chunks(upd.alias(UPDATED_AT), frame), like_chunks(ops.alias(OP), frame))


def _change_parts(
    diff: SnapshotDiff, base_kinds: Mapping[str, str], kinds: Mapping[str, str]
) -> tuple[list[Part], pl.DataFrame]:
    """The change frames of a diff in send order, and per update its op and positions."""
    parts: list[Part] = []
    positions: list[pl.DataFrame] = []
    null = pl.lit(None, dtype=pl.Int64)
    for op, frame, part_kinds in (
        ("delete", diff.deleted, base_kinds),
        ("update", diff.updated, kinds),
        ("insert", diff.inserted, kinds),
    ):
        if not frame.height:
            continue
        parts.append(Part(op, frame, part_kinds))
        positions.append(
            frame.select(
                pl.lit(op).alias(OP),
                (pl.col(BASE_ROW).cast(pl.Int64) if BASE_ROW in frame.columns else null).alias(BASE_ROW),
                (pl.col(TARGET_ROW).cast(pl.Int64) if TARGET_ROW in frame.columns else null).alias(TARGET_ROW),
            )
        )
    return parts, pl.concat(positions)


def _encode(frame: pl.DataFrame, kinds: Mapping[str, str], options: SyncOptions) -> pl.Series:
    """The update JSON of every row of a change frame (data + createdAt + updatedAt + op), in order.

    Encoded in batches of rows, so the intermediate row JSON of only one batch is held beside the updates.
    """
    columns = [c for c in data_columns(frame) if c not in (OP, UPDATED_AT)]
    column_kinds = {c: kinds[c] for c in columns}
    parts = []
    for offset in range(0, max(frame.height, 1), _ENCODE_BATCH):
        batch = frame.slice(offset, _ENCODE_BATCH)
        rows = encode_rows(
            batch.select(columns),
            column_kinds,
            nest_dotted_columns=options.nest_dotted_columns,
            decimal_as_string=options.decimal_as_string,
        )
        parts.append(
            encode_updates(
                batch.get_column(OP),
                rows,
                batch.get_column(CREATED_AT),
                batch.get_column(UPDATED_AT),
                brand_id=options.brand_id,
                table_name=options.table_name,
            )
        )
    return (parts[0] if len(parts) == 1 else pl.concat(parts, rechunk=False)).alias(UPDATE)


def plan_meta(options: SyncOptions, kinds: Mapping[str, str], keys: list[str], run_ms: int) -> dict[str, Any]:
    """What a plan file records of the run that made it (``meta``): its table, kinds, keys, time and shape.

    :param options: the run's options.
    :param kinds: the plan's kinds.
    :param keys: the key columns.
    :param run_ms: the run's time (epoch ms).
    """
    return {
        "plan_format": PLAN_FORMAT,
        "brand_id": options.brand_id,
        "table_name": options.table_name,
        "kinds": dict(kinds),
        "key_columns": keys,
        "run_ms": run_ms,
        "nest_dotted_columns": options.nest_dotted_columns,
        "decimal_as_string": options.decimal_as_string,
        "shape": options.shape(),
        "updated_at_column": options.updated_at_column,
        "row_hash": ROW_HASH,
        # the DAG run (and task) that made the plan: a later try of it counts the plan as its own
        "run_key": options.run_key,
        # bounds the chunks a killed delivery can have had in flight (settle tells them from chunks never sent)
        "max_concurrent_requests": options.max_concurrent_requests,
    }


def baseline_plan(canon: Canonical, committed: Committed | None, options: SyncOptions, run_ms: int) -> RunPlan:
    """Record ``canon`` as delivered whatever the committed snapshot holds; nothing to send (a rebaseline).

    Keys the snapshot knows keep their createdAt (unless ``created_at_column`` gives one); a snapshot keyed by
    other columns names other rows, so it is replaced as by a first load. No safeguard applies: recording a
    table sends nothing.
    """
    if committed is not None and tuple(committed.key_columns) == tuple(canon.key_columns):
        keys = list(canon.key_columns)
        created = timestamp_column(canon, options.created_at_column, "created_at")
        kinds = kinds_after(canon, committed.kinds)
        change = schema_changes(committed, canon, options)
        plan = _baseline(
            canon, committed, kinds, keys, created, run_ms, plan_meta(options, kinds, keys, run_ms), change
        )
        plan.schema_change = {"policy": "rebaseline", **change} if change else None
        return plan
    plan = make_plan(canon, None, replace(options, initial_load="baseline"), run_ms)
    if committed is not None:
        plan.schema_change = {"policy": "rebaseline", **schema_changes(committed, canon, options)}
    return plan


__all__ = [
    "APPROVE_HINT",
    "PLAN_FORMAT",
    "UPDATE",
    "Part",
    "RunPlan",
    "align",
    "approval",
    "baseline_plan",
    "check_safeguards",
    "describe",
    "kind_changes",
    "make_plan",
    "plan_from_diff",
    "plan_meta",
    "schema_changes",
]
