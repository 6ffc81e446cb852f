"""StopChurnUpdateOperator: keep a StopChurn table in step with a DataFrame or a SQL query."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from airflow_provider_stopchurn.exceptions import StopChurnConfigError, StopChurnError
from airflow_provider_stopchurn.hooks._compat import (
    AirflowException,
    AirflowFailException,
    BaseHook,
    BaseOperator,
    ObjectStoragePath,
    XComArg,
)
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.operators.commit_guard import CommitGuard
from airflow_provider_stopchurn.snapshot import SnapshotStore
from airflow_provider_stopchurn.sources import read_sql_frame
from airflow_provider_stopchurn.sync import SyncOptions, run_sync

if TYPE_CHECKING:
    import pandas as pd

    from airflow_provider_stopchurn.hooks._compat import Context


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
        "lock_ttl_s",
        "progress_interval_s",
    }
)


class StopChurnUpdateOperator(BaseOperator):
    """Send the changes of a table since the last run to StopChurn's ``/client-data/update``.

    Each run reads the source (a DataFrame, an upstream task's XCom, a callable returning a DataFrame, or a SQL
    query on any Airflow SQL connection), diffs it against the snapshot it delivered last time, sends only the
    inserted, updated and deleted rows in bounded chunks, and commits the new snapshot once StopChurn has
    acknowledged every chunk. An interrupted delivery is resumed by the next try, without resending
    acknowledged chunks.

    Every commit is also recorded in Airflow's metadata database (an Airflow Variable named
    ``stopchurn_commit__<brand_id>__<table>__<hash of the snapshot location>``: snapshot version, row count,
    location; never a key). Before a run reads the source, the store must hold the recorded snapshot or a newer
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
    :param dataframe: a pandas DataFrame, an ``XComArg`` of an upstream task, or a callable returning a DataFrame
        (called in ``execute``, never at DAG parse time; it receives ``context=`` if it accepts it).
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
        max_delete_fraction: float = 0.5,
        allow_empty_source: bool = False,
        allow_large_changes: bool | str = False,
        on_schema_change: str = "fail",
        on_rejected_rows: str = "fail",
        max_rejected_rows: int = 100,
        max_concurrent_requests: int = 4,
        nest_dotted_columns: bool = True,
        decimal_as_string: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (dataframe is None) == (sql is None):
            raise ValueError(f"{self.task_id}: pass exactly one of `dataframe` or `sql`.")
        if sql is not None and not sql_conn_id:
            raise ValueError(f"{self.task_id}: `sql` needs `sql_conn_id`.")
        if initial_load not in ("send", "baseline"):
            raise ValueError(f"{self.task_id}: initial_load must be 'send' or 'baseline', got {initial_load!r}.")
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
        self.max_delete_fraction = max_delete_fraction
        self.allow_empty_source = allow_empty_source
        self.allow_large_changes = allow_large_changes
        self.on_schema_change = on_schema_change
        self.on_rejected_rows = on_rejected_rows
        self.max_rejected_rows = max_rejected_rows
        self.max_concurrent_requests = max_concurrent_requests
        self.nest_dotted_columns = nest_dotted_columns
        self.decimal_as_string = decimal_as_string

    # --- execute ---------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        run_ms = time.time_ns() // 1_000_000
        try:
            hook = StopChurnHook(self.stopchurn_conn_id)
            options = self._options(hook, context)
            store = SnapshotStore(self._snapshot_root(), options.brand_id, options.table_name)
            # Before anything is read or sent: does this worker's store hold what Airflow saw committed last?
            guard = CommitGuard.for_task(store, options.brand_id, options.table_name, context)
            guard.check(accept_missing_snapshot=_as_bool(self.accept_missing_snapshot))
            sender = None if options.dry_run else hook.client
            try:
                summary = run_sync(self._source(context), store, sender, options, run_ms=run_ms)
            finally:
                if not options.dry_run:
                    guard.record()  # failed runs too: a run may commit before it fails; never raises
                if sender is not None:
                    sender.close()  # release the keep-alive connections now, not when the worker exits
        except StopChurnError as err:
            if err.permanent:
                raise AirflowFailException(str(err)) from err
            raise AirflowException(str(err)) from err
        return summary.as_dict()

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
            allow_large_changes=_as_bool(self.allow_large_changes),
            holder=holder,
            run_key=run_key,
            **{name: getattr(self, name) for name in SYNC_OPTION_ARGUMENTS},
        )

    def _snapshot_root(self) -> Any:
        uri = self.snapshot_uri
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
        return ObjectStoragePath(uri, conn_id=self.snapshot_conn_id)

    def _source(self, context: Context) -> Callable[[], pd.DataFrame]:
        """The source as a callable, so the engine reads it after it has finished any pending plan."""
        if self.sql is not None:
            sql, parameters = self.sql, self.parameters
            conn_id = str(self.sql_conn_id)

            def read() -> pd.DataFrame:
                hook = BaseHook.get_connection(conn_id).get_hook(hook_params=self.sql_hook_params)
                if not hasattr(hook, "get_df"):
                    raise StopChurnConfigError(
                        f"Connection {conn_id!r} has no SQL hook with get_df() (got {type(hook).__name__})."
                    )
                return read_sql_frame(hook, sql, parameters)

            return read
        factory = self._dataframe_factory
        if factory is not None:
            if _accepts_context(factory):
                return lambda: factory(context=context)
            return factory
        frame = self.dataframe
        return lambda: frame


def _is_xcom_arg(value: Any) -> bool:
    return isinstance(value, XComArg)


def _accepts_context(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "context" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)
