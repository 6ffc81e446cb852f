"""Where the pushdown diff runs: one small protocol, one class per way of talking to a database (no Airflow import).

The SQL itself is built by :mod:`~airflow_provider_stopchurn.warehouse.sql` for the warehouse's ``dialect`` (a
sqlglot dialect name). A warehouse only runs it:

* :meth:`Warehouse.batches` reads a query's result as Arrow record batches **through the same reader as the
  local path** for that database (ADBC for PostgreSQL, the driver's own Arrow batches for DuckDB, ``fetchmany``
  for any other DB-API connection), so the changed rows arrive with exactly the types the local path would see,
  and both paths send byte-identical bodies.
* :meth:`Warehouse.rows` reads a small result (counts, the state table's bookkeeping row).
* :meth:`Warehouse.execute` runs statements, in one transaction where the database has them.
* :meth:`Warehouse.load` creates a staging table holding an Arrow table (the acknowledged changes of a settle).

**Every session is pinned to UTC** (and, on PostgreSQL, to ISO dates, the default interval and float text): the
key texts and row hashes are ``CAST(.. AS TEXT)`` of the values, and a timestamp with time zone is written in the
session's zone. Without the pin, a database whose default zone changes, or a worker with another ``TZ`` (DuckDB
gives new sessions the process's zone), would see every such row as changed, and a key as deleted and inserted.
A connection handed in by the caller is not changed: the warehouse works on a session of its own. A DB-API
connection is pinned where its dialect is PostgreSQL (a postgres connection with IAM authentication or without the
ADBC driver); other DB-API warehouses (Snowflake, Trino, ...) keep their sessions' own settings.

Implementations: :class:`PostgresWarehouse` (ADBC), :class:`DuckDBWarehouse`, :class:`DbApiWarehouse` (any other
DB-API connection: Snowflake, Trino, Databricks SQL, ...), and ``SparkWarehouse`` (``warehouse/spark.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from airflow_provider_stopchurn.source.dbapi_rows import rows_to_batch
from airflow_provider_stopchurn.source.sql import BATCH_ROWS, PostgresUri, connect_postgres

log = logging.getLogger(__name__)

__all__ = ["DbApiWarehouse", "DuckDBWarehouse", "PostgresWarehouse", "Warehouse"]

#: Rows per Arrow batch read from DuckDB: a few of its vectors (2,048 rows). DuckDB runs in the worker, so a batch is
#: a copy the worker holds beside DuckDB's own buffers; a fixed row count must stay small when the rows are wide
#: (2 kB rows: 20 MB a batch, where :data:`BATCH_ROWS` would make it 100 MB).
DUCKDB_BATCH_ROWS = 10_240


@runtime_checkable
class Warehouse(Protocol):
    """A database the diff runs in. ``dialect`` names its SQL for sqlglot (``postgres``, ``duckdb``, ``spark``,
    ``snowflake``, ``bigquery``, ``databricks``, ``trino``). ``transactions``: whether :meth:`execute` runs its
    statements atomically and the database can ``DELETE`` rows (else the state table is rewritten and swapped)."""

    dialect: str
    transactions: bool

    def batches(self, sql: str) -> Generator[pa.RecordBatch]: ...
    def rows(self, sql: str) -> list[tuple[Any, ...]]: ...
    def execute(self, statements: Sequence[str]) -> None: ...
    def load(self, table: str, data: pa.Table) -> None: ...
    def close(self) -> None: ...


def _or_empty(reader: Any) -> Iterator[pa.RecordBatch]:
    """The batches of an Arrow record batch reader, or one zero-row batch carrying its schema when it has none
    (an empty result still names its columns)."""
    seen = False
    for batch in reader:
        seen = True
        yield batch
    if not seen:
        yield pa.RecordBatch.from_pylist([], schema=reader.schema)


class _CursorWarehouse:
    """Shared by the DB-API warehouses: one connection held for the run, statements through its cursor."""

    dialect = ""
    transactions = True
    #: run on every new session before anything else (see the module docstring)
    session_setup: tuple[str, ...] = ()

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._conn: Any = None

    def __repr__(self) -> str:  # never the connection (its URI may hold a password)
        return f"{type(self).__name__}(dialect={self.dialect!r})"

    @property
    def conn(self) -> Any:
        if self._conn is None:
            conn = self._connect()
            self._setup(conn)
            self._conn = conn
        return self._conn

    def _setup(self, conn: Any) -> None:
        if not self.session_setup:
            return
        cursor = conn.cursor()
        try:
            for statement in self.session_setup:
                cursor.execute(statement)
        finally:
            cursor.close()
        conn.commit()  # a session setting made inside a transaction would end with it

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        cursor = self.conn.cursor()
        try:
            cursor.execute(sql)
            result = [tuple(r) for r in cursor.fetchall()]
        except BaseException:
            self.conn.rollback()  # a failed statement aborts the transaction (PostgreSQL): start clean
            raise
        finally:
            cursor.close()
        self.conn.commit()
        return result

    def execute(self, statements: Sequence[str]) -> None:
        cursor = self.conn.cursor()
        try:
            for statement in statements:
                log.debug("Running statement: %s", statement)
                cursor.execute(statement)
        except BaseException:
            self.conn.rollback()
            raise
        finally:
            cursor.close()
        self.conn.commit()

    def batches(self, sql: str) -> Generator[pa.RecordBatch]:
        """Read on a connection of its own, so the run may write (a baseline's batches) while it streams."""
        conn = self._reader()
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(sql)
                yield from self._read(cursor)
            finally:
                cursor.close()
            conn.commit()
        finally:
            conn.close()

    def _reader(self) -> Any:
        conn = self._connect()
        try:
            self._setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _read(self, cursor: Any) -> Iterator[pa.RecordBatch]:
        names = [str(c[0]) for c in cursor.description]
        seen = False
        while rows := cursor.fetchmany(BATCH_ROWS):
            seen = True
            yield rows_to_batch(rows, names)
        if not seen:
            yield pa.RecordBatch.from_arrays([pa.nulls(0) for _ in names], names=names)

    def load(self, table: str, data: pa.Table) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class PostgresWarehouse(_CursorWarehouse):
    """PostgreSQL through ADBC: the reader of the local path, bulk loads by COPY (``adbc_ingest``)."""

    dialect = "postgres"
    session_setup = (
        "SET TIME ZONE 'UTC'",
        "SET DateStyle = 'ISO, MDY'",
        "SET IntervalStyle = 'postgres'",
        "SET extra_float_digits = 1",
        "SET bytea_output = 'hex'",
        # the bookkeeping row's texts are written as plain literals full of backslashes (JSON): with the setting
        # off they would be read as escapes, and the row layouts stored as other texts
        "SET standard_conforming_strings = on",
    )

    def __init__(self, uri: PostgresUri) -> None:
        super().__init__(lambda: connect_postgres(uri))

    def _read(self, cursor: Any) -> Iterator[pa.RecordBatch]:
        yield from _or_empty(cursor.fetch_record_batch())

    def load(self, table: str, data: pa.Table) -> None:
        cursor = self.conn.cursor()
        try:
            cursor.execute(f'DROP TABLE IF EXISTS "{table}"')
            cursor.adbc_ingest(table, data, mode="create", temporary=True)
        finally:
            cursor.close()


class DuckDBWarehouse(_CursorWarehouse):
    """DuckDB (a database file, or an open ``duckdb`` connection): Arrow in and out natively.

    Every statement runs on a session of its own (``cursor()``: a new connection to the same database), pinned to
    UTC: a caller's connection keeps its own settings."""

    dialect = "duckdb"
    session_setup = ("SET TimeZone = 'UTC'",)

    def __init__(self, database: str | Any = ":memory:") -> None:
        if isinstance(database, str):
            path = database

            def connect() -> Any:
                import duckdb

                return duckdb.connect(path)

            super().__init__(connect)
            self._owned = True
        else:
            super().__init__(lambda: database)
            self._owned = False
        self._work: Any = None

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _session(self) -> Any:
        session = self.conn.cursor()
        for statement in self.session_setup:
            session.execute(statement)
        return session

    @property
    def work(self) -> Any:
        """The session every statement and staging table of the run uses (temporary tables are per session)."""
        if self._work is None:
            self._work = self._session()
        return self._work

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.work.execute(sql).fetchall()]

    def batches(self, sql: str) -> Generator[pa.RecordBatch]:
        reader_conn = self._session()  # a session of its own: the run may write while it streams
        try:
            relation = reader_conn.sql(sql)
            # DuckDB 2.x names it to_arrow_reader, 1.x fetch_arrow_reader
            read = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
            yield from _or_empty(read(DUCKDB_BATCH_ROWS))
        finally:
            reader_conn.close()

    def execute(self, statements: Sequence[str]) -> None:
        conn = self.work
        conn.execute("BEGIN TRANSACTION")
        try:
            for statement in statements:
                log.debug("Running statement: %s", statement)
                conn.execute(statement)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def load(self, table: str, data: pa.Table) -> None:
        conn = self.work
        conn.register("__stopchurn_arrow", data)
        try:
            conn.execute(f'CREATE OR REPLACE TEMP TABLE "{table}" AS SELECT * FROM __stopchurn_arrow')
        finally:
            conn.unregister("__stopchurn_arrow")

    def close(self) -> None:
        work, self._work = self._work, None
        try:
            if work is not None:
                work.close()
        finally:
            if self._owned:
                super().close()
            else:
                self._conn = None


class DbApiWarehouse(_CursorWarehouse):
    """Any other DB-API connection (Snowflake, Trino, Databricks SQL, BigQuery's DB-API, ...): rows are fetched
    ``fetchmany`` at a time into Arrow as on the local path; a load inserts with ``executemany``.

    Same code path as the tested warehouses, not tested in this project's CI (docs: "the diff in the warehouse").
    """

    def __init__(self, connect: Callable[[], Any], dialect: str, *, paramstyle: str = "format") -> None:
        super().__init__(connect)
        self.dialect = dialect
        # a postgres connection the ADBC reader cannot open (IAM authentication, no ADBC driver) is still
        # PostgreSQL: its sessions are pinned as PostgresWarehouse's are, or its key texts follow the database's zone
        self.session_setup = _PINNED.get(dialect, ())
        self._marker = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(paramstyle, "%s")

    def load(self, table: str, data: pa.Table) -> None:
        from airflow_provider_stopchurn.warehouse.sql import staging_ddl

        names = data.column_names
        self.execute([staging_ddl(self.dialect, table, data.schema)])
        insert = f'INSERT INTO "{table}" ({", ".join(names)}) VALUES ({", ".join([self._marker] * len(names))})'
        cursor = self.conn.cursor()
        try:
            for batch in data.to_batches(BATCH_ROWS):
                cursor.executemany(insert, list(zip(*(c.to_pylist() for c in batch.columns), strict=True)))
        finally:
            cursor.close()
        self.conn.commit()


#: Session settings of the DB-API warehouses whose text forms are known here (the others keep their own).
_PINNED: dict[str, tuple[str, ...]] = {"postgres": PostgresWarehouse.session_setup}
