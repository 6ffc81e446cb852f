"""StopChurnHistoricalExportOperator: a table as StopChurn's historical-upload files, recorded as the baseline."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.options import MAX_FILE_BYTES, ExportOptions
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.operators._common import (
    StopChurnBaseOperator,
    _as_bool,
    _fail,
    _refusal_recorded,
    _storage_root,
)
from airflow_provider_stopchurn.operators.commit_guard import CommitGuard, SnapshotBehindError
from airflow_provider_stopchurn.options import LOCK_TTL_S
from airflow_provider_stopchurn.store import SnapshotStore

if TYPE_CHECKING:
    from airflow_provider_stopchurn.hooks._compat import Context


class StopChurnHistoricalExportOperator(StopChurnBaseOperator):
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
        super().__init__(**self._with_retry_defaults(kwargs))
        self._set_source(self.task_id, dataframe, sql, sql_conn_id, parameters, sql_hook_params)
        self._set_table_arguments(
            table_name, primary_key, snapshot_uri, snapshot_conn_id, created_at_column, updated_at_column
        )
        self._set_run_arguments(brand_id, stopchurn_conn_id, nest_dotted_columns, json_columns, lock_wait_s, lock_ttl_s)
        self.output_uri = output_uri
        self.output_conn_id = output_conn_id
        self.max_file_bytes = max_file_bytes
        self.replace_snapshot = replace_snapshot
        self.decimal_as_string = decimal_as_string

    def execute(self, context: Context) -> dict[str, Any]:
        run_ms = time.time_ns() // 1_000_000
        try:
            hook = StopChurnHook(self.stopchurn_conn_id)
            options = ExportOptions(
                **self._run_fields(hook, context),
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
                lock_wait_s=self.lock_wait_s,
                lock_ttl_s=self.lock_ttl_s,
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
