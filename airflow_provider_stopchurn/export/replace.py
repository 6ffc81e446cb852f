"""Replacing a snapshot the store holds: refuse unless allowed, settle an unfinished plan, keep the rows it lacks.

An upload adds and replaces rows at StopChurn but deletes none, so a replaced snapshot's rows that the export lacks
are still there afterwards; keeping them in the new snapshot is what lets the update engine delete them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from airflow_provider_stopchurn.exceptions import SafeguardError, StopChurnConfigError
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.store import CREATED_AT, HASH_1, HASH_2, Committed, Plan, SnapshotStore
from airflow_provider_stopchurn.update.diff import DIRTY_HASH, DIRTY_UPDATE, data_columns, with_hashes
from airflow_provider_stopchurn.update.settle import settle

# the export's records keep the logger they always had: users and tests filter on it
log = logging.getLogger("airflow_provider_stopchurn.export.engine")

#: The column StopChurn keys rows by (every canonical table has it).
ID = "id"


def check_replace(store: SnapshotStore, committed: Any, pending: Plan | None, options: ExportOptions) -> bool:
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


def settle_pending(store: SnapshotStore, pending: Plan, lock: Any) -> int:
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


def kept_rows(
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


__all__ = ["check_replace", "kept_rows", "settle_pending"]
