"""PostgreSQL numeric columns read as the server's text, handed on as the driver's own batches (no Airflow import).

ADBC decodes PostgreSQL's binary ``numeric`` into decimal text on the client, digit group by digit group: in a
1M-row table with one numeric column that was about a third of the driver's CPU time, and the read is what bounds a
PostgreSQL run (the conversion, the diff and the send wait for it). The server writes the same text with
``numeric::text`` for a fraction of that. So when the last statement's result has numeric columns, the reader runs
``SELECT q."a", q."n"::text AS "n", ... FROM (<statement>) AS q`` instead and puts each text column back into the
type and field the driver gives a numeric column (``arrow.opaque`` numeric over the same string storage, with its
metadata): the engine gets the values, types and fields the driver would have given, byte for byte; only where the
driver cuts its batches may differ (text is shorter than binary numeric on the wire). The only texts that differ are
the special values, ``NaN``, ``Infinity`` and ``-Infinity``, which the driver writes ``nan``, ``inf`` and ``-inf``;
they are written back.

Only what is sure is rewritten. The query and its rewrite are both described by the server first (prepared, not
run), before anything else runs on the connection: when either cannot be (a query with an error, or one a subquery
cannot hold, such as ``INSERT ... RETURNING`` or a ``WITH`` that writes), the empty transaction is rolled back and
the query runs as written, raising its own error if it has one. The rewrite is used only when its columns are the
query's with text for numeric. Errors a query raises while it runs are the same either way (the server's message
names no query text). A source of several statements is read as written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["NumericText", "numeric_as_text"]

log = logging.getLogger(__name__)

#: numeric_out's special values -> the driver's spelling of them.
_SPECIAL = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}
_SPECIAL_TEXTS = pa.array(list(_SPECIAL), pa.string())
_DRIVER_TEXTS = pa.array(list(_SPECIAL.values()), pa.string())


class NumericText:
    """A statement rewritten to read numeric columns as text, and how its batches are given back their types.

    :param statement: the statement to run in place of the original.
    :param schema: the original statement's result schema, as the driver describes it (its numeric fields are
        used).
    :param numeric: positions of the numeric columns in it.
    """

    __slots__ = ("numeric", "schema", "statement")

    def __init__(self, statement: str, schema: pa.Schema, numeric: frozenset[int]) -> None:
        self.statement = statement
        self.schema = schema
        self.numeric = numeric

    def restored(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """The batches of :attr:`statement` as the original statement's (see the module).

        :param batches: what the driver read for :attr:`statement`.
        """
        for batch in batches:
            yield self.restore(batch)

    def restored_schema(self, schema: pa.Schema) -> pa.Schema:
        """The schema of :attr:`statement`'s result with each numeric column's field as the driver gives it.

        :param schema: what the driver read (or described) for :attr:`statement`.
        """
        return pa.schema(
            [self.schema.field(index) if index in self.numeric else field for index, field in enumerate(schema)],
            metadata=schema.metadata,
        )

    def restore(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """One batch of :attr:`statement` with each numeric column in the driver's numeric type and spelling; the
        other columns as read.

        :param batch: a batch of :attr:`statement`'s result.
        """
        columns = [
            pa.ExtensionArray.from_storage(self.schema.field(index).type, _driver_spelling(column))
            if index in self.numeric
            else column
            for index, column in enumerate(batch.columns)
        ]
        return pa.RecordBatch.from_arrays(columns, schema=self.restored_schema(batch.schema))


def numeric_as_text(
    conn: Any, cursor: Any, statements: list[str], *, cancelled: Callable[[], bool]
) -> NumericText | None:
    """The rewrite of the source's query that reads its numeric columns as text, or None to run it as written.

    Call it first on a fresh connection (in its first transaction, before anything was run): a statement the server
    cannot prepare aborts the transaction, which is then rolled back with nothing in it. Only a source of one
    statement is rewritten: the result of a later statement may depend on the earlier ones, which would have to run
    twice.

    :param conn: the ADBC PostgreSQL connection (not in autocommit).
    :param cursor: a cursor of it.
    :param statements: the source's statements, the last one its query.
    :param cancelled: whether the read was cancelled (a task stopped): a description that failed then failed for
        that, and its error is raised, as the query's would have been.
    """
    if len(statements) != 1:
        return None
    try:
        return _rewrite(cursor, statements[0])
    except Exception as exc:  # the server could not prepare one of them: the statement runs as written
        if cancelled():
            raise
        log.debug("Numeric columns are read as the driver reads them: %s", type(exc).__name__)
    with contextlib.suppress(Exception):  # a connection that broke: the query's own execution raises its error
        conn.rollback()
    return None


def _rewrite(cursor: Any, statement: str) -> NumericText | None:
    schema = cursor.adbc_execute_schema(statement)
    names = schema.names
    numeric = frozenset(index for index, field in enumerate(schema) if _is_numeric(field.type))
    if not numeric or len(set(names)) != len(names):  # repeated names are refused later, as read
        return None
    selected = ", ".join(
        f"q.{_quoted(name)}::text AS {_quoted(name)}" if index in numeric else f"q.{_quoted(name)}"
        for index, name in enumerate(names)
    )
    # the statement on lines of its own: a comment on its last line cannot swallow the parenthesis
    rewritten = f"SELECT {selected} FROM (\n{statement}\n) AS q"
    described = cursor.adbc_execute_schema(rewritten)
    if not _same_but_text(schema, described, numeric):
        return None
    return NumericText(rewritten, schema, numeric)


def _is_numeric(t: pa.DataType) -> bool:
    """PostgreSQL's numeric as ADBC hands it over: ``arrow.opaque`` numeric over string storage."""
    return (
        isinstance(t, pa.OpaqueType)
        and t.type_name == "numeric"
        and t.vendor_name == "PostgreSQL"
        and t.storage_type == pa.string()
    )


def _same_but_text(schema: pa.Schema, described: pa.Schema, numeric: frozenset[int]) -> bool:
    """Whether the rewrite's columns are the statement's, each numeric one as the text its storage holds."""
    if described.names != schema.names:
        return False
    for index, (field, got) in enumerate(zip(schema, described, strict=True)):
        if index in numeric:
            if got.type != pa.string():
                return False
        elif not got.equals(field, check_metadata=True):
            return False
    return True


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _driver_spelling(texts: pa.Array) -> pa.Array:
    """numeric_out's ``NaN``/``Infinity``/``-Infinity`` as the driver writes them; other texts are the same."""
    special = pc.is_in(texts, value_set=_SPECIAL_TEXTS)
    if not pc.any(special).as_py():
        return texts
    positions = pc.index_in(texts.filter(special), value_set=_SPECIAL_TEXTS)
    return pc.replace_with_mask(texts, special, _DRIVER_TEXTS.take(positions))
