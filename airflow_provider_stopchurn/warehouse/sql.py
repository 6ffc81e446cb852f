"""The SQL of the pushdown diff, written once and rendered for each warehouse's dialect by sqlglot (no Airflow).

Every statement is written here in PostgreSQL's dialect and transpiled with ``sqlglot.transpile(..., write=dialect)``
(types, quoting, ``MD5`` as hex text, string concatenation). The user's source query is never parsed or rewritten:
it is placed, as written, in a ``WITH __stopchurn_source AS (...)`` clause in front of the transpiled statement.

**The row hash** (:func:`row_hash_sql`): the data columns in name order, each written as ``n`` when NULL, else
``v<length>:<text>`` where ``<text>`` is ``CAST(column AS TEXT)`` in the warehouse (its own text form of the value)
and ``<length>`` that text's length; the pieces are concatenated and hashed by the warehouse's ``MD5`` as 32
lower-case hex digits. The length prefix makes the text unambiguous without escaping. The hash is only compared
with hashes the same warehouse computed (the state table lives beside the source), so one engine's text forms
(float digits, timestamp format) never meet another's.

**Keys** are compared as ``CAST(key AS TEXT)``: the state table keeps each key column as text. Rows are marked
``dirty:insert`` / ``dirty:update`` in place of a hash when their chunk's request was sent but never acknowledged:
the next diff sends their current state again, as the local path does (``update/settle.py``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from airflow_provider_stopchurn.warehouse.sqlparts import (
    IN_STATE,
    NEW_HASH,
    OLD_CREATED,
    OLD_ROW,
    OP,
    PG_IDENTIFIER_BYTES,
    ROWS,
    SOURCE,
    _joined,
    among_keys,
    changed_rows,
    columns_of,
    columns_text,
    key_text,
    lit,
    narrow_grouped,
    narrow_rows,
    q,
    render,
    render_identifier,
    row_hash_sql,
    source_query,
    staging_ddl,
    state_table_name,
)

__all__ = [
    "DIRTY_INSERT",
    "DIRTY_UPDATE",
    "PG_IDENTIFIER_BYTES",
    "SOURCE",
    "STATE_FORMAT",
    "StateTable",
    "columns_of",
    "columns_text",
    "key_text",
    "lit",
    "q",
    "render",
    "render_identifier",
    "row_hash_sql",
    "source_query",
    "staging_ddl",
    "state_table_name",
]

#: Bumped when the state table's layout or meaning changes; ``engine._migrate`` upgrades older tables in place.
#: 2: key texts and row hashes in a UTC session. 3 (ROWS_FORMAT): with row layouts, rows kept as values (rows.py).
STATE_FORMAT, ROWS_FORMAT = 2, 3
#: The session time zone every key text and row hash is computed in.
SESSION_ZONE = "UTC"
HASH = "_stopchurn_row_hash"
CREATED = "_stopchurn_created_at"
ROW = "_stopchurn_row"
DIRTY_INSERT = "dirty:insert"
DIRTY_UPDATE = "dirty:update"
ACTION = "__sc_action"
#: the op of the narrow diff's source rows with a NULL key (the key check, in the same pass)
NULL_KEY = "null_key"
#: Dialects whose diff is written once into a scratch table (:meth:`StateTable.diff_into`). Elsewhere (Spark, the
#: untested DB-API warehouses: no ``information_schema`` to find a killed run's scratch table by) two queries.
NARROW = frozenset({"postgres", "duckdb"})
#: Narrow dialects whose scratch table keeps the changed rows' columns: the source query runs once. Not DuckDB: every
#: row's columns through its join ran out of memory under a ``memory_limit`` far below the table (keys diffed again).
ONE_PASS = frozenset({"postgres"})
#: How long a best-effort statement on PostgreSQL (a scratch table's DROP, the key index of an older state table)
#: waits for a lock another session holds before it gives up (the next run tries again).
LOCK_WAIT = "5s"
#: Dialects whose state table is indexed on its key. Not DuckDB: its hash joins never use one, and keeping one up
#: made a 1M-row settle 6x slower (benchmarks/RESULTS-pushdown.md). Not Spark: no indexes.
INDEXED = frozenset({"postgres"})
_QUALIFIED_RENAME = frozenset({"spark", "databricks", "hive"})


@dataclass(frozen=True)
class StateTable:
    """The statements of one state table (``<schema>.b<brand>_<table>``) and its bookkeeping row (``..__meta``)."""

    schema: str
    name: str
    key_columns: tuple[str, ...]
    dialect: str
    #: the scratch table a rewrite is built in before it is swapped in (``..__next``); a baseline on a warehouse
    #: with transactions builds in one of its own (``..__next_<plan>``, :meth:`for_plan`)
    next_suffix: str = "__next"
    older_name: str = ""  #: the name an older version gave it, where it differs (PostgreSQL cut it to 63 bytes)
    #: key columns whose texts in the state table are still in a format-1 session's zone (a dry run, which cannot
    #: migrate the table, reads them as the migration will write them)
    legacy_zoned_keys: tuple[str, ...] = ()
    #: where the state table and its bookkeeping are read (a dry run over a swap a crash left half done reads the
    #: complete ``..__next`` / ``..__meta_next`` the next real run renames into place)
    state_suffix: str = ""
    meta_suffix: str = "__meta"

    def for_plan(self, plan_id: str) -> StateTable:
        """This state table with a scratch table named after ``plan_id``: a run whose lease was taken while it
        filled its scratch table never writes into the one the new owner fills."""
        tag = re.sub(r"[^0-9a-z]", "", plan_id.lower())[-8:]
        return replace(self, next_suffix=f"__next_{tag}")

    def _in_schema(self, table: str) -> str:
        """``table`` (the state table's name with a suffix) quoted and qualified by the state schema."""
        return f"{q(self.schema)}.{q(table)}"

    def _scratch_name(self, suffix: str) -> str:
        """The name of a scratch table of this state table (a rewrite's, a swap's): the name with ``suffix``, or on
        PostgreSQL, where that would be cut at 63 bytes (into the bookkeeping table's name, or one plan's scratch
        table into another's), the short prefix with it. Only scratch tables: they live within one run (or until
        the next run finishes a swap), so a name they had under an older version is never looked for."""
        name = self.name + suffix
        if self.dialect == "postgres" and len(name.encode()) > PG_IDENTIFIER_BYTES:
            return self.short() + suffix
        return name

    @property
    def qualified(self) -> str:
        """The state table where it is read, quoted and qualified (a dry run over a swap a crash left half done
        reads ``..__next``)."""
        return self._in_schema(self.name + self.state_suffix)

    @property
    def next(self) -> str:
        """The scratch table a rewrite of the state table is built in before it is swapped in."""
        return self._in_schema(self._scratch_name(self.next_suffix))

    @property
    def meta(self) -> str:
        """The bookkeeping table where it is read (its one row: format, token, plan, columns, key columns and
        row count)."""
        return self._in_schema(self.name + self.meta_suffix)

    @property
    def meta_next(self) -> str:
        """The bookkeeping table's scratch table, swapped in where the warehouse has no transactions."""
        return self._in_schema(self._scratch_name("__meta_next"))

    @property
    def display(self) -> str:
        """The state table's name in messages: ``schema.name``, unquoted."""
        return f"{self.schema}.{self.name}"

    def r(self, sql: str, source: str | None = None) -> str:
        return render(sql, self.dialect, source=source)

    # --- DDL ----------------------------------------------------------------------------------------------
    def create(self) -> list[str]:
        keys = ", ".join(f"{q(k)} TEXT" for k in self.key_columns)
        return [
            self.r(f"CREATE SCHEMA IF NOT EXISTS {q(self.schema)}"),
            self.r(
                f"CREATE TABLE IF NOT EXISTS {self.qualified} "
                f"({keys}, {q(HASH)} TEXT, {q(CREATED)} BIGINT, {q(ROW)} TEXT)"
            ),
            self.r(
                f"CREATE TABLE IF NOT EXISTS {self.meta} "
                '("format" INT, "token" TEXT, "plan_id" TEXT, "columns" TEXT, "key_columns" TEXT, "rows" BIGINT, '
                '"row_layouts" TEXT)'
            ),
            *([self.create_index()] if self.dialect in INDEXED else []),
        ]

    def drop(self) -> list[str]:
        return [self.r(f"DROP TABLE IF EXISTS {t}") for t in (self.qualified, self.meta, self.next, self.meta_next)]

    def read_meta(self, *, layouts: bool = True) -> str:
        """:param layouts: with the row layouts (``warehouse/rows.py``; older bookkeeping tables have none)."""
        extra = ', "row_layouts"' if layouts else ""
        return self.r(f'SELECT "format", "token", "plan_id", "columns", "key_columns", "rows"{extra} FROM {self.meta}')

    def write_meta(
        self, *, token: str, plan_id: str | None, columns: str, rows_sql: str, transactions: bool, layouts: str | None
    ) -> list[str]:
        """:param layouts: the row layouts' text (None: the bookkeeping table has no column for them)."""
        keys = lit(",".join(self.key_columns))
        values = (
            f'SELECT {STATE_FORMAT if layouts is None else ROWS_FORMAT} AS "format", {lit(token)} AS "token", '
            f'{lit(plan_id) if plan_id else "CAST(NULL AS TEXT)"} AS "plan_id", {lit(columns)} AS "columns", '
            f'{keys} AS "key_columns", ({rows_sql}) AS "rows"'
            + ("" if layouts is None else f', {lit(layouts)} AS "row_layouts"')
        )
        if transactions:
            return [self.r(f"DELETE FROM {self.meta}"), self.r(f"INSERT INTO {self.meta} {values}")]
        # no DELETE (Spark's file tables): write a new one-row table and swap it in, as the state table is. Not
        # INSERT OVERWRITE: it empties the table before it writes, and a worker dying between the two would leave
        # no token at all.
        return [
            self.r(f"DROP TABLE IF EXISTS {self.meta_next}"),
            self.r(f"CREATE TABLE {self.meta_next} AS {values}"),
            *self._swap(self.meta_next, self.meta, self.name + "__meta"),
        ]

    def count_rows(self) -> str:
        return f"SELECT COUNT(*) FROM {self.qualified}"

    # --- checks and the diff --------------------------------------------------------------------------------
    def probe(self, source: str) -> str:
        """The source's columns and types (no rows)."""
        return self.r(f"SELECT * FROM {q(SOURCE)} AS s LIMIT 0", source)

    def key_check(self, source: str) -> str:
        """Rows with a NULL key, and keys held by more than one row."""
        nulls = " OR ".join(f"s.{q(k)} IS NULL" for k in self.key_columns)
        keys = ", ".join(f"s.{q(k)}" for k in self.key_columns)
        return self.r(
            f"SELECT (SELECT COUNT(*) FROM {q(SOURCE)} AS s WHERE {nulls}) AS null_keys, "
            f"(SELECT COUNT(*) FROM (SELECT {keys} FROM {q(SOURCE)} AS s GROUP BY {keys} HAVING COUNT(*) > 1) AS d) "
            "AS repeated_keys",
            source,
        )

    def repeated_keys(self, source: str, limit: int = 5) -> str:
        keys = ", ".join(f"s.{q(k)}" for k in self.key_columns)
        return self.r(
            f"SELECT {keys}, COUNT(*) AS n FROM {q(SOURCE)} AS s GROUP BY {keys} HAVING COUNT(*) > 1 LIMIT {limit}",
            source,
        )

    def _state_key(self, k: str) -> str:
        """Key column ``k`` of the state table (``t``) as a format-2 text."""
        if k in self.legacy_zoned_keys:
            return f"CAST(CAST(t.{q(k)} AS TIMESTAMPTZ) AS TEXT)"  # as _migrate's key_to_utc writes it
        return f"t.{q(k)}"

    def _diff_cte(
        self, columns: Sequence[str], *, update_all: bool, among: str | None = None, narrow: bool = False
    ) -> str:
        """``n`` (the source rows with their key texts and hash) and ``d`` (their full outer join with the state
        table, one op per key; NULL: unchanged). ``among``: a scratch table of keys (:meth:`diff_into`, DuckDB) both
        sides are limited to. ``narrow``: ``d`` holds the key texts, the op (:data:`NULL_KEY` for a NULL key),
        whether the key is in the state table and (:data:`ONE_PASS`) the source's columns and the hash."""
        texts = ", ".join(f"CAST(s.{q(k)} AS TEXT) AS {q(key_text(i))}" for i, k in enumerate(self.key_columns))
        on = " AND ".join(f"n.{q(key_text(i))} = {self._state_key(k)}" for i, k in enumerate(self.key_columns))
        first_key = q(key_text(0))
        old_texts = ", ".join(
            f"COALESCE(n.{q(key_text(i))}, {self._state_key(k)}) AS {q(key_text(i))}"
            for i, k in enumerate(self.key_columns)
        )
        changed = "TRUE" if update_all else f"n.{q(NEW_HASH)} <> t.{q(HASH)}"
        op = (
            f"CASE WHEN n.{first_key} IS NULL THEN 'delete' "
            f"WHEN t.{q(HASH)} IS NULL OR t.{q(HASH)} = {lit(DIRTY_INSERT)} THEN 'insert' "
            f"WHEN {changed} THEN 'update' ELSE NULL END AS {q(OP)}"
        )
        rows, state = f"{q(SOURCE)} AS s", f"{self.qualified} AS t"
        if among is not None:  # a semi-join on the keys: the hash is computed for the rows that pass only
            keys = enumerate(self.key_columns)
            by_source = " AND ".join(f"k.{q(key_text(i))} = CAST(s.{q(k)} AS TEXT)" for i, k in keys)
            match = (rows, by_source), (state, self._match("k"))
            rows, state = among_keys(self.dialect, among, len(self.key_columns), *match)
        if narrow:
            in_state = f"CASE WHEN t.{q(self.key_columns[0])} IS NULL THEN 0 ELSE 1 END AS {q(IN_STATE)}"
            # the key checks ride on the same join: a source row with a NULL key matches nothing and is marked (a
            # row hash is never NULL, so a missing one is a state row the source lacks)
            null_key = " OR ".join(f"n.{q(key_text(i))} IS NULL" for i in range(len(self.key_columns)))
            op = (
                f"CASE WHEN n.{q(NEW_HASH)} IS NULL THEN 'delete' WHEN {null_key} THEN {lit(NULL_KEY)} "
                f"WHEN t.{q(HASH)} IS NULL OR t.{q(HASH)} = {lit(DIRTY_INSERT)} THEN 'insert' "
                f"WHEN {changed} THEN 'update' ELSE NULL END AS {q(OP)}"
            )
            # with each row's columns and hash: the changed rows are kept from this one read of the source
            # (diff_into). Not the state's createdAt and last delivered row: they would widen every state row the
            # join hashes (spilled in batches past work_mem), and are looked up by key for the changed rows (changes)
            data = "".join(f", n.{q(c)}" for c in columns) if self.dialect in ONE_PASS else ""
            return (
                f"WITH n AS (SELECT s.*, {texts}, {row_hash_sql(columns)} AS {q(NEW_HASH)} FROM {rows}), "
                # OFFSET 0: a subquery of its own, or PostgreSQL computes the op (and the row hash) once for each
                # expression that uses it
                f"d AS (SELECT {old_texts}, {op}, {in_state}, n.{q(NEW_HASH)}{data} "
                f"FROM n FULL OUTER JOIN {state} ON {on} OFFSET 0) "
            )
        data = ", ".join(f"n.{q(c)}" for c in columns)
        return (
            f"WITH n AS (SELECT s.*, {texts}, {row_hash_sql(columns)} AS {q(NEW_HASH)} FROM {rows}), "
            f"d AS (SELECT {data}{', ' if data else ''}{old_texts}, n.{q(NEW_HASH)}, "
            f"t.{q(CREATED)} AS {q(OLD_CREATED)}, "
            # only a delete sends the row as last delivered: the others leave it in the warehouse
            f"CASE WHEN n.{first_key} IS NULL THEN t.{q(ROW)} END AS {q(OLD_ROW)}, {op} "
            f"FROM n FULL OUTER JOIN {state} ON {on}) "
        )

    def counts(self, source: str, columns: Sequence[str], *, update_all: bool) -> str:
        """One row per op (NULL: unchanged) with its count: what the safeguards see before any row leaves."""
        return self.r(
            self._diff_cte(columns, update_all=update_all) + f"SELECT d.{q(OP)}, COUNT(*) FROM d GROUP BY d.{q(OP)}",
            source,
        )

    def changes(
        self, source: str, columns: Sequence[str], *, update_all: bool, among: str | None = None, indexed: bool = True
    ) -> str:
        """The changed rows: source columns (NULL for deletes), key texts, new hash, the state's createdAt and last
        delivered row. ``among``: a narrow diff's scratch table; :data:`ONE_PASS`: it holds them (``indexed``: the
        state table has its key index), else its keys are diffed again: op, hash and columns from one statement."""
        if among is not None and self.dialect in ONE_PASS:
            state = (self.qualified, self._match("d"), (CREATED, ROW))
            return self.r(changed_rows(among, columns, len(self.key_columns), state, indexed=indexed))
        cte = self._diff_cte(columns, update_all=update_all, among=among)  # DuckDB: the changed keys diffed again
        return self.r(cte + f"SELECT * FROM d WHERE d.{q(OP)} IS NOT NULL", source)

    # --- the narrow diff, written once (NARROW dialects) -----------------------------------------------------
    def short(self) -> str:
        """The key index's and scratch tables' prefix: short (PostgreSQL's 63), one per state table."""
        return f"{self.name[:30]}_{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"

    def drop_scratch_table(self, table: str) -> list[str]:
        """Drop a scratch table (quoted and qualified), waiting at most :data:`LOCK_WAIT` for a lock another session
        holds on it (PostgreSQL): a DROP waiting for one would hold up the run, and every session queued behind
        its request. Run in one transaction (``SET LOCAL``)."""
        wait = [f"SET LOCAL lock_timeout = {lit(LOCK_WAIT)}"] if self.dialect == "postgres" else []
        return [*wait, self.r(f"DROP TABLE IF EXISTS {table}")]

    def index_older(self) -> list[str]:
        """The key index of a state table made before it had one, in one transaction that waits at most
        :data:`LOCK_WAIT` for a session holding a lock on the table (an invalid index is dropped first)."""
        index = f"{q(self.schema)}.{q(self.short() + '__key')}"
        wait = [f"SET LOCAL lock_timeout = {lit(LOCK_WAIT)}"] if self.dialect == "postgres" else []
        return [*wait, f"DROP INDEX IF EXISTS {index}", self.create_index()]

    def create_index(self) -> str:
        """The key index settling looks keys up in: hash (a B-tree refuses texts over 2.7 kB), on the key, or on all
        key texts joined (:meth:`_match`: a hash index on one column of many has its duplicates in one chain)."""
        key = q(self.key_columns[0]) if len(self.key_columns) == 1 else f"({_joined(map(q, self.key_columns))})"
        return self.r(f"CREATE INDEX IF NOT EXISTS {q(self.short() + '__key')} ON {self.qualified} USING hash ({key})")

    def _match(self, alias: str) -> str:
        """``alias``'s key texts equal the state table's (``t``), with the index's expression (composite keys)."""
        pairs = [(f"{alias}.{q(key_text(i))}", f"t.{q(k)}") for i, k in enumerate(self.key_columns)]
        indexed = self.dialect in INDEXED and len(pairs) > 1
        joined = f" AND {_joined(a for a, _ in pairs)} = {_joined(b for _, b in pairs)}" if indexed else ""
        return " AND ".join(f"{a} = {b}" for a, b in pairs) + joined

    @property
    def scratch_prefix(self) -> str:
        """The name every scratch table of a narrow diff starts with; one run's is ``<prefix><its tag>``."""
        return self.short() + "__diff_"

    def scratch(self, tag: str) -> str:
        """The narrow diff's scratch table of the run tagged ``tag``, quoted and qualified."""
        return self._in_schema(self.scratch_prefix + tag)

    def diff_into(self, scratch: str, source: str, columns: Sequence[str], *, update_all: bool) -> list[str]:
        """Write the narrow diff into ``scratch``: the one full outer join of the run, with the row hash of every
        source row. Each changed row is kept with its key texts, op, whether its key is in the state table and
        (:data:`ONE_PASS`) its columns and hash, which :meth:`changes` reads (DuckDB: one row per changed key); the
        unchanged rows are counted (:data:`ROWS`; key texts, op and columns NULL). So the source is read once for
        the diff, its key checks (and the changed rows): a NULL key is op :data:`NULL_KEY`, a key of more than one
        source row a changed key of more than one row, or more unchanged rows than unchanged state rows
        (:meth:`narrow_counts`)."""
        select = self._diff_cte(columns, update_all=update_all, narrow=True)
        keys = [q(key_text(i)) for i in range(len(self.key_columns))]
        if self.dialect not in ONE_PASS:  # DuckDB: one row per changed key, and one of the unchanged rows
            return [f"CREATE TABLE {scratch} AS {self.r(select + narrow_grouped(keys), source)}"]
        payload = [*(q(c) for c in columns), q(NEW_HASH)]
        # the join over every row lifts the statement's estimated cost past JIT's inlining and optimizing thresholds,
        # whose compiling of the row hash over every column took 3.8 s at 1M rows; the work per row is in functions
        # (MD5, casts) neither makes faster. Expressions are still compiled, as for any statement.
        jit = [f"SET LOCAL jit_{step}_above_cost = -1" for step in ("inline", "optimize")]
        # unlogged: a scratch table needs no WAL; a crash leaves it empty, and the next run drops it
        made = f"CREATE UNLOGGED TABLE {scratch} AS {self.r(select + narrow_rows(keys, payload), source)}"
        return [*jit, made, f"ANALYZE {scratch}"]  # a name no other run has; analyzed for the look-up of deletes

    def narrow_counts(self, scratch: str) -> str:
        """Per op (NULL: unchanged) and whether its key is in the state table, the keys of the narrow diff (for a
        changed op; one group for the unchanged rows) and their source rows."""
        keys = "".join(f"d.{q(key_text(i))}, " for i in range(len(self.key_columns)))
        by = f"d.{q(OP)}, d.{q(IN_STATE)}"
        grouped = f"SELECT {keys}{by}, SUM(d.{q(ROWS)}) AS {q(ROWS)} FROM {scratch} AS d GROUP BY {keys}{by}"
        return self.r(f"SELECT {by}, COUNT(*), SUM(d.{q(ROWS)}) FROM ({grouped}) AS d GROUP BY {by}")

    def first_load(self, source: str, columns: Sequence[str]) -> str:
        """Every source row, in the query's order, with its key texts and hash (no state to join)."""
        texts = ", ".join(f"CAST(s.{q(k)} AS TEXT) AS {q(key_text(i))}" for i, k in enumerate(self.key_columns))
        return self.r(
            f"SELECT s.*, {texts}, {row_hash_sql(columns)} AS {q(NEW_HASH)}, 'insert' AS {q(OP)}, "
            f"CAST(NULL AS BIGINT) AS {q(OLD_CREATED)} FROM {q(SOURCE)} AS s",
            source,
        )

    def baseline(self, source: str, columns: Sequence[str], *, keep_created: bool) -> str:
        """Every source row with its key texts and hash, and the createdAt the state table holds for its key."""
        if not keep_created:
            return self.first_load(source, columns)
        texts = ", ".join(f"CAST(s.{q(k)} AS TEXT) AS {q(key_text(i))}" for i, k in enumerate(self.key_columns))
        on = " AND ".join(f"n.{q(key_text(i))} = t.{q(k)}" for i, k in enumerate(self.key_columns))
        return self.r(
            f"WITH n AS (SELECT s.*, {texts}, {row_hash_sql(columns)} AS {q(NEW_HASH)} FROM {q(SOURCE)} AS s) "
            f"SELECT n.*, 'insert' AS {q(OP)}, t.{q(CREATED)} AS {q(OLD_CREATED)} "
            f"FROM n LEFT JOIN {self.qualified} AS t ON {on}",
            source,
        )

    # --- applying acknowledged changes -----------------------------------------------------------------------
    def _staged(self, staging: str, *, upserts_only: bool) -> str:
        keys = ", ".join(f"g.{q(key_text(i))}" for i in range(len(self.key_columns)))
        where = f" WHERE g.{q(ACTION)} = 'upsert'" if upserts_only else ""
        return f"SELECT {keys}, g.{q(HASH)}, g.{q(CREATED)}, g.{q(ROW)} FROM {q(staging)} AS g{where}"

    def apply(self, staging: str, *, transactions: bool) -> list[str]:
        """Statements that make the state table hold the staged rows (``upsert``) and not hold the staged keys
        (``delete``): a DELETE + INSERT in one transaction, or (warehouses without either) a rewrite of the table
        into ``..__next`` that :meth:`swap` puts in place."""
        match = self._match("g")
        columns = ", ".join([*(q(k) for k in self.key_columns), q(HASH), q(CREATED), q(ROW)])
        if transactions:
            return [
                self.r(
                    f"DELETE FROM {self.qualified} AS t WHERE EXISTS (SELECT 1 FROM {q(staging)} AS g WHERE {match})"
                ),
                self.r(f"INSERT INTO {self.qualified} ({columns}) {self._staged(staging, upserts_only=True)}"),
            ]
        kept = (
            f"SELECT {', '.join(f't.{c}' for c in columns.split(', '))} FROM {self.qualified} AS t "
            f"WHERE NOT EXISTS (SELECT 1 FROM {q(staging)} AS g WHERE {match})"
        )
        return [
            self.r(f"DROP TABLE IF EXISTS {self.next}"),
            self.r(f"CREATE TABLE {self.next} AS {kept} UNION ALL {self._staged(staging, upserts_only=True)}"),
            *self.swap(),
        ]

    def swap(self) -> list[str]:
        """Put ``..__next`` in place of the state table (warehouses without transactions; a baseline's scratch
        table, in one transaction, elsewhere), with the index it is looked up by (built once, after the rows)."""
        index = [self.create_index()] if self.dialect in INDEXED else []
        return [*self._swap(self.next, self.qualified, self.name), *index]

    def swap_meta(self) -> list[str]:
        """Put ``..__meta_next`` in place of the bookkeeping table (warehouses without transactions)."""
        return self._swap(self.meta_next, self.meta, self.name + "__meta")

    def _swap(self, new: str, old: str, old_name: str) -> list[str]:
        """DROP ``old``, then RENAME ``new`` to it: two statements, finished at the next run's start when a worker
        dies between them (``engine.prepare_state``)."""
        renamed = old if self.dialect in _QUALIFIED_RENAME else q(old_name)
        return [
            self.r(f"DROP TABLE IF EXISTS {old}"),
            # PostgreSQL and DuckDB take the new name alone (same schema); Spark's catalog the qualified name
            self.r(f"ALTER TABLE {new} RENAME TO {renamed}"),
        ]

    def baseline_into_next(self) -> list[str]:
        keys = ", ".join(f"{q(k)} TEXT" for k in self.key_columns)
        return [
            self.r(f"DROP TABLE IF EXISTS {self.next}"),
            self.r(f"CREATE TABLE {self.next} ({keys}, {q(HASH)} TEXT, {q(CREATED)} BIGINT, {q(ROW)} TEXT)"),
        ]

    def insert_next(self, staging: str) -> str:
        columns = ", ".join([*(q(k) for k in self.key_columns), q(HASH), q(CREATED), q(ROW)])
        return self.r(f"INSERT INTO {self.next} ({columns}) {self._staged(staging, upserts_only=False)}")

    def key_to_utc(self, table: str, column: str) -> str:
        """Rewrite ``column`` of ``table`` (quoted; the texts of a zoned key) as the same instants in UTC text (the
        session is pinned to UTC; the old texts carry their offsets)."""
        return self.r(f"UPDATE {table} SET {q(column)} = CAST(CAST({q(column)} AS TIMESTAMPTZ) AS TEXT)")

    def retext_postgres(self, table: str, column: str, sql_type: str, style: str) -> list[str]:
        """Rewrite ``column`` of ``table`` (quoted; texts of ``sql_type`` values written by a session whose
        ``DateStyle`` was ``style``) as the pinned session writes them (PostgreSQL, inside one transaction): each
        text is read back with the old style into a typed column, then written as text with the pinned one. A
        zoned text carries its offset or zone, so it becomes the same instant in UTC."""
        scratch = q("__sc_retext")
        return [
            f"SET LOCAL DateStyle = {lit(style)}",
            f"ALTER TABLE {table} ADD COLUMN {scratch} {sql_type}",
            f"UPDATE {table} SET {scratch} = CAST({q(column)} AS {sql_type})",
            "SET LOCAL DateStyle = 'ISO, MDY'",
            f"UPDATE {table} SET {q(column)} = CAST({scratch} AS TEXT)",
            f"ALTER TABLE {table} DROP COLUMN {scratch}",
        ]

    def exists_sql(self, table: str) -> str:
        """A query that fails when ``table`` (``name``, ``name__meta`` or ``name__next``) does not exist."""
        return self.r(f"SELECT 1 FROM {self._in_schema(table)} WHERE 1 = 0")
