"""Spark's streamed results carry every column name ``toArrow()`` carries: the streaming step addresses the
columns by position, so a name Spark would parse (a dot, a backtick, a repeated name) reads as it does whole."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pytest

from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

pytest_plugins = ["spark_session"]
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")


def test_spark_streams_columns_whose_names_spark_would_parse(
    spark: SparkSession, spark_warehouse: SparkWarehouse
) -> None:
    """A source column may be named ``plan.tier`` (``nest_dotted_columns``) or hold a backtick: each is quoted in
    the query's SQL, and ``toArrow()`` reads it back; the streamed read must too, or every run of such a source
    fails at its first read."""
    sql = (
        "SELECT id, CAST(id AS STRING) AS `plan.tier`, id * 2 AS `odd``name`, named_struct('x', id) AS `a.b`, "
        "CAST(NULL AS STRING) AS `with space` FROM range(0, 30, 1, 3)"
    )
    whole: Any = spark.sql(sql).toArrow()
    streamed = pa.Table.from_batches(list(spark_warehouse.batches(sql)))
    assert streamed.schema.names == ["id", "plan.tier", "odd`name", "a.b", "with space"]
    assert streamed.schema.equals(whole.schema)
    assert streamed.to_pylist() == whole.to_pylist()
