"""The pieces every warehouse statement is made of (no Airflow): identifiers and literals quoted, a statement rendered
for a dialect with the user's query in front, the row hash (described in :mod:`~.sql`), and the state table's name.
:mod:`~.sql` builds the statements from them and names them all again (``S.q``, ``S.render``, ...)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa
import sqlglot

from airflow_provider_stopchurn.exceptions import StopChurnConfigError

SOURCE = "__stopchurn_source"
#: Output columns of the change query besides the source's own.
OP = "__sc_op"
NEW_HASH = "__sc_hash"
OLD_CREATED = "__sc_old_created"
OLD_ROW = "__sc_old_row"
#: 1 when a row of the narrow diff has a row in the state table (the unchanged rows are counted by it)
IN_STATE = "__sc_in_state"
#: the source rows of a row of the narrow diff (one changed row or key, or every unchanged row)
ROWS = "__sc_rows"


def q(name: str) -> str:
    """A quoted identifier in the template dialect (PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


def lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def render(sql: str, dialect: str, *, source: str | None = None) -> str:
    """``sql`` (PostgreSQL dialect) in ``dialect``, with the user's ``source`` query as the ``__stopchurn_source``
    CTE when given."""
    out = sql if dialect == "postgres" else sqlglot.transpile(sql, read="postgres", write=dialect)[0]
    if source is None:
        return out
    head = f"WITH {render_identifier(SOURCE, dialect)} AS (\n{source}\n)"
    if out[:5].upper() == "WITH ":
        return f"{head},\n{out[5:]}"
    return f"{head}\n{out}"


def render_identifier(name: str, dialect: str) -> str:
    return sqlglot.exp.to_identifier(name, quoted=True).sql(dialect=dialect)


def source_query(sql: str) -> str:
    """The user's query, checked to be one statement that can sit inside a ``WITH`` clause."""
    import sqlparse

    statements = [s.strip().rstrip(";").strip() for s in sqlparse.split(sql) if s.strip().rstrip(";").strip()]
    if len(statements) != 1:
        raise StopChurnConfigError(
            f"diff_location='warehouse' needs the source to be one SELECT query; got {len(statements)} statements. "
            "Put setup statements in an upstream task, or use a view."
        )
    return statements[0]


def _joined(texts: Iterable[str]) -> str:
    """One text of several, each length-prefixed (so no two lists of texts join alike); immutable, as indexed."""
    return "(" + " || ".join(f"CAST(LENGTH({t}) AS TEXT) || ':' || {t}" for t in texts) + ")"


def row_hash_sql(columns: Sequence[str], alias: str = "s") -> str:
    """The row hash expression over ``columns`` (see the module docstring), in the template dialect."""
    pieces = []
    for name in sorted(columns):
        text = f"CAST({alias}.{q(name)} AS TEXT)"
        pieces.append(f"COALESCE('v' || CAST(LENGTH({text}) AS TEXT) || ':' || {text}, 'n')")
    return "MD5(" + (" || ".join(pieces) if pieces else "''") + ")"


def staging_ddl(dialect: str, table: str, schema: pa.Schema) -> str:
    """CREATE TABLE for a staging table holding ``schema`` (warehouses whose load inserts row by row)."""
    types = {pa.int64(): "BIGINT", pa.string(): "TEXT", pa.large_string(): "TEXT"}
    columns = ", ".join(f"{q(f.name)} {types.get(f.type, 'TEXT')}" for f in schema)
    return render(f"CREATE TEMPORARY TABLE {q(table)} ({columns})", dialect)


#: PostgreSQL keeps the first 63 bytes of an identifier (``NAMEDATALEN - 1``) and silently drops the rest
PG_IDENTIFIER_BYTES = 63


def state_table_name(brand_id: int, table_name: str, dialect: str = "") -> str:
    """``b<brand>_<table>``; characters other than letters, digits and ``_`` become ``_`` (with a hash of the
    real name appended then, so two tables never share a state table).

    On PostgreSQL a name its bookkeeping table (``<name>__meta``) would be truncated onto (63 bytes or more) is
    shortened, with a hash of the whole name: two names alike in their first 63 bytes would otherwise share one
    table, and its bookkeeping row would be written into the state table itself. No such state table ever
    worked, so none is lost; every shorter name is kept as it always was."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", table_name).lower()
    name = f"b{int(brand_id)}_{clean}"
    if clean != table_name:
        name += "_" + hashlib.sha256(table_name.encode()).hexdigest()[:8]
    name = name[:120]
    if dialect == "postgres" and len(name) >= PG_IDENTIFIER_BYTES:  # ASCII: a character is a byte
        name = f"{name[:39]}_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def schema_name(schema: str, dialect: str) -> str:
    """``schema`` as the warehouse names it. PostgreSQL cuts an identifier of 63 bytes or more to its first 63 (at
    a character's boundary) where it is an identifier, but compares the whole text where it is a value (a privilege
    check, the catalog): the cut name is the one both agree on, and the one every earlier run's tables are in."""
    if dialect != "postgres":
        return schema
    return schema.encode()[:PG_IDENTIFIER_BYTES].decode(errors="ignore")


def columns_text(schema: pa.Schema) -> str:
    """The source's columns and Arrow types, as kept in the state table's bookkeeping row."""
    return json.dumps({f.name: str(f.type) for f in schema}, sort_keys=False)


def columns_of(text: str | None) -> Mapping[str, str]:
    return dict(json.loads(text)) if text else {}


def among_keys(dialect: str, among: str, keys: int, source: tuple[str, str], state: tuple[str, str]) -> tuple[str, str]:
    """The source's and the state table's rows (each ``(from clause, match with alias k)``) limited to the keys of
    the scratch table ``among``: subqueries aliased ``s`` and ``t``.

    DuckDB joins each to the distinct changed keys: it made a correlated ``EXISTS`` a join on the distinct keys of
    every source row, with the source query materialized whole, which ran out of memory under a ``memory_limit``
    far below the table. Joined, the source streams once past the changed keys. Elsewhere ``EXISTS``; ``OFFSET 0``
    makes it a subquery of its own, or PostgreSQL hashes every row in the scan below the semi-join."""
    (rows, by_source), (table, by_state) = source, state
    if dialect != "duckdb":
        exists = f"EXISTS (SELECT 1 FROM {among} AS k WHERE "
        return f"(SELECT s.* FROM {rows} WHERE {exists}{by_source}) OFFSET 0) AS s", (
            f"(SELECT t.* FROM {table} WHERE {exists}{by_state})) AS t"
        )
    texts = ", ".join(q(key_text(i)) for i in range(keys))
    changed = f"(SELECT DISTINCT {texts} FROM {among} WHERE {q(key_text(0))} IS NOT NULL) AS k"
    return f"(SELECT s.* FROM {rows} JOIN {changed} ON {by_source}) AS s", (
        f"(SELECT t.* FROM {table} JOIN {changed} ON {by_state}) AS t"
    )


def narrow_rows(keys: Sequence[str], payload: Sequence[str]) -> str:
    """The end of the select that fills a narrow diff's scratch table (PostgreSQL) from the diff ``d``: each
    changed row with its ``keys`` texts and ``payload`` (its columns and hash; all quoted), then one row
    per value of :data:`IN_STATE` counting the unchanged rows. ``c`` holds the rows, nulled for an unchanged one
    (a few bytes each), and is read twice: the source is read once. The count's row takes its NULLs from an empty
    join on ``c``, so each has its column's type. A ``CASE`` drops a type's modifier (``numeric(10,2)`` is kept as
    ``numeric``): the datum, its Arrow type and its text are the same. One ``CREATE TABLE AS``, not ``INSERT``:
    PostgreSQL may then hash the rows in parallel workers."""
    nulled = ", ".join(f"CASE WHEN d.{q(OP)} IS NOT NULL THEN d.{c} END AS {c}" for c in [*keys, *payload])

    def row(alias: str, in_state: str, rows: str) -> str:
        return ", ".join([*(f"{alias}.{c}" for c in keys), f"{alias}.{q(OP)}", in_state, rows]) + "".join(
            f", {alias}.{c}" for c in payload
        )

    unchanged = f"SELECT c.{q(IN_STATE)}, COUNT(*) AS {q(ROWS)} FROM c WHERE c.{q(OP)} IS NULL GROUP BY 1"
    return (
        f", c AS MATERIALIZED (SELECT {nulled}, d.{q(OP)}, d.{q(IN_STATE)} FROM d) "
        f"SELECT {row('c', f'c.{q(IN_STATE)}', f'CAST(1 AS BIGINT) AS {q(ROWS)}')} FROM c WHERE c.{q(OP)} IS NOT NULL "
        f"UNION ALL SELECT {row('x', f'g.{q(IN_STATE)}', f'g.{q(ROWS)}')} FROM ({unchanged}) AS g "
        "LEFT JOIN c AS x ON FALSE"
    )


def narrow_grouped(keys: Sequence[str]) -> str:
    """The select of a narrow diff's scratch table (DuckDB) from the diff ``d``: grouped by key text (NULL for the
    unchanged rows: one group), op and whether the key is in the state table, with each group's source rows."""
    nulled = ", ".join(f"CASE WHEN d.{q(OP)} IS NULL THEN NULL ELSE d.{k} END AS {k}" for k in keys)
    by = ", ".join(str(i + 1) for i in range(len(keys) + 2))
    return f"SELECT {nulled}, d.{q(OP)}, d.{q(IN_STATE)}, COUNT(*) AS {q(ROWS)} FROM d GROUP BY {by}"


def changed_rows(
    scratch: str, columns: Sequence[str], keys: int, state: tuple[str, str, tuple[str, str]], *, indexed: bool = True
) -> str:
    """The changed rows kept in a narrow diff's scratch table, with the one-query change query's columns: the
    source's, the key texts, the hash, createdAt, the last delivered row (a delete's) and the op.

    :param state: the state table (quoted and qualified), its key texts equal to the scratch table's (``match``:
        the state aliased ``t``, the scratch table ``d``) and its columns of createdAt and delivered rows: they are
        looked up by key for the changed rows whose key it holds (through its key index on PostgreSQL).
    :param indexed: the state table has its key index (PostgreSQL). Without it (a role that may not add it) the
        state table is joined: a look-up per changed row would scan it once each."""
    table, match, (created, row) = state
    names = [*(q(c) for c in columns), *(q(key_text(i)) for i in range(keys)), q(NEW_HASH)]
    listed = ", ".join(f"d.{c}" for c in names)
    # a look-up of its own for each changed row (LIMIT 1: never flattened into a join), through the key index:
    # joined, PostgreSQL hashed the changed rows and scanned the whole state table (0.29 s at 300,000 rows)
    found = f"SELECT t.{q(created)}, t.{q(row)} FROM {table} AS t WHERE d.{q(IN_STATE)} = 1 AND {match} LIMIT 1"
    joined = (
        f"LEFT JOIN LATERAL ({found}) AS t ON TRUE"
        if indexed
        else f"LEFT JOIN {table} AS t ON d.{q(IN_STATE)} = 1 AND {match}"
    )
    return (
        f"SELECT {listed}, t.{q(created)} AS {q(OLD_CREATED)}, "
        f"CASE WHEN d.{q(OP)} = 'delete' THEN t.{q(row)} END AS {q(OLD_ROW)}, d.{q(OP)} FROM {scratch} AS d "
        f"{joined} WHERE d.{q(OP)} IS NOT NULL"
    )


def key_text(i: int) -> str:
    """The name of the i-th key's text in the change query and the staging table."""
    return f"__sc_key_{i}"


def key_index_valid(index: str) -> str:
    """A query of one row: 1 when ``index`` (quoted and qualified; PostgreSQL) exists and is valid, else 0."""
    return (
        "SELECT COUNT(*) FROM pg_catalog.pg_index AS i "
        f"WHERE i.indexrelid = to_regclass({lit(index)}) AND i.indisvalid AND i.indisready"
    )
