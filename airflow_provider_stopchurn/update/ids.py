"""A key diff made right for StopChurn when ``id`` is not the whole key: ids moving between keys, changed ids."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from airflow_provider_stopchurn.store import HASH_1, HASH_2
from airflow_provider_stopchurn.update.diff import BASE_ROW, TARGET_ROW, BaseSnapshot, SnapshotDiff

__all__ = ["reconcile_ids"]

ID = "id"


def reconcile_ids(diff: SnapshotDiff, base: BaseSnapshot, keys: Sequence[str]) -> tuple[SnapshotDiff, bool]:
    """The key diff made right for StopChurn, which keys rows by ``id``, when ``id`` is not the whole key.

    A key diff sends one update per changed key. With an ``id`` column of its own (key ``("tenant", "id")``, or
    ``user_key`` beside an ``id``), ids can move between keys, and what StopChurn must end with is decided by id:

    - a row whose ``id`` changed: its old id is deleted (a delete of its own base row, sent before any insert or
      update: see below) and its new id written, as an ``insert`` unless StopChurn holds that id after the plan's
      deletes;
    - a deleted key whose id a target row now holds sends no delete (a delete landing after the new row's update
      would remove it): the insert of a new key taking that id becomes an ``update`` of it, settled as replacing
      the deleted key's row (a row moving between tenants);
    - any other deleted key's id is deleted.

    Returns the diff and whether it deletes the old id of a row whose id changed. Such a plan is delivered deletes
    first (``deletes_first``): every delete is settled before any insert or update is sent, so a row's old id is
    never left behind by a plan stopped between the two, and no two requests in flight touch one id.
    Ids of another type than the base's (``1`` -> ``"1"``) are other ids.
    """
    keys = list(keys)
    target = diff.target
    if (
        keys == [ID]
        or ID not in target.columns
        or not (diff.inserted.height + diff.updated.height + diff.deleted.height)
    ):
        return diff, False
    base_ids = base.columns([ID]).with_row_index(BASE_ROW)
    row_dtype = base_ids.schema[BASE_ROW]
    same_type = base_ids.schema[ID] == target.schema[ID]
    updated = diff.updated.join(base_ids.rename({ID: _OLD_ID}), on=BASE_ROW, how="left", maintain_order="left")
    id_moved = updated.filter(pl.col(ID).ne_missing(pl.col(_OLD_ID))) if same_type else updated
    # a row a settle kept dirty as a maybe-insert (its insert may have landed) whose id changed since: its old id
    # may be at StopChurn too, so it is deleted like the old id of an updated row (the row stays an insert)
    kept = diff.inserted.filter(pl.col(BASE_ROW).is_not_null()).join(
        base_ids.rename({ID: _OLD_ID}), on=BASE_ROW, how="left", maintain_order="left"
    )
    kept_moved = kept.filter(pl.col(ID).ne_missing(pl.col(_OLD_ID))) if same_type else kept
    old_ids = pl.concat([id_moved.select(*keys, BASE_ROW, _OLD_ID), kept_moved.select(*keys, BASE_ROW, _OLD_ID)])
    deleted, inserted, merged = diff.deleted, diff.inserted, diff.inserted.clear()
    if old_ids.height:  # the old id of a row whose id changed: deleted as it was last delivered
        rows = base.rows_with_keys(old_ids.select(keys)).unique(subset=keys, keep="first", maintain_order=True)
        extra = (
            rows.drop([c for c in (HASH_1, HASH_2) if c in rows.columns])
            .join(old_ids.select(*keys, BASE_ROW), on=keys, how="left", maintain_order="left")
            .with_columns(pl.col(BASE_ROW).cast(row_dtype))
        )
    else:
        extra = None
    if same_type:
        sent_ids = target.select(ID).unique()
        if deleted.height:  # a deleted key whose id a target row now holds: no delete
            reused = deleted.join(sent_ids, on=ID, how="semi").get_column(BASE_ROW)
            deleted = deleted.join(sent_ids, on=ID, how="anti", maintain_order="left")
        else:
            reused = pl.Series(BASE_ROW, [], dtype=row_dtype)
        # the ids StopChurn holds once the plan's deletes landed; each once (a settled snapshot may hold an id on
        # two rows); the row of a deleted key is the one an insert of that id replaces
        gone_ids = old_ids.select(pl.col(_OLD_ID).alias(ID))
        if deleted.height:
            gone_ids = pl.concat([gone_ids, deleted.select(ID)])
        held = (
            base_ids.join(gone_ids, on=ID, how="anti")
            .sort(pl.col(BASE_ROW).is_in(reused.implode()), descending=True)
            .unique(subset=[ID], keep="first")
            .rename({BASE_ROW: _OWNER})
        )
        # an insert of an id another base row holds updates that id (replacing the deleted key's row)
        owned = inserted.join(held, on=ID, how="left", maintain_order="left")
        takes = pl.col(_OWNER).is_not_null() & pl.col(_OWNER).ne_missing(pl.col(BASE_ROW))
        merged = owned.filter(takes).with_columns(
            pl.when(pl.col(BASE_ROW).is_null() & pl.col(_OWNER).is_in(reused.implode()))
            .then(pl.col(_OWNER))
            .otherwise(pl.col(BASE_ROW))
            .cast(row_dtype)
            .alias(BASE_ROW)
        )
        inserted = owned.filter(~takes)
        to_insert = id_moved.filter(~pl.col(ID).is_in(held.get_column(ID).implode()))
    else:  # ids of another type are other ids: every old id goes, every new one is new
        to_insert = id_moved
    if extra is not None:
        deleted = extra if diff.deleted.height == 0 else pl.concat([deleted, extra.select(deleted.columns)])
    columns = diff.updated.columns
    stays = updated.join(to_insert.select(TARGET_ROW), on=TARGET_ROW, how="anti", maintain_order="left")
    return (
        SnapshotDiff(
            target=target,
            inserted=pl.concat([inserted.select(columns), to_insert.select(columns)]).sort(keys),
            updated=pl.concat([stays.select(columns), merged.select(columns)]).sort(keys),
            deleted=deleted.sort(keys) if deleted.height else deleted,
            unchanged=diff.unchanged,
        ),
        extra is not None,
    )


_OLD_ID = "__sc_old_id"
_OWNER = "__sc_owner"
