"""StopChurnUpdateOperator: keep a StopChurn table in step with a DataFrame or a SQL query."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from airflow_provider_stopchurn.assets import TableRef
from airflow_provider_stopchurn.exceptions import StopChurnConfigError, StopChurnError
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.operators import lineage
from airflow_provider_stopchurn.operators._common import (
    StopChurnBaseOperator,
    _as_bool,
    _fail,
    _refusal_recorded,
    snapshot_root,
)
from airflow_provider_stopchurn.operators._warehouse import (
    DEFAULT_STATE_SCHEMA,
    _check_diff_location,
    _is_template,
    warehouse_source,
)
from airflow_provider_stopchurn.operators.commit_guard import CommitGuard
from airflow_provider_stopchurn.options import LOCK_TTL_S, SyncOptions
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import SyncSummary, run_sync

if TYPE_CHECKING:
    from airflow_provider_stopchurn.hooks._compat import Context
    from airflow_provider_stopchurn.update.deliver import Sender


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


class StopChurnUpdateOperator(StopChurnBaseOperator):
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
        super().__init__(**self._with_retry_defaults(kwargs))
        self._set_source(self.task_id, dataframe, sql, sql_conn_id, parameters, sql_hook_params)
        if initial_load not in ("send", "baseline"):
            raise ValueError(f"{self.task_id}: initial_load must be 'send' or 'baseline', got {initial_load!r}.")
        if not _is_template(diff_location):  # a template is checked once rendered, in execute()
            _check_diff_location(diff_location, sql, self.task_id)
        if not isinstance(state_schema, str) or not state_schema.strip():
            raise ValueError(f"{self.task_id}: state_schema must be a schema name, got {state_schema!r}.")
        # copied after this operator's own checks: a DAG with several mistakes is told of those first
        self._set_table_arguments(
            table_name, primary_key, snapshot_uri, snapshot_conn_id, created_at_column, updated_at_column
        )
        self._set_run_arguments(brand_id, stopchurn_conn_id, nest_dotted_columns, json_columns, lock_wait_s, lock_ttl_s)
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
        self.decimal_as_string = decimal_as_string
        self._table: TableRef | None = None  # set by execute(), for lineage
        self._summary: dict[str, Any] | None = None
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
            raise _fail(err) from err
        self._summary = summary.as_dict()
        lineage.attach_counts(self.outlets, context.get("outlet_events"), self._summary)
        return self._summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the SQL's tables (or the asset inlets) in, the StopChurn table out, the counts as facets."""
        return lineage.operator_lineage(self, self._table, self._summary)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        return lineage.operator_lineage(self, self._table, None)

    def _options(self, hook: StopChurnHook, context: Context) -> SyncOptions:
        return SyncOptions(
            **self._run_fields(hook, context),
            table_name=str(self.table_name),
            key_columns=tuple(self.primary_key),
            dry_run=self.sync_dry_run,
            allow_large_changes=_as_bool(self.allow_large_changes, "allow_large_changes"),
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
        from airflow_provider_stopchurn.warehouse import run_warehouse_sync

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
