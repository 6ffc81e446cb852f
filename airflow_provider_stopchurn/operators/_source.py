"""The one source-reading path of the three operators: a DataFrame, an XComArg, a callable, or SQL on a connection."""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow_provider_stopchurn.exceptions import StopChurnConfigError
from airflow_provider_stopchurn.hooks._compat import BaseHook, XComArg, mask_secret
from airflow_provider_stopchurn.source.sql import PostgresUri, SqlHook, postgres_uri, read_dbapi, read_postgres

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import Connection

    from airflow_provider_stopchurn.hooks._compat import Context
    from airflow_provider_stopchurn.source.canonical import Source

log = logging.getLogger(__name__)


def read_sql(
    conn_id: str,
    sql: str | list[str],
    parameters: Mapping[str, Any] | Sequence[Any] | None = None,
    hook_params: Mapping[str, Any] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The result of ``sql`` on connection ``conn_id`` as Arrow record batches (see ``sources``).

    A postgres connection is read through ADBC, except with IAM authentication (the token comes from the hook)
    or without ``adbc-driver-postgresql``; every other connection through its common.sql hook's DB-API connection.
    """
    connection = BaseHook.get_connection(conn_id)
    hook = connection.get_hook(hook_params=dict(hook_params or {}))
    uri = _adbc_postgres_uri(connection, hook)
    if uri is not None:
        return read_postgres(uri, sql, parameters)
    if not isinstance(hook, SqlHook):
        raise StopChurnConfigError(
            f"Connection {conn_id!r} has no SQL hook with get_conn() (got {type(hook).__name__}); `sql` needs a "
            "common.sql DbApiHook."
        )
    return read_dbapi(hook, sql, parameters)


def _adbc_postgres_uri(connection: Connection, hook: Any) -> PostgresUri | None:
    """The ADBC URI of a postgres connection, or None where the hook's own driver must read it."""
    if connection.conn_type != "postgres":
        return None
    extras = connection.extra_dejson
    if extras.get("iam"):
        log.info("Connection %r uses IAM authentication: reading through the hook's driver.", connection.conn_id)
        return None
    if importlib.util.find_spec("adbc_driver_postgresql") is None:
        log.warning(
            "adbc-driver-postgresql is not installed: reading connection %r row by row through the hook's driver, "
            "which is slower and less exact (install airflow-provider-stopchurn[postgres]).",
            connection.conn_id,
        )
        return None
    if connection.password:  # Airflow masks the password as it is; the URI holds it percent-encoded
        mask_secret(quote(connection.password, safe=""))
    return postgres_uri(
        host=connection.host,
        port=connection.port,
        login=connection.login,
        password=connection.password,
        database=getattr(hook, "database", None) or connection.schema,
        extras=extras,
        options=getattr(hook, "options", None),
    )


def _is_xcom_arg(value: Any) -> bool:
    return isinstance(value, XComArg)


def _accepts_context(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "context" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class _SourceArguments:
    """The source arguments of the three operators: a DataFrame, an XComArg, a callable, or SQL on a connection."""

    sql: Any
    sql_conn_id: str | None
    parameters: Any
    sql_hook_params: dict[str, Any]
    dataframe: Any
    _dataframe_factory: Callable[..., Any] | None

    def _set_source(
        self,
        task_id: str,
        dataframe: Any,
        sql: Any,
        sql_conn_id: str | None,
        parameters: Any,
        sql_hook_params: dict[str, Any] | None,
    ) -> None:
        if (dataframe is None) == (sql is None):
            raise ValueError(f"{task_id}: pass exactly one of `dataframe` or `sql`.")
        if sql is not None and not sql_conn_id:
            raise ValueError(f"{task_id}: `sql` needs `sql_conn_id`.")
        # A callable in a template field would be called by the renderer with (context, jinja_env): keep user
        # callables out of it and call them in execute().
        self._dataframe_factory = None
        if callable(dataframe) and not _is_xcom_arg(dataframe):
            self._dataframe_factory, dataframe = dataframe, None
        self.dataframe = dataframe
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.parameters = parameters
        self.sql_hook_params = sql_hook_params or {}

    def _source(self, context: Context) -> Source:
        """The source as a callable, so the engine reads it after it has finished any pending plan."""
        return lambda: self._read(context)

    def _read(self, context: Context, extra_parameters: Mapping[str, Any] | None = None) -> Any:
        """The source's rows now; ``extra_parameters`` are added to a SQL source's named parameters."""
        if self.sql is not None:
            parameters = self.parameters
            if extra_parameters:
                if parameters is not None and not isinstance(parameters, Mapping):
                    raise StopChurnConfigError(
                        f"parameters must be a dict (named parameters) when the SQL gets {sorted(extra_parameters)} "
                        f"too; got {type(parameters).__name__}."
                    )
                clash = sorted(set(parameters or {}) & set(extra_parameters))
                if clash:
                    raise StopChurnConfigError(
                        f"parameters must not set {clash}: the operator passes them (the start of the window)."
                    )
                parameters = {**(parameters or {}), **extra_parameters}
            return read_sql(str(self.sql_conn_id), self.sql, parameters, self.sql_hook_params)
        factory = self._dataframe_factory
        if factory is not None:
            kwargs: dict[str, Any] = {}
            if _accepts_context(factory):
                kwargs["context"] = context
            if extra_parameters and _accepts(factory, "since"):
                kwargs["since"] = extra_parameters["since"]
            return factory(**kwargs)
        return self.dataframe
