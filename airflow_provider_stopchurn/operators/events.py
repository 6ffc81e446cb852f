"""StopChurnEventOperator: send a source's rows as events to StopChurn, each event key once."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import Window, event_store
from airflow_provider_stopchurn.events.options import MAX_LOOKBACK, EventOptions
from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
from airflow_provider_stopchurn.operators._common import StopChurnBaseOperator, _fail, _refusal_recorded, _storage_root
from airflow_provider_stopchurn.operators.commit_guard import CommitGuard, SnapshotBehindError
from airflow_provider_stopchurn.options import LOCK_TTL_S

if TYPE_CHECKING:
    from airflow_provider_stopchurn.hooks._compat import Context


class StopChurnEventOperator(StopChurnBaseOperator):
    """Send the rows of a source as events to StopChurn's ``/client-data/event``, each event key once.

    Each row is one event ``{"brandId": .., "userId": "<user id>", "name": .., "value": ..}``. The delivery protocol
    is the update operator's: the plan is written before the first request, every acknowledged chunk is recorded,
    a crash or a retryable failure leaves the plan for the next try to finish (only its unacknowledged chunks are
    sent), a permanent failure settles it. A ledger of the event keys delivered inside the lookback window, kept in
    the state store, drops the events an overlapping query or a re-run returns again. A request whose answer was
    lost is sent again (the API has no idempotency key): its events are delivered at least once, every other
    event exactly once.

    :param user_id_column: column of each event's user id (sent as a string; integers become their digits).
    :param name: every event's name (templated). Exactly one of ``name`` and ``name_column``.
    :param name_column: the column of each event's name, instead of one ``name`` for all.
    :param value_column: column sent as the event's ``value`` (left out when null). At most one of
        ``value_column`` and ``value_columns``; neither: no value.
    :param value_columns: columns sent as one object ``{"<column>": <value>}`` as the event's ``value`` (``a.b``
        columns nest).
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
        super().__init__(**self._with_retry_defaults(kwargs))
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
        # copied after this operator's own checks: a DAG with several mistakes is told of those first
        self._set_run_arguments(brand_id, stopchurn_conn_id, nest_dotted_columns, json_columns, lock_wait_s, lock_ttl_s)
        self.state_uri = state_uri
        self.state_conn_id = state_conn_id
        self.stream_id = stream_id
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.max_concurrent_requests = max_concurrent_requests
        # BaseOperator already has a dry_run() method: keep the flag under another name.
        self.events_dry_run = dry_run

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
            **self._run_fields(hook, context),
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
            lock_wait_s=self.lock_wait_s,
            lock_ttl_s=self.lock_ttl_s,
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
