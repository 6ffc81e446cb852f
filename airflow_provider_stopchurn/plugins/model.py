"""What the StopChurn page shows: a StopChurn task, its runs, the stores they used, and the counts read from them.

:class:`SyncTask` is one StopChurn task of a DAG (one map index of a mapped task) with its runs (:class:`Run`): the
summary each returned and the history records its tries left in its store. :class:`StoreState` is what a snapshot
store holds besides its snapshot (lock, pending plan, quarantined rows, history). :class:`Count` names a count of a
run and where it is read. It imports nothing from Airflow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Count:
    """A count the page shows: its heading, its ``data-col`` name, and where a run's value is read (the summary
    the run returned first, then the newest history record of the run; the first key present wins)."""

    heading: str
    col: str
    summary_keys: tuple[str, ...]
    record_keys: tuple[str, ...]
    colour: str = ""


def count_named(name: str, colour: str = "") -> Count:
    """A count whose heading, ``data-col`` name and keys are all ``name``."""
    return Count(name, name, (name,), (name,), colour)


#: HTTP retries (a request sent again after a 429, a 5xx or a network error), not Airflow task retries. An old
#: history record (and every summary) calls them ``retries``.
HTTP_RETRIES = Count("http retries", "http_retries", ("http_retries", "retries"), ("http_retries", "retries"))
#: Chunks of an earlier try (or run) settled at the start of this one (an events summary: ``resumed_chunks``).
SETTLED = Count("settled", "settled_chunks", ("settled_chunks", "resumed_chunks"), ("settled_chunks",))
#: The counts of an update (sync) task; the first four are the chart's series.
SYNC_COUNTS: tuple[Count, ...] = (
    count_named("inserted", "#2e7d32"),
    count_named("updated", "#1565c0"),
    count_named("deleted", "#c62828"),
    Count("rejected", "rejected", ("quarantined",), ("rejected", "quarantined"), "#ef6c00"),
    count_named("unchanged"),
    count_named("chunks"),
    HTTP_RETRIES,
)
#: The counts of an events task; the first four are the chart's series.
EVENT_COUNTS: tuple[Count, ...] = (
    Count("events sent", "events_sent", ("sent", "events_sent"), ("events_sent", "sent"), "#2e7d32"),
    Count("duplicates", "duplicates", ("duplicates",), ("duplicates",), "#6d4c41"),
    Count("before the window", "before_window", ("before_window",), ("before_window",), "#78909c"),
    Count("held future", "held_future", ("held_future",), ("held_future",), "#ef6c00"),
    Count("ledger size", "ledger_size", ("ledger_keys", "ledger_size"), ("ledger_size", "ledger_keys")),
    count_named("chunks"),
    HTTP_RETRIES,
)
#: The counts of a historical export task; the first is the chart's series.
EXPORT_COUNTS: tuple[Count, ...] = (
    Count("rows exported", "rows_exported", ("rows", "rows_exported"), ("rows_exported",), "#1565c0"),
    count_named("files"),
    Count("bytes exported", "bytes_exported", ("bytes", "bytes_exported"), ("bytes_exported",)),
)
#: Series drawn in the chart, per kind of task.
SERIES_OF: dict[str, tuple[Count, ...]] = {
    "sync": SYNC_COUNTS[:4],
    "events": EVENT_COUNTS[:4],
    "export": EXPORT_COUNTS[:1],
}
#: The chart's series of an update task (kept for callers of earlier versions): (name, summary key, colour).
SERIES: tuple[tuple[str, str, str], ...] = tuple((c.heading, c.summary_keys[0], c.colour) for c in SYNC_COUNTS[:4])
#: Runs shown in a task's chart and run table (the newest).
CHART_RUNS = 30


def task_kind(operator: str) -> str:
    """``"events"``, ``"export"`` or ``"sync"``, from the operator's class name."""
    if "Event" in operator:
        return "events"
    if "Export" in operator:
        return "export"
    return "sync"


def finite_int(value: Any) -> int | None:
    """``value`` as an int when it is a finite number (not a bool), else None."""
    # a record's NaN or infinity (Python's json reads both) is no count: shown as none, not a failed page
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


@dataclass
class Run:
    """One run (task instance) of a StopChurn task.

    ``summary`` is what it returned, if it returned anything; ``records`` are the history records its tries left
    in its store (newest first), matched by :func:`attach_stores`. ``brand_id``, ``table_name`` (an events task's
    stream) and ``store_uri`` say which store the run used, as its summary or its rendered fields tell.
    """

    run_id: str
    run_after: datetime | None
    state: str | None
    try_number: int = 0
    summary: dict[str, Any] | None = None
    brand_id: int | None = None
    table_name: str | None = None
    #: the rendered ``snapshot_uri`` (``state_uri`` for events); None: the default location
    store_uri: str | None = None
    store_uri_known: bool = False
    #: ``(location, brand_id, table_name)`` of the store the run used, once :func:`attach_stores` found it
    store_key: tuple[str, int, str] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def record(self) -> dict[str, Any] | None:
        """The newest history record of this run (its last try that recorded one)."""
        return self.records[0] if self.records else None

    def count(self, key: str) -> int | None:
        """``summary[key]`` as an int; None without a summary or that key."""
        if self.summary is None:
            return None
        return finite_int(self.summary.get(key))

    def value(self, count: Count) -> int | None:
        """``count`` of this run: from its summary, else from its newest history record; None when neither has it."""
        if self.summary is not None:
            for key in count.summary_keys:
                found = finite_int(self.summary.get(key))
                if found is not None:
                    return found
        record = self.record
        if record is not None:
            for key in count.record_keys:
                found = finite_int(record.get(key))
                if found is not None:
                    return found
        return None

    def detail(self, summary_key: str, record_key: str | None = None) -> Any:
        """A non-count field of the summary, else of the newest record (e.g. the watermark)."""
        if self.summary is not None and self.summary.get(summary_key) is not None:
            return self.summary.get(summary_key)
        record = self.record
        return None if record is None else record.get(record_key or summary_key)

    @property
    def has_counts(self) -> bool:
        """Whether the run left counts to show: a summary, or a history record."""
        return self.summary is not None or self.record is not None

    @property
    def tries(self) -> int:
        """The try number: Airflow's, or the newest record's when Airflow's is not known."""
        recorded = record_try(self.record) if self.record is not None else None
        return self.try_number or recorded or 0

    @property
    def settled_chunks(self) -> int:
        """Chunks of an earlier try (or run) this run settled at its start."""
        found = self.value(
            Count("settled", "settled_chunks", ("settled_chunks", "resumed_chunks"), ("settled_chunks",))
        )
        return found or 0

    @property
    def error(self) -> str | None:
        """The first line of the error of the newest try that failed, when the newest record is a failure."""
        record = self.record
        if record is None or record.get("status") != "failed":
            return None
        return str(record.get("error") or record.get("error_type") or "failed")

    @property
    def dry_run(self) -> bool:
        return bool(self.summary and self.summary.get("dry_run"))

    @property
    def baseline(self) -> bool:
        return bool(self.summary and self.summary.get("baseline")) or bool(self.record and self.record.get("baseline"))


_TRY = re.compile(r" try (\d+)$")


def record_try(record: Mapping[str, Any]) -> int | None:
    """A record's try number: its ``try_number``, else the one its lock holder names (``... try 2``)."""
    found = finite_int(record.get("try_number"))
    if found is not None:
        return found
    match = _TRY.search(str(record.get("holder") or ""))
    return int(match.group(1)) if match else None


def record_belongs(record: Mapping[str, Any], dag_id: str, task_id: str, run_id: str, map_index: int) -> bool:
    """Whether a history record is of this task instance: by its ``dag_id``/``task_id``/``run_id`` fields, else
    (a record written before those fields existed) by its ``run_key``, ``"<dag>.<task> run <run id> map <i>"``."""
    run_key = record.get("run_key")
    if isinstance(run_key, str) and run_key:
        return run_key == f"{dag_id}.{task_id} run {run_id} map {map_index}"
    return (record.get("dag_id"), record.get("task_id"), record.get("run_id")) == (dag_id, task_id, run_id)


@dataclass
class PendingPlan:
    plan_id: str
    acked: int
    total: int


@dataclass
class StoreState:
    """What a snapshot store holds besides its snapshot: lock, pending plan, quarantined rows, run history."""

    location: str
    brand_id: int
    table_name: str
    error: str | None = None
    lock: dict[str, Any] | None = None
    plan: PendingPlan | None = None
    #: the newest quarantine file's first rows: ``id``, ``change`` (insert/update/delete) and ``reason``
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    quarantined_total: int = 0
    #: the newest history records, newest first
    history: list[dict[str, Any]] = field(default_factory=list)
    #: why the history could not be read (the rest of the store may still have been)
    history_error: str | None = None
    #: ``"snapshot"`` (a table's store) or ``"events"`` (an event stream's ledger)
    kind: str = "snapshot"

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.location, self.brand_id, self.table_name)

    @property
    def label(self) -> str:
        if self.kind == "events":
            return f"event stream {self.table_name} (brand {self.brand_id})"
        return f"{self.table_name} (brand {self.brand_id})"


@dataclass
class SyncTask:
    """A StopChurn task of a DAG (one map index of a mapped task), its runs (oldest first) and its stores."""

    dag_id: str
    task_id: str
    operator: str
    map_index: int = -1
    table_name: str | None = None
    brand_id: int | None = None
    runs: list[Run] = field(default_factory=list)
    #: ``snapshot_uri`` (``state_uri`` for events) as the newest run rendered it (None: the default), when known
    snapshot_uri: str | None = None
    snapshot_uri_known: bool = False
    #: the connection of the object store of its location, when its DAG names one
    store_conn_id: str | None = None
    #: the store of the newest run that named one
    store: StoreState | None = None
    #: every store the kept runs used, the newest run's first
    stores: list[StoreState] = field(default_factory=list)

    @property
    def key(self) -> str:
        base = f"{self.dag_id}/{self.task_id}"
        return base if self.map_index < 0 else f"{base}/{self.map_index}"

    @property
    def label(self) -> str:
        return self.key.replace("/", " / ")

    @property
    def kind(self) -> str:
        return task_kind(self.operator)

    @property
    def counts(self) -> tuple[Count, ...]:
        return {"events": EVENT_COUNTS, "export": EXPORT_COUNTS}.get(self.kind, SYNC_COUNTS)

    @property
    def last_run(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    @property
    def last_summary(self) -> Run | None:
        """The newest run that returned a summary."""
        return next((run for run in reversed(self.runs) if run.summary is not None), None)

    @property
    def last_counted(self) -> Run | None:
        """The newest run with counts to show: one that returned a summary or left a history record."""
        return next((run for run in reversed(self.runs) if run.has_counts), None)

    @property
    def table_label(self) -> str:
        if self.kind == "events":
            stream = f"events: {self.table_name}" if self.table_name else "events"
            return f"{stream} (brand {self.brand_id})" if self.brand_id is not None else stream
        table = self.table_name or "?"
        return f"{table} (brand {self.brand_id})" if self.brand_id is not None else table
