"""The sync engine: plan (diff + safeguards) and apply (send, resume, commit). No Airflow import.

One call, :func:`run_sync`, does a whole run::

    lock -> finish any unfinished plan -> canonicalize the source -> diff against the committed snapshot
         -> safeguards -> encode + chunk -> write the plan -> send chunks, recording each acknowledgement
         -> commit the new snapshot -> summary

The committed snapshot changes only after every chunk was acknowledged, so a crash or a failed request loses
nothing: the next run (or a task retry) resumes at the first unacknowledged chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import orjson
import pandas as pd
import polars as pl

from airflow_provider_stopchurn.contract import USER_TABLE, check_user_table, coerce_user_flags
from airflow_provider_stopchurn.diff import ChangeSet, diff_frames
from airflow_provider_stopchurn.encoding import (
    Canonical,
    bodies_bytes,
    canonicalize,
    chunk_bodies,
    chunk_body,
    encode_rows,
    encode_updates,
    plan_chunks,
)
from airflow_provider_stopchurn.exceptions import (
    SafeguardError,
    SnapshotError,
    SourceDataError,
    StopChurnConfigError,
    StopChurnRejectedError,
)
from airflow_provider_stopchurn.snapshot import (
    CREATED_AT,
    HASH_1,
    HASH_2,
    META_COLUMNS,
    OP,
    UPDATED_AT,
    Committed,
    Plan,
    SnapshotStore,
)

log = logging.getLogger(__name__)

SchemaPolicy = Literal["fail", "update_all", "rebaseline"]
RejectPolicy = Literal["fail", "quarantine"]
_NUMERIC = {"int", "float"}


class Sender(Protocol):
    """What the engine needs from a client: post one encoded body, raise on failure."""

    def post_update_body(self, body: bytes) -> Any: ...


@dataclass(frozen=True)
class SyncOptions:
    """Everything that shapes one run. Validated on construction (no I/O)."""

    brand_id: int
    table_name: str
    key_columns: tuple[str, ...] = ("id",)
    created_at_column: str | None = None
    updated_at_column: str | None = None
    initial_load: Literal["send", "baseline"] = "send"
    chunk_size: int = 500
    max_chunk_bytes: int = 5_000_000
    dry_run: bool = False
    max_delete_fraction: float = 0.5
    allow_empty_source: bool = False
    allow_large_changes: bool = False
    on_schema_change: SchemaPolicy = "fail"
    on_rejected_rows: RejectPolicy = "fail"
    max_rejected_rows: int = 100
    max_concurrent_requests: int = 4
    nest_dotted_columns: bool = True
    decimal_as_string: bool = False
    holder: str = "stopchurn-sync"
    lock_ttl_s: float = 3600.0
    progress_interval_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.brand_id, bool) or not isinstance(self.brand_id, int):
            problems.append(f"brand_id must be an integer, got {self.brand_id!r}")
        if not isinstance(self.table_name, str) or not self.table_name.strip():
            problems.append("table_name must be a non-empty string")
        if not self.key_columns or not all(isinstance(k, str) and k for k in self.key_columns):
            problems.append(f"primary_key must name one or more columns, got {self.key_columns!r}")
        if self.initial_load not in ("send", "baseline"):
            problems.append(f"initial_load must be 'send' or 'baseline', got {self.initial_load!r}")
        if self.on_schema_change not in ("fail", "update_all", "rebaseline"):
            problems.append(
                f"on_schema_change must be 'fail', 'update_all' or 'rebaseline', got {self.on_schema_change!r}"
            )
        if self.on_rejected_rows not in ("fail", "quarantine"):
            problems.append(f"on_rejected_rows must be 'fail' or 'quarantine', got {self.on_rejected_rows!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            problems.append(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if not isinstance(self.max_chunk_bytes, int) or self.max_chunk_bytes < 64:
            problems.append(f"max_chunk_bytes must be an integer >= 64, got {self.max_chunk_bytes!r}")
        if not 0.0 <= float(self.max_delete_fraction) <= 1.0:
            problems.append(f"max_delete_fraction must be within [0, 1], got {self.max_delete_fraction!r}")
        if not isinstance(self.max_concurrent_requests, int) or self.max_concurrent_requests < 1:
            problems.append(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests!r}")
        if not isinstance(self.max_rejected_rows, int) or self.max_rejected_rows < 0:
            problems.append(f"max_rejected_rows must be >= 0, got {self.max_rejected_rows!r}")
        if problems:
            raise StopChurnConfigError("Invalid sync options: " + "; ".join(problems) + ".")


@dataclass
class SyncSummary:
    """The run's numbers; ``as_dict()`` is what the operator returns (and Airflow puts in XCom)."""

    table_name: str
    brand_id: int
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    chunks: int = 0
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    resumed_chunks: int = 0
    quarantined: int = 0
    quarantine_uri: str | None = None
    dry_run: bool = False
    baseline: bool = False
    schema_change: dict[str, Any] | None = None
    snapshot_uri: str = ""
    duration_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.dry_run:
            data.pop("samples")
        return data

    def line(self) -> str:
        """One readable log line."""
        mode = " (dry run: nothing sent)" if self.dry_run else ""
        mode += " (baseline recorded, nothing sent)" if self.baseline else ""
        extra = f", {self.resumed_chunks} resumed chunks" if self.resumed_chunks else ""
        extra += f", {self.quarantined} rows quarantined" if self.quarantined else ""
        return (
            f"StopChurn sync of brand {self.brand_id} table {self.table_name!r}{mode}: "
            f"{self.inserted} inserted, {self.updated} updated, {self.deleted} deleted, {self.unchanged} unchanged; "
            f"{self.chunks} chunks, {self.bytes} bytes, {self.retries} retries{extra}; "
            f"{self.duration_s:.2f}s; snapshot {self.snapshot_uri}"
        )


Source = pd.DataFrame | Callable[[], pd.DataFrame]


def run_sync(
    source: Source,
    store: SnapshotStore,
    sender: Sender | None,
    options: SyncOptions,
    *,
    run_ms: int | None = None,
) -> SyncSummary:
    """Deliver the difference between ``source`` and the committed snapshot; see the module docstring.

    ``sender`` may be None only for a dry run. ``run_ms`` (epoch ms) is the run's time, used as
    ``updatedAt`` of every change and ``createdAt`` of new keys when no timestamp columns are named.
    """
    started = time.monotonic()
    run_ms = run_ms if run_ms is not None else time.time_ns() // 1_000_000
    summary = SyncSummary(options.table_name, options.brand_id, dry_run=options.dry_run)
    summary.snapshot_uri = store.location
    if options.dry_run:
        _plan_and_apply(source, store, None, options, summary, run_ms, lock=None)
    else:
        if sender is None:
            raise StopChurnConfigError("A sender is required unless dry_run=True.")
        with store.lock(options.holder, ttl_s=options.lock_ttl_s) as table_lock:
            pending = store.pending_plan()
            if pending is not None:
                _resume(pending, store, sender, options, summary, table_lock)
            _plan_and_apply(source, store, sender, options, summary, run_ms, lock=table_lock)
    summary.duration_s = round(time.monotonic() - started, 3)
    log.info("%s", summary.line())
    return summary


# --- planning ------------------------------------------------------------------------------------------------
def _load_source(source: Source) -> pd.DataFrame:
    frame = source() if callable(source) else source
    if not isinstance(frame, pd.DataFrame):
        raise SourceDataError(f"The source must be a pandas DataFrame, got {type(frame).__name__}.")
    return frame


def _compatible(old: str, new: str) -> bool:
    return old == new or "null" in (old, new) or {old, new} <= _NUMERIC


def schema_changes(committed: Committed, canon: Canonical) -> dict[str, Any]:
    """Columns added, removed or retyped between the snapshot and the source ({} when none)."""
    old, new = committed.kinds, canon.kinds
    added = [c for c in new if c not in old]
    removed = [c for c in old if c not in new]
    retyped = {c: f"{old[c]} -> {new[c]}" for c in new if c in old and not _compatible(old[c], new[c])}
    keys_changed = tuple(committed.key_columns) != tuple(canon.key_columns)
    change: dict[str, Any] = {}
    if added:
        change["added"] = added
    if removed:
        change["removed"] = removed
    if retyped:
        change["retyped"] = retyped
    if keys_changed:
        change["key_columns"] = f"{list(committed.key_columns)} -> {list(canon.key_columns)}"
    return change


def _align(base: pl.DataFrame, canon: Canonical, base_kinds: Mapping[str, str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cast all-null ('null' kind) columns on either side to the other side's dtype so they compare."""
    new = canon.frame
    casts_base, casts_new = [], []
    for col in new.columns:
        if col not in base.columns:
            continue
        if base_kinds.get(col) == "null" and canon.kinds[col] != "null":
            casts_base.append(pl.col(col).cast(new.schema[col]))
        elif canon.kinds[col] == "null" and base_kinds.get(col) != "null":
            casts_new.append(pl.col(col).cast(base.schema[col]))
    if casts_base:
        base = base.with_columns(casts_base)
    if casts_new:
        new = new.with_columns(casts_new)
    return base, new


def _kinds_after(canon: Canonical, base_kinds: Mapping[str, str]) -> dict[str, str]:
    return {c: (base_kinds.get(c, k) if k == "null" else k) for c, k in canon.kinds.items()}


def _timestamp_column(canon: Canonical, name: str | None, role: str) -> pl.Expr | None:
    if name is None:
        return None
    if name not in canon.kinds:
        raise SourceDataError(f"{role} column {name!r} is not in the source (columns: {list(canon.kinds)}).")
    if canon.kinds[name] not in ("timestamp", "date", "int", "null"):
        raise SourceDataError(
            f"{role} column {name!r} must hold datetimes or epoch milliseconds, not {canon.kinds[name]} values."
        )
    return pl.col(name).cast(pl.Int64)


def _plan_and_apply(
    source: Source,
    store: SnapshotStore,
    sender: Sender | None,
    options: SyncOptions,
    summary: SyncSummary,
    run_ms: int,
    *,
    lock: Any,
) -> None:
    canon = canonicalize(
        _load_source(source), key_columns=options.key_columns, decimal_as_string=options.decimal_as_string
    )
    if options.table_name == USER_TABLE:
        frame, user_kinds = coerce_user_flags(canon.frame, canon.kinds)
        canon = Canonical(frame=frame, kinds=user_kinds, key_columns=canon.key_columns)
        if frame.height:
            check_user_table(frame, user_kinds, nest_dotted_columns=options.nest_dotted_columns)
    keys = list(canon.key_columns)
    created_expr = _timestamp_column(canon, options.created_at_column, "created_at")
    updated_expr = _timestamp_column(canon, options.updated_at_column, "updated_at")

    committed = store.read_committed()
    if options.dry_run:
        pending = store.pending_plan(cleanup=False)
        if pending is not None:  # a dry run sees the state the pending plan will commit
            committed = Committed(
                store,
                kinds=dict(pending.meta["kinds"]),
                key_columns=pending.meta["key_columns"],
                version=pending.target_version,
                rows=pending.meta.get("target_rows"),
                row_hash=pending.meta.get("row_hash"),
            )
    base_kinds: dict[str, str] = dict(committed.kinds) if committed is not None else {}
    kinds = _kinds_after(canon, base_kinds)

    # --- schema drift -----------------------------------------------------------------------------------------
    update_all = False
    if committed is not None:
        change = schema_changes(committed, canon)
        if change:
            summary.schema_change = {"policy": options.on_schema_change, **change}
            if options.on_schema_change == "fail":
                raise SafeguardError(
                    f"The columns of the source differ from the snapshot of brand {options.brand_id} table "
                    f"{options.table_name!r}: {_describe(change)}. Nothing was sent. Set on_schema_change="
                    "'update_all' to send every row with its new columns, or 'rebaseline' to record the new "
                    "table without sending."
                )
            log.warning(
                "Schema change on %r (%s), policy on_schema_change=%r.",
                options.table_name,
                _describe(change),
                options.on_schema_change,
            )
            if options.on_schema_change == "rebaseline":
                _record_baseline(store, canon, kinds, committed, created_expr, run_ms, options, summary)
                return
            update_all = True

    # --- first run in baseline mode ---------------------------------------------------------------------------
    if committed is None and options.initial_load == "baseline":
        _record_baseline(store, canon, kinds, None, created_expr, run_ms, options, summary)
        return

    # --- diff ---------------------------------------------------------------------------------------------------
    if committed is None:
        new_data = canon.frame
        target = _target_snapshot(new_data, None, keys, created_expr, run_ms)
        changes = ChangeSet(new_data.sort(keys), new_data.clear(), new_data.clear(), 0)
    elif not update_all and committed.row_hash == ROW_HASH and base_kinds == canon.kinds:
        new_data = canon.frame
        target, changes = _diff_by_hash(new_data, committed, keys, created_expr, run_ms)
    else:
        base_data, new_data = _align(_data(committed.frame), canon, base_kinds)
        if update_all:
            base_keys = base_data.select(keys)
            changes = ChangeSet(
                inserted=new_data.join(base_keys, on=keys, how="anti").sort(keys),
                updated=new_data.join(base_keys, on=keys, how="semi").sort(keys),
                deleted=base_data.join(new_data.select(keys), on=keys, how="anti").sort(keys),
                unchanged=0,
            )
        else:
            changes = diff_frames(base_data, new_data, keys)
        target = _target_snapshot(new_data, committed, keys, created_expr, run_ms)

    summary.inserted = changes.inserted.height
    summary.updated = changes.updated.height
    summary.deleted = changes.deleted.height
    summary.unchanged = changes.unchanged
    _check_safeguards(changes, committed, canon, options)

    if summary.inserted + summary.updated + summary.deleted == 0:
        if committed is not None and base_kinds == kinds and committed.row_hash == ROW_HASH:
            return  # nothing to send, nothing to record
        _record_baseline(store, canon, kinds, committed, created_expr, run_ms, options, summary, baseline=False)
        return

    # --- target snapshot and change set -------------------------------------------------------------------------
    change_frame = None if committed is None else _change_frame(changes, target, committed, keys, updated_expr, run_ms)
    updates = _encode_plan(
        change_frame if change_frame is not None else _inserts_from_target(target, updated_expr, run_ms),
        kinds,
        options,
    )
    sizes = updates.str.len_bytes().to_numpy()
    chunks = plan_chunks(sizes, chunk_size=options.chunk_size, max_chunk_bytes=options.max_chunk_bytes)
    summary.chunks = len(chunks)
    summary.bytes = bodies_bytes(sizes, chunks)

    if options.dry_run:
        summary.samples = [orjson.loads(u) for u in updates.head(5).to_list()]
        return

    assert sender is not None
    target_version = store.write_snapshot(target)
    plan = store.write_plan(
        target_version=target_version,
        base_version=committed.version if committed is not None else None,
        changes=change_frame,
        chunks=chunks,
        meta={**_plan_meta(options, kinds, keys, run_ms), "target_rows": target.height},
    )
    _deliver_and_commit(plan, updates, store, sender, options, summary, lock, acked=set())


def _describe(change: Mapping[str, Any]) -> str:
    parts = []
    for what in ("added", "removed"):
        if what in change:
            parts.append(f"{what} {change[what]}")
    if "retyped" in change:
        parts.append("retyped " + ", ".join(f"{c} ({t})" for c, t in change["retyped"].items()))
    if "key_columns" in change:
        parts.append(f"key columns {change['key_columns']}")
    return "; ".join(parts)


def _check_safeguards(changes: ChangeSet, committed: Committed | None, canon: Canonical, options: SyncOptions) -> None:
    if committed is None or options.allow_large_changes:
        return
    base_rows = committed.rows if committed.rows is not None and committed.rows >= 0 else committed.frame.height
    if base_rows == 0:
        return
    hint = " Nothing was sent. To let this run through, set allow_large_changes=True for one run."
    if canon.frame.height == 0 and not options.allow_empty_source:
        raise SafeguardError(
            f"The source of brand {options.brand_id} table {options.table_name!r} is empty but the snapshot holds "
            f"{base_rows} rows; syncing would delete them all.{hint} (or allow_empty_source=True)"
        )
    fraction = changes.deleted.height / base_rows
    if fraction > options.max_delete_fraction and not (canon.frame.height == 0 and options.allow_empty_source):
        raise SafeguardError(
            f"The plan deletes {changes.deleted.height} of {base_rows} rows ({fraction:.1%}) of brand "
            f"{options.brand_id} table {options.table_name!r}, more than max_delete_fraction="
            f"{options.max_delete_fraction:.0%}.{hint}"
        )


def _target_snapshot(
    new_data: pl.DataFrame,
    committed: Committed | None,
    keys: list[str],
    created_expr: pl.Expr | None,
    run_ms: int,
) -> pl.DataFrame:
    """The source plus each key's createdAt (the named column, else when the key was first delivered) and hashes."""
    if created_expr is not None:
        target = new_data.with_columns(created_expr.fill_null(run_ms).alias(CREATED_AT))
    elif committed is None:
        target = new_data.with_columns(pl.lit(run_ms, dtype=pl.Int64).alias(CREATED_AT))
    else:
        target = new_data.join(_created_at(committed, keys, new_data), on=keys, how="left", maintain_order="left")
        target = target.with_columns(pl.col(CREATED_AT).fill_null(run_ms))
    return _with_hashes(target)


def _created_at(committed: Committed, keys: list[str], like: pl.DataFrame) -> pl.DataFrame:
    """Keys and createdAt of the committed snapshot, keys cast to ``like``'s dtypes (an all-null key column of
    an empty snapshot is stored as text)."""
    known = committed.columns([*keys, CREATED_AT])
    casts = [pl.col(k).cast(like.schema[k], strict=False) for k in keys if known.schema[k] != like.schema[k]]
    return known.with_columns(casts) if casts else known


_SEEDS = (0x5EED0001, 0x0BADC0DE)


def _row_hash_id() -> str:
    """Name the row-hash function by what it computes on a fixed probe table.

    Polars promises stable hashes within one version only, and its hashers may differ between CPUs. A snapshot
    records this id; a worker whose hashes differ (another polars version, another platform) sees another id
    and compares the columns themselves instead of trusting the stored hashes.
    """
    probe = pl.DataFrame(
        {"i": [1, None, 2**62], "f": [1.5, None, -0.0], "s": ["x", None, "é"], "b": [True, None, False]}
    )
    values = [probe.hash_rows(seed=seed).to_list() for seed in _SEEDS]
    return f"polars-{pl.__version__}-" + hashlib.sha256(repr(values).encode()).hexdigest()[:16]


ROW_HASH = _row_hash_id()


def _data(frame: pl.DataFrame) -> pl.DataFrame:
    """The data columns of a snapshot frame (without createdAt and the hashes)."""
    return frame.drop([c for c in META_COLUMNS if c in frame.columns])


def _with_hashes(frame: pl.DataFrame) -> pl.DataFrame:
    """Add two independent 64-bit hashes of each row's data columns (in name order: column order is free).

    Together they are 128 bits: a changed row keeping both hashes has a chance of about 2^-128. A run whose
    hash function differs (``ROW_HASH``) compares the columns themselves instead and rewrites the hashes.
    """
    data = _data(frame)
    ordered = data.select(sorted(data.columns))
    return frame.with_columns(
        ordered.hash_rows(seed=_SEEDS[0]).alias(HASH_1),
        ordered.hash_rows(seed=_SEEDS[1]).alias(HASH_2),
    )


def _diff_by_hash(
    new_data: pl.DataFrame,
    committed: Committed,
    keys: list[str],
    created_expr: pl.Expr | None,
    run_ms: int,
) -> tuple[pl.DataFrame, ChangeSet]:
    """Diff against the row hashes kept in the snapshot, reading only its keys, createdAt and hashes.

    Returns the target snapshot (source + createdAt + hashes) and the change set. Deleted rows, as last
    delivered, are streamed out of the old snapshot file.
    """
    hashed = _with_hashes(new_data)
    old = committed.columns([*keys, CREATED_AT, HASH_1, HASH_2]).rename(
        {CREATED_AT: "__sc_old_created", HASH_1: "__sc_old_1", HASH_2: "__sc_old_2"}
    )
    # Join only keys and hashes; the old keys are unique, so the result is row-aligned with the source and the
    # data columns are never copied.
    matched = hashed.select([*keys, HASH_1, HASH_2]).join(old, on=keys, how="left", maintain_order="left")
    is_new = pl.col("__sc_old_1").is_null()
    changed = (pl.col(HASH_1) != pl.col("__sc_old_1")) | (pl.col(HASH_2) != pl.col("__sc_old_2"))
    state = matched.select(pl.when(is_new).then(1).when(changed).then(2).otherwise(0).cast(pl.Int8)).to_series()
    if created_expr is not None:
        created = new_data.select(created_expr).to_series()
    else:
        created = matched.get_column("__sc_old_created")
    columns = [*new_data.columns, CREATED_AT]
    target = hashed.with_columns(created.fill_null(run_ms).alias(CREATED_AT)).select([*columns, HASH_1, HASH_2])
    # the changed rows keep their createdAt, so the change frame needs no further join
    inserted = target.filter(state == 1).select(columns).sort(keys)
    updated = target.filter(state == 2).select(columns).sort(keys)
    gone = old.select(keys).join(new_data.select(keys), on=keys, how="anti")
    deleted = committed.rows_with_keys(gone).drop(HASH_1, HASH_2).sort(keys) if gone.height else inserted.clear()
    unchanged = new_data.height - inserted.height - updated.height
    return target, ChangeSet(inserted=inserted, updated=updated, deleted=deleted, unchanged=unchanged)


def _change_frame(
    changes: ChangeSet,
    target: pl.DataFrame,
    committed: Committed,
    keys: list[str],
    updated_expr: pl.Expr | None,
    run_ms: int,
) -> pl.DataFrame:
    """One frame in send order (deletes, updates, inserts; each by key) with op and timestamps.

    Inserts and updates carry the source row and the target's createdAt; deletes carry the row as last
    delivered with the createdAt recorded in the committed snapshot. Frames of the change set that carry their
    createdAt already (the hash diff's) are taken as they are.
    """
    columns = [c for c in target.columns if c not in META_COLUMNS]
    upd = updated_expr.fill_null(run_ms) if updated_expr is not None else pl.lit(run_ms, dtype=pl.Int64)
    parts = []
    if changes.deleted.height:
        deleted = changes.deleted
        if CREATED_AT not in deleted.columns:
            deleted = deleted.join(_created_at(committed, keys, deleted), on=keys, how="left", maintain_order="left")
        parts.append(deleted.with_columns(pl.lit(run_ms, dtype=pl.Int64).alias(UPDATED_AT), pl.lit("delete").alias(OP)))
    created = target.select([*keys, CREATED_AT])
    for op, frame in (("update", changes.updated), ("insert", changes.inserted)):
        if frame.height:
            if CREATED_AT in frame.columns:
                part = frame.select([*columns, CREATED_AT])
            else:
                part = frame.select(columns).join(created, on=keys, how="left", maintain_order="left")
            parts.append(part.with_columns(upd.alias(UPDATED_AT), pl.lit(op).alias(OP)))
    return pl.concat(parts, how="diagonal_relaxed")


def _inserts_from_target(target: pl.DataFrame, updated_expr: pl.Expr | None, run_ms: int) -> pl.DataFrame:
    upd = updated_expr.fill_null(run_ms) if updated_expr is not None else pl.lit(run_ms, dtype=pl.Int64)
    return target.with_columns(upd.alias(UPDATED_AT), pl.lit("insert").alias(OP))


_ENCODE_BATCH = 200_000


def _encode_plan(frame: pl.DataFrame, kinds: Mapping[str, str], options: SyncOptions) -> pl.Series:
    """The update JSON of every row of a change frame, in order.

    Encoded in batches of rows, so the intermediate row JSON of only one batch is held beside the updates.
    """
    data_columns = [c for c in frame.columns if c not in (OP, UPDATED_AT, *META_COLUMNS)]
    column_kinds = {c: kinds[c] for c in data_columns}
    parts = []
    for offset in range(0, max(frame.height, 1), _ENCODE_BATCH):
        batch = frame.slice(offset, _ENCODE_BATCH)
        rows = encode_rows(
            batch.select(data_columns),
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
    return parts[0] if len(parts) == 1 else pl.concat(parts)


def _plan_meta(options: SyncOptions, kinds: Mapping[str, str], keys: list[str], run_ms: int) -> dict[str, Any]:
    return {
        "brand_id": options.brand_id,
        "table_name": options.table_name,
        "kinds": dict(kinds),
        "key_columns": keys,
        "run_ms": run_ms,
        "nest_dotted_columns": options.nest_dotted_columns,
        "decimal_as_string": options.decimal_as_string,
        "created_at_column": options.created_at_column,
        "updated_at_column": options.updated_at_column,
        "row_hash": ROW_HASH,
    }


def _record_baseline(
    store: SnapshotStore,
    canon: Canonical,
    kinds: dict[str, str],
    committed: Committed | None,
    created_expr: pl.Expr | None,
    run_ms: int,
    options: SyncOptions,
    summary: SyncSummary,
    *,
    baseline: bool = True,
) -> None:
    """Commit the source as the snapshot without sending anything."""
    summary.baseline = baseline
    if baseline:
        summary.unchanged = canon.frame.height
    if options.dry_run:
        return
    data = canon.frame
    if committed is not None:
        data = _align(_data(committed.frame), canon, committed.kinds)[1]
    target = _target_snapshot(data, committed, list(canon.key_columns), created_expr, run_ms)
    version = store.write_snapshot(target)
    store.commit(
        version, kinds=kinds, key_columns=canon.key_columns, rows=target.height, plan_id=None, row_hash=ROW_HASH
    )


# --- delivery ------------------------------------------------------------------------------------------------
def _resume(
    plan: Plan, store: SnapshotStore, sender: Sender, options: SyncOptions, summary: SyncSummary, lock: Any
) -> None:
    """Finish a plan a previous run left: send only its unacknowledged chunks, then commit it."""
    meta = plan.meta
    if meta.get("brand_id") != options.brand_id or meta.get("table_name") != options.table_name:
        raise SnapshotError(f"The pending plan {plan.plan_id} in {store.location} belongs to another brand or table.")
    acked = store.acked(plan)
    log.warning(
        "Resuming unfinished plan %s of %r: %d of %d chunks already acknowledged.",
        plan.plan_id,
        options.table_name,
        len(acked),
        len(plan.chunks),
    )
    if plan.changes_from_target:
        updated_column = meta.get("updated_at_column")
        updated_expr = pl.col(updated_column).cast(pl.Int64) if updated_column else None
        frame = _inserts_from_target(store.read_snapshot(plan.target_version), updated_expr, int(meta["run_ms"]))
    else:
        frame = store.read_changes(plan)
    # encode exactly as the plan was encoded, whatever this run's options say
    replay = dataclasses.replace(
        options,
        nest_dotted_columns=bool(meta.get("nest_dotted_columns", True)),
        decimal_as_string=bool(meta.get("decimal_as_string", False)),
    )
    updates = _encode_plan(frame, dict(meta["kinds"]), replay)
    summary.resumed_chunks = len(plan.chunks) - len(acked)
    _deliver_and_commit(plan, updates, store, sender, replay, summary, lock, acked=acked)


@dataclass
class _Rejected:
    index: int
    reason: str


def _deliver_and_commit(
    plan: Plan,
    updates: pl.Series,
    store: SnapshotStore,
    sender: Sender,
    options: SyncOptions,
    summary: SyncSummary,
    lock: Any,
    *,
    acked: set[int],
) -> None:
    todo = [i for i in range(len(plan.chunks)) if i not in acked]
    rejected: list[_Rejected] = []
    total = len(todo)
    last_progress = time.monotonic()
    done = 0

    def send(index: int, body: bytes) -> list[_Rejected]:
        start, end = plan.chunks[index]
        return _send_range(sender, updates, start, end, options, summary, index, len(plan.chunks), body)

    workers = max(1, min(options.max_concurrent_requests, total))
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stopchurn-send") as pool:
        pending: dict[Future[list[_Rejected]], int] = {}
        queue = chunk_bodies(updates, plan.chunks, todo, window=max(64, 8 * workers))
        while True:
            # one request first: a wrong key or a rejected first chunk then costs one request, not `workers`
            while failure is None and len(pending) < (workers if done else 1):
                nxt = next(queue, None)
                if nxt is None:
                    break
                pending[pool.submit(send, *nxt)] = nxt[0]
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                index = pending.pop(fut)
                try:
                    rejected.extend(fut.result())
                except BaseException as err:  # keep the first failure; let the others in flight finish
                    if failure is None:
                        failure = err
                    continue
                store.ack(plan, index)
                done += 1
                if lock is not None:
                    lock.refresh()
                if time.monotonic() - last_progress >= options.progress_interval_s:
                    last_progress = time.monotonic()
                    log.info("Delivered %d of %d chunks of %r.", done, total, options.table_name)
    if failure is not None:
        raise failure

    target_version = plan.target_version
    target_rows: int | None = None
    if rejected:
        target_version, target_rows = _quarantine(plan, updates, rejected, store, options, summary)
    kinds = dict(plan.meta["kinds"])
    if target_rows is None:
        target_rows = int(plan.meta.get("target_rows", -1))
    store.commit(
        target_version,
        kinds=kinds,
        key_columns=plan.meta["key_columns"],
        rows=target_rows,
        plan_id=plan.plan_id,
        row_hash=plan.meta.get("row_hash"),
    )
    if summary.quarantined > options.max_rejected_rows:
        raise SafeguardError(
            f"StopChurn rejected {summary.quarantined} rows of {options.table_name!r}, more than max_rejected_rows="
            f"{options.max_rejected_rows}. The other rows were delivered and committed; the rejected ones are in "
            f"{summary.quarantine_uri} and will be tried again next run."
        )


def _send_range(
    sender: Sender,
    updates: pl.Series,
    start: int,
    end: int,
    options: SyncOptions,
    summary: SyncSummary,
    chunk: int,
    chunks: int,
    body: bytes | None = None,
) -> list[_Rejected]:
    """Send updates [start, end); under the quarantine policy, bisect a rejected range to isolate bad rows."""
    if body is None:
        body = chunk_body(updates, start, end)
    try:
        result = sender.post_update_body(body)
    except StopChurnRejectedError as err:
        if options.on_rejected_rows == "fail":
            raise StopChurnRejectedError(
                f"StopChurn rejected chunk {chunk + 1} of {chunks} (updates {start + 1}-{end}) of "
                f"{options.table_name!r}: {err.reason}. Chunks acknowledged before it stay recorded; the snapshot "
                "was not committed, so the next run resumes here.",
                reason=err.reason,
                status=err.status,
                attempts=err.attempts,
            ) from None
        summary.requests += 1
        if end - start == 1:
            return [_Rejected(start, err.reason)]
        mid = (start + end) // 2
        return _send_range(sender, updates, start, mid, options, summary, chunk, chunks) + _send_range(
            sender, updates, mid, end, options, summary, chunk, chunks
        )
    summary.requests += 1
    summary.retries += max(int(getattr(result, "attempts", 1)) - 1, 0)
    return []


def _quarantine(
    plan: Plan,
    updates: pl.Series,
    rejected: list[_Rejected],
    store: SnapshotStore,
    options: SyncOptions,
    summary: SyncSummary,
) -> tuple[str, int]:
    """Record rejected rows and write a snapshot without their changes so they are tried again next run."""
    meta = plan.meta
    keys = list(meta["key_columns"])
    records = []
    indices = sorted(r.index for r in rejected)
    reasons = {r.index: r.reason for r in rejected}
    for i in indices:
        update = orjson.loads(updates[i])
        records.append({"reason": reasons[i], "position": i, "update": update})
    summary.quarantined += len(records)
    summary.quarantine_uri = store.write_quarantine(plan.plan_id, records)
    log.warning(
        "StopChurn rejected %d rows of %r; they are in %s and will be tried again next run.",
        len(records),
        options.table_name,
        summary.quarantine_uri,
    )
    # revert the rejected keys in the target: back to the base row, or absent if there was none
    target = store.read_snapshot(plan.target_version)
    if plan.changes_from_target:
        bad = target.with_row_index("__sc_pos").filter(pl.col("__sc_pos").is_in(indices)).select(keys)
    else:
        bad = store.read_changes(plan).with_row_index("__sc_pos").filter(pl.col("__sc_pos").is_in(indices))
        bad = bad.select(keys)
    target = target.join(bad, on=keys, how="anti")
    if plan.base_version is not None:
        base = store.read_snapshot(plan.base_version)
        target = pl.concat([target, base.join(bad, on=keys, how="semi")], how="diagonal_relaxed")
    version = store.write_snapshot(_with_hashes(target))
    store.delete_snapshot(plan.target_version)
    return version, target.height


__all__ = [
    "Sender",
    "SyncOptions",
    "SyncSummary",
    "run_sync",
    "schema_changes",
]
