"""Real warehouses for the pushdown tests: DuckDB (a database file), PostgreSQL (the suite's server) and Spark
(local mode). Each engine loads a pandas frame as the source table, gives the pushdown's ``Warehouse`` and reads a
query the way the local path reads it (for the byte-identical comparison)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from airflow_provider_stopchurn.source.sql import postgres_uri, read_postgres
from airflow_provider_stopchurn.warehouse import DuckDBWarehouse, PostgresWarehouse, Warehouse


@dataclass
class Engine:
    name: str
    handle: Any
    loaded: list[str] = field(default_factory=list)

    # --- the source table ---------------------------------------------------------------------------------
    def load(self, frame: pd.DataFrame, table: str = "src") -> None:
        data = pa.Table.from_pandas(frame, preserve_index=False)
        if self.name == "duckdb":
            import duckdb

            with duckdb.connect(str(self.handle)) as con:
                con.register("frame_in", data)
                con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM frame_in")
        elif self.name == "postgres":
            import adbc_driver_postgresql.dbapi as adbc

            with adbc.connect(self.handle.uri) as con, con.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {table}")
                cur.adbc_ingest(table, data, mode="create")
                con.commit()
        else:  # spark
            self.handle.createDataFrame(frame).write.mode("overwrite").saveAsTable(table)

    def execute(self, sql: str) -> None:
        if self.name == "duckdb":
            import duckdb

            with duckdb.connect(str(self.handle)) as con:
                con.execute(sql)
        elif self.name == "postgres":
            self.handle.execute(sql)
        else:
            self.handle.sql(sql).collect()

    # --- the two paths --------------------------------------------------------------------------------------
    def warehouse(self) -> Warehouse:
        if self.name == "duckdb":
            return DuckDBWarehouse(str(self.handle))
        if self.name == "postgres":
            return PostgresWarehouse(self.uri())
        from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse

        return SparkWarehouse(self.handle)

    def uri(self) -> Any:
        server = self.handle
        return postgres_uri(
            host=server.host, port=server.port, login=server.user, password=None, database=server.dbname
        )

    def read(self, sql: str) -> Any:
        """The query's result as the local path reads it (a source for ``run_sync``)."""
        if self.name == "duckdb":
            import duckdb

            con = duckdb.connect(str(self.handle))
            relation = con.sql(sql)
            return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        if self.name == "postgres":
            return pa.Table.from_batches(list(read_postgres(self.uri(), sql)))
        return self.handle.sql(sql).toArrow()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        wh = self.warehouse()
        try:
            return wh.rows(sql)
        finally:
            wh.close()


def engine_fixture(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if name == "duckdb":
        yield Engine("duckdb", tmp_path / "warehouse.duckdb")
    elif name == "postgres":
        yield Engine("postgres", request.getfixturevalue("postgres_database"))
    else:
        spark = request.getfixturevalue("spark")
        for table in spark.catalog.listTables():
            spark.sql(f"DROP TABLE IF EXISTS {table.name}")
        for db in spark.catalog.listDatabases():
            if db.name != "default":
                spark.sql(f"DROP DATABASE IF EXISTS {db.name} CASCADE")
        yield Engine("spark", spark)


#: The engines a test runs on without Spark: DuckDB always, PostgreSQL with the suite's server.
LOCAL_ENGINES = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=LOCAL_ENGINES, name="engine")
def local_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The ``engine`` fixture of the tests that run on DuckDB and PostgreSQL (import it to use it)."""
    yield from engine_fixture(request.param, request, tmp_path)
