"""The snapshot store: what was last delivered for one (brand, table), and the plan being delivered now.

Layout under ``<root>/<brand_id>/<table_name>/`` (every file but the pointers and the lock is written once)::

    CURRENT                            pointer to the committed snapshot (JSON: version, kinds, key columns,
                                       rows, row_hash, plan_id of the plan it finished), written last at commit
    snapshots/<version>.parquet        a canonical table + the ``__sc_created_at`` column (epoch ms per key)
    PLAN                               pointer to the plan in flight (JSON: base and target version, chunk
                                       boundaries, meta), written after its files
    plans/<plan_id>/changes.parquet    the change set in send order (absent when every update is an insert)
    plans/<plan_id>/acks/<chunk>       one file per chunk StopChurn acknowledged: empty, or the records it
                                       rejected inside the chunk, one JSON object per line
    plans/<plan_id>/failed_tries/<ns>  event plans: one empty file per try that StopChurn answered with a
                                       retryable error (the third settles the plan)
    LOCK                               the run holding this table (JSON), with an expiry (see ``lock``)
    LOCK.<digest>.claim                for an instant, while a run breaks, refreshes or releases the LOCK
    plans/<plan_id>/quarantine.jsonl   the rows rejected before that the plan's delivery did not resolve (read
                                       when the plan is settled)
    quarantine/<plan_id>.jsonl         the rows StopChurn still rejects once the plan was settled, whole, with its
                                       reason; the newest file is the quarantine (empty: none); older files are
                                       removed ``QUARANTINE_RETENTION_S`` (7 days) after a newer one replaced them
    quarantine/failures.json           per row id, the tries whose request failed with a retryable error, and
                                       whether it failed alone (a hint for isolating rows: see ``deliver``)
    history/<time>-<random>.json       one record per run that committed something (counts, times, version,
                                       status, first line of a failure); the newest ``HISTORY_LIMIT`` are kept

Crash safety:

* Object stores have no atomic rename, so nothing is overwritten in place except the pointers, the lock and an
  acknowledgement written again; each of those is one whole-file write that a reader sees entirely or not at
  all (locally: a temporary file and ``os.replace``; object stores: a single PUT). A pointer is written only
  after everything it names exists, and locally it is fsynced.
* A commit checks its base: it writes CURRENT only if CURRENT still names the snapshot the run started from
  (and, given the run's lock, only if the lock is still the run's). Otherwise nothing is written, and the next
  run diffs against whatever is committed.
* A PLAN whose ``plan_id`` CURRENT records (a crash between writing CURRENT and removing PLAN) is recognised as
  committed and cleaned up; a PLAN made against a snapshot that is no longer committed is discarded: its
  changes are diffed again (a row may be sent twice, none is lost).
* A snapshot file no pointer names (its run died after publishing it but before its plan named it, or part way
  through an upload to a store that shows an object while it is written) is removed by the next commit made under
  the lock, if it is older than that lock: a newer one may be a run's that took the lock since.
* An acknowledgement and the rejections in its chunk are one file, so a rejection is never recorded without
  its acknowledgement nor the other way round.
* The history cannot be appended to in place on an object store, so each record is its own small file, written
  whole after the commit it describes; pruning the oldest comes after the write, so a crash never loses a
  record it had written, it only leaves a few records over the bound until the next append.

The modules, one job each:

* :mod:`.snapshots`: :class:`SnapshotStore`, the store of one brand/table, its parts joined, and taking its lock;
* :mod:`.folder`: the table's folder, the names of its files and how its pointers and Parquet files are read;
* :mod:`.committed`: the committed snapshot, CURRENT and the commit; :mod:`.plans`: the plan in flight and its
  acknowledgements; :mod:`.quarantine`: the rows still rejected; :mod:`.history_files`: the run records' files;
* :mod:`.lock`: the lease on a table (claims, refresh, fencing, heartbeat); :mod:`.lock_records`: what a lock
  record says about its holder;
* :mod:`.backend`: the storage seam (a local directory, or any UPath-like object: s3://, gs://, memory://, ...);
* :mod:`.history`: what a run's history record holds; what the on-call commands do to a store is
  :mod:`~airflow_provider_stopchurn.cli.operate`.

This package imports no Airflow.
"""

from __future__ import annotations

from airflow_provider_stopchurn.store.backend import (
    Backend,
    LocalBackend,
    ObjectStoreBackend,
    backend_for,
    display_location,
)
from airflow_provider_stopchurn.store.committed import Committed
from airflow_provider_stopchurn.store.constants import (
    CREATED_AT,
    FORMAT_VERSION,
    HASH_1,
    HASH_2,
    META_COLUMNS,
    OP,
    UPDATED_AT,
)
from airflow_provider_stopchurn.store.history_files import HISTORY_LIMIT
from airflow_provider_stopchurn.store.lock import TableLock
from airflow_provider_stopchurn.store.plans import Plan
from airflow_provider_stopchurn.store.snapshots import SnapshotStore

__all__ = [
    "CREATED_AT",
    "FORMAT_VERSION",
    "HASH_1",
    "HASH_2",
    "HISTORY_LIMIT",
    "META_COLUMNS",
    "OP",
    "UPDATED_AT",
    "Backend",
    "Committed",
    "LocalBackend",
    "ObjectStoreBackend",
    "Plan",
    "SnapshotStore",
    "TableLock",
    "backend_for",
    "display_location",
]
