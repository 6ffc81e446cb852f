"""StopChurnUpdateOperator: keep a StopChurn table in step with a DataFrame or a SQL query."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import quote, unquote, urlsplit

from airflow_provider_stopchurn.assets import TableRef
from airflow_provider_stopchurn.exceptions import StopChurnConfigError, StopChurnError
from airflow_provider_stopchurn.hooks._compat import (
    AirflowException,
    AirflowFailException,
    BaseHook,
    BaseOperator,
    ObjectStoragePath,
    XComArg,
    mask_secret,
)
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.operators import lineage
from airflow_provider_stopchurn.operators.commit_guard import CommitGuard
from airflow_provider_stopchurn.options import LOCK_TTL_S
from airflow_provider_stopchurn.snapshot import SnapshotStore
from airflow_provider_stopchurn.sources import PostgresUri, SqlHook, postgres_uri, read_dbapi, read_postgres
from airflow_provider_stopchurn.sync import SyncOptions, SyncSummary, run_sync

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import Connection

    from airflow_provider_stopchurn.canonical import Source
    from airflow_provider_stopchurn.deliver import Sender
    from airflow_provider_stopchurn.hooks._compat import Context
    from airflow_provider_stopchurn.pushdown import Warehouse, WarehouseSource

log = logging.getLogger(__name__)


#: SyncOptions fields the operator takes as arguments of the same name and passes on unchanged (SyncOptions
#: validates them); the others are derived in ``_options``.
SYNC_OPTION_ARGUMENTS = tuple(
    name
    for name in SyncOptions.field_names()
    if name
    not in {
        "brand_id",
        "table_name",
        "key_columns",
        "dry_run",
        "allow_large_changes",
        "holder",
        "run_key",
        "progress_interval_s",
        "window_rows",
        "run_info",
    }
)

#: Where the diff runs (``diff_location``): in the worker, or inside the warehouse that holds the SQL source.
DIFF_LOCATIONS = ("worker", "warehouse")
#: The schema of the warehouse's state tables (``state_schema``), as the engine's ``WarehouseSource`` defaults it.
DEFAULT_STATE_SCHEMA = "stopchurn_state"


class StopChurnUpdateOperator(BaseOperator):
    """Send the changes of a table since the last run to StopChurn's ``/client-data/update``.

    Each run reads the source (a pandas or polars DataFrame, an Arrow table or stream, an upstream task's XCom,
    a callable returning one of these, or a SQL query on any Airflow SQL connection), diffs it against the
    snapshot it delivered last time, sends only the inserted, updated and deleted rows in bounded chunks, and
    commits the new snapshot once StopChurn has acknowledged every chunk. An interrupted delivery is resumed by
    the next try, without resending acknowledged chunks.

    Every commit is also recorded in Airflow's metadata database (an Airflow Variable per brand and table,
    ``stopchurn_commit__<brand_id>__<table>__<hash>``: snapshot version, row count, location; never a key).
    Before a run reads the source, its ``snapshot_uri`` must be the recorded location (else it is refused; to
    move a store on purpose, see ``move_store_from``) and the store must hold the recorded snapshot or a newer
    one. When it holds none, or an older one (a worker that cannot see the snapshot of another worker, or a
    restored old copy), the run fails without retry and sends nothing, where it would otherwise resend the whole
    table as inserts or resend changes already delivered. Several workers need shared storage: ``snapshot_uri``
    on an object store (``s3://...`` with ``snapshot_conn_id``). To rebaseline on purpose, run once with
    ``accept_missing_snapshot=True`` (with ``initial_load="baseline"`` when StopChurn already holds the table, so
    that nothing is resent), or delete that Variable. A dry run checks but records nothing.

    :param table_name: StopChurn table name (templated).
    :param brand_id: StopChurn brand id (templated); None takes ``brand_id`` from the connection's extras.
    :param primary_key: key column, or a list of columns for a composite key. A row without an ``id`` column
        gets one: the key's value, or the key parts joined with ``:``.
    :param dataframe: the table: a pandas or polars DataFrame, a polars LazyFrame, a pyarrow Table or
        RecordBatchReader, an iterator of pyarrow RecordBatches, an ``XComArg`` of an upstream task, or a callable
        returning any of these (called in ``execute``, never at DAG parse time; it receives ``context=`` if it
        accepts it). Readers and iterators can be read once: pass them through a callable.
    :param sql: SQL query or ``.sql`` file (templated), run on ``sql_conn_id``. Exactly one of ``dataframe``/``sql``.
    :param sql_conn_id: any Airflow connection whose hook is a common.sql ``DbApiHook``.
    :param parameters: query parameters (templated).
    :param sql_hook_params: extra keyword arguments for the SQL hook.
    :param stopchurn_conn_id: the StopChurn connection (API base URL in host, API key in password).
    :param snapshot_uri: where snapshots live (templated): a local path or any ObjectStoragePath URL
        (``s3://bucket/prefix``...). Default: ``$AIRFLOW_HOME/stopchurn/snapshots``, which suits a single
        machine only; deployments with several workers must point it at shared storage.
    :param snapshot_conn_id: connection for the object store of ``snapshot_uri``.
    :param created_at_column: column with each row's creation time (datetime or epoch ms) for ``createdAt``;
        default: when the sync first delivered the key.
    :param updated_at_column: column with each row's update time for ``updatedAt``; default: the run's time.
    :param initial_load: first run without a snapshot: ``"send"`` inserts every row, ``"baseline"`` records the
        table without sending (for tables loaded through StopChurn's historical upload).
    :param chunk_size: at most this many updates per request.
    :param max_chunk_bytes: at most this many bytes per request body.
    :param dry_run: compute the plan and return its counts with up to 5 sample updates; send and write nothing.
    :param accept_missing_snapshot: run even though Airflow recorded a commit that the store at ``snapshot_uri``
        does not hold (no snapshot, or an older one): the run uses the store as it is (a first load follows
        ``initial_load``) and its commit replaces the record (templated; meant for one run, e.g. from a DAG
        param). Default: such a run fails with ``AirflowFailException`` before anything is sent.
    :param move_store_from: the previous ``snapshot_uri`` of this table (templated), to move its store on
        purpose: Airflow keeps one store location per brand and table and refuses runs elsewhere. Copy the table's
        folder to the new ``snapshot_uri`` first (or add ``accept_missing_snapshot=True``); the run then records
        the new location, after which the argument has no effect and may be removed.
    :param max_delete_fraction: fail when a plan deletes more than this share of the snapshot's rows.
    :param allow_empty_source: let an empty source delete every row of a non-empty snapshot.
    :param allow_large_changes: let this run through the two guards above (templated; e.g. from a DAG param).
    :param on_schema_change: when the columns differ from the snapshot's: ``"fail"``, ``"update_all"`` (send
        every row as an update) or ``"rebaseline"`` (record the new table, send nothing).
    :param on_rejected_rows: on a 400: ``"fail"`` stops the run; ``"quarantine"`` isolates the rejected rows,
        delivers the rest, and writes the rejected ones beside the snapshot to try again next run.
    :param max_rejected_rows: fail the run (after committing the rest) when more rows were quarantined.
    :param max_concurrent_requests: chunks in flight at once (1 = strictly sequential).
    :param nest_dotted_columns: turn columns named ``a.b`` into nested objects ``{"a": {"b": ...}}``.
    :param decimal_as_string: send decimals as JSON strings instead of exact JSON numbers.
    :param json_columns: text columns holding JSON (MariaDB's JSON, JSON in SQLite TEXT or a VARCHAR), parsed
        before the diff and sent as JSON values; reformatted JSON text is no change. Text that is not valid JSON
        fails the run before anything is sent. MySQL 8's JSON and PostgreSQL's json/jsonb need no entry.
    :param lock_wait_s: while another run syncs the same table, wait up to this many seconds for its lock
        (polling with backoff), then fail as retryable.
    :param lock_ttl_s: the table lock's lease, in seconds (default 900): a heartbeat renews it while the run
        works. A run killed on another machine (where its process cannot be seen) blocks the table until its
        lease expires; on the same host it is broken at once. It must exceed a request's timeouts (the
        connection's) by a tenth of itself.
    :param diff_location: where the diff runs (templated). ``"worker"`` (default): the source is read into the
        worker and diffed against the snapshot. ``"warehouse"`` (SQL sources only): the diff runs as SQL in the
        database of ``sql_conn_id``, against a state table kept there, and only the changed rows leave it
        (``pushdown``). ``sql`` must then be one SELECT; ``parameters`` only on PostgreSQL (inlined as literals).
        Connection types: postgres (ADBC), duckdb (the database file in host or schema), snowflake,
        gcpbigquery/bigquery, databricks, trino, redshift; not SQLite, MySQL/MariaDB or Spark (a SparkSession
        warehouse is used through the engine's API). A table synced on the worker cannot simply switch: record it
        once in the warehouse (``stopchurn reconcile --reset``, then a run with ``initial_load="baseline"``).
    :param state_schema: the schema of the warehouse that holds the state tables (templated), with
        ``diff_location="warehouse"``.

    Unless the task or its DAG's ``default_args`` set them (or ``[core] default_task_retries`` is set), the
    operator retries: ``retries=3``, ``retry_delay=2 minutes``, doubling (``retry_exponential_backoff=2.0``); a retry
    settles what an earlier try delivered and sends only the rest.
    """

    template_fields: Sequence[str] = (
        "table_name",
        "brand_id",
        "sql",
        "parameters",
        "snapshot_uri",
        "dataframe",
        "allow_large_changes",
        "accept_missing_snapshot",
        "move_store_from",
        "diff_location",
        "state_schema",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    ui_color = "#3c6df0"

    def __init__(  # noqa: PLR0913 - keyword-only operator arguments; test_operator_unit checks them against SyncOptions
        self,
        *,
        table_name: str,
        brand_id: int | str | None = None,
        primary_key: str | Sequence[str] = "id",
        dataframe: Any = None,
        sql: str | list[str] | None = None,
        sql_conn_id: str | None = None,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        sql_hook_params: dict[str, Any] | None = None,
        stopchurn_conn_id: str = StopChurnHook.default_conn_name,
        snapshot_uri: str | None = None,
        snapshot_conn_id: str | None = None,
        created_at_column: str | None = None,
        updated_at_column: str | None = None,
        initial_load: str = "send",
        chunk_size: int = 500,
        max_chunk_bytes: int = 5_000_000,
        dry_run: bool = False,
        accept_missing_snapshot: bool | str = False,
        move_store_from: str | None = None,
        max_delete_fraction: float = 0.5,
        allow_empty_source: bool = False,
        allow_large_changes: bool | str = False,
        on_schema_change: str = "fail",
        on_rejected_rows: str = "fail",
        max_rejected_rows: int = 100,
        max_concurrent_requests: int = 4,
        nest_dotted_columns: bool = True,
        decimal_as_string: bool = False,
        lock_wait_s: float = 300.0,
        lock_ttl_s: float = LOCK_TTL_S,
        json_columns: Sequence[str] = (),
        diff_location: Literal["worker", "warehouse"] = "worker",
        state_schema: str = DEFAULT_STATE_SCHEMA,
        **kwargs: Any,
    ) -> None:
        super().__init__(**_with_retry_defaults(kwargs))
        if (dataframe is None) == (sql is None):
            raise ValueError(f"{self.task_id}: pass exactly one of `dataframe` or `sql`.")
        if sql is not None and not sql_conn_id:
            raise ValueError(f"{self.task_id}: `sql` needs `sql_conn_id`.")
        if initial_load not in ("send", "baseline"):
            raise ValueError(f"{self.task_id}: initial_load must be 'send' or 'baseline', got {initial_load!r}.")
        if not _is_template(diff_location):  # a template is checked once rendered, in execute()
            _check_diff_location(diff_location, sql, self.task_id)
        if not isinstance(state_schema, str) or not state_schema.strip():
            raise ValueError(f"{self.task_id}: state_schema must be a schema name, got {state_schema!r}.")
        self.table_name = table_name
        self.brand_id = brand_id
        self.primary_key = [primary_key] if isinstance(primary_key, str) else list(primary_key)
        # A callable in a template field would be called by the renderer with (context, jinja_env): keep user
        # callables out of it and call them in execute().
        self._dataframe_factory: Callable[..., Any] | None = None
        if callable(dataframe) and not _is_xcom_arg(dataframe):
            self._dataframe_factory, dataframe = dataframe, None
        self.dataframe = dataframe
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.parameters = parameters
        self.sql_hook_params = sql_hook_params or {}
        self.stopchurn_conn_id = stopchurn_conn_id
        self.snapshot_uri = snapshot_uri
        self.snapshot_conn_id = snapshot_conn_id
        self.created_at_column = created_at_column
        self.updated_at_column = updated_at_column
        self.initial_load = initial_load
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        # BaseOperator already has a dry_run() method: keep the flag under another name.
        self.sync_dry_run = dry_run
        self.accept_missing_snapshot = accept_missing_snapshot
        self.move_store_from = move_store_from
        self.max_delete_fraction = max_delete_fraction
        self.allow_empty_source = allow_empty_source
        self.allow_large_changes = allow_large_changes
        self.on_schema_change = on_schema_change
        self.on_rejected_rows = on_rejected_rows
        self.max_rejected_rows = max_rejected_rows
        self.max_concurrent_requests = max_concurrent_requests
        self.nest_dotted_columns = nest_dotted_columns
        self.decimal_as_string = decimal_as_string
        self.lock_wait_s = lock_wait_s
        self.lock_ttl_s = lock_ttl_s
        self._table: TableRef | None = None  # set by execute(), for lineage
        self._summary: dict[str, Any] | None = None
        self.json_columns = (json_columns,) if isinstance(json_columns, str) else tuple(json_columns)
        self.diff_location = diff_location
        self.state_schema = state_schema

    # --- execute ---------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        run_ms = time.time_ns() // 1_000_000
        try:
            in_warehouse = _check_diff_location(self.diff_location, self.sql, self.task_id) == "warehouse"
            hook = StopChurnHook(self.stopchurn_conn_id)
            options = self._options(hook, context)
            self._table = lineage.sync_table(hook.api_host, options.brand_id, options.table_name, self.outlets)
            store = SnapshotStore(self._snapshot_root(), options.brand_id, options.table_name)
            # Before anything is read or sent: does this worker's store hold what Airflow saw committed last?
            guard = CommitGuard.for_task(store, options.brand_id, options.table_name, context)
            with _refusal_recorded(store, options, "sync"):
                guard.check(
                    accept_missing_snapshot=_as_bool(self.accept_missing_snapshot, "accept_missing_snapshot"),
                    move_store_from=self._moved_from(options),
                    dry_run=options.dry_run,
                )
            sender = None if options.dry_run else hook.client
            try:
                summary = self._run(in_warehouse, store, sender, options, context, run_ms)
            finally:
                if not options.dry_run:
                    guard.record()  # failed runs too: a run may commit before it fails; never raises
                if sender is not None:
                    sender.close()  # release the keep-alive connections now, not when the worker exits
        except StopChurnError as err:
            if err.permanent:
                raise AirflowFailException(str(err)) from err
            raise AirflowException(str(err)) from err
        self._summary = summary.as_dict()
        lineage.attach_counts(self.outlets, context.get("outlet_events"), self._summary)
        return self._summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the SQL's tables (or the asset inlets) in, the StopChurn table out, the counts as facets."""
        return lineage.operator_lineage(self, self._table, self._summary)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return lineage.operator_lineage(self, self._table, None)

    def _options(self, hook: StopChurnHook, context: Context) -> SyncOptions:
        brand_id = self.brand_id if self.brand_id not in (None, "") else hook.brand_id
        if brand_id in (None, ""):
            raise StopChurnConfigError(
                f"No brand id: set brand_id on task {self.task_id!r} or `brand_id` in the extras of connection "
                f"{self.stopchurn_conn_id!r}."
            )
        try:
            brand = int(str(brand_id).strip())
        except ValueError:
            raise StopChurnConfigError(f"brand_id must be an integer, got {brand_id!r}.") from None
        ti = context.get("ti")
        holder = f"{self.dag_id}.{self.task_id} run {context.get('run_id')} try {getattr(ti, 'try_number', '?')}"
        run_key = f"{self.dag_id}.{self.task_id} run {context.get('run_id')} map {getattr(ti, 'map_index', -1)}"
        return SyncOptions(
            brand_id=brand,
            table_name=str(self.table_name),
            key_columns=tuple(self.primary_key),
            dry_run=self.sync_dry_run,
            allow_large_changes=_as_bool(self.allow_large_changes, "allow_large_changes"),
            holder=holder,
            run_key=run_key,
            run_info=run_info(self, context),
            **{name: getattr(self, name) for name in SYNC_OPTION_ARGUMENTS},
        )

    def _snapshot_root(self) -> Any:
        return snapshot_root(self.snapshot_uri, self.snapshot_conn_id)

    def _moved_from(self, options: SyncOptions) -> str | None:
        """The table store's location under ``move_store_from`` (the old ``snapshot_uri``), or None."""
        if self.move_store_from in (None, ""):
            return None
        old = snapshot_root(str(self.move_store_from).strip(), self.snapshot_conn_id)
        return SnapshotStore(old, options.brand_id, options.table_name).location

    def _run(
        self,
        in_warehouse: bool,
        store: SnapshotStore,
        sender: Sender | None,
        options: SyncOptions,
        context: Context,
        run_ms: int,
    ) -> SyncSummary:
        """One sync by the engine of ``diff_location``: the local diff, or the diff inside the warehouse."""
        if not in_warehouse:
            return run_sync(self._source(context), store, sender, options, run_ms=run_ms)
        from airflow_provider_stopchurn.pushdown import run_warehouse_sync

        if self.sql is None:  # checked by _check_diff_location
            raise StopChurnConfigError(f"{self.task_id}: diff_location='warehouse' needs a SQL source.")
        source = warehouse_source(
            str(self.sql_conn_id),
            self.sql,
            self.parameters,
            self.sql_hook_params,
            state_schema=str(self.state_schema).strip(),
        )
        return run_warehouse_sync(source, store, sender, options, run_ms=run_ms)

    def _source(self, context: Context) -> Source:
        """The source as a callable, so the engine reads it after it has finished any pending plan."""
        if self.sql is not None:
            sql, parameters, hook_params = self.sql, self.parameters, self.sql_hook_params
            conn_id = str(self.sql_conn_id)
            return lambda: read_sql(conn_id, sql, parameters, hook_params)
        factory = self._dataframe_factory
        if factory is not None:
            if _accepts_context(factory):
                return lambda: factory(context=context)
            return factory
        frame = self.dataframe
        return lambda: frame


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


# --- the diff inside the warehouse (diff_location="warehouse") -------------------------------------------------
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
    "(airflow_provider_stopchurn.pushdown.spark) in a task that owns the session, or diff_location='worker'"
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
    from airflow_provider_stopchurn.pushdown import DbApiWarehouse, DuckDBWarehouse, PostgresWarehouse

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
    from airflow_provider_stopchurn.pushdown import WarehouseSource
    from airflow_provider_stopchurn.sources import _with_literals

    statements = [sql] if isinstance(sql, str) else [str(s) for s in sql]
    if len(statements) != 1:
        raise StopChurnConfigError(
            f"diff_location='warehouse' needs `sql` to be one SELECT query, got a list of {len(statements)} statements."
        )
    query = statements[0]
    warehouse = warehouse_for_connection(conn_id, hook_params)
    if warehouse.dialect == "postgres":
        query = _with_literals(query, parameters)
    elif parameters:
        raise StopChurnConfigError(
            f"Query parameters with diff_location='warehouse' are only supported on PostgreSQL; connection {conn_id!r} "
            f"is a {warehouse.dialect} warehouse. Write the values into the query (a Jinja template renders them), "
            "or use diff_location='worker'."
        )
    return WarehouseSource(query, warehouse, state_schema=state_schema)


def snapshot_root(uri: Any, conn_id: str | None = None) -> Any:
    """The snapshot location of ``snapshot_uri`` (rendered), as a Path or an ObjectStoragePath.

    Empty: ``$AIRFLOW_HOME/stopchurn/snapshots``. The StopChurn page of the Airflow UI resolves a task's store the
    same way.
    """
    if not uri:
        home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
        return Path(home) / "stopchurn" / "snapshots"
    uri = str(uri)
    if "://" not in uri:
        return Path(uri).expanduser()
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StopChurnConfigError(
                f"snapshot_uri {uri!r} names a remote host; a file:// URL must be local (file:///path)."
            )
        return Path(unquote(parts.path))
    return ObjectStoragePath(uri, conn_id=conn_id)


#: Task retries unless the task, its DAG's default_args or Airflow's configuration say otherwise: a retry
#: settles what the failed try delivered and sends only the rest.
RETRY_DEFAULTS: dict[str, Any] = {
    "retries": 3,
    "retry_delay": timedelta(minutes=2),
    # Airflow 3.3 takes a multiplier (True would be 1: a constant delay); older versions took a bool
    "retry_exponential_backoff": (
        True
        if isinstance(inspect.signature(BaseOperator.__init__).parameters["retry_exponential_backoff"].default, bool)
        else 2.0
    ),
}


def _with_retry_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus :data:`RETRY_DEFAULTS` for what neither the task nor the DAG's default_args set.

    Airflow's metaclass passes the merged DAG/task default_args as ``default_args``; BaseOperator fills its own
    arguments from them only when they are absent from kwargs, so they must not be set here. A deployment-wide
    ``[core] default_task_retries`` (non-zero) is respected too.
    """
    given = set(kwargs) | set(kwargs.get("default_args") or {})
    if "retries" in given or _configured_default_retries():
        return kwargs
    return {**{k: v for k, v in RETRY_DEFAULTS.items() if k not in given}, **kwargs}


def _configured_default_retries() -> bool:
    try:
        from airflow.sdk.bases.operator import DEFAULT_RETRIES
    except ImportError:  # another Airflow layout: its BaseOperator applies the setting itself
        return False
    return bool(DEFAULT_RETRIES)


def _is_xcom_arg(value: Any) -> bool:
    return isinstance(value, XComArg)


def _accepts_context(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "context" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
#: what a false or unset param renders as ("{{ params.x }}" of None renders "None")
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off", "none"})


def _as_bool(value: Any, name: str = "value") -> bool:
    """An approval argument (``replace_snapshot``, ``allow_large_changes``...), often a rendered template.

    Raises ``StopChurnConfigError`` (permanent: a retry renders it the same) for text that is neither true nor
    false, so a typo never reads as a silent "no", nor ever as a "yes".
    """
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise StopChurnConfigError(
            f"{name} must be true or false, got {value[:40]!r}.\nNothing was read or written. Accepted: "
            "true/false, 1/0, yes/no, on/off (a template such as a DAG param's must render one of them)."
        )
    return bool(value)


# --- events and the historical export ---------------------------------------------------------------------------
# StopChurnEventOperator sends a source's rows as events, each event key once; StopChurnHistoricalExportOperator
# writes a table as StopChurn's historical-upload files and records it as the update operator's baseline. Their
# imports stay here, beside them, so the module's head is left to the update operator.
import contextlib  # noqa: E402
import datetime  # noqa: E402

from airflow_provider_stopchurn.events import (  # noqa: E402
    MAX_LOOKBACK,
    EventOptions,
    Window,
    event_store,
    run_events,
)
from airflow_provider_stopchurn.export import MAX_FILE_BYTES, ExportOptions, run_export  # noqa: E402
from airflow_provider_stopchurn.history import record_refusal  # noqa: E402
from airflow_provider_stopchurn.operators.commit_guard import SnapshotBehindError  # noqa: E402
from airflow_provider_stopchurn.options import RunInfo  # noqa: E402


def _storage_root(uri: Any, conn_id: str | None, default_folder: str) -> Any:
    """A state or output location: a local path, a ``file://`` URL, or any ObjectStoragePath URL with ``conn_id``.

    Empty: ``$AIRFLOW_HOME/stopchurn/<default_folder>`` (a single machine only).
    """
    if not uri:
        home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
        return Path(home) / "stopchurn" / default_folder
    uri = str(uri)
    if "://" not in uri:
        return Path(uri).expanduser()
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StopChurnConfigError(f"{uri!r} names a remote host; a file:// URL must be local (file:///path).")
        return Path(unquote(parts.path))
    return ObjectStoragePath(uri, conn_id=conn_id)


def _resolve_brand(brand_id: Any, hook: StopChurnHook, task_id: str, conn_id: str) -> int:
    value = brand_id if brand_id not in (None, "") else hook.brand_id
    if value in (None, ""):
        raise StopChurnConfigError(
            f"No brand id: set brand_id on task {task_id!r} or `brand_id` in the extras of connection {conn_id!r}."
        )
    try:
        return int(str(value).strip())
    except ValueError:
        raise StopChurnConfigError(f"brand_id must be an integer, got {value!r}.") from None


def _run_key(task: BaseOperator, context: Context) -> str:
    ti = context.get("ti")
    return f"{task.dag_id}.{task.task_id} run {context.get('run_id')} map {getattr(ti, 'map_index', -1)}"


def run_info(task: BaseOperator, context: Context) -> RunInfo:
    """The DAG, task, DAG run and try of a task's run, for the store's history."""
    ti = context.get("ti")
    try_number = getattr(ti, "try_number", None)
    run_id = context.get("run_id")
    return RunInfo(
        dag_id=task.dag_id,
        task_id=task.task_id,
        run_id=None if run_id is None else str(run_id),
        try_number=try_number if isinstance(try_number, int) and not isinstance(try_number, bool) else None,
    )


@contextlib.contextmanager
def _refusal_recorded(store: SnapshotStore, options: Any, kind: str) -> Iterator[None]:
    """Record a run the multi-worker guard refuses (``history.record_refusal``: only in a store that exists)."""
    try:
        yield
    except StopChurnError as err:
        if not getattr(options, "dry_run", False):
            record_refusal(store, options, kind, err)
        raise


def _holder(task: BaseOperator, context: Context) -> str:
    ti = context.get("ti")
    return f"{task.dag_id}.{task.task_id} run {context.get('run_id')} try {getattr(ti, 'try_number', '?')}"


class _SourceArguments:
    """The source arguments shared with ``StopChurnUpdateOperator``: a DataFrame, an XComArg, a callable, or SQL."""

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


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _fail(err: StopChurnError) -> AirflowException:
    """Permanent errors fail the task without a retry; the others let Airflow retry it."""
    if err.permanent:
        return AirflowFailException(str(err))
    return AirflowException(str(err))


class StopChurnEventOperator(_SourceArguments, BaseOperator):
    """Send the rows of a source as events to StopChurn's ``/client-data/event``, each event key once.

    Each row is one event ``{"brandId": .., "userId": "<user id>", "name": .., "value": ..}``. The delivery protocol
    is the update operator's: the plan is written before the first request, every acknowledged chunk is recorded,
    a crash or a retryable failure leaves the plan for the next try to finish (only its unacknowledged chunks are
    sent), a permanent failure settles it. A ledger of the event keys delivered inside the lookback window, kept in
    the state store, drops the events an overlapping query or a re-run returns again. A request whose answer was
    lost is sent again (the API has no idempotency key): its events are delivered at least once, every other
    event exactly once.

    :param user_id_column: column of each event's user id (sent as a string; integers become their digits).
    :param name: every event's name (templated); or ``name_column``, the column of each event's name.
    :param value_column: column sent as the event's ``value`` (left out when null); or ``value_columns``, columns
        sent as one object ``{"<column>": <value>}`` (``a.b`` columns nest). Neither: no value.
    :param event_key: columns that make an event unique; default: every column of the source.
    :param watermark_column: column of datetimes, dates or epoch ms to read incrementally by. A SQL source then
        gets the named query parameters ``since`` (a UTC datetime) and ``since_ms`` (epoch ms): the last delivered
        watermark minus ``lookback`` (1970-01-01 on the first run), e.g. ``WHERE created_at >= %(since)s``
        (PostgreSQL) or ``WHERE created_ms >= :since_ms`` (SQLite); a callable source gets ``since=`` if it takes
        it. Every source is also filtered to rows at or after ``since`` here. Naive values are UTC (a PostgreSQL
        session is pinned to UTC). A row dated after the run's clock is held until a later run's clock passes it;
        the watermark never passes the clock minus one minute.
    :param lookback: a ``datetime.timedelta`` (at most 719,162 days): late rows whose watermark is inside it are
        still sent, once.
    :param dataframe: a DataFrame, an ``XComArg``, or a callable returning one (called in ``execute``).
    :param sql: SQL query or ``.sql`` file (templated), run on ``sql_conn_id``. Exactly one of ``dataframe``/``sql``.
    :param sql_conn_id: any Airflow connection whose hook is a common.sql ``DbApiHook``.
    :param parameters: query parameters (templated); a dict when ``watermark_column`` is set.
    :param sql_hook_params: extra keyword arguments for the SQL hook.
    :param brand_id: StopChurn brand id (templated); None takes ``brand_id`` from the connection's extras.
    :param stopchurn_conn_id: the StopChurn connection.
    :param state_uri: where the ledger lives (templated): a local path or any ObjectStoragePath URL; default
        ``$AIRFLOW_HOME/stopchurn/snapshots`` (a single machine only; several workers need shared storage).
    :param state_conn_id: connection for the object store of ``state_uri``.
    :param stream_id: names this stream's ledger (templated); default ``<dag_id>.<task_id>``. Two tasks sending
        from the same source under one name share a ledger; renaming it starts a new one.
    :param chunk_size: at most this many events per request.
    :param max_chunk_bytes: at most this many bytes per request body.
    :param max_concurrent_requests: chunks in flight at once (1 = strictly sequential, in watermark order).
    :param dry_run: compute what would be sent and return the counts with up to 5 sample events; send and write
        nothing.
    :param nest_dotted_columns: with ``value_columns``, turn columns named ``a.b`` into nested objects.
    :param json_columns: text columns holding JSON (a value, or part of the event key), parsed and sent nested, as
        the update operator's; reformatted JSON text is the same event.
    :param lock_wait_s: while another run sends the same stream, wait up to this many seconds for its lock
        (polling with backoff), then fail as retryable.
    :param lock_ttl_s: the stream lock's lease, in seconds (default 900): a heartbeat renews it while the run
        works. A run killed on another machine (where its process cannot be seen) blocks the stream until its
        lease expires; on the same host it is broken at once. It must exceed a request's timeouts by a tenth of it.
    Unless the task or its DAG's ``default_args`` set them (or ``[core] default_task_retries`` is set), the
    operator retries: ``retries=3``, ``retry_delay=2 minutes``, doubling (``retry_exponential_backoff=2.0``), as
    the update operator does; a retry finishes the plan an earlier try left and sends only its unacknowledged chunks.
    """

    template_fields: Sequence[str] = ("brand_id", "name", "sql", "parameters", "state_uri", "dataframe", "stream_id")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    ui_color = "#3c6df0"

    def __init__(  # noqa: PLR0913 - keyword-only operator arguments, the EventOptions fields among them
        self,
        *,
        user_id_column: str,
        name: str | None = None,
        name_column: str | None = None,
        value_column: str | None = None,
        value_columns: Sequence[str] | None = None,
        event_key: str | Sequence[str] | None = None,
        watermark_column: str | None = None,
        lookback: datetime.timedelta | None = None,
        dataframe: Any = None,
        sql: str | list[str] | None = None,
        sql_conn_id: str | None = None,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        sql_hook_params: dict[str, Any] | None = None,
        brand_id: int | str | None = None,
        stopchurn_conn_id: str = StopChurnHook.default_conn_name,
        state_uri: str | None = None,
        state_conn_id: str | None = None,
        stream_id: str | None = None,
        chunk_size: int = 1000,
        max_chunk_bytes: int = 5_000_000,
        max_concurrent_requests: int = 4,
        dry_run: bool = False,
        nest_dotted_columns: bool = True,
        json_columns: Sequence[str] = (),
        lock_wait_s: float = 300.0,
        lock_ttl_s: float = LOCK_TTL_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**_with_retry_defaults(kwargs))
        self._set_source(self.task_id, dataframe, sql, sql_conn_id, parameters, sql_hook_params)
        if (name is None) == (name_column is None):
            raise ValueError(f"{self.task_id}: pass exactly one of `name` or `name_column`.")
        if value_column is not None and value_columns is not None:
            raise ValueError(f"{self.task_id}: pass at most one of `value_column` or `value_columns`.")
        self.user_id_column = user_id_column
        self.name = name
        self.name_column = name_column
        self.value_column = value_column
        self.value_columns = None if value_columns is None else list(value_columns)
        self.event_key = [event_key] if isinstance(event_key, str) else (None if event_key is None else list(event_key))
        self.watermark_column = watermark_column
        self.lookback = lookback if lookback is not None else datetime.timedelta(0)
        if isinstance(self.lookback, datetime.timedelta) and self.lookback > MAX_LOOKBACK:
            # refused at DAG parse time: such a window starts before the first datetime on every run but the first
            raise ValueError(
                f"{self.task_id}: `lookback` must be at most {MAX_LOOKBACK.days} days (back from 1970 to the year 1), "
                f"got {self.lookback!r}."
            )
        self.brand_id = brand_id
        self.stopchurn_conn_id = stopchurn_conn_id
        self.state_uri = state_uri
        self.state_conn_id = state_conn_id
        self.stream_id = stream_id
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.max_concurrent_requests = max_concurrent_requests
        # BaseOperator already has a dry_run() method: keep the flag under another name.
        self.events_dry_run = dry_run
        self.nest_dotted_columns = nest_dotted_columns
        self.json_columns = (json_columns,) if isinstance(json_columns, str) else tuple(json_columns)
        self.lock_wait_s = lock_wait_s
        self.lock_ttl_s = lock_ttl_s

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            hook = StopChurnHook(self.stopchurn_conn_id)
            options = self.event_options(hook, context)
            stream = str(self.stream_id or f"{self.dag_id}.{self.task_id}")
            store = event_store(
                _storage_root(self.state_uri, self.state_conn_id, "snapshots"), options.brand_id, stream
            )
            guard = CommitGuard.for_task(store, options.brand_id, f"events.{stream}", context)
            with _refusal_recorded(store, options, "events"):
                _check_event_guard(guard)
            sender = None if options.dry_run else hook.client

            def read(window: Window) -> Any:
                return self._read(context, window.parameters() if self.watermark_column else None)

            try:
                summary = run_events(read, store, sender, options, stream=stream)
            finally:
                if not options.dry_run:
                    guard.record()
                if sender is not None:
                    sender.close()
        except StopChurnError as err:
            raise _fail(err) from err
        return summary.as_dict()

    def event_options(self, hook: StopChurnHook, context: Context) -> EventOptions:
        """The engine's options from this task's arguments (validated by ``EventOptions``)."""
        return EventOptions(
            brand_id=_resolve_brand(self.brand_id, hook, self.task_id, self.stopchurn_conn_id),
            user_id_column=self.user_id_column,
            name=None if self.name is None else str(self.name),
            name_column=self.name_column,
            value_column=self.value_column,
            value_columns=None if self.value_columns is None else tuple(self.value_columns),
            event_key=None if self.event_key is None else tuple(self.event_key),
            watermark_column=self.watermark_column,
            lookback=self.lookback,
            chunk_size=self.chunk_size,
            max_chunk_bytes=self.max_chunk_bytes,
            max_concurrent_requests=self.max_concurrent_requests,
            dry_run=self.events_dry_run,
            nest_dotted_columns=self.nest_dotted_columns,
            json_columns=self.json_columns,
            holder=_holder(self, context),
            run_key=_run_key(self, context),
            lock_wait_s=self.lock_wait_s,
            lock_ttl_s=self.lock_ttl_s,
            run_info=run_info(self, context),
        )


def _check_event_guard(guard: CommitGuard) -> None:
    """The multi-worker guard, in the events' terms: a worker missing the ledger would send everything again."""
    try:
        guard.check()
    except SnapshotBehindError as err:
        raise SnapshotBehindError(
            f"This worker's event ledger at {guard.store.location} is missing or older than the one Airflow recorded "
            f"(Variable {guard.key!r}). Nothing was sent: going on would send again every event the ledger "
            "recorded as delivered. Point state_uri at storage every worker shares (e.g. s3://<bucket>/stopchurn "
            "with state_conn_id), or copy the ledger folder back; to start over on purpose, delete that Variable."
        ) from err


class StopChurnHistoricalExportOperator(_SourceArguments, BaseOperator):
    """Write a table as StopChurn's historical-upload files and record it as the update operator's baseline.

    The files (``part-00001.json``, ...; each one JSON array of ``{"data": <row>, "createdAt": <ms>, "updatedAt":
    <ms>}``, never over ``max_file_bytes``) go under ``<output_uri>/<brand_id>/<table_name>/<run>/`` with a
    ``manifest.json`` (rows, bytes and SHA-256 of each file) written last. The rows are encoded exactly as
    ``StopChurnUpdateOperator`` encodes them (same ids, values and ``user``-table contract), and the exported table
    is committed as that operator's snapshot (same ``createdAt`` values), so a ``StopChurnUpdateOperator`` on the
    same brand, table and ``snapshot_uri`` sends only the changes made after the export. Upload the files in
    StopChurn's Back Office before that update run.

    :param table_name: StopChurn table name (templated).
    :param primary_key: key column, or a list of columns (as for ``StopChurnUpdateOperator``).
    :param dataframe: a DataFrame, an ``XComArg``, or a callable returning one (called in ``execute``).
    :param sql: SQL query or ``.sql`` file (templated), run on ``sql_conn_id``. Exactly one of ``dataframe``/``sql``.
    :param sql_conn_id: any Airflow connection whose hook is a common.sql ``DbApiHook``.
    :param parameters: query parameters (templated).
    :param sql_hook_params: extra keyword arguments for the SQL hook.
    :param created_at_column: column for ``createdAt`` (datetime or epoch ms); default: the export's time.
    :param updated_at_column: column for ``updatedAt``; default: the export's time.
    :param output_uri: where the files go (templated): a local path or any ObjectStoragePath URL
        (``s3://bucket/prefix``); default ``$AIRFLOW_HOME/stopchurn/exports``.
    :param output_conn_id: connection for the object store of ``output_uri``.
    :param max_file_bytes: the largest file written (StopChurn takes at most 2 GB per file).
    :param snapshot_uri: the update operator's snapshot location (templated), default as there.
    :param snapshot_conn_id: connection for the object store of ``snapshot_uri``.
    :param replace_snapshot: replace a snapshot the store already holds (templated). Default: refuse, since the
        next update run would then compare against the export and skip the changes StopChurn has not seen. When
        replacing, an unfinished update plan is settled first, and the rows of the replaced snapshot that the export
        lacks stay in the new one, so that the next update run deletes them at StopChurn.
    :param lock_wait_s: while another run syncs the same table, wait up to this many seconds for its lock
        (polling with backoff), then fail as retryable.
    :param lock_ttl_s: the table lock's lease, in seconds (default 900): a heartbeat renews it while the run
        works. A run killed on another machine (where its process cannot be seen) blocks the table until its
        lease expires; on the same host it is broken at once. It must exceed a request's timeouts by a tenth of it.
    :param brand_id: StopChurn brand id (templated); None takes ``brand_id`` from the connection's extras.
    :param stopchurn_conn_id: the StopChurn connection (read for its ``brand_id`` only; nothing is sent).
    :param nest_dotted_columns: turn columns named ``a.b`` into nested objects ``{"a": {"b": ...}}``.
    :param decimal_as_string: write decimals as JSON strings instead of exact JSON numbers.
    :param json_columns: text columns holding JSON, parsed and written nested (as the update operator's).
    Unless the task or its DAG's ``default_args`` set them (or ``[core] default_task_retries`` is set), the
    operator retries: ``retries=3``, ``retry_delay=2 minutes``, doubling (``retry_exponential_backoff=2.0``), as
    the update operator does; a retry of the same DAG run writes the same folder again.
    """

    template_fields: Sequence[str] = (
        "table_name",
        "brand_id",
        "sql",
        "parameters",
        "output_uri",
        "snapshot_uri",
        "dataframe",
        "replace_snapshot",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    ui_color = "#3c6df0"

    def __init__(  # noqa: PLR0913 - keyword-only operator arguments
        self,
        *,
        table_name: str,
        primary_key: str | Sequence[str] = "id",
        dataframe: Any = None,
        sql: str | list[str] | None = None,
        sql_conn_id: str | None = None,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        sql_hook_params: dict[str, Any] | None = None,
        created_at_column: str | None = None,
        updated_at_column: str | None = None,
        output_uri: str | None = None,
        output_conn_id: str | None = None,
        max_file_bytes: int = MAX_FILE_BYTES,
        snapshot_uri: str | None = None,
        snapshot_conn_id: str | None = None,
        replace_snapshot: bool | str = False,
        brand_id: int | str | None = None,
        stopchurn_conn_id: str = StopChurnHook.default_conn_name,
        nest_dotted_columns: bool = True,
        decimal_as_string: bool = False,
        json_columns: Sequence[str] = (),
        lock_wait_s: float = 300.0,
        lock_ttl_s: float = LOCK_TTL_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**_with_retry_defaults(kwargs))
        self._set_source(self.task_id, dataframe, sql, sql_conn_id, parameters, sql_hook_params)
        self.table_name = table_name
        self.primary_key = [primary_key] if isinstance(primary_key, str) else list(primary_key)
        self.created_at_column = created_at_column
        self.updated_at_column = updated_at_column
        self.output_uri = output_uri
        self.output_conn_id = output_conn_id
        self.max_file_bytes = max_file_bytes
        self.snapshot_uri = snapshot_uri
        self.snapshot_conn_id = snapshot_conn_id
        self.replace_snapshot = replace_snapshot
        self.brand_id = brand_id
        self.stopchurn_conn_id = stopchurn_conn_id
        self.nest_dotted_columns = nest_dotted_columns
        self.decimal_as_string = decimal_as_string
        self.json_columns = (json_columns,) if isinstance(json_columns, str) else tuple(json_columns)
        self.lock_wait_s = lock_wait_s
        self.lock_ttl_s = lock_ttl_s

    def execute(self, context: Context) -> dict[str, Any]:
        run_ms = time.time_ns() // 1_000_000
        try:
            hook = StopChurnHook(self.stopchurn_conn_id)
            options = ExportOptions(
                brand_id=_resolve_brand(self.brand_id, hook, self.task_id, self.stopchurn_conn_id),
                table_name=str(self.table_name),
                key_columns=tuple(self.primary_key),
                created_at_column=self.created_at_column,
                updated_at_column=self.updated_at_column,
                max_file_bytes=self.max_file_bytes,
                replace_snapshot=_as_bool(self.replace_snapshot, "replace_snapshot"),
                nest_dotted_columns=self.nest_dotted_columns,
                decimal_as_string=self.decimal_as_string,
                json_columns=self.json_columns,
                run_id=str(context.get("run_id") or "manual"),
                run_key=_run_key(self, context),
                holder=_holder(self, context),
                lock_wait_s=self.lock_wait_s,
                lock_ttl_s=self.lock_ttl_s,
                run_info=run_info(self, context),
            )
            root = _storage_root(self.snapshot_uri, self.snapshot_conn_id, "snapshots")
            store = SnapshotStore(root, options.brand_id, options.table_name)
            guard = CommitGuard.for_task(store, options.brand_id, options.table_name, context)
            with _refusal_recorded(store, options, "export"):
                try:
                    guard.check(accept_missing_snapshot=options.replace_snapshot)
                except SnapshotBehindError as err:
                    raise SnapshotBehindError(
                        "Export refused: this worker does not see the snapshot Airflow recorded for the table.\n"
                        f"Airflow recorded a snapshot of brand {options.brand_id} table {options.table_name!r} "
                        f"committed at {store.location} (Variable {guard.key!r}) that this worker does not see: "
                        "updates have been flowing from another worker's store. Nothing was written.\nPoint "
                        "snapshot_uri at the shared store, or set replace_snapshot=True to replace that baseline "
                        "with this export on purpose."
                    ) from err
            output = _storage_root(self.output_uri, self.output_conn_id, "exports")
            try:
                summary = run_export(lambda: self._read(context), store, output, options, run_ms=run_ms)
            finally:
                guard.record()
        except StopChurnError as err:
            raise _fail(err) from err
        return summary.as_dict()
