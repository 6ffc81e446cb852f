"""Run history: every run that ends leaves one record in its store, failed runs included (no Airflow import).

The person on call asks what last night's run sent, and how it ended. :func:`recorded` wraps a run and, when the
run ends (a success, nothing changed included, or a failure: a safeguard, a refused key, a busy lock, a rejected
chunk, a source error), appends a record to the store's bounded history (:meth:`SnapshotStore.append_history`):
one small file per record, so records of runs ending together never overwrite each other. A run that never held
the table's lock (it was busy: the store belongs to another run), or whose lock was taken over, only adds its
own record file: it reads no committed version (which would not be its own) and prunes nothing, unless such runs
piled up to twice the bound. Record files sort in the order they were written, whatever a worker's clock says.
A record never holds the API key: only counts, names, times and the first line of a failure's message, with any
password a source's error quotes (a URL's ``user:password@``, a DSN's ``password=``) taken out. A run stopped by
Airflow (``execution_timeout``, SIGTERM) is recorded as failed; a run killed outright records nothing, and its
retry's record says what it settled of it.

The record's fields (a field a record lacks reads as null; :func:`http_retries` reads records written before
``retries`` was renamed):

- every kind: ``kind`` (``sync``, ``events``, ``export``, ``settle``, ``rebaseline``), ``status`` (``success`` /
  ``failed``), ``error`` (first line) and ``error_type``, ``brand_id``, ``table_name``, ``run_key``, ``holder``,
  ``dag_id``, ``task_id``, ``run_id``, ``try_number``, ``started_at``, ``finished_at``, ``duration_s``,
  ``chunks``, ``bytes``, ``requests``, ``http_retries``, ``settled_chunks``, ``version`` and ``rows`` (the
  committed snapshot after the run; null when the run never held the lock);
- sync (and settle, rebaseline): ``inserted``, ``updated``, ``deleted``, ``unchanged``, ``rejected``, ``baseline``,
  ``schema_change``, ``settled_from_other_runs``, ``never_sent`` and ``unacknowledged`` (updates of a failed
  delivery never sent vs sent without an acknowledgement), ``approved_deletes`` (null, or ``run_id``, ``deletes``
  and ``rows_before`` of a mass delete let through by ``allow_large_changes``);
- events: ``events_sent``, ``duplicates``, ``before_window``, ``held_future``, ``watermark`` (ISO text or null),
  ``ledger_size``;
- export: ``rows_exported``, ``files``, ``bytes_exported``, ``replaced_snapshot``, ``kept_rows``.

The on-call commands (``stopchurn settle`` / ``rebaseline``) record their commits too, through :func:`record`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict, Unpack

from airflow_provider_stopchurn.options import NO_RUN_INFO, RunInfo
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.store.lock import TableLock

log = logging.getLogger(__name__)

#: The counts a sync's record copies from its ``SyncSummary`` (``retries`` becomes ``http_retries``,
#: ``quarantined`` becomes ``rejected``).
SUMMARY_FIELDS = (
    "inserted",
    "updated",
    "deleted",
    "unchanged",
    "chunks",
    "bytes",
    "requests",
    "retries",
    "settled_chunks",
    "quarantined",
    "baseline",
    "schema_change",
    "settled_from_other_runs",
    "never_sent",
    "unacknowledged",
    "approved_deletes",
)
#: Counts every record has (0 when a run did not get that far).
_COMMON_COUNTS = ("chunks", "bytes", "requests", "http_retries", "settled_chunks")
#: Counts of a sync record (and of the on-call commands' records).
_SYNC_COUNTS = ("inserted", "updated", "deleted", "unchanged", "rejected", "never_sent", "unacknowledged")
_MAX_ERROR = 500


#: ``scheme://user:password@`` in a URL (the password is replaced)
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"']*):[^\s@\"']*@")
#: ``password=...`` in a key=value DSN (libpq's, ODBC's), quoted or not
_DSN_SECRET = re.compile(
    r"\b(password|passwd|pwd|sslpassword|secret|token|api_?key)(\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&;,\"']+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(Bearer\s+)\S+", re.IGNORECASE)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (bounded), for a history record, with passwords taken out.

    The engine's own errors name no credentials, but a source's may (a DataFrame factory's driver quotes a
    mistyped DSN whole, password included): Airflow masks its connections' passwords in the log only, and a
    record is a file the StopChurn page shows. So a URL's ``user:password@`` and a DSN's ``password=...`` are
    replaced by ``***``.
    """
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    line = _URL_PASSWORD.sub(r"\1:***@", line)
    line = _DSN_SECRET.sub(r"\1\2***", line)
    line = _BEARER.sub(r"\1***", line)
    return line if len(line) <= _MAX_ERROR else line[: _MAX_ERROR - 3] + "..."


def http_retries(entry: Mapping[str, Any]) -> int:
    """A record's HTTP retries: ``http_retries``, or ``retries`` in a record written before it was renamed."""
    value = entry.get("http_retries", entry.get("retries"))
    return int(value or 0)


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")


def _int(value: Any) -> int:
    return int(value or 0)


def sync_fields(counts: Mapping[str, Any]) -> dict[str, Any]:
    """A sync's (or an on-call command's) record fields from its counts (``SUMMARY_FIELDS``; a missing one is 0)."""
    fields: dict[str, Any] = {
        **{name: _int(counts.get(name)) for name in ("chunks", "bytes", "requests", "settled_chunks")},
        "http_retries": _int(counts.get("http_retries", counts.get("retries"))),
        **{name: _int(counts.get(name)) for name in ("inserted", "updated", "deleted", "unchanged")},
        "rejected": _int(counts.get("rejected", counts.get("quarantined"))),
        "never_sent": _int(counts.get("never_sent")),
        "unacknowledged": _int(counts.get("unacknowledged")),
        "baseline": bool(counts.get("baseline")),
        "schema_change": counts.get("schema_change"),
        # what this run settled of a plan another run left: kept apart from its own counts, as in the summary
        "settled_from_other_runs": {k: int(v) for k, v in dict(counts.get("settled_from_other_runs") or {}).items()},
        "approved_deletes": _approval(counts.get("approved_deletes")),
    }
    return fields


def _approval(value: Any) -> dict[str, Any] | None:
    if not value:
        return None
    return {
        "run_id": value.get("run_id"),
        "deletes": _int(value.get("deletes")),
        "rows_before": value.get("rows_before"),
    }


class _Options(Protocol):
    """What a record reads of a run's options (``SyncOptions``, ``EventOptions`` and ``ExportOptions`` have it)."""

    @property
    def holder(self) -> str: ...
    @property
    def run_key(self) -> str | None: ...
    @property
    def run_info(self) -> RunInfo: ...


class _Record(TypedDict, total=False):
    """What :func:`recorded` takes besides the store and the options."""

    kind: str
    counts: Callable[[], Mapping[str, Any]]
    fields: Callable[[], Mapping[str, Any]] | None


class _LockingOptions(_Options, Protocol):
    """What a run that holds the table's lock reads of its options besides the record's: its lease and wait."""

    @property
    def lock_ttl_s(self) -> float: ...
    @property
    def lock_wait_s(self) -> float: ...


def record(  # noqa: PLR0913 - keyword-only fields of one record
    store: SnapshotStore,
    *,
    kind: str,
    holder: str,
    started: float,
    counts: Mapping[str, Any],
    run_key: str | None = None,
    error: BaseException | None = None,
    info: RunInfo | None = None,
    fields: Mapping[str, Any] | None = None,
    own_store: bool = True,
    current: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Append one record to ``store``'s history and return it; a failure to write is only logged.

    :param kind: ``"sync"``, ``"events"``, ``"export"``, or the on-call command (``"settle"``, ``"rebaseline"``).
    :param started: when the work began (``time.time()``).
    :param counts: a sync's counts (``SUMMARY_FIELDS``; a missing count is 0); ``{}`` for the other kinds.
    :param error: why the run failed, or None.
    :param info: the DAG, task, DAG run and try (None: not run by Airflow).
    :param fields: the record fields of another kind (events, export), added as they are.
    :param own_store: whether the run held the table's lock to the end. When not (the lock was busy, or taken
        over), the store is another run's: the record reads no committed version and prunes no old record.
    :param current: the ``CURRENT`` record the run left, read while it held the lock (None: read it now).
    """
    finished = time.time()
    if not own_store:
        current = {}
    elif current is None:
        try:
            current = store.read_current() or {}
        except Exception as err:  # the record is still worth keeping without the version
            current = {}
            log.warning(
                "Could not read the committed snapshot of %s for its history: %s", store.location, first_line(err)
            )
    entry: dict[str, Any] = {
        "kind": kind,
        "status": "failed" if error is not None else "success",
        "error": first_line(error) if error is not None else None,
        "error_type": type(error).__name__ if error is not None else None,
        "brand_id": store.brand_id,
        "table_name": store.table_name,
        "run_key": run_key,
        "holder": holder,
        **(info or NO_RUN_INFO).fields(),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_s": round(finished - started, 3),
        **{name: 0 for name in _COMMON_COUNTS},
        **(sync_fields(counts) if kind not in ("events", "export") else {}),
        **dict(fields or {}),
        "version": current.get("version"),
        "rows": current.get("rows"),
    }
    try:
        store.append_history(entry, prune=own_store)
    except Exception as err:  # the run's outcome stands; losing its history record must not change it
        log.warning("Could not append the run to the history of %s: %s", store.location, first_line(err))
        return None
    return entry


@dataclass
class Recording:
    """A run being recorded. A run that never held the table's lock is recorded without touching anything of the
    store but its own record; one that held it enters :meth:`holding` inside the lock."""

    store: SnapshotStore
    lock: Any = None
    #: ``CURRENT`` as the run left it, read before its lock was released
    current: Mapping[str, Any] | None = None

    @contextlib.contextmanager
    def holding(self, lock: Any) -> Iterator[None]:
        """Enter once ``lock`` is held (innermost): on the way out, still under the lock, read the committed
        version the run leaves, so the record names its own (not one a run that took the lock next committed)."""
        self.lock = lock
        try:
            yield
        finally:
            if getattr(lock, "lost", None) is None:
                try:
                    self.current = self.store.read_current() or {}
                except Exception as err:  # the record is still worth keeping without the version
                    log.warning("Could not read the committed snapshot of %s: %s", self.store.location, first_line(err))


@contextlib.contextmanager
def recorded(
    store: SnapshotStore,
    options: _Options,
    *,
    kind: str = "sync",
    counts: Callable[[], Mapping[str, Any]] = dict,
    fields: Callable[[], Mapping[str, Any]] | None = None,
) -> Iterator[Recording]:
    """Record the run of the block in ``store``'s history when it ends, however it ends (see the module docstring).

    Enter it before taking the table's lock (so a busy lock is recorded too), and the yielded
    :meth:`Recording.holding` inside the lock. ``counts`` / ``fields`` are read when the block ends.
    An exception is re-raised unchanged. Airflow stops a task past its ``execution_timeout`` (or on SIGTERM) with
    a ``BaseException``: that run ends and is recorded too. A process killed outright records nothing.
    """
    recording = Recording(store)
    started = time.time()
    try:
        yield recording
    except GeneratorExit:
        raise
    except BaseException as err:
        _after(store, options, recording, kind, counts, fields, started, err)
        raise
    _after(store, options, recording, kind, counts, fields, started, None)


@contextlib.contextmanager
def recorded_under_lock(
    store: SnapshotStore, options: _LockingOptions, **record: Unpack[_Record]
) -> Iterator[TableLock]:
    """The block of an engine's run: recorded in ``store``'s history however it ends (see :func:`recorded`), and
    holding the table's lock (the run's holder, lease and wait from ``options``) with its heartbeat.

    ``record`` takes :func:`recorded`'s keywords. The record is opened before the lock is taken, so a run refused
    by a busy lock is recorded too; it reads the version the run leaves while the lock is still held.
    """
    with (
        recorded(store, options, **record) as recording,
        store.lock(options.holder, ttl_s=options.lock_ttl_s, wait_s=options.lock_wait_s) as lock,
        lock.heartbeat(),
        recording.holding(lock),
    ):
        yield lock


def _after(
    store: SnapshotStore,
    options: _Options,
    recording: Recording,
    kind: str,
    counts: Callable[[], Mapping[str, Any]],
    fields: Callable[[], Mapping[str, Any]] | None,
    started: float,
    error: BaseException | None,
) -> None:
    lock = recording.lock
    try:
        record(
            store,
            kind=kind,
            holder=options.holder,
            started=started,
            counts=counts(),
            run_key=options.run_key,
            error=error,
            info=options.run_info,
            fields=fields() if fields is not None else None,
            # never held (busy), or taken over: the store is another run's now
            own_store=lock is not None and getattr(lock, "lost", None) is None,
            current=recording.current,
        )
    except Exception as err:  # never hide the run's own outcome behind a failure to record it
        log.warning("Could not record the run in the history of %s: %s", store.location, first_line(err))


def record_refusal(store: SnapshotStore, options: _Options, kind: str, error: BaseException) -> None:
    """Record a run the multi-worker guard refused before it took the lock, in the store it named, but only when
    that store holds a committed snapshot: a record never creates a store where there is none (a worker without
    the snapshot, or a ``snapshot_uri`` that is not the table's recorded location, would otherwise get a folder,
    and the StopChurn page a store, that does not exist)."""
    try:
        if store.read_current() is None:
            return
    except Exception:  # an unreadable store: nothing is added to it
        return
    record(
        store,
        kind=kind,
        holder=options.holder,
        started=time.time(),
        counts={},
        run_key=options.run_key,
        error=error,
        info=options.run_info,
        own_store=False,
    )


__all__ = [
    "SUMMARY_FIELDS",
    "Recording",
    "first_line",
    "http_retries",
    "record",
    "record_refusal",
    "recorded",
    "sync_fields",
]
