"""The state table beside the snapshot store: its bookkeeping row, the drift check against ``CURRENT``, and what
every run does to it first (finish a swap a crash interrupted, migrate an older format).

**Where state lives.** The state table (``<state_schema>.b<brand>_<table>``) holds per key: the key columns as
text, the row hash (``warehouse/sql.py``), createdAt and the last delivered row (a delete carries it): its values
alone where the warehouse has transactions, the constant text around them kept once in the bookkeeping row
(``warehouse/rows.py``), else its JSON text. Its bookkeeping table (``..__meta``) holds a token; the snapshot
store's ``CURRENT`` holds the same token after every commit. The plan (the changed rows with their update JSON),
the acknowledgements and the rejected rows stay in the snapshot store, exactly as on the local path, so a crash,
a rejection or a retry is settled the same way.

Any disagreement between the two that no crash explains is *drift*: the run stops before reading the source and
names the ``stopchurn reconcile`` command that repairs it (``warehouse/reconcile.py``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from airflow_provider_stopchurn.exceptions import SnapshotError, StopChurnConfigError
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.warehouse import rows as R
from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.databases import Warehouse

# the logger name the warehouse sync has always logged under: users and tests filter on it
log = logging.getLogger("airflow_provider_stopchurn.warehouse.engine")

__all__ = ["StateDriftError", "check_state", "drop_scratch", "holds_layouts", "prepare_state"]


class StateDriftError(SnapshotError):
    """The state table and the snapshot store disagree about what StopChurn holds (repair: ``stopchurn reconcile``)."""


@dataclass
class _Meta:
    format: int
    token: str
    plan_id: str | None
    columns: dict[str, str]
    key_columns: tuple[str, ...]
    rows: int
    #: the row layouts (tag -> constant texts, ``warehouse/rows.py``); None: the bookkeeping table has no column
    #: for them (made before them, and not yet given one), so every row is kept as its JSON text
    layouts: dict[str, list[str]] | None = None


def read_meta(warehouse: Warehouse, state: S.StateTable) -> _Meta | None:
    """The state table's bookkeeping row, or None when the state table does not exist."""
    # without transactions every row is kept as JSON text, and the bookkeeping row is written without layouts
    layouts = warehouse.transactions
    try:
        rows = warehouse.rows(state.read_meta(layouts=layouts))
    except Exception as err:  # the table is missing, or made before the row layouts: every database says it its way
        log.debug("No state bookkeeping in %s: %s", state.display, err)
        if not layouts:
            return None
        try:
            rows, layouts = warehouse.rows(state.read_meta(layouts=False)), False
        except Exception as again:
            log.debug("No state bookkeeping in %s: %s", state.display, again)
            return None
    if not rows:
        return None
    fmt, token, plan_id, columns, keys, count, *rest = rows[0]
    return _Meta(
        int(fmt),
        str(token),
        plan_id,
        dict(S.columns_of(columns)),
        tuple(str(keys).split(",")),
        int(count),
        R.layouts_of(rest[0]) if layouts else None,
    )


def holds_layouts(warehouse: Warehouse, state: S.StateTable) -> bool:
    """Whether the bookkeeping table has the row layouts' column (made with it, or given it by
    :func:`prepare_state`)."""
    try:
        warehouse.rows(state.r(f'SELECT "row_layouts" FROM {state.meta} WHERE 1 = 0'))
    except Exception:
        return False
    return True


def _table_exists(warehouse: Warehouse, state: S.StateTable, name: str) -> bool:
    try:
        warehouse.rows(state.exists_sql(name))
    except Exception:
        return False
    return True


def check_state(
    warehouse: Warehouse, state: S.StateTable, store: SnapshotStore, current: Mapping[str, Any] | None
) -> _Meta | None:
    """The state table's bookkeeping row when it agrees with ``CURRENT``; else :class:`StateDriftError`."""
    meta = read_meta(warehouse, state)
    if meta is not None and meta.format > S.STATE_FORMAT:
        raise StopChurnConfigError(
            f"The state table {state.display} has format {meta.format}, written by a newer version of this "
            f"provider (this one reads up to {S.STATE_FORMAT}). Upgrade the provider on every worker."
        )
    token = None if current is None else str(current["version"])
    if meta is None and token is None:
        return None
    if meta is not None and token == meta.token:
        return meta
    where = f"brand {store.brand_id} table {store.table_name!r}"
    if meta is None:
        problem = f"The snapshot store ({store.location}) records a sync of {where}, but its state table "
        problem += f"{state.display} is missing."
    elif token is None:
        problem = f"The state table {state.display} exists (written by plan {meta.plan_id}), but the snapshot "
        problem += f"store ({store.location}) has no record of {where}."
    else:
        problem = f"The state table {state.display} was last written with token {meta.token} (plan "
        problem += f"{meta.plan_id}); the snapshot store ({store.location}) committed {token}."
    raise StateDriftError(
        f"{problem} Nothing was read or sent.\n"
        "Repair it with `stopchurn reconcile` (docs: the diff in the warehouse): --adopt-state when the state table "
        "is right (it holds what StopChurn was sent), or --reset to drop both and start again with a run using "
        "initial_load='baseline' (records the source as delivered without sending) or a full first load."
    )


def prepare_state(warehouse: Warehouse, state: S.StateTable) -> None:
    """What every run does first, under the lock, before anything reads or writes the state table: finish a swap
    a crash interrupted, then bring an older state table to this version's format.

    The swap (warehouses without transactions: ``DROP`` the state table, ``RENAME`` ``..__next`` into its place)
    drops the old table only once ``..__next`` is complete. So a missing state table beside a ``..__next`` is a
    swap stopped between its two steps: ``..__next`` is the only copy, and it is renamed into place. Both present:
    ``..__next`` is an unfinished rewrite the next rewrite replaces (the state table is as it was). The bookkeeping
    table is swapped the same way (``..__meta_next``)."""
    if not warehouse.transactions:
        swaps = (
            (state.name, state.name + "__next", state.swap),
            (state.name + "__meta", state.name + "__meta_next", state.swap_meta),
        )
        for name, new, swap in swaps:
            if not _table_exists(warehouse, state, name) and _table_exists(warehouse, state, new):
                log.warning("Finishing the interrupted swap of %s.%s.", state.schema, name)
                warehouse.execute(swap()[1:])
    if warehouse.transactions:
        _add_layouts(warehouse, state)
    meta = read_meta(warehouse, state)
    if meta is not None and meta.format < S.STATE_FORMAT:
        _migrate(warehouse, state, meta)
    if warehouse.transactions and warehouse.dialect in S.NARROW:
        drop_scratch(warehouse, state)
    if meta is not None and warehouse.dialect in S.INDEXED and not _indexed(warehouse, state):
        # a state table made before it had an index gets it now, once (no user action)
        log.info("Indexing the state table %s on its key.", state.display)
        try:
            warehouse.execute([state.create_index()])
        except Exception as err:  # only its owner may index it: the run keeps going without, as it did before
            log.warning(
                "Could not index the state table %s on its key (the run goes on without; its owner may run the "
                "index statement the next run tries again): %s",
                state.display,
                _first_line(err),
            )


def _add_layouts(warehouse: Warehouse, state: S.StateTable) -> None:
    """Give a bookkeeping table made before the row layouts their column (NULL: no layouts yet), so this run's
    rows are kept as their values. Its rows stay JSON text, read as they are. Where its owner alone may alter it,
    the run goes on keeping every row as JSON text, as it did before."""
    if holds_layouts(warehouse, state) or not _table_exists(warehouse, state, state.name + "__meta"):
        return
    log.info("Adding the row layouts' column to %s__meta.", state.display)
    try:
        warehouse.execute([state.r(f'ALTER TABLE {state.meta} ADD COLUMN "row_layouts" TEXT')])
    except Exception as err:
        log.warning(
            "Could not add the row layouts' column to %s__meta (rows stay JSON text; its owner may run the "
            "statement the next run tries again): %s",
            state.display,
            _first_line(err),
        )


def drop_scratch(warehouse: Warehouse, state: S.StateTable) -> None:
    """Drop the narrow diff's scratch tables of this state table that a killed or failed run left: runs are
    serialized by the lock, so none is in use when a run starts."""
    # exactly a run's name (sync.py: 12 hex digits after the prefix): a table that only starts alike is not ours
    run_name = re.compile(re.escape(state.scratch_prefix) + "[0-9a-f]{12}")
    tables = f"SELECT table_name FROM information_schema.tables WHERE table_schema = {S.lit(state.schema)}"
    stale = [str(name) for (name,) in warehouse.rows(tables) if run_name.fullmatch(str(name))]
    if stale:
        log.info("Dropping %d scratch table(s) an earlier run left in %s.", len(stale), state.schema)
        for name in stale:
            try:
                warehouse.execute([state.r(f"DROP TABLE IF EXISTS {S.q(state.schema)}.{S.q(name)}")])
            except Exception as err:  # another role's (its owner may drop it): never read, so never in the way
                log.warning("Could not drop the scratch table %s.%s: %s", state.schema, name, _first_line(err))


def _indexed(warehouse: Warehouse, state: S.StateTable) -> bool:
    """Whether the state table's key index exists (PostgreSQL)."""
    where = f"schemaname = {S.lit(state.schema)} AND indexname = {S.lit(state.short() + '__key')}"
    return bool(warehouse.rows(f"SELECT 1 FROM pg_indexes WHERE {where}"))


def _first_line(err: BaseException) -> str:
    """The first line of an error (a driver's message goes on with the whole statement)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _past_half_swaps(warehouse: Warehouse, state: S.StateTable) -> S.StateTable:
    """``state`` reading, for a swap a crash left half done (see :func:`prepare_state`), the complete new table
    the next real run renames into place: a dry run changes nothing, so it reads past the swap instead."""
    if warehouse.transactions:
        return state
    if not _table_exists(warehouse, state, state.name) and _table_exists(warehouse, state, state.name + "__next"):
        state = replace(state, state_suffix="__next")
    name = state.name + "__meta"
    if not _table_exists(warehouse, state, name) and _table_exists(warehouse, state, name + "_next"):
        state = replace(state, meta_suffix="__meta_next")
    return state


def _zoned(columns: Mapping[str, str], names: Sequence[str]) -> list[str]:
    """The columns among ``names`` that hold timestamps with a time zone (their text depends on the session's)."""
    return [c for c in names if "tz=" in columns.get(c, "")]


def _old_key_texts(
    warehouse: Warehouse, state: S.StateTable, table: str, columns: Mapping[str, str], keys: Mapping[str, str]
) -> list[str]:
    """Statements rewriting the key texts a format-1 session wrote into ``table`` (``keys``: key column -> its
    column there) as a format-2 session writes them. PostgreSQL: every date and timestamp key, read back in the
    database's own ``DateStyle`` (format-1 sessions used it: 'SQL, DMY' writes ``29/03/2026``); elsewhere the
    zoned keys, whose texts followed the session's zone."""
    if warehouse.dialect != "postgres":
        return [state.key_to_utc(table, keys[k]) for k in _zoned(columns, list(keys))]
    types = {k: _postgres_type(columns.get(k, "")) for k in keys}
    dated = [k for k in keys if types[k] is not None]
    if not dated:
        return []
    ((style,),) = warehouse.rows("SELECT reset_val FROM pg_settings WHERE name = 'DateStyle'")
    return [s for k in dated for s in state.retext_postgres(table, keys[k], str(types[k]), str(style))]


def _postgres_type(arrow: str) -> str | None:
    """PostgreSQL's type for a date or timestamp column's Arrow type text (None for any other)."""
    if arrow.startswith("date"):
        return "DATE"
    if arrow.startswith("timestamp["):
        return "TIMESTAMPTZ" if "tz=" in arrow else "TIMESTAMP"
    return None


def _migrate(warehouse: Warehouse, state: S.StateTable, meta: _Meta) -> None:
    """Format 1 -> 2: sessions are pinned to UTC (and, on PostgreSQL, to ISO dates) from format 2 on. A key column
    with a time zone was kept as text in the zone the session had; it is rewritten as the same instant in UTC
    (exact: the old text holds its offset). On PostgreSQL every date and timestamp key is read back in the
    database's own DateStyle first (:func:`_old_key_texts`). Row hashes cannot be recomputed without the source:
    rows with such a column are sent once more as updates where the session's zone (or style) was another. Spark
    sessions were expected in UTC already: only the format moves."""
    log.warning("Migrating the state table %s from format %d to %d.", state.display, meta.format, S.STATE_FORMAT)
    statements = []
    if warehouse.transactions:
        keys = {k: k for k in meta.key_columns}
        statements = _old_key_texts(warehouse, state, state.qualified, meta.columns, keys)
    bookkeeping = state.write_meta(
        token=meta.token,
        plan_id=meta.plan_id,
        columns=json.dumps(meta.columns),
        rows_sql=state.count_rows(),
        transactions=warehouse.transactions,
        layouts=None if meta.layouts is None else R.layouts_text(meta.layouts),
    )
    warehouse.execute([*statements, *bookkeeping])
