"""Apache Spark as a warehouse: the diff runs as Spark SQL in a :class:`pyspark.sql.SparkSession` the caller owns
(no Airflow import; pyspark is only needed by whoever builds the session).

* ``transactions = False``: Spark's built-in file tables (``USING parquet``, the default provider) cannot
  ``DELETE``, ``UPDATE``, ``MERGE`` or ``CREATE OR REPLACE``, and ``INSERT OVERWRITE`` cannot read the table it
  overwrites. The engine rewrites the state table (and its bookkeeping table: ``INSERT OVERWRITE`` empties a
  table before writing it) into a new one (``CREATE TABLE .. AS SELECT``), drops the old one and renames the new
  one into place; a run that finds a swap stopped between the two finishes it first. ``INSERT INTO``,
  ``INSERT OVERWRITE TABLE`` (from another table), ``DROP TABLE``, ``ALTER TABLE .. RENAME TO`` and
  ``CREATE SCHEMA IF NOT EXISTS`` all work.
* :meth:`SparkWarehouse.batches` reads with ``DataFrame.toArrow()`` (Spark 4): no Python workers (unlike the
  streaming ``DataFrame.__arrow_c_stream__``, which runs ``mapInArrow`` in workers that need pyarrow), Spark's
  own Arrow types (``timestamp`` -> ``timestamp[us, tz=UTC]``). The whole result is collected on the driver first
  (bounded by ``spark.driver.maxResultSize``), then handed out ``BATCH_ROWS`` rows at a time; the diff only reads
  changed rows.
* :meth:`SparkWarehouse.load` makes a **temporary view** (single-part name, session-scoped) over
  ``spark.createDataFrame(arrow_table)``; :meth:`SparkWarehouse.close` drops the views it made and leaves the
  session running.

The session time zone must be ``UTC`` (``spark.sql.session.timeZone``): ``CAST(timestamp AS STRING)`` (key texts,
row hashes) and naive Arrow timestamps given to :meth:`SparkWarehouse.load` follow it, so another zone, or a zone
that changes between runs, changes the hashes. A warning is logged on first use otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
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


def _to_arrow(frame: Any) -> pa.Table:
    """``frame.toArrow()``, first marking the fields inside struct columns nullable when Spark says they are not:
    ``toArrow`` casts to Spark's nullability, and pyarrow refuses that cast for a NULL struct whose fields are
    declared NOT NULL (``SELECT named_struct('a', 1) UNION ALL SELECT NULL``). ``DataFrame.to`` only re-labels
    the columns (one projection); it cannot take duplicate column names, which are then left as they are."""
    from pyspark.sql.types import StructField, StructType

    schema = frame.schema
    fields, changed = [], False
    for field in schema.fields:
        inner, inner_changed = _nested_nullable(field.dataType)
        changed = changed or inner_changed
        fields.append(StructField(field.name, inner, field.nullable, field.metadata))
    if changed and len(set(schema.names)) == len(schema.names):
        frame = frame.to(StructType(fields))
    table: pa.Table = frame.toArrow()
    return table


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
        """The result of ``sql`` as Arrow batches of at most ``BATCH_ROWS`` rows; an empty result is one zero-row
        batch carrying the schema."""
        table = self._arrow(sql)
        seen = False
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            if batch.num_rows:
                seen = True
                yield batch
        if not seen:
            yield _empty_batch(table.schema)

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
