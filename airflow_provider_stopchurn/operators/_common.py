"""What the three operators share: their base class, retry defaults, storage locations, the brand, a run's names,
errors."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from airflow_provider_stopchurn.exceptions import StopChurnConfigError, StopChurnError
from airflow_provider_stopchurn.hooks._compat import (
    AirflowException,
    AirflowFailException,
    BaseOperator,
    ObjectStoragePath,
)
from airflow_provider_stopchurn.operators._source import _SourceArguments
from airflow_provider_stopchurn.options import RunInfo
from airflow_provider_stopchurn.source.read_ahead import cancel_reads
from airflow_provider_stopchurn.store.history import record_refusal

if TYPE_CHECKING:
    from airflow_provider_stopchurn.hooks._compat import Context
    from airflow_provider_stopchurn.hooks.stopchurn import StopChurnHook
    from airflow_provider_stopchurn.store import SnapshotStore


def snapshot_root(uri: Any, conn_id: str | None = None) -> Any:
    """The snapshot location of ``snapshot_uri`` (rendered), as a Path or an ObjectStoragePath.

    Empty: ``$AIRFLOW_HOME/stopchurn/snapshots``. The StopChurn page of the Airflow UI resolves a task's store the
    same way.
    """
    return _storage_root(uri, conn_id, "snapshots", argument="snapshot_uri ")


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


def _storage_root(uri: Any, conn_id: str | None, default_folder: str, *, argument: str = "") -> Any:
    """A state or output location: a local path, a ``file://`` URL, or any ObjectStoragePath URL with ``conn_id``.

    Empty: ``$AIRFLOW_HOME/stopchurn/<default_folder>`` (a single machine only).

    :param argument: what an error names the location by, with a trailing space (``"snapshot_uri "``).
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
            raise StopChurnConfigError(
                f"{argument}{uri!r} names a remote host; a file:// URL must be local (file:///path)."
            )
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


def _fail(err: StopChurnError) -> AirflowException:
    """Permanent errors fail the task without a retry; the others let Airflow retry it."""
    if err.permanent:
        return AirflowFailException(str(err))
    return AirflowException(str(err))


class StopChurnBaseOperator(_SourceArguments, BaseOperator):
    """The base of the three StopChurn operators, an Airflow ``BaseOperator``: their source
    (:class:`._source._SourceArguments`), its SQL templating, their retry defaults, their colour in Airflow's UI,
    and the fields every engine's options take from a run."""

    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    ui_color = "#3c6df0"

    #: each operator's ``__init__`` passes BaseOperator's arguments through it: ``RETRY_DEFAULTS`` where unset
    _with_retry_defaults = staticmethod(_with_retry_defaults)

    def on_kill(self) -> None:
        """Cancel the source's running query: Airflow 3 calls this on SIGTERM and raises nothing in the task's
        thread, so the read then fails with the driver's error instead of running its query to the end."""
        cancel_reads()

    def _set_run_arguments(
        self,
        brand_id: Any,
        stopchurn_conn_id: str,
        nest_dotted_columns: bool,
        json_columns: Sequence[str],
        lock_wait_s: float,
        lock_ttl_s: float,
    ) -> None:
        """Keep the arguments the three operators take alike: the brand and the StopChurn connection, how dotted
        and JSON columns are read, and the lock's wait and lease."""
        self.brand_id = brand_id
        self.stopchurn_conn_id = stopchurn_conn_id
        self.nest_dotted_columns = nest_dotted_columns
        self.json_columns = (json_columns,) if isinstance(json_columns, str) else tuple(json_columns)
        self.lock_wait_s = lock_wait_s
        self.lock_ttl_s = lock_ttl_s

    def _set_table_arguments(
        self,
        table_name: str,
        primary_key: str | Sequence[str],
        snapshot_uri: str | None,
        snapshot_conn_id: str | None,
        created_at_column: str | None,
        updated_at_column: str | None,
    ) -> None:
        """Keep the arguments of the two operators that keep a table's snapshot (update and export): the table, its
        key (one column or several), the snapshot's location and the timestamp columns."""
        self.table_name = table_name
        self.primary_key = [primary_key] if isinstance(primary_key, str) else list(primary_key)
        self.snapshot_uri = snapshot_uri
        self.snapshot_conn_id = snapshot_conn_id
        self.created_at_column = created_at_column
        self.updated_at_column = updated_at_column

    def _run_fields(self, hook: StopChurnHook, context: Context) -> dict[str, Any]:
        """The fields every engine's options take from a run: ``brand_id`` (the task's, else the connection's
        extras), the lock ``holder``, the history's ``run_key`` and ``run_info``."""
        return {
            "brand_id": _resolve_brand(self.brand_id, hook, self.task_id, self.stopchurn_conn_id),
            "holder": _holder(self, context),
            "run_key": _run_key(self, context),
            "run_info": run_info(self, context),
        }
