"""Run history: each run that committed something leaves one summary record in its store (no Airflow import).

The person on call asks what last night's run sent, and how it ended. :func:`recorded` wraps a run (inside its
lock) and, when the run ends having committed a snapshot (a success, or a failure that settled what StopChurn
acknowledged), appends a record to the store's bounded history (:meth:`SnapshotStore.append_history`). A run that
committed nothing (nothing changed, a safeguard, a busy lock, a failure before any acknowledgement) leaves the
store untouched, as it always did. A record never holds the API key: only counts, names, times and the first
line of a failure's message (the engine's errors name no credentials).

The on-call commands (``stopchurn settle`` / ``rebaseline``) record their commits too, through :func:`record`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_provider_stopchurn.snapshot import SnapshotStore

if TYPE_CHECKING:
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.sync import SyncSummary

log = logging.getLogger(__name__)

#: The counts a history record copies from a run's ``SyncSummary`` (its ``quarantined`` becomes ``rejected``).
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
)
_COUNTS = tuple(
    f for f in SUMMARY_FIELDS if f not in ("quarantined", "baseline", "schema_change", "settled_from_other_runs")
)
_MAX_ERROR = 500


def first_line(err: BaseException) -> str:
    """The first line of an error's message (bounded), for a history record."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= _MAX_ERROR else line[: _MAX_ERROR - 3] + "..."


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")


def record(
    store: SnapshotStore,
    *,
    kind: str,
    holder: str,
    started: float,
    counts: Mapping[str, Any],
    run_key: str | None = None,
    error: BaseException | None = None,
) -> dict[str, Any] | None:
    """Append one record of a commit to ``store``'s history and return it; a failure to write is only logged.

    :param kind: ``"sync"`` for a run, or the on-call command that committed (``"settle"``, ``"rebaseline"``).
    :param started: when the work began (``time.time()``).
    :param counts: what was delivered (``SUMMARY_FIELDS``); a missing count is 0.
    :param error: why the run failed after committing part of it, or None.
    """
    finished = time.time()
    current = store.read_current() or {}
    entry: dict[str, Any] = {
        "kind": kind,
        "status": "failed" if error is not None else "success",
        "error": first_line(error) if error is not None else None,
        "error_type": type(error).__name__ if error is not None else None,
        "brand_id": store.brand_id,
        "table_name": store.table_name,
        "run_key": run_key,
        "holder": holder,
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_s": round(finished - started, 3),
        **{name: int(counts.get(name) or 0) for name in _COUNTS},
        "rejected": int(counts.get("quarantined") or 0),
        "baseline": bool(counts.get("baseline")),
        "schema_change": counts.get("schema_change"),
        # what this run settled of a plan another run left: kept apart from its own counts, as in the summary
        "settled_from_other_runs": {k: int(v) for k, v in dict(counts.get("settled_from_other_runs") or {}).items()},
        "version": current.get("version"),
        "rows": current.get("rows"),
    }
    try:
        store.append_history(entry)
    except Exception as err:  # the commit stands; losing its history record must not fail the run
        log.warning("Could not append the run to the history of %s: %s", store.location, first_line(err))
        return None
    return entry


@contextlib.contextmanager
def recorded(store: SnapshotStore, summary: SyncSummary, options: SyncOptions, lock: Any) -> Iterator[None]:
    """Record the run of the block in ``store``'s history if it commits something (see the module docstring).

    Enter it while holding the table's lock: the committed version is read on entry and on exit, and a run
    whose lock was taken over (``lock.lost``) records nothing, since a change of version is then not its own.
    """
    started = time.time()
    before = (store.read_current() or {}).get("version")
    try:
        yield
    except Exception as err:
        _after(store, summary, options, lock, started, before, err)
        raise
    _after(store, summary, options, lock, started, before, None)


def _after(
    store: SnapshotStore,
    summary: SyncSummary,
    options: SyncOptions,
    lock: Any,
    started: float,
    before: str | None,
    error: BaseException | None,
) -> None:
    if getattr(lock, "lost", None) is not None:
        return
    try:
        after = (store.read_current() or {}).get("version")
    except Exception as err:
        log.warning("Could not read the committed snapshot of %s for its history: %s", store.location, err)
        return
    if after is None or after == before:
        return
    counts = {name: getattr(summary, name) for name in SUMMARY_FIELDS}
    record(
        store,
        kind="sync",
        holder=options.holder,
        started=started,
        counts=counts,
        run_key=options.run_key,
        error=error,
    )


__all__ = ["SUMMARY_FIELDS", "first_line", "record", "recorded"]
