"""The historical export: a table as StopChurn's historical-upload files, recorded as the updates' baseline.

Before updates may flow, a brand's existing data is uploaded by hand in StopChurn's Back Office as JSON files:
one JSON array per file of ``{"data": <row>, "createdAt": <ms>, "updatedAt": <ms>}`` (an update's inner record
without ``brandId`` / ``tableName``), one table and one brand per file, at most 2 GB per file. :func:`run_export`
writes those files and commits the very rows it wrote as the snapshot of the update engine (``sync.py``), so that
a ``StopChurnUpdateOperator`` on the same brand, table and snapshot location sends only what changed after the
export. No Airflow import.

One run::

    lock the table's snapshot store (as an update run does) -> refuse if it holds a snapshot (unless
    replace_snapshot, or this same run wrote it) -> settle an unfinished update plan (the update engine's settle)
    -> canonicalize the source (the update engine's rules: keys, ids, the ``user`` table's contract)
    -> the target snapshot of a first load (createdAt from ``created_at_column``, else the run's time)
    + the replaced snapshot's rows the export lacks (kept, so that the next update run deletes them)
    -> encode and write the files batch by batch -> commit the target as the baseline -> write ``manifest.json``

An upload adds and replaces rows at StopChurn but deletes none, so a replaced snapshot's rows that the export lacks
are still there afterwards; keeping them in the new snapshot is what lets the update engine delete them.

Files go to ``<output>/<brand_id>/<table_name>/<run>/part-00001.json, part-00002.json, ...`` (``<run>``: the
run id as a name a person can type, :func:`export_folder_name`) and the
``manifest.json`` (rows, bytes and SHA-256 of each file) is written last, after the commit: a folder with a manifest
is complete and its rows are the committed baseline (with the kept rows, if any); a folder without one is the
leftover of a failed try (the next try of the same run rewrites it). Each file is ``[``, one record per line
separated by ``,``, and ``]``, never more than ``max_file_bytes`` bytes. The rows are the update engine's canonical
JSON, byte for byte what an ``insert`` of the row would carry. Rows are encoded and written a batch at a time, so
beside the table itself only one batch of JSON text is held in memory, whatever the table's size.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from airflow_provider_stopchurn.encode.records import row_pieces
from airflow_provider_stopchurn.exceptions import SafeguardError, SourceDataError, StopChurnConfigError
from airflow_provider_stopchurn.options import LOCK_TTL_S, NO_RUN_INFO, RunInfo
from airflow_provider_stopchurn.store import (
    CREATED_AT,
    HASH_1,
    HASH_2,
    Committed,
    Plan,
    SnapshotStore,
    backend_for,
    display_location,
)
from airflow_provider_stopchurn.store.folder import safe_name
from airflow_provider_stopchurn.store.history import recorded
from airflow_provider_stopchurn.update.diff import DIRTY_HASH, DIRTY_UPDATE, ROW_HASH, data_columns, with_hashes
from airflow_provider_stopchurn.update.plan import make_plan
from airflow_provider_stopchurn.update.settle import settle
from airflow_provider_stopchurn.update.sync import SyncOptions, canonical_source

log = logging.getLogger(__name__)

#: StopChurn's documented limit of one historical-upload file.
MAX_FILE_BYTES = 2_000_000_000
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "stopchurn-historical-upload/1"
_HEAD, _SEPARATOR, _TAIL = b"[\n", b",\n", b"\n]\n"
#: A file of n records of sizes s_i is ``sum(s_i + 2) + 3`` bytes: each record costs its size and a 2-byte head
#: or separator, and the tail costs 3.
_PER_RECORD, _TAIL_BYTES = 2, 3
_BATCH_ROWS = 100_000
_PART_NAME = "part-{:05d}.json"
#: The column StopChurn keys rows by (every canonical table has it).
ID = "id"

Source = pd.DataFrame | Callable[[], pd.DataFrame]


@dataclass(frozen=True)
class ExportOptions:
    """Everything that shapes one export. Validated on construction (no I/O).

    :param run_id: names the run's output folder (an Airflow run id, any text; see :func:`export_folder_name`).
    :param run_key: names the task run: a snapshot committed by the same run_key is this export's own (a retry).
    :param replace_snapshot: replace a snapshot the store holds already (it would otherwise hide changes).
    """

    brand_id: int
    table_name: str
    key_columns: tuple[str, ...] = ("id",)
    created_at_column: str | None = None
    updated_at_column: str | None = None
    max_file_bytes: int = MAX_FILE_BYTES
    replace_snapshot: bool = False
    nest_dotted_columns: bool = True
    decimal_as_string: bool = False
    #: text columns holding JSON, parsed as the update operator's ``json_columns``
    json_columns: tuple[str, ...] = ()
    run_id: str = "manual"
    run_key: str | None = None
    holder: str = "stopchurn-export"
    #: the table lock's lease (as the update operator's ``lock_ttl_s``)
    lock_ttl_s: float = LOCK_TTL_S
    #: while another run holds the table's lock, wait up to this many seconds for it (as an update run does)
    lock_wait_s: float = 300.0
    #: the DAG, task, DAG run and try this run is (recorded in the store's history; not an operator argument)
    run_info: RunInfo = NO_RUN_INFO

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_file_bytes, int) or not 64 <= self.max_file_bytes <= MAX_FILE_BYTES:
            problems.append(
                f"max_file_bytes must be an integer from 64 to {MAX_FILE_BYTES} (StopChurn's limit), got "
                f"{self.max_file_bytes!r}"
            )
        if not isinstance(self.run_id, str) or not self.run_id:
            problems.append(f"run_id must be a non-empty string, got {self.run_id!r}")
        if problems:
            raise StopChurnConfigError("Invalid export options: " + "; ".join(problems) + ".")
        self.sync_options()  # validates brand_id, table_name, key columns

    def sync_options(self) -> SyncOptions:
        """The update engine's options for the same table (what its first ``initial_load="baseline"`` run uses)."""
        return SyncOptions(
            brand_id=self.brand_id,
            table_name=self.table_name,
            key_columns=self.key_columns,
            created_at_column=self.created_at_column,
            updated_at_column=self.updated_at_column,
            initial_load="baseline",
            nest_dotted_columns=self.nest_dotted_columns,
            decimal_as_string=self.decimal_as_string,
            json_columns=self.json_columns,
            holder=self.holder,
            run_key=self.run_key,
            lock_ttl_s=self.lock_ttl_s,
            lock_wait_s=self.lock_wait_s,
            run_info=self.run_info,
        )


@dataclass
class ExportSummary:
    """What the export wrote; ``as_dict()`` is what the operator returns (and Airflow puts in XCom)."""

    brand_id: int
    table_name: str
    rows: int = 0
    files: int = 0
    bytes: int = 0
    output_uri: str = ""
    manifest_uri: str = ""
    snapshot_uri: str = ""
    snapshot_version: str = ""
    replaced_snapshot: bool = False
    #: rows of the replaced snapshot the export lacks, kept in the new one: the next update run deletes them
    kept_rows: int = 0
    #: acknowledged chunks of an unfinished update plan settled before the snapshot was replaced
    settled_chunks: int = 0
    duration_s: float = 0.0
    file_list: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("file_list")  # the manifest lists every file; XCom stays small
        return data

    def record_fields(self) -> dict[str, Any]:
        """The run's fields in the store's history (``history``: kind ``export``)."""
        return {
            "rows_exported": self.rows,
            "files": self.files,
            "bytes_exported": self.bytes,
            "replaced_snapshot": self.replaced_snapshot,
            "kept_rows": self.kept_rows,
            "settled_chunks": self.settled_chunks,
        }

    def line(self) -> str:
        return (
            f"StopChurn historical export of brand {self.brand_id} table {self.table_name!r}: {self.rows} rows in "
            f"{self.files} file(s), {self.bytes} bytes, under {self.output_uri}; baseline snapshot "
            f"{self.snapshot_version} committed at {self.snapshot_uri}; {self.duration_s:.2f}s"
        )


def output_folder(root: Any, options: ExportOptions) -> Any:
    """``<root>/<brand_id>/<table_name>/<export_folder_name(run id)>`` (a ``pathlib.Path`` or an
    ObjectStoragePath / UPath)."""
    name = export_folder_name(options.run_id, key=options.run_key)
    return root / str(int(options.brand_id)) / safe_name(options.table_name) / name


_UNSAFE_IN_FOLDER = re.compile(r"[^A-Za-z0-9_.-]+")


def export_folder_name(run_id: str, key: str | None = None) -> str:
    """The run's export folder: a name a person can type, the same for every try of one DAG run.

    An Airflow run id ``<kind>__<ISO time>`` gives ``<UTC time>-<kind>-<hash>`` (``20261207T005212Z-manual-3f9a1c``);
    any other run id its letters, digits, ``_`` and ``.`` (the rest as ``-``, cut to 40 characters), then the hash.
    The hash (6 hex digits of the SHA-256 of ``key``, the task run's ``run_key``: DAG, task, run id and map index;
    of the run id when None) keeps two runs apart whose names would otherwise meet: two triggers in one second, or
    two DAGs on one schedule (their run ids are the same). The folder depends on the task run alone, so a retry
    rewrites its own folder.
    """
    digest = hashlib.sha256((run_id if key is None else key).encode("utf-8")).hexdigest()[:6]
    kind, sep, stamp = run_id.rpartition("__")
    if sep:
        try:
            at = dt.datetime.fromisoformat(stamp)
        except ValueError:
            at = None
        readable_kind = _UNSAFE_IN_FOLDER.sub("-", kind).strip("-.")[:24]
        if at is not None and at.tzinfo is not None and readable_kind:
            utc = at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            return f"{utc}-{readable_kind}-{digest}"
    readable = _UNSAFE_IN_FOLDER.sub("-", run_id).strip("-.")[:40].rstrip("-.")
    return f"{readable or 'run'}-{digest}"


def run_export(
    source: Source,
    store: SnapshotStore,
    output_root: Any,
    options: ExportOptions,
    *,
    run_ms: int | None = None,
) -> ExportSummary:
    """Write the historical-upload files of ``source`` and commit them as the baseline; see the module docstring.

    :param store: the update engine's snapshot store of the same brand and table.
    :param output_root: where the files go (a ``pathlib.Path``, or an ObjectStoragePath / UPath).
    :param run_ms: the export's time (epoch ms): ``createdAt`` / ``updatedAt`` of rows without such columns.
    """
    started = time.monotonic()
    run_ms = run_ms if run_ms is not None else time.time_ns() // 1_000_000
    folder = output_folder(output_root, options)
    summary = ExportSummary(options.brand_id, options.table_name)
    summary.output_uri = display_location(folder)
    summary.snapshot_uri = store.location
    sync_options = options.sync_options()
    with (
        recorded(store, options, kind="export", fields=summary.record_fields) as recording,  # however it ends
        store.lock(options.holder, ttl_s=options.lock_ttl_s, wait_s=options.lock_wait_s) as lock,
        lock.heartbeat(),
        recording.holding(lock),
    ):
        pending = store.pending_plan(cleanup=False)
        committed = store.read_committed()
        summary.replaced_snapshot = _check_replace(store, committed, pending, options)
        unfinished = store.pending_plan()  # the same plan (or None: one a crash left committed or outdated)
        if unfinished is not None:
            summary.settled_chunks = _settle_pending(store, unfinished, lock)
            committed = store.read_committed()
            summary.replaced_snapshot = committed is not None  # what the settle committed is replaced too
        canon = canonical_source(source, sync_options)
        plan = make_plan(canon, None, sync_options, run_ms)
        exported = plan.target
        kept = _kept_rows(committed, exported, plan.kinds, plan.key_columns, options) if committed else None
        snapshot_frame = exported if kept is None or kept.height == 0 else pl.concat([exported, kept])
        summary.kept_rows = 0 if kept is None else kept.height
        # the baseline snapshot is written while the files are (Parquet and file I/O both release the GIL)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stopchurn-snapshot") as pool:
            snapshot = pool.submit(store.write_snapshot, snapshot_frame)
            try:
                files = _write_files(exported, plan.kinds, folder, options, run_ms, lock.fence)
            except BaseException:
                with contextlib.suppress(Exception):
                    store.delete_snapshot(snapshot.result())  # written for nothing: no pointer names it
                raise
            version = snapshot.result()
        manifest_uri = display_location(folder / MANIFEST)
        try:
            store.commit(
                version,
                base_version=committed.version if committed is not None else None,
                kinds=plan.kinds,
                key_columns=plan.key_columns,
                rows=snapshot_frame.height,
                plan_id=None,
                row_hash=ROW_HASH,
                lock=lock,
                run={"run_key": options.run_key, "export": manifest_uri, "rows": exported.height},
                # the files carry the rows in this shape: the update run that follows compares its own with it
                shape=options.sync_options().shape(),
            )
        except Exception:
            with contextlib.suppress(Exception):
                store.delete_snapshot(version)  # not committed: no pointer names it
            raise
        summary.rows = exported.height
        summary.files = len(files)
        summary.bytes = sum(f["bytes"] for f in files)
        summary.file_list = files
        summary.snapshot_version = version
        summary.manifest_uri = manifest_uri
        _write_manifest(folder, summary, options, lock.fence)
    if summary.kept_rows:
        log.warning(
            "%d rows of the replaced snapshot of %r are not in this export; they stay in the snapshot, so the next "
            "update run deletes them at StopChurn (or sends them again if the source has them then).",
            summary.kept_rows,
            options.table_name,
        )
    summary.duration_s = round(time.monotonic() - started, 3)
    log.info("%s", summary.line())
    return summary


def _check_replace(store: SnapshotStore, committed: Any, pending: Plan | None, options: ExportOptions) -> bool:
    """Whether an existing snapshot is replaced; raise when it may not be (it would hide changes)."""
    if pending is not None and pending.meta.get("diff_location") == "warehouse":
        raise StopChurnConfigError(
            f"The snapshot store {store.location} holds an unfinished plan of the warehouse diff "
            f"(diff_location='warehouse') of brand {options.brand_id} table {options.table_name!r}; only a "
            "warehouse run can settle it. Nothing was written. Let the update operator with diff_location='warehouse' "
            "run once, or run `stopchurn reconcile --reset` (docs: the diff in the warehouse), then export again."
        )
    if pending is not None and (
        pending.meta.get("brand_id") != options.brand_id or pending.meta.get("table_name") != options.table_name
    ):
        raise StopChurnConfigError(f"The pending plan in {store.location} belongs to another brand or table.")
    if committed is None and pending is None:
        return False
    record = (committed.run if committed is not None else None) or {}
    own = options.run_key is not None and record.get("run_key") == options.run_key and "export" in record
    if options.replace_snapshot or (own and pending is None):
        if committed is not None and not own:
            log.warning(
                "replace_snapshot=True: the snapshot %s of %s (%s rows) is replaced by this export.",
                committed.version,
                store.location,
                committed.rows,
            )
        return committed is not None and not own
    what = (
        f"snapshot {committed.version} ({committed.rows} rows, committed {committed.committed_at})"
        if committed is not None and pending is None
        else "an unfinished update plan"
    )
    short = "a snapshot" if committed is not None and pending is None else "an unfinished update plan"
    raise SafeguardError(
        f"Export refused: the table already has {short}; set replace_snapshot=True to replace it.\n"
        f"The snapshot store {store.location} holds {what} of brand {options.brand_id} table "
        f"{options.table_name!r}: updates have been flowing. Nothing was written.\n"
        "Replacing it with this export would make the next update run compare against the export and silently skip "
        "every change StopChurn has not seen yet. Set replace_snapshot=True (the example DAG's "
        "approve_replace_snapshot param in the Trigger dialog) once the files of this export are going to be "
        "uploaded: rows StopChurn holds that the export lacks are then deleted by the next update run. Or export "
        "to another snapshot_uri."
    )


def _settle_pending(store: SnapshotStore, pending: Plan, lock: Any) -> int:
    """Settle an update plan a run left unfinished, as the update run does first (``run_sync``): what StopChurn
    acknowledged is committed, so the rows it holds are known before the snapshot is replaced. Returns the number of
    acknowledged chunks."""
    acks = store.acks(pending)
    log.warning(
        "Settling the unfinished update plan %s of %r before the export replaces its snapshot: %d of %d chunks "
        "were acknowledged.",
        pending.plan_id,
        store.table_name,
        len(acks),
        len(pending.chunks),
    )
    settle(store, pending, acks, lock=lock)
    return len(acks)


#: Keys or ids named in an error, at most.
_SHOWN = 5


def _kept_rows(
    committed: Committed,
    exported: pl.DataFrame,
    kinds: Mapping[str, str],
    key_columns: Sequence[str],
    options: ExportOptions,
) -> pl.DataFrame:
    """The rows of the replaced snapshot that the export lacks, as rows of the new snapshot.

    StopChurn holds them (an upload adds and replaces rows, it deletes none), so the new snapshot keeps them and
    the next update run deletes them, or sends them again when the source has them then. A row is matched by its
    key and by its ``id`` (what StopChurn keys rows by): a row whose id the export gives another key is not kept (a
    delete of that id would remove the exported row). Its values are kept as they were when the schema is the
    same; otherwise the row is kept dirty (``DIRTY_HASH``: resent if the key comes back). Raises
    :class:`SafeguardError` when such a row cannot be kept: the key columns or the id changed type, or a key kept
    with another id.
    """
    keys = list(key_columns)
    wanted = list(dict.fromkeys([*keys, ID]))
    old_keys = list(committed.key_columns)
    old = committed.columns(list(dict.fromkeys([*old_keys, ID])))
    if old.height == 0:
        return exported.clear()
    retyped = [
        c
        for c in wanted
        if c not in old.columns or committed.kinds.get(c) != kinds.get(c) or old.schema[c] != exported.schema[c]
    ]
    if old_keys != keys or retyped:
        changed = ", ".join(map(repr, retyped or keys))
        raise SafeguardError(
            f"The export of {options.table_name!r} cannot replace the snapshot: its key or id column(s) {changed} "
            f"differ from the snapshot's (key columns {old_keys}, kinds "
            f"{ {c: committed.kinds.get(c) for c in old_keys} }).\n"
            f"Nothing was written. StopChurn holds the snapshot's {committed.rows} rows under their old ids, which "
            "this export could not delete later. Let the update operator send the table with its new keys first "
            "(on_schema_change='update_all'), then export again if the files are still needed."
        )
    ids = exported.select(pl.col(ID).unique())
    gone = old.join(ids, on=ID, how="anti")  # ids StopChurn holds that the export lacks
    if gone.height == 0:
        return exported.clear()
    renamed = gone.join(exported.select(keys), on=keys, how="semi")
    if renamed.height:
        shown = ", ".join(repr(v) for v in renamed.get_column(ID).head(_SHOWN).to_list())
        raise SafeguardError(
            f"The export of {options.table_name!r} cannot replace the snapshot: {renamed.height} key(s) have another "
            f"id than StopChurn holds (old ids {shown}).\n"
            "Nothing was written. After the upload StopChurn would hold both ids of such a key, and no later run "
            "could delete the old one. Let the update operator send the new ids first, then export again if the "
            "files are still needed."
        )
    rows = committed.rows_with_keys(gone.select(keys))
    columns = [*data_columns(exported), CREATED_AT]
    same = set(data_columns(rows)) == set(data_columns(exported)) and all(
        committed.kinds.get(c) == kinds.get(c) and rows.schema[c] == exported.schema[c] for c in data_columns(exported)
    )
    kept = rows.select(
        [
            pl.col(c).cast(exported.schema[c])
            if c in rows.columns and rows.schema[c] == exported.schema[c]
            else pl.lit(None, dtype=exported.schema[c]).alias(c)
            for c in columns
        ]
    )
    if same:
        kept = with_hashes(kept)
        if HASH_1 in rows.columns:  # a row a settle marked dirty stays dirty
            was_dirty = rows.get_column(HASH_1) == DIRTY_HASH
            old_hashes = rows.select(HASH_1, HASH_2).cast(exported.select(HASH_1, HASH_2).schema)
            kept = kept.with_columns(
                pl.when(was_dirty).then(old_hashes.get_column(h)).otherwise(pl.col(h)).alias(h)
                for h in (HASH_1, HASH_2)
            )
    else:  # not what StopChurn holds in every column: resent if the key comes back
        kept = kept.with_columns(
            pl.lit(DIRTY_HASH, dtype=exported.schema[HASH_1]).alias(HASH_1),
            pl.lit(DIRTY_UPDATE, dtype=exported.schema[HASH_2]).alias(HASH_2),
        )
    return kept.select(exported.columns).cast(exported.schema)


# --- files -----------------------------------------------------------------------------------------------------
class _Part:
    """One output file. Its size and rows are planned on the encoding thread; the writer thread does the I/O."""

    def __init__(self, folder: Any, number: int) -> None:
        self.name = _PART_NAME.format(number)
        self.path = folder / self.name
        self.planned = 0  # bytes of the records planned into it, each with its head or separator
        self.rows = 0
        self._handle: Any = None
        self._sha = hashlib.sha256()
        self._bytes = 0

    # writer thread
    def _put(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._sha.update(data)
        self._bytes += len(data)

    def write(self, data: memoryview, first: bool) -> None:
        """Records ``data`` (each followed by ``,\n`` but the last): the file's first ones, or more."""
        if first:
            self._handle = self.path.open("wb")
            self._put(_HEAD)
        else:
            self._put(_SEPARATOR)
        self._put(data)

    def close(self) -> dict[str, Any]:
        self._put(_TAIL)
        self._handle.close()
        self._handle = None
        return {"name": self.name, "rows": self.rows, "bytes": self._bytes, "sha256": self._sha.hexdigest()}

    def abandon(self) -> None:
        if self._handle is not None:
            self._handle.close()


class _Writer:
    """Writes and hashes the files on one thread, in order, while the next batch is encoded (both release the GIL).

    At most one batch waits beside the one being encoded, so memory stays bounded.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stopchurn-export")
        self._last: Future[None] | None = None
        self.files: list[dict[str, Any]] = []

    def submit(self, jobs: list[Callable[[], None]]) -> None:
        future = self._pool.submit(_run_all, jobs)
        if self._last is not None:
            self._last.result()  # raises the writer's error, if any
        self._last = future

    def finish(self) -> list[dict[str, Any]]:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        return self.files

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _run_all(jobs: list[Callable[[], None]]) -> None:
    for job in jobs:
        job()


def _close_into(files: list[dict[str, Any]], part: _Part) -> None:
    files.append(part.close())


def _write_files(
    target: pl.DataFrame,
    kinds: Mapping[str, str],
    folder: Any,
    options: ExportOptions,
    run_ms: int,
    fence: Callable[[], None],
) -> list[dict[str, Any]]:
    """Encode ``target`` a batch at a time and fill files up to ``max_file_bytes``; return what each file holds.

    :param fence: raises unless this run still holds the table's lease; called before the folder is cleared and
        before each batch is written. Every try of a DAG run writes the same folder: a try that was paused past its
        lease (a zombie) must not remove or rewrite the files and manifest of the try that took the table over.
    """
    fence()
    _prepare(folder)
    columns = data_columns(target)
    pieces = row_pieces(
        target.select(columns).schema,
        {c: kinds[c] for c in columns},
        nest_dotted_columns=options.nest_dotted_columns,
        decimal_as_string=options.decimal_as_string,
    )
    limit = options.max_file_bytes - _TAIL_BYTES  # room for records (each with its head or separator)
    writer = _Writer()
    parts: list[_Part] = []
    try:
        for offset in range(0, target.height, _BATCH_ROWS):
            batch = target.slice(offset, _BATCH_ROWS)
            data, ends = _records(batch, pieces, options, run_ms)
            jobs: list[Callable[[], None]] = []
            start = 0
            while start < len(ends) - 1:
                if not parts or parts[-1].planned + (ends[start + 1] - ends[start]) > limit:
                    if parts and parts[-1].rows:
                        jobs.append(functools.partial(_close_into, writer.files, parts[-1]))
                    parts.append(_Part(folder, len(parts) + 1))
                part = parts[-1]
                end = int(np.searchsorted(ends, ends[start] + limit - part.planned, side="right")) - 1
                if end <= start:
                    raise _too_large(batch, start, int(ends[start + 1] - ends[start]), options)
                view = data[int(ends[start]) : int(ends[end]) - len(_SEPARATOR)]
                jobs.append(functools.partial(part.write, view, not part.rows))
                part.planned += int(ends[end] - ends[start])
                part.rows += end - start
                start = end
            if offset + _BATCH_ROWS >= target.height and parts and parts[-1].rows:
                jobs.append(functools.partial(_close_into, writer.files, parts[-1]))
            fence()
            writer.submit(jobs)
        return writer.finish()
    except BaseException:
        writer.abort()
        for part in parts:
            part.abandon()
        raise


def _records(
    batch: pl.DataFrame, pieces: list[pl.Expr], options: ExportOptions, run_ms: int
) -> tuple[memoryview, np.ndarray]:
    """``{"data": <row>, "createdAt": <ms>, "updatedAt": <ms>},\n`` of each row of a batch of the target, as one
    buffer of UTF-8 bytes and the offsets where each record ends (``ends[0] == 0``)."""
    if options.updated_at_column is not None:
        updated = pl.col(options.updated_at_column).cast(pl.Int64).fill_null(run_ms)
    else:
        updated = pl.lit(run_ms, dtype=pl.Int64)
    records = batch.select(
        pl.concat_str(
            pl.lit('{"data":'),
            *pieces,
            pl.lit(',"createdAt":'),
            pl.col(CREATED_AT).cast(pl.String),
            pl.lit(',"updatedAt":'),
            updated.cast(pl.String),
            pl.lit("}" + _SEPARATOR.decode()),
        ).alias("record")
    ).to_series()
    # the Arrow layout: one buffer of every record's bytes and an offset per record, read without a copy
    array = records.rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    return memoryview(array.buffers()[2]), offsets


def _too_large(batch: pl.DataFrame, position: int, cost: int, options: ExportOptions) -> SourceDataError:
    row_id = batch.get_column("id")[position] if "id" in batch.columns else None
    return SourceDataError(
        f"The row with id {row_id!r} of {options.table_name!r} needs {cost + _TAIL_BYTES} bytes as a file of its own, "
        f"more than max_file_bytes={options.max_file_bytes}. Nothing was committed and no manifest was written; "
        "shrink the row or raise max_file_bytes."
    )


def _prepare(folder: Any) -> None:
    """Create the run's folder, and remove what an earlier try of the same run left in it."""
    try:
        children = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        children = []
    for child in children:
        name = str(child).rstrip("/").rsplit("/", 1)[-1]
        if name == MANIFEST or (name.startswith("part-") and name.endswith(".json")):
            child.unlink()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError:  # object stores have no folders
        if getattr(folder, "protocol", "file") in ("file", "local", ""):
            raise


def _write_manifest(folder: Any, summary: ExportSummary, options: ExportOptions, fence: Callable[[], None]) -> None:
    fence()  # a try that lost its lease after its commit leaves the folder to the try that took the table over
    manifest = {
        "format": MANIFEST_FORMAT,
        "brand_id": options.brand_id,
        "table_name": options.table_name,
        "run_id": options.run_id,
        "rows": summary.rows,
        "bytes": summary.bytes,
        "max_file_bytes": options.max_file_bytes,
        "files": summary.file_list,
        "snapshot": {
            "location": summary.snapshot_uri,
            "version": summary.snapshot_version,
            "rows": summary.rows + summary.kept_rows,
            "kept_rows": summary.kept_rows,
        },
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "upload": (
            "Upload every part file in StopChurn's Back Office as a historical load of this table and brand, "
            "before the first update run; the update run then sends only what changed since this export."
        ),
    }
    backend_for(folder).write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n", durable=True)


__all__ = ["MANIFEST", "MAX_FILE_BYTES", "ExportOptions", "ExportSummary", "output_folder", "run_export"]
