"""The worker path streamed: the source read a batch at a time, the diff on keys and row hashes, the target snapshot
written as it is made. No Airflow import.

:func:`plan_streamed` gives the plan ``make_plan(canonical_source(...))`` gives (the same target snapshot, change
frames, positions and errors), while holding only the key columns (and ``id``), the committed snapshot's keys,
createdAt and row hashes, one batch, and the changed rows:

1. Each record batch is canonicalized (``canonical_batches``; a batch longer than a spool file is cut first),
   hashed, and spooled with its row hashes to a temporary Arrow IPC file while a SQL source's next batch is read;
   only its key columns stay in memory. Kinds are final only after the last batch (a later batch may turn a column
   into ``json``), so the checks over the whole table (kinds joined, unique keys, ``id``) run then, on the keys alone.
2. The keys are joined with the snapshot's (each source row's position in it); the delete safeguards are checked
   before anything is written.
3. The spool is read back a file at a time (mapped, not copied), retyped to the final kinds as ``merge_batches``
   retypes earlier batches (and hashed again only then), given its createdAt, and appended to the target snapshot
   file (written aside, published only when the run sends or commits something, then atomic like
   ``write_snapshot``); its inserted and updated rows are kept.
4. Deleted rows are read from the committed snapshot by row group. The rest is the whole path's: ids reconciled,
   change parts in send order, windows encoded from them.

A first load writes its target the same way; its inserts are encoded from the written file a window at a time.

When: :data:`STREAM_ENV` (``auto`` by default: sources of Arrow record batches, which is what SQL sources are,
once their canonical batches pass :data:`STREAM_ABOVE_BYTES`; a smaller one is planned whole from memory, faster).
What is not streamed takes the whole path, with the same result: frames held in memory (pandas, polars; unless
``always``), dry runs, ``json_columns``, ``created_at_column`` and the ``user`` table (their checks need whole
columns); and, read from the spool, a source whose columns or kinds differ from the snapshot's, a snapshot hashed
by another row-hash function, and key columns of another type.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import GeneratorType
from typing import Any

import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.api.contract import USER_TABLE
from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.source.canonical import (
    Batch,
    canonical_batches,
    canonicalize_source,
    is_batch_iterable,
    join_batches,
    joined_small_batches,
    merge_batches,
    release_freed_memory,
    retyped,
)
from airflow_provider_stopchurn.source.frame import Canonical, check_names, finish, with_derived_id
from airflow_provider_stopchurn.store import CREATED_AT, HASH_1, HASH_2, Committed, SnapshotStore
from airflow_provider_stopchurn.store.parquet import compacted
from airflow_provider_stopchurn.store.scratch import scratch_folder, scratch_write_error
from airflow_provider_stopchurn.store.snapshots import StagedSnapshot
from airflow_provider_stopchurn.update.diff import (
    ROW_HASH,
    TARGET_ROW,
    SnapshotDiff,
    change_states,
    deleted_rows,
    with_hashes,
)
from airflow_provider_stopchurn.update.keys import BASE_ROW, match_keys, snapshot_states
from airflow_provider_stopchurn.update.plan import (
    Part,
    RunPlan,
    check_safeguards,
    kinds_after,
    make_plan,
    plan_from_diff,
    plan_meta,
    schema_changes,
    timestamp_column,
)

#: When the worker path streams: ``auto`` (the default) for sources of Arrow record batches (SQL sources, readers,
#: tables, iterators of batches) once they pass :data:`STREAM_ABOVE_BYTES`; ``always`` for every source from its
#: first byte (a pandas or polars frame is canonicalized whole, then diffed and written as batches); ``never``: every
#: source is read whole.
STREAM_ENV = "STOPCHURN_WORKER_STREAM"
_MODES = ("auto", "always", "never")
#: Canonical bytes (polars' estimate) an Arrow source may reach in memory before it is spooled and streamed
#: (``auto``): a smaller one takes the whole path from memory, which costs less CPU than spooling it (about a
#: quarter less at 1M rows of 12 columns, 128 MB) and holds at most a few times this beside the keys.
STREAM_ABOVE_BYTES = 256 * 2**20
#: Environment variable overriding :data:`STREAM_ABOVE_BYTES` under ``auto`` (a whole number of bytes).
STREAM_ABOVE_ENV = "STOPCHURN_WORKER_STREAM_ABOVE_BYTES"
#: Rows a spool file holds at least (consecutive batches of the same kinds are joined), unless the source ends:
#: each becomes a row group of the target snapshot, and is what the second pass holds at once.
SPOOL_ROWS = 131_072


def stream_mode() -> str:
    """The mode :data:`STREAM_ENV` names (``auto`` when unset)."""
    mode = os.environ.get(STREAM_ENV, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise StopChurnConfigError(f"{STREAM_ENV}={mode!r} is not one of {', '.join(_MODES)}.")
    return mode


def stream_above_bytes() -> int:
    """The canonical bytes past which an Arrow source streams under ``auto`` (:data:`STREAM_ABOVE_ENV`)."""
    raw = os.environ.get(STREAM_ABOVE_ENV, "").strip()
    if not raw:
        return STREAM_ABOVE_BYTES
    if not raw.isdigit():
        raise StopChurnConfigError(f"{STREAM_ABOVE_ENV}={raw!r} is not a whole number of bytes.")
    return int(raw)


def streams(data: Any, options: SyncOptions) -> bool:
    """Whether a run over ``data`` (a source already called) takes :func:`plan_streamed`."""
    mode = stream_mode()
    if mode == "never" or options.dry_run or options.json_columns or options.table_name == USER_TABLE:
        return False
    if options.created_at_column is not None:
        return False
    if isinstance(data, pa.Table | pa.RecordBatch | pa.RecordBatchReader) or is_batch_iterable(data):
        return True
    return mode == "always"


@dataclass
class StreamedPlan(RunPlan):
    """A plan whose target snapshot is written already: ``target`` holds only its key columns and ``id``."""

    target_version: str = ""
    target_rows: int = 0


class SnapshotRows:
    """The rows of a written snapshot file, read a slice at a time (only the row groups holding it are decoded)."""

    def __init__(self, store: SnapshotStore, version: str, height: int) -> None:
        self._store = store
        self._version = version
        self._height = height

    @property
    def height(self) -> int:
        return self._height

    def slice(self, offset: int, length: int | None = None) -> pl.DataFrame:
        length = self._height - offset if length is None else length
        return self._store.read_snapshot_slice(self._version, offset, length)


@dataclass
class _Spool:
    """Canonical batches in temporary Arrow IPC files, each with its kinds; their key columns kept in memory."""

    folder: Path
    files: list[tuple[Path, dict[str, str]]] = field(default_factory=list)
    narrow: list[Batch] = field(default_factory=list)
    #: whether the batches come from a canonical frame already checked whole (``id`` included)
    finished: bool = False
    #: consecutive batches of the same kinds not yet written, joined into one file of ``SPOOL_ROWS`` or more
    pending: list[Batch] = field(default_factory=list)

    def push(self, part: Batch, keys: tuple[str, ...]) -> None:
        if self.pending and part[1] != self.pending[0][1]:
            self.flush(keys)
        self.pending.append(part)
        if sum(frame.height for frame, _ in self.pending) >= SPOOL_ROWS:
            self.flush(keys)

    def flush(self, keys: tuple[str, ...]) -> None:
        if self.pending:
            self.add(*join_batches(self.pending), keys)
            self.pending = []

    def add(self, frame: pl.DataFrame, kinds: dict[str, str], keys: tuple[str, ...]) -> None:
        """Spool one canonical batch with its row hashes, hashed now (while a SQL source's next batch is read)
        as the second pass would hash it in these kinds; that pass hashes it again only if the kinds change."""
        path = self.folder / f"{len(self.files):07d}.arrow"
        derived = "id" not in frame.columns
        hashed = with_hashes(with_derived_id(frame, kinds, keys)[0] if derived else frame)
        spooled = frame.with_columns(hashed.get_column(HASH_1), hashed.get_column(HASH_2))
        try:
            spooled.write_ipc(path, compression="uncompressed")  # written once, read once: CPU counts, not bytes
        except OSError as err:
            raise scratch_write_error(self.folder, err) from err
        self.files.append((path, kinds))
        names = [*keys, "id"] if "id" in frame.columns and "id" not in keys else list(keys)
        self.narrow.append((frame.select(names), kinds))

    def batches(self, kinds: dict[str, str], keys: tuple[str, ...], *, mapped: bool = True) -> Iterator[pl.DataFrame]:
        """The spooled batches in order, in the final ``kinds``, with the derived ``id`` when the source has none,
        and their row hashes (``with_hashes``'s columns, last).

        :param mapped: read in place from the mapped files (each batch is freed before the spool is removed); else
            copied, for frames that outlive the spool.
        """
        for path, have in self.files:
            frame = _read_spool(path, mapped=mapped)
            # ``have`` names the batch's columns, ``kinds`` also the ``id`` derived after the last batch
            if any(kinds[name] != kind for name, kind in have.items()):  # a later batch changed a kind: hashed again
                frame = retyped(frame.drop(HASH_1, HASH_2), have, kinds)
                if "id" not in frame.columns:
                    frame, _ = with_derived_id(frame, kinds, keys)
                yield with_hashes(frame)
                continue
            if "id" not in frame.columns:  # derived as the whole path derives it, before the hashes
                frame, _ = with_derived_id(frame, kinds, keys)
                frame = frame.select(pl.exclude(HASH_1, HASH_2), HASH_1, HASH_2)
            yield frame


def _read_spool(path: Path, *, mapped: bool = True) -> pl.DataFrame:
    """A spool file as a frame. ``mapped``: its columns read in place from the mapped file (no copy: the pages are
    the page cache's, and leave memory with the frame); a file system that cannot map files (some FUSE mounts) has
    it read. Else a frame of its own memory: a mapped file's pages would stay on the disk, its name removed, for as
    long as any of its columns lives."""
    source: Any = None
    if mapped:
        try:
            source = pa.memory_map(str(path))
        except OSError:
            if not path.is_file():
                raise
    with source if source is not None else pa.OSFile(str(path)) as opened:
        table = pa.ipc.open_file(opened).read_all()
    frame = pl.from_arrow(table, rechunk=False)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _spool_source(data: Any, options: SyncOptions, spool: _Spool) -> tuple[tuple[str, ...], list[Batch] | None]:
    """Canonicalize ``data``; return the key columns, and the canonical batches when the source stayed under
    :data:`STREAM_ABOVE_BYTES` (``auto``: held in memory, nothing spooled), else None (every batch in ``spool``)."""
    if not (isinstance(data, pa.Table | pa.RecordBatch | pa.RecordBatchReader) or is_batch_iterable(data)):
        canon = canonicalize_source(data, key_columns=options.key_columns, decimal_as_string=options.decimal_as_string)
        spool.finished = True
        for offset in range(0, max(canon.frame.height, 1), SPOOL_ROWS):
            spool.add(canon.frame.slice(offset, SPOOL_ROWS), canon.kinds, canon.key_columns)
        return canon.key_columns, None
    limit = 0 if stream_mode() == "always" else stream_above_bytes()
    keys: tuple[str, ...] | None = None
    held: list[Batch] | None = []
    held_bytes = 0
    try:
        batches = canonical_batches(
            _in_pieces(data), key_columns=options.key_columns, decimal_as_string=options.decimal_as_string
        )
        for found, part in batches:
            keys = found
            if held is None:
                spool.push(part, keys)
            else:  # a small table takes the whole path, from memory: faster
                held.append(part)
                held_bytes += int(part[0].estimated_size())
                if held_bytes >= limit:  # too large to hold: spooled from now on
                    for earlier in held:
                        spool.push(earlier, keys)
                    held = None
            release_freed_memory()  # as canonicalize_arrow does after each batch
        if keys is not None:
            spool.flush(keys)
    finally:
        if isinstance(data, GeneratorType | pa.RecordBatchReader):
            data.close()  # a SQL source's generator releases its connection
    if keys is None:  # no batch and no schema: a source without columns
        keys = check_names([], options.key_columns)
    return keys, held


def _in_pieces(data: Any) -> Any:
    """``data`` with each record batch longer than :data:`SPOOL_ROWS` cut into slices of that many rows (zero-copy),
    so that a source handing over its whole table as one batch (a one-chunk ``pa.Table``, a driver that fetched
    everything at once) is canonicalized, spooled and read back a piece at a time, not whole beside the source.

    A table stays a table and a reader a reader (an empty one keeps its schema); an iterable's items are cut as
    they come. Row numbers in errors are unchanged: they count the rows before each slice.
    """
    if isinstance(data, pa.RecordBatch | pa.Table):
        return _cut_table(data)
    if isinstance(data, pa.RecordBatchReader):
        return pa.RecordBatchReader.from_batches(data.schema, _cut(data))
    if isinstance(data, list | tuple):
        return [_cut_one(item) for item in data]
    return (_cut_one(item) for item in data)


def _cut(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield from _cut_table(batch).to_batches() if batch.num_rows > SPOOL_ROWS else [batch]


def _cut_table(data: pa.RecordBatch | pa.Table) -> pa.Table:
    """``data`` as a table of slices of at most :data:`SPOOL_ROWS` rows."""
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    return pa.Table.from_batches(table.to_batches(max_chunksize=SPOOL_ROWS), schema=table.schema)


def _cut_one(item: Any) -> Any:
    """An item of a source's iterable, cut: a long batch becomes a table of slices (the reader takes tables too)."""
    if isinstance(item, pa.Table) or (isinstance(item, pa.RecordBatch) and item.num_rows > SPOOL_ROWS):
        return _cut_table(item)
    return item


def _source_keys(spool: _Spool, keys: tuple[str, ...]) -> Canonical:
    """The source's key columns (and ``id``) in their final kinds, checked over the whole table as the whole path
    checks them; ``kinds`` are every column's."""
    frame, kinds = merge_batches(spool.narrow, keys)
    if spool.finished:
        return Canonical(frame=frame, kinds=kinds, key_columns=keys)
    return finish(frame, kinds, keys)


def _whole(spool: _Spool, canon: Canonical) -> Canonical:
    """The whole canonical source, from the spool (what the whole path would have read), in memory: the plan made
    from it outlives the spool."""
    frames = [frame.drop(HASH_1, HASH_2) for frame in spool.batches(canon.kinds, canon.key_columns, mapped=False)]
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
    return Canonical(frame=frame, kinds=dict(canon.kinds), key_columns=canon.key_columns)


def plan_streamed(
    data: Any, store: SnapshotStore, options: SyncOptions, run_ms: int
) -> tuple[RunPlan, Committed | None]:
    """Plan a run over ``data`` (a source already called) as ``make_plan`` would, streaming where it can.

    Returns the plan and the committed snapshot it was diffed against. A :class:`StreamedPlan`'s target is written
    (``target_version``); any other plan is the whole path's, its target in memory.
    """
    with scratch_folder() as folder:
        spool = _Spool(folder)
        keys, held = _spool_source(data, options, spool)
        if held is not None:  # a small source, held in memory: the whole path, as canonicalize_arrow builds it
            whole = finish(*merge_batches(list(joined_small_batches(held)), keys), keys)
            del held
            release_freed_memory()
            committed = store.read_committed()
            return make_plan(whole, committed, options, run_ms), committed
        canon = _source_keys(spool, keys)
        committed = store.read_committed()
        # only the kinds are checked here (the column is read when encoding); the frame just has the columns
        named = pl.DataFrame(schema=dict.fromkeys(canon.kinds, pl.Int64))
        timestamp_column(Canonical(named, canon.kinds, keys), options.updated_at_column, "updated_at")
        base_kinds: dict[str, str] = dict(committed.kinds) if committed is not None else {}
        if committed is not None and (
            schema_changes(committed, canon, options) or committed.row_hash != ROW_HASH or base_kinds != canon.kinds
        ):
            return make_plan(_whole(spool, canon), committed, options, run_ms), committed
        kinds = kinds_after(canon, base_kinds)
        meta = plan_meta(options, kinds, list(keys), run_ms)
        if committed is None:
            return _first_load(spool, canon, store, options, run_ms, meta), None
        plan = _churn(spool, canon, committed, store, options, run_ms, meta)
        if plan is None:  # key columns of another type: other ids
            return make_plan(_whole(spool, canon), committed, options, run_ms), committed
        return plan, committed


def _first_load(
    spool: _Spool, canon: Canonical, store: SnapshotStore, options: SyncOptions, run_ms: int, meta: dict[str, Any]
) -> StreamedPlan:
    def target() -> Iterator[pl.DataFrame]:
        for hashed in spool.batches(canon.kinds, canon.key_columns):
            created = pl.repeat(run_ms, hashed.height, dtype=pl.Int64, eager=True)
            yield hashed.with_columns(created.alias(CREATED_AT)).select(pl.exclude(HASH_1, HASH_2), HASH_1, HASH_2)

    with store.staged_snapshot(target()) as staged:
        version, rows = staged.version, staged.rows
        kinds, keys = dict(canon.kinds), list(canon.key_columns)
        plan = StreamedPlan(canon.frame, kinds, keys, None, meta=meta, target_version=version, target_rows=rows)
        if options.initial_load == "baseline":
            plan.baseline, plan.unchanged = True, rows
        elif rows:
            plan.parts, plan.inserted = [Part("insert", SnapshotRows(store, version, rows), kinds)], rows
        _publish_if_needed(plan, staged)
    return plan


def _publish_if_needed(plan: StreamedPlan, staged: StagedSnapshot) -> None:
    """Publish the target a run will commit (changes to send, a baseline, a rewrite); else it is dropped unwritten,
    as the whole path writes nothing when nothing changed."""
    if plan.changes or plan.baseline or plan.rewrite:
        staged.publish()


def _churn(
    spool: _Spool,
    canon: Canonical,
    committed: Committed,
    store: SnapshotStore,
    options: SyncOptions,
    run_ms: int,
    meta: dict[str, Any],
) -> StreamedPlan | None:
    """The streamed diff against ``committed`` (same kinds, same row-hash function); None when the key columns'
    types differ."""
    keys = list(canon.key_columns)
    source = canon.frame
    old_keys = committed.columns(keys)
    if any(old_keys.schema[k] != source.schema[k] for k in keys):
        return None
    match = match_keys(source, old_keys, keys)
    del old_keys  # the join's tables are freed before the snapshot's hashes are read: the step's peak is one of them
    # raised before the target is written; the deletes are the unmatched keys, each once
    approved = check_safeguards(match.gone.height, source.height, committed, options)
    positions = match.positions
    old = snapshot_states(committed.columns([CREATED_AT, HASH_1, HASH_2]), match)
    inserted: list[pl.DataFrame] = []
    updated: list[pl.DataFrame] = []

    def target() -> Iterator[pl.DataFrame]:
        offset = 0
        for hashed in spool.batches(canon.kinds, canon.key_columns):
            matched = change_states(hashed, old, positions.slice(offset, hashed.height), None, update_all=False)
            created = matched.get_column("__sc_old_created").fill_null(run_ms).cast(pl.Int64)
            columns = [*hashed.columns[:-2], CREATED_AT]  # the data columns (the hashes are last)
            rows = hashed.with_columns(created.alias(CREATED_AT)).select([*columns, HASH_1, HASH_2])
            yield rows
            state = matched.get_column("state")
            indexed = rows.select(columns).with_row_index(TARGET_ROW, offset=offset)
            indexed = indexed.with_columns(matched.get_column(BASE_ROW))
            # copies: rows filtered from a batch would keep the whole batch's text in memory
            inserted.append(compacted(indexed.filter(state == 1)))
            updated.append(compacted(indexed.filter(state == 2)))
            offset += hashed.height

    with store.staged_snapshot(target()) as staged:  # dropped unpublished if planning fails: no plan names it
        diff = SnapshotDiff(
            target=source,
            inserted=pl.concat(inserted).sort(keys),
            updated=pl.concat(updated).sort(keys),
            deleted=deleted_rows(committed, match.gone, keys),
            unchanged=source.height - sum(f.height for f in inserted) - sum(f.height for f in updated),
        )
        # the snapshot's kinds are the source's and no schema change is sent (else the whole path plans it)
        plan = plan_from_diff(StreamedPlan, diff, committed, dict(canon.kinds), keys, meta, approved)
        plan.target_version, plan.target_rows = staged.version, staged.rows
        _publish_if_needed(plan, staged)
    return plan


__all__ = [
    "STREAM_ABOVE_BYTES",
    "STREAM_ABOVE_ENV",
    "STREAM_ENV",
    "SnapshotRows",
    "StreamedPlan",
    "plan_streamed",
    "stream_mode",
    "streams",
]
