"""The diff inside the warehouse (``diff_location="warehouse"``): the warehouse and source of a SQL connection."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.hooks._compat import BaseHook
from airflow_provider_stopchurn.operators._source import _adbc_postgres_uri
from airflow_provider_stopchurn.source.sql import SqlHook

if TYPE_CHECKING:
    from airflow_provider_stopchurn.warehouse import Warehouse, WarehouseSource

log = logging.getLogger(__name__)

#: Where the diff runs (``diff_location``): in the worker, or inside the warehouse that holds the SQL source.
DIFF_LOCATIONS = ("worker", "warehouse")
#: The schema of the warehouse's state tables (``state_schema``), as the engine's ``WarehouseSource`` defaults it.
DEFAULT_STATE_SCHEMA = "stopchurn_state"


#: Connection types diffed through their hook's DB-API connection: the warehouse's sqlglot dialect and its
#: driver's paramstyle (the staging inserts of a settle). PostgreSQL and DuckDB have warehouses of their own.
WAREHOUSE_DIALECTS: dict[str, tuple[str, str]] = {
    "snowflake": ("snowflake", "pyformat"),
    "gcpbigquery": ("bigquery", "pyformat"),
    "bigquery": ("bigquery", "pyformat"),
    "databricks": ("databricks", "qmark"),
    "trino": ("trino", "qmark"),
    "redshift": ("redshift", "format"),
}

_SPARK_REFUSAL = (
    "a Spark connection gives no SparkSession to diff in: use the engine's API with a SparkWarehouse "
    "(airflow_provider_stopchurn.warehouse.spark) in a task that owns the session, or diff_location='worker'"
)
#: Connection types the warehouse diff refuses, and why.
WAREHOUSE_REFUSED: dict[str, str] = {
    "sqlite": "SQLite has no MD5 function for the row hashes; use diff_location='worker'",
    "mysql": "MySQL/MariaDB are not supported by the diff in the warehouse; use diff_location='worker'",
    "mariadb": "MySQL/MariaDB are not supported by the diff in the warehouse; use diff_location='worker'",
    "spark": _SPARK_REFUSAL,
    "spark_sql": _SPARK_REFUSAL,
    "sparksql": _SPARK_REFUSAL,
    "spark_connect": _SPARK_REFUSAL,
    "spark_jdbc": _SPARK_REFUSAL,
}


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _check_diff_location(diff_location: Any, sql: Any, task_id: str) -> str:
    """``diff_location`` checked (with the source it needs); raises ``StopChurnConfigError`` (a ValueError)."""
    if diff_location not in DIFF_LOCATIONS:
        raise StopChurnConfigError(f"{task_id}: diff_location must be 'worker' or 'warehouse', got {diff_location!r}.")
    if diff_location == "warehouse":
        if sql is None:
            raise StopChurnConfigError(
                f"{task_id}: diff_location='warehouse' needs a SQL source (`sql` with `sql_conn_id`): the diff runs "
                "in the database that holds it. A DataFrame source is diffed on the worker (diff_location='worker')."
            )
        if not isinstance(sql, str) and len(sql) != 1:
            raise StopChurnConfigError(
                f"{task_id}: diff_location='warehouse' needs `sql` to be one SELECT query, got a list of {len(sql)} "
                "statements. Put setup statements in an upstream task, or use a view."
            )
    return str(diff_location)


def warehouse_for_connection(conn_id: str, hook_params: Mapping[str, Any] | None = None) -> Warehouse:
    """The warehouse the diff runs in, for Airflow connection ``conn_id`` (no connection is opened yet).

    postgres: :class:`PostgresWarehouse` over the ADBC URI the worker path reads with (the hook's own driver with
    IAM authentication or without ``adbc-driver-postgresql``); duckdb: :class:`DuckDBWarehouse` on the database
    file in the connection's host (or schema); the types of :data:`WAREHOUSE_DIALECTS`: the hook's DB-API
    connection. Others (:data:`WAREHOUSE_REFUSED`, or unknown) raise ``StopChurnConfigError``.
    """
    from airflow_provider_stopchurn.warehouse import DbApiWarehouse, DuckDBWarehouse, PostgresWarehouse

    connection = BaseHook.get_connection(conn_id)
    conn_type = str(connection.conn_type or "").lower()
    if conn_type in WAREHOUSE_REFUSED:
        raise StopChurnConfigError(
            f"Connection {conn_id!r} is of type {conn_type!r}: the diff cannot run in it "
            f"({WAREHOUSE_REFUSED[conn_type]})."
        )
    if conn_type == "duckdb":
        database = connection.host or connection.schema
        if not database:
            raise StopChurnConfigError(
                f"Connection {conn_id!r} (duckdb) names no database file: set its host (or schema) to the file's path."
            )
        return DuckDBWarehouse(str(database))
    if conn_type != "postgres" and conn_type not in WAREHOUSE_DIALECTS:
        supported = ", ".join(["postgres", "duckdb", *WAREHOUSE_DIALECTS])
        raise StopChurnConfigError(
            f"Connection {conn_id!r} is of type {conn_type!r}, which the diff in the warehouse does not know "
            f"(supported: {supported}); use diff_location='worker'."
        )
    hook = connection.get_hook(hook_params=dict(hook_params or {}))
    if conn_type == "postgres":
        uri = _adbc_postgres_uri(connection, hook)
        if uri is not None:
            return PostgresWarehouse(uri)
        dialect, paramstyle = "postgres", "format"  # psycopg's
    else:
        dialect, paramstyle = WAREHOUSE_DIALECTS[conn_type]
    if not isinstance(hook, SqlHook):
        raise StopChurnConfigError(
            f"Connection {conn_id!r} has no SQL hook with get_conn() (got {type(hook).__name__}); the diff in the "
            "warehouse needs a common.sql DbApiHook."
        )
    log.info("The diff runs in %s (connection %r) through its hook's DB-API connection.", dialect, conn_id)
    return DbApiWarehouse(hook.get_conn, dialect, paramstyle=paramstyle)


def warehouse_source(
    conn_id: str,
    sql: str | list[str],
    parameters: Mapping[str, Any] | Sequence[Any] | None = None,
    hook_params: Mapping[str, Any] | None = None,
    *,
    state_schema: str = DEFAULT_STATE_SCHEMA,
) -> WarehouseSource:
    """The source of a warehouse diff: one SELECT on ``conn_id``'s warehouse. PostgreSQL's ``parameters`` are
    inlined as literals (as the worker path binds them for ADBC); elsewhere a query with parameters is refused."""
    from airflow_provider_stopchurn.source.sql import with_literals
    from airflow_provider_stopchurn.warehouse import WarehouseSource

    statements = [sql] if isinstance(sql, str) else [str(s) for s in sql]
    if len(statements) != 1:
        raise StopChurnConfigError(
            f"diff_location='warehouse' needs `sql` to be one SELECT query, got a list of {len(statements)} statements."
        )
    query = statements[0]
    warehouse = warehouse_for_connection(conn_id, hook_params)
    if warehouse.dialect == "postgres":
        query = with_literals(query, parameters)
    elif parameters:
        raise StopChurnConfigError(
            f"Query parameters with diff_location='warehouse' are only supported on PostgreSQL; connection {conn_id!r} "
            f"is a {warehouse.dialect} warehouse. Write the values into the query (a Jinja template renders them), "
            "or use diff_location='worker'."
        )
    return WarehouseSource(query, warehouse, state_schema=state_schema)
