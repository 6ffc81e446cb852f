"""The export's run: lock the table, read the source, write the files, commit what they hold as the baseline.

Before updates may flow, a brand's existing data is uploaded by hand in StopChurn's Back Office as JSON files:
one JSON array per file of ``{"data": <row>, "createdAt": <ms>, "updatedAt": <ms>}`` (an update's inner record
without ``brandId`` / ``tableName``), one table and one brand per file, at most 2 GB per file. :func:`run_export`
writes those files and commits the very rows it wrote as the snapshot of the update engine (``update/sync.py``), so
that a ``StopChurnUpdateOperator`` on the same brand, table and snapshot location sends only what changed after the
export. No Airflow import.

One run::

    lock the table's snapshot store (as an update run does) -> refuse if it holds a snapshot (unless
    replace_snapshot, or this same run wrote it) -> settle an unfinished update plan (the update engine's settle)
    -> canonicalize the source (the update engine's rules: keys, ids, the ``user`` table's contract)
    -> the target snapshot of a first load (createdAt from ``created_at_column``, else the run's time)
    + the replaced snapshot's rows the export lacks (kept, so that the next update run deletes them)
    -> encode and write the files batch by batch -> commit the target as the baseline -> write ``manifest.json``

The parts: ``options.py`` (what shapes an export), ``replace.py`` (refusing, settling and keeping the rows of a
snapshot the store holds already), ``folder.py`` (where the files go), ``files.py`` (the files and the manifest),
``summary.py`` (what the run reports).

Files go to ``<output>/<brand_id>/<table_name>/<run>/part-00001.json, part-00002.json, ...`` (``<run>``: the
run id as a name a person can type, :func:`~airflow_provider_stopchurn.export.folder.export_folder_name`) and the
``manifest.json`` (rows, bytes and SHA-256 of each file) is written last, after the commit: a folder with a manifest
is complete and its rows are the committed baseline (with the kept rows, if any); a folder without one is the
leftover of a failed try (the next try of the same run rewrites it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import polars as pl

from airflow_provider_stopchurn.export.files import MANIFEST, write_files, write_manifest
from airflow_provider_stopchurn.export.folder import output_folder
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.export.replace import check_replace, kept_rows, settle_pending
from airflow_provider_stopchurn.export.summary import ExportSummary
from airflow_provider_stopchurn.store import SnapshotStore, display_location
from airflow_provider_stopchurn.store.history import recorded_under_lock
from airflow_provider_stopchurn.update.diff import ROW_HASH
from airflow_provider_stopchurn.update.plan import make_plan
from airflow_provider_stopchurn.update.sync import canonical_source

log = logging.getLogger(__name__)

Source = pd.DataFrame | Callable[[], pd.DataFrame]


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
    with recorded_under_lock(store, options, kind="export", fields=summary.record_fields) as lock:
        pending = store.pending_plan(cleanup=False)
        committed = store.read_committed()
        summary.replaced_snapshot = check_replace(store, committed, pending, options)
        unfinished = store.pending_plan()  # the same plan (or None: one a crash left committed or outdated)
        if unfinished is not None:
            summary.settled_chunks = settle_pending(store, unfinished, lock)
            committed = store.read_committed()
            summary.replaced_snapshot = committed is not None  # what the settle committed is replaced too
        canon = canonical_source(source, sync_options)
        plan = make_plan(canon, None, sync_options, run_ms)
        exported = plan.target
        kept = kept_rows(committed, exported, plan.kinds, plan.key_columns, options) if committed else None
        snapshot_frame = exported if kept is None or kept.height == 0 else pl.concat([exported, kept])
        summary.kept_rows = 0 if kept is None else kept.height
        # the baseline snapshot is written while the files are (Parquet and file I/O both release the GIL)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stopchurn-snapshot") as pool:
            snapshot = pool.submit(store.write_snapshot, snapshot_frame)
            try:
                files = write_files(exported, plan.kinds, folder, options, run_ms, lock.fence)
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
        write_manifest(folder, summary, options, lock.fence)
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


__all__ = ["run_export"]
