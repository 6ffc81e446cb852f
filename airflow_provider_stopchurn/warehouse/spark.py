"""Apache Spark as a warehouse: the diff runs as Spark SQL in a :class:`pyspark.sql.SparkSession` the caller owns
(no Airflow import; pyspark is only needed by whoever builds the session).

* ``transactions = False``: Spark's built-in file tables (``USING parquet``, the default provider) cannot
  ``DELETE``, ``UPDATE``, ``MERGE`` or ``CREATE OR REPLACE``, and ``INSERT OVERWRITE`` cannot read the table it
  overwrites. The engine rewrites the state table (and its bookkeeping table: ``INSERT OVERWRITE`` empties a
  table before writing it) into a new one (``CREATE TABLE .. AS SELECT``), drops the old one and renames the new
  one into place; a run that finds a swap stopped between the two finishes it first. ``INSERT INTO``,
  ``INSERT OVERWRITE TABLE`` (from another table), ``DROP TABLE``, ``ALTER TABLE .. RENAME TO`` and
  ``CREATE SCHEMA IF NOT EXISTS`` all work.
* :meth:`SparkWarehouse.batches` **streams** a result one partition at a time: each partition's Arrow batches
  are serialized in Spark's Python workers (``mapInArrow``) and fetched with ``toLocalIterator()``, which runs one
  job per partition as the caller asks for it. So the worker holds one partition's batches, not the whole result
  (a rebaseline reads every source row). Each batch is cast to the schema ``DataFrame.toArrow()`` gives (Spark's
  own Arrow types: ``timestamp`` -> ``timestamp[us, tz=UTC]``), so both reads give the same bytes. The Python
  workers need pyarrow (``PYSPARK_PYTHON`` names their interpreter in local mode). Where they cannot run it (a
  probe job on first use fails), a warning is logged and results are collected whole with ``toArrow()`` as
  before (bounded by ``spark.driver.maxResultSize``). ``pyspark.sql.DataFrame.__arrow_c_stream__`` is not used:
  it fails on any timestamp column (its schema has no time zone).
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
    """``frame.toArrow()`` of the :func:`_relabelled` frame: the whole result, collected on the driver."""
    table: pa.Table = _relabelled(frame).toArrow()
    return table


def _ipc_frame(frame: Any) -> Any:
    """``frame`` as one binary column, each value one Arrow batch of a partition as an IPC stream, made in Spark's
    Python workers (``mapInArrow``): the batches stay in partition order, rows in their order within each."""
    from pyspark.sql.types import BinaryType, StructField, StructType

    # a nested function: cloudpickle ships it by value, so the workers need pyarrow, not this package
    def as_ipc(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        for batch in batches:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            yield pa.RecordBatch.from_arrays([pa.array([sink.getvalue().to_pybytes()], pa.binary())], ["ipc"])

    return frame.mapInArrow(as_ipc, StructType([StructField("ipc", BinaryType(), False)]))


def _streamed(frame: Any) -> Iterator[pa.RecordBatch]:
    """The batches of ``frame`` (already :func:`_relabelled`), one partition at a time (``toLocalIterator`` runs
    a job for the next partition only when it is asked for), each cast to the schema ``toArrow`` gives."""
    schema = frame.limit(0).toArrow().schema  # an empty relation: no job
    names = schema.names
    # named by position on the way: mapInArrow resolves each column by its name, so it refuses two columns of one
    # name and reads a dotted name (`a.b`) as a struct's field
    frame = frame.toDF(*(f"c{i}" for i in range(len(names))))
    for row in _ipc_frame(frame).toLocalIterator():
        with pa.ipc.open_stream(pa.py_buffer(row[0])) as reader:
            for part in reader:
                batch = pa.RecordBatch.from_arrays(part.columns, names=names)
                yield batch if batch.schema.equals(schema) else batch.cast(schema)


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
        #: whether Spark's Python workers can stream results (None: not probed yet; see :meth:`_can_stream`)
        self._stream: bool | None = None

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

    def _can_stream(self) -> bool:
        """Whether results can be streamed: a one-row ``mapInArrow`` job, run once per warehouse, succeeds."""
        if self._stream is None:
            try:
                self._stream = len(_ipc_frame(self._spark.range(1)).collect()) == 1
            except Exception as err:  # no Python worker, or one without pyarrow
                log.warning(
                    "Spark's Python workers cannot stream Arrow batches (%s); every result is collected whole on "
                    "the driver instead (toArrow). Give the workers an interpreter with pyarrow (PYSPARK_PYTHON).",
                    str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
                )
                self._stream = False
        return self._stream

    def batches(self, sql: str) -> Generator[pa.RecordBatch]:
        """The result of ``sql`` as Arrow batches of at most ``BATCH_ROWS`` rows, streamed a partition at a time
        (see the module docstring); an empty result is one zero-row batch carrying the schema."""
        self._check_zone()
        log.debug("Running query: %s", sql)
        frame = _relabelled(self._spark.sql(sql))
        if self._can_stream():
            parts: Iterator[pa.RecordBatch] = _streamed(frame)
            schema = None
        else:
            table: pa.Table = frame.toArrow()
            parts, schema = iter(table.to_batches()), table.schema
        seen = False
        for part in parts:
            schema = part.schema
            for batch in pa.Table.from_batches([part]).to_batches(max_chunksize=BATCH_ROWS):
                if batch.num_rows:
                    seen = True
                    yield batch
        if not seen:
            yield _empty_batch(schema if schema is not None else frame.limit(0).toArrow().schema)

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
