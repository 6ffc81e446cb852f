"""Apache Spark as a warehouse: the diff runs as Spark SQL in a :class:`pyspark.sql.SparkSession` the caller owns
(no Airflow import; pyspark is only needed by whoever builds the session).

* ``transactions = False``: Spark's built-in file tables (``USING parquet``, the default provider) cannot
  ``DELETE``, ``UPDATE``, ``MERGE`` or ``CREATE OR REPLACE``, and ``INSERT OVERWRITE`` cannot read the table it
  overwrites. The engine rewrites the state table (and its bookkeeping table: ``INSERT OVERWRITE`` empties a
  table before writing it) into a new one (``CREATE TABLE .. AS SELECT``), drops the old one and renames the new
  one into place; a run that finds a swap stopped between the two finishes it first. ``INSERT INTO``,
  ``INSERT OVERWRITE TABLE`` (from another table), ``DROP TABLE``, ``ALTER TABLE .. RENAME TO`` and
  ``CREATE SCHEMA IF NOT EXISTS`` all work.
* :meth:`SparkWarehouse.batches` streams the result a partition at a time, so the driver and the worker hold
  one partition, never the whole result (a baseline reads every row): each partition's Arrow batches are written
  as Arrow IPC bytes by ``mapInArrow`` (Spark's Python workers, which need pyarrow, as for any Arrow UDF) and
  fetched by ``toLocalIterator`` (one Spark job per partition, in order, each started when the one before is read:
  not prefetched, or a failure computing the next partition could stop the current one), then cast to the types
  ``toArrow()`` gives (Spark's own Arrow types: ``timestamp`` -> ``timestamp[us, tz=UTC]``). Batches hold at most
  ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows (and never more than ``BATCH_ROWS``).
  :meth:`SparkWarehouse.rows` (small results) collects with ``DataFrame.toArrow()``: no Python workers.
* :meth:`SparkWarehouse.load` makes a **temporary view** (single-part name, session-scoped) over
  ``spark.createDataFrame(arrow_table)``; :meth:`SparkWarehouse.close` drops the views it made and leaves the
  session running.

The session time zone must be ``UTC`` (``spark.sql.session.timeZone``): ``CAST(timestamp AS STRING)`` (key texts,
row hashes) and naive Arrow timestamps given to :meth:`SparkWarehouse.load` follow it, so another zone, or a zone
that changes between runs, changes the hashes. A warning is logged on first use otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from airflow_provider_stopchurn.source.sql import BATCH_ROWS

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

__all__ = ["SparkWarehouse", "spark_identifier"]

#: The session time zone the warehouse expects (see the module docstring).
SESSION_TIME_ZONE = "UTC"


def spark_identifier(name: str) -> str:
    """``name`` as one backtick-quoted Spark SQL identifier (a backtick inside is doubled)."""
    return "`" + name.replace("`", "``") + "`"


def _nested_nullable(data_type: Any) -> tuple[Any, bool]:
    """``data_type`` (a pyspark ``DataType``) with every field of every struct inside it nullable, and whether that
    changed anything."""
    from pyspark.sql.types import ArrayType, MapType, StructField, StructType

    if isinstance(data_type, StructType):
        fields, changed = [], False
        for field in data_type.fields:
            inner, inner_changed = _nested_nullable(field.dataType)
            changed = changed or inner_changed or not field.nullable
            fields.append(StructField(field.name, inner, True, field.metadata))
        return StructType(fields), changed
    if isinstance(data_type, ArrayType):
        element, changed = _nested_nullable(data_type.elementType)
        return ArrayType(element, data_type.containsNull), changed
    if isinstance(data_type, MapType):
        key, key_changed = _nested_nullable(data_type.keyType)
        value, value_changed = _nested_nullable(data_type.valueType)
        return MapType(key, value, data_type.valueContainsNull), key_changed or value_changed
    return data_type, False


def _relabelled(frame: Any) -> Any:
    """``frame`` with the fields inside struct columns marked nullable when Spark says they are not: ``toArrow``
    casts to Spark's nullability, and pyarrow refuses that cast for a NULL struct whose fields are declared NOT
    NULL (``SELECT named_struct('a', 1) UNION ALL SELECT NULL``). ``DataFrame.to`` only re-labels the columns (one
    projection); it cannot take duplicate column names, which are then left as they are."""
    from pyspark.sql.types import StructField, StructType

    schema = frame.schema
    fields, changed = [], False
    for field in schema.fields:
        inner, inner_changed = _nested_nullable(field.dataType)
        changed = changed or inner_changed
        fields.append(StructField(field.name, inner, field.nullable, field.metadata))
    if changed and len(set(schema.names)) == len(schema.names):
        frame = frame.to(StructType(fields))
    return frame


def _to_arrow(frame: Any) -> pa.Table:
    """``frame.toArrow()`` (see :func:`_relabelled`): the whole result, collected on the driver."""
    table: pa.Table = _relabelled(frame).toArrow()
    return table


def _arrow_schema(frame: Any) -> pa.Schema:
    """The Arrow schema ``frame.toArrow()`` gives (timestamps in UTC, large types as the session says)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    large = str(frame.sparkSession.conf.get("spark.sql.execution.arrow.useLargeVarTypes", "false")).lower() == "true"
    schema: pa.Schema = to_arrow_schema(
        frame.schema, error_on_duplicated_field_names_in_struct=True, timezone="UTC", prefers_large_types=large
    )
    return schema


def _partition_batches(frame: Any) -> Iterator[pa.RecordBatch]:
    """The batches of ``frame``, fetched one partition at a time (``toLocalIterator``): each partition's Arrow
    batches travel as Arrow IPC bytes, one row per batch, written by ``mapInArrow`` in Spark's Python workers."""
    from pyspark.sql.types import BinaryType, StructField, StructType

    # defined here, not at module level: cloudpickle then ships the function itself, so Spark's Python workers
    # need pyarrow but not this package
    def to_ipc(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        for batch in batches:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            yield pa.RecordBatch.from_arrays([pa.array([sink.getvalue().to_pybytes()], pa.binary())], names=["ipc"])

    blobs = frame.mapInArrow(to_ipc, StructType([StructField("ipc", BinaryType(), False)]))
    for (blob,) in blobs.toLocalIterator(prefetchPartitions=False):
        with pa.ipc.open_stream(blob) as reader:
            yield from reader


def _python_workers_failed(err: BaseException) -> bool:
    """Whether ``err`` says Spark's Python workers failed (did not start, or could not import what they need),
    as opposed to the query failing."""
    text = str(err)
    return "Python worker" in text or "PYTHON_EXCEPTION" in text or "Cannot run program" in text


def _first_line(err: BaseException) -> str:
    """The first line of an error (Spark's go on with the stack trace)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=field.type) for field in schema], schema=schema)


class SparkWarehouse:
    """A :class:`~airflow_provider_stopchurn.warehouse.databases.Warehouse` over a ``SparkSession`` (tested with
    classic sessions; the calls it makes exist on Spark Connect too). The constructor only keeps the session;
    the caller starts and stops it."""

    dialect = "spark"
    transactions = False

    def __init__(self, spark: SparkSession) -> None:
        self._spark = spark
        self._views: set[str] = set()
        self._zone_checked = False
        #: False once Spark's Python workers failed to stream a result (see :meth:`batches`)
        self._streams = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dialect={self.dialect!r})"

    @property
    def spark(self) -> SparkSession:
        return self._spark

    def _check_zone(self) -> None:
        if self._zone_checked:
            return
        self._zone_checked = True
        zone = self._spark.conf.get("spark.sql.session.timeZone")
        if zone != SESSION_TIME_ZONE:
            log.warning(
                "The Spark session time zone is %s, not %s: timestamps cast to text (keys, row hashes) follow it. "
                "Set spark.sql.session.timeZone=%s on the session.",
                zone,
                SESSION_TIME_ZONE,
                SESSION_TIME_ZONE,
            )

    def _arrow(self, sql: str) -> pa.Table:
        self._check_zone()
        log.debug("Running query: %s", sql)
        return _to_arrow(self._spark.sql(sql))

    def batches(self, sql: str) -> Generator[pa.RecordBatch]:
        """The result of ``sql`` as Arrow batches of at most ``BATCH_ROWS`` rows, fetched a partition at a time
        (see the module docstring); an empty result is one zero-row batch carrying the schema.

        Where Spark's Python workers cannot run the stream (no pyarrow in the interpreter ``PYSPARK_PYTHON``
        names, or none at all), the first read fails before any batch: the result is then read whole with
        ``toArrow()`` as before, with a warning, and so are this warehouse's later reads."""
        self._check_zone()
        log.debug("Running query: %s", sql)
        frame = _relabelled(self._spark.sql(sql))
        schema = _arrow_schema(frame)
        seen = False
        if self._streams:
            try:
                for batch in self._stream(frame, schema):
                    seen = True
                    yield batch
            except Exception as err:
                if seen or not _python_workers_failed(err):
                    raise
                self._streams = False
                log.warning(
                    "Spark's Python workers could not stream the result (%s); reading each result whole with "
                    "toArrow() instead, which holds it in this process. Point PYSPARK_PYTHON at an interpreter "
                    "with pyarrow to stream it a partition at a time.",
                    _first_line(err),
                )
            else:
                if not seen:
                    yield _empty_batch(schema)
                return
        table: pa.Table = frame.toArrow()
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            if batch.num_rows:
                seen = True
                yield batch
        if not seen:
            yield _empty_batch(table.schema)

    @staticmethod
    def _stream(frame: Any, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        # mapInArrow refuses columns of one name ("SELECT 1 AS a, 2 AS a" is ambiguous): the stream carries them
        # by position, named back on arrival
        positional = _relabelled(frame.toDF(*(f"_{i}" for i in range(len(frame.columns)))))
        for batch in _partition_batches(positional):
            if not batch.num_rows:
                continue
            table = pa.Table.from_batches([batch]).rename_columns(schema.names)
            if table.schema != schema:  # as toArrow() types them (the session's zone, Spark's nullability)
                table = table.cast(schema)
            yield from table.to_batches(max_chunksize=BATCH_ROWS)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """A small result as tuples, through Arrow like :meth:`batches` (timestamps come back as aware UTC
        datetimes, whatever the Python process's local zone; maps as lists of (key, value) pairs)."""
        table = self._arrow(sql)
        if table.num_columns == 0:
            return [() for _ in range(table.num_rows)]
        return list(zip(*(column.to_pylist() for column in table.columns), strict=True))

    def execute(self, statements: Sequence[str]) -> None:
        """Run ``statements`` in order, each on its own (Spark has no transactions: a failure leaves the earlier
        ones done). DDL and DML commands run when ``spark.sql`` is called."""
        self._check_zone()
        for statement in statements:
            log.debug("Running statement: %s", statement)
            self._spark.sql(statement)

    def load(self, table: str, data: pa.Table) -> None:
        """Make ``table`` (one unqualified name, case-insensitive like every Spark identifier) a temporary view
        holding ``data``, replacing any view of that name. Reference it as ``table`` or quoted with backticks."""
        if not table or "." in table:
            raise ValueError(f"A Spark temporary view needs a single-part name, not {table!r}")
        self._check_zone()
        frame = self._spark.createDataFrame(data)
        frame.createOrReplaceTempView(spark_identifier(table))
        self._views.add(table)

    def close(self) -> None:
        """Drop the temporary views :meth:`load` made; the session keeps running (the caller owns it)."""
        views, self._views = self._views, set()
        for view in sorted(views):
            try:
                self._spark.catalog.dropTempView(view)
            except Exception:  # a stopped session: its views are gone with it
                log.debug("Could not drop the temporary view %s", view, exc_info=True)
