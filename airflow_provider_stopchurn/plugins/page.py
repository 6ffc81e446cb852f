"""What the StopChurn page shows, and its HTML: server-rendered, one inline SVG chart per store, no CDN.

The plugin (:mod:`.stopchurn`) reads Airflow's metadata database into :class:`SyncTask` objects, one per StopChurn
task of a DAG the user may read, with the task's runs, the summaries they returned (XCom) and where each run kept
its state (the brand, table or event stream and location it rendered). This module looks into every snapshot store
those runs used, through the store's public API (:func:`inspect_stores`): lock, pending plan, quarantined rows and
the store's run history (:meth:`SnapshotStore.read_history`); it matches each history record to its run (a failed
run returns no summary, so its record is what the page shows of it) and renders the page (:func:`render_page`).
It imports nothing from Airflow.

The page's only script does two things a server-rendered page cannot: links into Airflow's own pages open in the
whole window (Airflow shows this page in a sandboxed frame that may not navigate the window itself, see
:data:`_SCRIPT`), and the page refreshes itself while it is visible.

The page never shows a connection, so never an API key. Quarantined rows are shown by id, change type and
StopChurn's reason, not by their content.
"""

from __future__ import annotations

import concurrent.futures
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from airflow_provider_stopchurn.store import SnapshotStore


@dataclass(frozen=True)
class Count:
    """A count the page shows: its heading, its ``data-col`` name, and where a run's value is read (the summary
    the run returned first, then the newest history record of the run; the first key present wins)."""

    heading: str
    col: str
    summary_keys: tuple[str, ...]
    record_keys: tuple[str, ...]
    colour: str = ""


def _same(name: str, colour: str = "") -> Count:
    return Count(name, name, (name,), (name,), colour)


#: HTTP retries (a request sent again after a 429, a 5xx or a network error), not Airflow task retries. An old
#: history record (and every summary) calls them ``retries``.
HTTP_RETRIES = Count("http retries", "http_retries", ("http_retries", "retries"), ("http_retries", "retries"))
#: Chunks of an earlier try (or run) settled at the start of this one (an events summary: ``resumed_chunks``).
SETTLED = Count("settled", "settled_chunks", ("settled_chunks", "resumed_chunks"), ("settled_chunks",))
#: The counts of an update (sync) task; the first four are the chart's series.
SYNC_COUNTS: tuple[Count, ...] = (
    _same("inserted", "#2e7d32"),
    _same("updated", "#1565c0"),
    _same("deleted", "#c62828"),
    Count("rejected", "rejected", ("quarantined",), ("rejected", "quarantined"), "#ef6c00"),
    _same("unchanged"),
    _same("chunks"),
    HTTP_RETRIES,
)
#: The counts of an events task; the first four are the chart's series.
EVENT_COUNTS: tuple[Count, ...] = (
    Count("events sent", "events_sent", ("sent", "events_sent"), ("events_sent", "sent"), "#2e7d32"),
    Count("duplicates", "duplicates", ("duplicates",), ("duplicates",), "#6d4c41"),
    Count("before the window", "before_window", ("before_window",), ("before_window",), "#78909c"),
    Count("held future", "held_future", ("held_future",), ("held_future",), "#ef6c00"),
    Count("ledger size", "ledger_size", ("ledger_keys", "ledger_size"), ("ledger_size", "ledger_keys")),
    _same("chunks"),
    HTTP_RETRIES,
)
#: The counts of a historical export task; the first is the chart's series.
EXPORT_COUNTS: tuple[Count, ...] = (
    Count("rows exported", "rows_exported", ("rows", "rows_exported"), ("rows_exported",), "#1565c0"),
    _same("files"),
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
#: Quarantined rows listed per store (the count is always the full one).
QUARANTINE_ROWS = 20
#: History records read per store (one small file each): the kept runs of a task using it, a few tries of some.
HISTORY_RECORDS = 60
#: History records listed in a store's card.
HISTORY_ROWS = 8
#: How long the page waits for all snapshot stores together before it reports the rest as not answering.
STORE_TIMEOUT_S = 5.0
#: The page reloads its data this often while it is visible (``?refresh=`` overrides it; 0 turns it off).
REFRESH_S = 45
#: The shortest refresh interval a ``?refresh=`` can ask for.
MIN_REFRESH_S = 2


def task_kind(operator: str) -> str:
    """``"events"``, ``"export"`` or ``"sync"``, from the operator's class name."""
    if "Event" in operator:
        return "events"
    if "Export" in operator:
        return "export"
    return "sync"


def _int(value: Any) -> int | None:
    # a record's NaN or infinity (Python's json reads both) is no count: shown as none, not a failed page
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


# --- the model -----------------------------------------------------------------------------------------------
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
        return _int(self.summary.get(key))

    def value(self, count: Count) -> int | None:
        """``count`` of this run: from its summary, else from its newest history record; None when neither has it."""
        if self.summary is not None:
            for key in count.summary_keys:
                found = _int(self.summary.get(key))
                if found is not None:
                    return found
        record = self.record
        if record is not None:
            for key in count.record_keys:
                found = _int(record.get(key))
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
    found = _int(record.get("try_number"))
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


# --- the stores ----------------------------------------------------------------------------------------------
def inspect_store(
    root: Any, brand_id: int, table_name: str, *, rows: int = QUARANTINE_ROWS, history: int = 0
) -> StoreState:
    """Read the lock, the pending plan and the newest quarantine file of one store, and with ``history`` its
    newest ``history`` records. Writes nothing."""
    store = SnapshotStore(root, brand_id, table_name)
    state = StoreState(location=store.location, brand_id=brand_id, table_name=table_name)
    try:
        state.lock = store.read_lock()
        plan = store.pending_plan(cleanup=False)
        if plan is not None:
            state.plan = PendingPlan(plan.plan_id, len(store.acked(plan)), len(plan.chunks))
        records = store.read_quarantine()
        state.quarantined_total = len(records)
        state.quarantined = [_rejection(record) for record in records[:rows]]
    except Exception as err:  # any storage error: the page says so and shows the rest
        state.error = f"{type(err).__name__}: {err}"
    if history > 0:
        try:
            state.history = read_store_history(root, brand_id, table_name, history)
        except Exception as err:
            state.history_error = f"{type(err).__name__}: {err}"
    return state


def read_store_history(root: Any, brand_id: int, table_name: str, limit: int = HISTORY_RECORDS) -> list[dict[str, Any]]:
    """The newest ``limit`` history records of one store, newest first (one small file each: an object store
    answers them one request at a time, so :func:`inspect_stores` reads them beside the rest)."""
    return SnapshotStore(root, brand_id, table_name).read_history(limit)


def _rejection(record: Mapping[str, Any]) -> dict[str, Any]:
    """A quarantined row as the page shows it: its id, the change and StopChurn's reason (not its content)."""
    update = record.get("update")
    update = update if isinstance(update, dict) else {}
    data = update.get("data")
    data = data if isinstance(data, dict) else {}
    return {"id": record.get("id", data.get("id")), "change": update.get("type"), "reason": record.get("reason")}


def inspect_stores(
    targets: Mapping[tuple[str, int, str], Any], *, timeout_s: float = STORE_TIMEOUT_S, history: int = HISTORY_RECORDS
) -> dict[tuple[str, int, str], StoreState]:
    """Inspect several stores at once, keyed ``(location, brand_id, table_name)`` with the root as value, and read
    the newest ``history`` records of each beside it.

    A store (or its history) that has not answered after ``timeout_s`` (an object store that hangs) is reported as
    such; its reader thread is left to finish on its own.
    """
    if not targets:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, 2 * len(targets)), thread_name_prefix="stopchurn")
    try:
        futures = {key: pool.submit(inspect_store, root, key[1], key[2]) for key, root in targets.items()}
        histories = {
            key: pool.submit(read_store_history, root, key[1], key[2], history) for key, root in targets.items()
        }
        pending: list[concurrent.futures.Future[Any]] = [*futures.values(), *histories.values()]
        concurrent.futures.wait(pending, timeout=timeout_s)
        late = f"no answer within {timeout_s:g} s"
        states = {}
        for key, future in futures.items():
            if future.done():
                states[key] = future.result()
            else:
                future.cancel()
                states[key] = StoreState(location=key[0], brand_id=key[1], table_name=key[2], error=late)
            reading = histories[key]
            if not reading.done():
                reading.cancel()
                states[key].history_error = late
            elif reading.exception() is not None:
                error = reading.exception()
                states[key].history_error = f"{type(error).__name__}: {error}"
            else:
                states[key].history = reading.result()
        return states
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --- formatting ----------------------------------------------------------------------------------------------
def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (ValueError, OverflowError, OSError):  # not epoch seconds (e.g. milliseconds): no time to show
            return None
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _age(since: datetime | None, now: datetime) -> str:
    if since is None:
        return "?"
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _short(value: int) -> str:
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= size:
            return f"{value // size}{suffix}"
    return str(value)


def _state_badge(state: str | None) -> str:
    name = state or "no run yet"
    css = {
        "success": "ok",
        "failed": "bad",
        "upstream_failed": "bad",
        "up_for_retry": "warn",
        "running": "run",
        "queued": "run",
        "scheduled": "run",
        "deferred": "run",
    }.get(state or "", "none")
    return f'<span class="badge {css}" data-state="{escape(name)}">{escape(name.replace("_", " "))}</span>'


class _Links:
    """Links into Airflow's own UI. They carry ``data-airflow-link``: inside Airflow's frame the page's script
    opens them in the whole window (see :data:`_SCRIPT`); on their own they are plain links."""

    def __init__(self, airflow_base: str) -> None:
        self.base = airflow_base if airflow_base.endswith("/") else airflow_base + "/"

    def dag(self, dag_id: str) -> str:
        return f"{self.base}dags/{quote(dag_id, safe='')}"

    def task_instance(self, task: SyncTask, run: Run) -> str:
        url = f"{self.dag(task.dag_id)}/runs/{quote(run.run_id, safe='')}/tasks/{quote(task.task_id, safe='')}"
        return url if task.map_index < 0 else f"{url}/mapped/{task.map_index}"

    def anchor(self, url: str, text: str) -> str:
        return f'<a href="{escape(url)}" data-airflow-link>{escape(text)}</a>'


def _chart_link(task: SyncTask) -> str:
    return "?" + urlencode({"task": task.key}) + "#chart"


def _watermark(run: Run) -> str:
    value = run.detail("watermark")
    return "-" if value in (None, "") else str(value)


# --- the chart -----------------------------------------------------------------------------------------------
def chart_runs(task: SyncTask, limit: int = CHART_RUNS, store: tuple[str, int, str] | None = None) -> list[Run]:
    """The runs the chart shows: the newest ``limit`` with counts (a summary, or a history record), dry runs left
    out; with ``store``, only the runs that used that store."""
    runs = [run for run in task.runs if run.has_counts and not run.dry_run]
    if store is not None:
        runs = [run for run in runs if run.store_key == store]
    return runs[-limit:]


def render_chart(task: SyncTask, store: StoreState | None = None) -> str:
    """Grouped bars (inserted, updated, deleted, rejected; an events or export task's own counts) per run, on a
    logarithmic scale; with ``store``, the runs of that store only."""
    runs = chart_runs(task, store=None if store is None else store.key)
    series = SERIES_OF[task.kind]
    if not runs:
        return '<p class="muted chart-empty">No run of this task has left counts here yet.</p>'
    peak = max((run.value(count) or 0) for run in runs for count in series)
    decades = max(1, math.ceil(math.log10(peak + 1)))
    top = math.log10(10**decades + 1)
    bar, gap, left, right, head, plot_h, foot = 14, 22, 52, 12, 12, 180, 26
    group = len(series) * bar + gap
    width = max(480, left + len(runs) * group + right)
    height = head + plot_h + foot
    shows = task.label if store is None else f"{task.label} on {store.label}"

    def y_of(value: int) -> float:
        return head + plot_h - plot_h * math.log10(value + 1) / top

    store_attr = "" if store is None else f' data-store="{escape(store.table_name)}" data-brand="{store.brand_id}"'
    parts = [
        f'<svg class="sync-chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'data-task="{escape(task.key)}"{store_attr} aria-label="Counts per run of {escape(shows)}">'
    ]
    for tick in [0, *(10**i for i in range(decades + 1))]:
        y = y_of(tick)
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_short(tick)}</text>')
    every = max(1, math.ceil(72 / group))  # a label (about 65 px wide) every few runs
    for index, run in enumerate(runs):
        x0 = left + index * group + gap / 2
        parts.append(f'<g class="run" data-run-id="{escape(run.run_id)}">')
        for offset, count in enumerate(series):
            value = run.value(count) or 0
            y = y_of(value)
            parts.append(
                f'<rect class="bar" data-series="{count.col}" data-value="{value}" x="{x0 + offset * bar:.1f}" '
                f'y="{y:.1f}" width="{bar - 2}" height="{head + plot_h - y:.1f}" fill="{count.colour}">'
                f"<title>{escape(run.run_id)}: {value:,} {count.heading}</title></rect>"
            )
        parts.append("</g>")
        if index % every == 0:
            label = run.run_after.astimezone(UTC).strftime("%m-%d %H:%M") if run.run_after else run.run_id[:11]
            cx = x0 + len(series) * bar / 2
            parts.append(
                f'<text class="tick" x="{cx:.1f}" y="{head + plot_h + 16}" text-anchor="middle">{escape(label)}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{c.colour}"></span>{c.heading}</span>'
        for c in series
    )
    return (
        f'<div class="legend">{legend}</div><div class="chart-box">{"".join(parts)}</div>'
        '<p class="note">Runs oldest first, on a logarithmic scale; a bar\'s tooltip names its run.</p>'
    )


# --- the page ------------------------------------------------------------------------------------------------
_CSS = """
:root { color-scheme: light dark; --fg: #1f2933; --muted: #66727f; --line: #d9dee3; --head: #f3f5f7; }
@media (prefers-color-scheme: dark) { :root { --fg: #e4e7eb; --muted: #9aa5b1; --line: #3e4c59; --head: #1f2933; } }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 12px 16px; }
h1 { font-size: 20px; margin: 0 0 2px; } h2 { font-size: 16px; margin: 26px 0 8px; } h3 { font-size: 14px; }
.muted { color: var(--muted); } a { color: #3c6df0; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 6px; text-align: left; white-space: nowrap;
  vertical-align: top; }
th { background: var(--head); font-weight: 600; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th.n { white-space: normal; min-width: 4.5em; }
.badge { border-radius: 9px; padding: 1px 8px; font-size: 12px; background: #e4e7eb; color: #1f2933; }
.badge.ok { background: #c8e6c9; } .badge.bad { background: #ffcdd2; } .badge.warn { background: #ffe0b2; }
.badge.run { background: #bbdefb; }
.note { font-size: 12px; color: var(--muted); }
td[data-col="state"] .note[data-item="try"] { white-space: nowrap; }
td.name, td[data-col="table"] { white-space: normal; overflow-wrap: anywhere; max-width: 16em; }
td[data-col="store"] { white-space: normal; min-width: 7em; max-width: 16em; }
td[data-col="store"] .badge { display: inline-block; margin: 1px 0; }
td[data-col="state"] { white-space: normal; min-width: 12em; max-width: 24em; }
td[data-col="state"] .note, td[data-col="state"] .error { white-space: normal; overflow-wrap: anywhere; }
td.other { white-space: normal; }
td.other span { display: inline-block; margin-right: 12px; }
.legend { margin: 4px 0; } .legend-item { margin-right: 14px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }
.chart-box, .scroll { overflow-x: auto; }
svg .grid { stroke: var(--line); } svg .tick { fill: var(--muted); font-size: 11px; }
.store { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.store h3 { margin: 0 0 4px; } .loc { font-family: monospace; font-size: 12px; overflow-wrap: anywhere; }
.store-runs { margin: 12px 0 20px; } .store-runs h3 { margin: 8px 0 2px; }
.error { color: #c62828; }
#refresh-status { margin-left: 8px; }
"""

#: The page's script (inline, no CDN).
#:
#: Links into Airflow: Airflow 3.3 shows an external view in an ``<iframe sandbox="allow-scripts allow-same-origin
#: allow-forms allow-downloads">``. Without ``allow-top-navigation`` the frame may not navigate the window
#: (``target="_top"`` and ``window.top.location`` are blocked), and Airflow's UI does not listen for messages
#: from the frame. A plain link would open Airflow's page inside the frame, a second Airflow UI nested in the
#: first. ``allow-same-origin`` lets the frame reach the window's document, though: the script puts a link into
#: that document and clicks it, and a link of the window's own document navigates the window (the browser checks
#: the document the link belongs to, which is not sandboxed). Opened on its own (no frame), the links are left
#: as they are. The page's own links (a task's chart, the task picker) navigate the frame, which Airflow mirrors
#: in its address bar (``/plugin/stopchurn/stopchurn/?task=...``), so a reload or a shared link keeps the task.
#: Airflow does not pass its own query to the frame: a ``task=`` in Airflow's address (``/plugin/stopchurn?task=``)
#: is read from the window's address and the frame reloads itself on that task.
#:
#: Refresh: every ``data-refresh-s`` seconds while the page is visible (``document.visibilityState``; none while
#: it is hidden, one at once when it shows again after a due refresh; ``data-refreshes`` on the body counts the
#: refreshes started), the script fetches the page's own URL
#: (the task chosen stays in it) and swaps ``#content``, keeping the scroll position. It waits while the task
#: picker has the focus, and stops with a note when the session ended (the fetch was sent to the login page).
_SCRIPT = """
(function () {
  "use strict";
  function host() {
    try {
      if (window.parent !== window && window.parent.document && window.parent.document.body) {
        return window.parent.document;
      }
    } catch (err) { /* another origin: plain links */ }
    return null;
  }
  // Airflow's own address may carry the task (/plugin/stopchurn?task=...), which it does not pass to the frame
  var own = new URLSearchParams(window.location.search);
  var doc0 = host();
  if (doc0 && !own.has("task")) {
    var wanted = new URLSearchParams(window.parent.location.search).get("task");
    if (wanted) {
      own.set("task", wanted);
      window.location.replace("?" + own.toString() + "#chart");
      return;
    }
  }
  document.addEventListener("click", function (event) {
    var link = event.target && event.target.closest ? event.target.closest("a[data-airflow-link]") : null;
    if (!link || event.defaultPrevented || event.button !== 0) return;
    var doc = host();
    if (!doc) return;
    event.preventDefault();
    var proxy = doc.createElement("a");
    proxy.href = link.href;
    if (event.ctrlKey || event.metaKey || event.shiftKey) proxy.target = "_blank";
    proxy.rel = "noopener";
    proxy.style.display = "none";
    doc.body.appendChild(proxy);
    proxy.click();
    proxy.remove();
  });

  var seconds = Number(document.body.getAttribute("data-refresh-s") || 0);
  if (!(seconds > 0)) return;
  var last = Date.now(), busy = false, stopped = false, started = 0;
  function say(text) {
    var status = document.getElementById("refresh-status");
    if (status) status.textContent = text;
  }
  function refresh() {
    if (busy || stopped || document.visibilityState === "hidden") return;
    var active = document.activeElement;
    if (active && active.tagName === "SELECT") return;
    busy = true;
    started += 1;
    document.body.setAttribute("data-refreshes", String(started));
    fetch(window.location.href.split("#")[0], {
      credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" }
    }).then(function (response) {
      if (response.redirected || !response.ok) {
        stopped = response.redirected;
        throw new Error(response.redirected ? "signed out" : "HTTP " + response.status);
      }
      return response.text();
    }).then(function (text) {
      var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("content");
      var current = document.getElementById("content");
      if (!fresh || !current) throw new Error("no content");
      var x = window.scrollX, y = window.scrollY;
      current.replaceWith(document.importNode(fresh, true));
      window.scrollTo(x, y);
      say("");
    }).catch(function (err) {
      say(stopped ? "Not refreshing: signed out. Reload the page." : "Could not refresh (" + err.message + ")");
    }).finally(function () {
      last = Date.now();
      busy = false;
    });
  }
  window.setInterval(function () {
    if (Date.now() - last >= seconds * 1000) refresh();
  }, 1000);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible" && Date.now() - last >= seconds * 1000) refresh();
  });
})();
"""


def _status_cell(task: SyncTask, run: Run, links: _Links | None, *, with_time: bool) -> str:
    """A run's state: Airflow's badge, the try, what it settled of an earlier try, its error's first line, the
    mass delete it was approved for, and earlier tries that failed."""
    parts = []
    if with_time and links is not None:
        parts.append(links.anchor(links.task_instance(task, run), _when(run.run_after)))
    parts.append(_state_badge(run.state))
    tries = run.tries
    if tries:
        parts.append(f'<span class="note" data-item="try">try {tries}</span>')
    notes = []
    if run.settled_chunks:
        chunks = run.settled_chunks
        notes.append(
            f'<div class="note" data-item="settled">settled {chunks:,} chunk{"s" if chunks != 1 else ""} from an '
            "earlier try</div>"
        )
    record = run.record
    if run.error is not None:
        notes.append(f'<div class="error" data-item="error">{escape(run.error)}</div>')
        never_sent = None if record is None else _int(record.get("never_sent"))
        unacked = None if record is None else _int(record.get("unacknowledged"))
        if never_sent or unacked:
            notes.append(
                f'<div class="note" data-item="undelivered">{_num(never_sent)} updates never sent, '
                f"{_num(unacked)} sent without an acknowledgement</div>"
            )
    elif run.state in ("failed", "upstream_failed") and run.summary is None and record is None:
        notes.append('<div class="note">no record of this run in its store: see its log in Airflow</div>')
    approved = record.get("approved_deletes") if record is not None else None
    if isinstance(approved, dict):
        notes.append(
            f'<div class="note" data-item="approved">mass delete approved: {_num(_int(approved.get("deletes")))} '
            f"deletes of {_num(_int(approved.get('rows_before')))} rows"
            f"{' (run ' + escape(str(approved.get('run_id'))) + ')' if approved.get('run_id') else ''}</div>"
        )
    for earlier in run.records[1:]:
        if earlier.get("status") == "failed":
            number = record_try(earlier)
            notes.append(
                f'<div class="note" data-item="earlier">{"try " + str(number) if number else "an earlier try"} '
                f"failed: {escape(str(earlier.get('error') or earlier.get('error_type') or ''))}</div>"
            )
    if run.dry_run:
        notes.append('<div class="note">dry run: nothing sent</div>')
    return " ".join(parts) + "".join(notes)


def _count_cells(task: SyncTask, run: Run | None, *, overview: bool) -> str:
    """The count cells of a run: one per count of an update task; an events or export task's own counts, in
    one cell spanning the update columns in the overview (its columns are the update tasks')."""
    if task.kind == "sync" or not overview:
        counts = (*SYNC_COUNTS[:4], HTTP_RETRIES) if overview else task.counts
        cells = "".join(
            f'<td class="n" data-col="{count.col}">{_num(None if run is None else run.value(count))}</td>'
            for count in counts
        )
        if task.kind == "events" and not overview:
            cells += f'<td data-col="watermark">{escape(_watermark(run)) if run else "-"}</td>'
        return cells
    span = len(SYNC_COUNTS[:4]) + 1
    if run is None:
        return f'<td class="other" colspan="{span}"><span class="muted">no counts yet</span></td>'
    items = [
        f'<span data-col="{count.col}">{count.heading} <strong>{_num(run.value(count))}</strong></span>'
        for count in task.counts
        if count is not HTTP_RETRIES and count.col != "chunks"
    ]
    if task.kind == "events":
        items.append(f'<span data-col="watermark">watermark <strong>{escape(_watermark(run))}</strong></span>')
    return f'<td class="other" colspan="{span}">{"".join(items)}</td>'


def _task_rows(tasks: Sequence[SyncTask], links: _Links) -> str:
    rows = []
    for task in tasks:
        last, counted = task.last_run, task.last_counted
        status = _state_badge(None) if last is None else _status_cell(task, last, links, with_time=True)
        if counted is not None and counted is not last:
            status += f'<div class="note">counts: the run of {escape(_when(counted.run_after))}</div>'
        counts = _count_cells(task, counted, overview=True)
        duration = "-"
        seconds = None if counted is None else counted.detail("duration_s")
        if isinstance(seconds, int | float):
            duration = f"{seconds:.1f} s"
        task_name = task.task_id if task.map_index < 0 else f"{task.task_id} [{task.map_index}]"
        rows.append(
            f'<tr data-task="{escape(task.key)}" data-kind="{task.kind}"><td class="name">'
            f"{links.anchor(links.dag(task.dag_id), task.dag_id)}"
            f'<div class="note" title="{escape(task.operator)}">{escape(task_name)}</div></td>'
            f'<td data-col="table"><a href="{escape(_chart_link(task))}" title="chart of its runs">'
            f"{escape(task.table_label)}</a></td>"
            f'<td data-col="state">{status}</td>{counts}<td class="n" data-col="duration">{duration}</td>'
            f'<td data-col="store">{_store_cell(task)}</td></tr>'
        )
    head = (
        "<tr><th>DAG / task</th><th>Table</th><th>Last run</th>"
        + "".join(f'<th class="n">{count.heading}</th>' for count in (*SYNC_COUNTS[:4], HTTP_RETRIES))
        + '<th class="n">duration</th><th data-col="store">Store</th></tr>'
    )
    return (
        f'<div class="scroll"><table id="sync-tasks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
        '<p class="note">Events and export tasks show their own counts. <em>http retries</em>: requests sent again '
        "after a 429, a 5xx or a network error (Airflow's task retries are the <em>try</em>).</p>"
    )


def _store_cell(task: SyncTask) -> str:
    stores = task.stores or ([task.store] if task.store is not None else [])
    if not stores:
        return '<span class="muted">-</span>'
    if len(stores) == 1:
        return _store_flags(stores[0])
    return "".join(
        f'<div data-store="{escape(s.table_name)}" data-brand="{s.brand_id}"><span class="note">{escape(s.label)}:'
        f"</span> {_store_flags(s)}</div>"
        for s in stores
    )


def _store_flags(store: StoreState | None) -> str:
    if store is None:
        return '<span class="muted">-</span>'
    if store.error:
        return '<span class="badge bad">not readable</span>'
    flags = []
    if store.lock:
        flags.append('<span class="badge warn" data-flag="lock">locked</span>')
    if store.plan:
        flags.append(
            f'<span class="badge warn" data-flag="plan">plan {store.plan.acked}/{store.plan.total} chunks</span>'
        )
    if store.quarantined_total:
        flags.append(f'<span class="badge bad" data-flag="quarantine">{store.quarantined_total} quarantined</span>')
    return " ".join(flags) or '<span class="muted">clean</span>'


def _runs_table(task: SyncTask, runs: Sequence[Run], links: _Links) -> str:
    rows = []
    for run in reversed(runs):
        tags = " (dry run)" if run.dry_run else " (baseline)" if run.baseline else ""
        extra = "" if task.kind != "sync" else f'<td class="n" data-col="bytes">{_num(run.value(_same("bytes")))}</td>'
        rows.append(
            f'<tr data-run-id="{escape(run.run_id)}"><td>'
            f"{links.anchor(links.task_instance(task, run), _when(run.run_after))}"
            f'<div class="note">{escape(run.run_id)}{escape(tags)}</div></td>'
            f'<td data-col="state">{_status_cell(task, run, None, with_time=False)}</td>'
            f"{_count_cells(task, run, overview=False)}{extra}</tr>"
        )
    heads = [f'<th class="n">{count.heading}</th>' for count in task.counts]
    if task.kind == "events":
        heads.append("<th>watermark</th>")
    if task.kind == "sync":
        heads.append('<th class="n">bytes</th>')
    head = f"<tr><th>Run</th><th>Status</th>{''.join(heads)}</tr>"
    body = "".join(rows)
    return f'<div class="scroll"><table class="sync-runs"><thead>{head}</thead><tbody>{body}</tbody></table></div>'


def _chart_section(tasks: Sequence[SyncTask], selected: SyncTask | None, links: _Links) -> str:
    if selected is None:
        return ""
    options = "".join(
        f'<option value="{escape(t.key)}"{" selected" if t is selected else ""}>{escape(t.label)}</option>'
        for t in tasks
    )
    picker = (
        f'<form method="get" action="#chart"><label>Task <select name="task">{options}</select></label> '
        '<button type="submit">Show</button></form>'
    )
    runs = selected.runs[-CHART_RUNS:]
    groups: list[tuple[StoreState | None, list[Run]]] = [
        (store, [run for run in runs if run.store_key == store.key]) for store in selected.stores
    ]
    unplaced = [run for run in runs if run.store_key is None or run.store_key not in {s.key for s in selected.stores}]
    if unplaced or not groups:
        groups.append((None, unplaced))
    sections = []
    for store, group in groups:
        if store is None:
            title = "store not known" if selected.stores else escape(selected.table_label)
            attrs = ""
            chart = render_chart(selected) if not selected.stores else ""
        else:
            title = f'{escape(store.label)} <span class="loc">{escape(store.location)}</span>'
            attrs = f' data-store="{escape(store.table_name)}" data-brand="{store.brand_id}"'
            chart = render_chart(selected, store)
        sections.append(
            f'<section class="store-runs"{attrs}><h3>{title}</h3>{chart}{_runs_table(selected, group, links)}</section>'
        )
    count = len(selected.stores)
    several = f" ({count} stores, one chart each)" if count > 1 else ""
    return (
        f'<h2 id="chart" data-task="{escape(selected.key)}">Runs of {escape(selected.label)}{several}</h2>{picker}'
        f"{''.join(sections)}"
        '<p class="note">Up to the newest 30 runs. A run that failed shows what its history record says (its '
        "error's first line, what it delivered); what a failed try delivered is settled by the next try or run.</p>"
    )


def _history_table(store: StoreState) -> str:
    if store.history_error:
        return f'<p class="note error" data-item="history">History not readable: {escape(store.history_error)}</p>'
    if not store.history:
        return '<p class="note" data-item="history">History: no record yet.</p>'
    rows = []
    for record in store.history[:HISTORY_ROWS]:
        who = record.get("run_id") or record.get("run_key") or record.get("holder") or ""
        number = record_try(record)
        status = str(record.get("status") or "success")
        badge = _state_badge("failed" if status == "failed" else "success")
        error = record.get("error")
        rows.append(
            f"<tr><td>{escape(_when(_parse_time(record.get('finished_at'))))}</td>"
            f"<td>{escape(str(record.get('kind') or 'sync'))}</td><td>{badge}"
            f"{'' if number is None else ' try ' + str(number)}</td>"
            f'<td class="note">{escape(str(who))}</td>'
            f'<td class="error">{escape(str(error)) if error else ""}</td></tr>'
        )
    return (
        f'<details data-item="history"><summary>History: {_newest(min(len(store.history), HISTORY_ROWS))}'
        "</summary>"
        '<table class="history"><thead><tr><th>finished</th><th>kind</th><th>status</th><th>run</th><th>error</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></details>"
    )


def _newest(count: int) -> str:
    return "the newest record" if count == 1 else f"the newest {count} records"


def _store_section(tasks: Sequence[SyncTask], now: datetime) -> str:
    stores: dict[tuple[str, int, str], StoreState] = {}
    users: dict[tuple[str, int, str], list[str]] = {}
    for task in tasks:
        for store in task.stores or ([task.store] if task.store is not None else []):
            stores.setdefault(store.key, store)
            if task.label not in users.setdefault(store.key, []):
                users[store.key].append(task.label)
    if not stores:
        return ""
    cards = []
    for key, store in stores.items():
        body = []
        if store.error:
            body.append(f'<p class="error">Not readable from the API server: {escape(store.error)}</p>')
        else:
            body.append(_lock_line(store.lock, now))
            if store.plan is None:
                body.append('<p data-item="plan">Pending plan: none.</p>')
            else:
                body.append(
                    f'<p data-item="plan">Pending plan <code>{escape(store.plan.plan_id)}</code>: '
                    f"{store.plan.acked} of {store.plan.total} chunks acknowledged. The next run of the task "
                    "resumes it.</p>"
                )
            body.append(_quarantine_block(store))
            body.append(_history_table(store))
        cards.append(
            f'<div class="store" data-store="{escape(store.table_name)}" data-brand="{store.brand_id}" '
            f'data-kind="{store.kind}"><h3>{escape(store.label)}</h3>'
            f'<div class="loc">{escape(store.location)}</div>'
            f'<div class="note">used by {escape(", ".join(users[key]))}</div>{"".join(body)}</div>'
        )
    return (
        '<h2 id="stores">Snapshot stores</h2><p class="note">Every store the kept runs used, read from the API '
        f"server where it can reach them; nothing here is changed by this page.</p>{''.join(cards)}"
    )


def _lock_line(lock: dict[str, Any] | None, now: datetime) -> str:
    if not lock:
        return '<p data-item="lock">Lock: free.</p>'
    acquired = _parse_time(lock.get("acquired_at"))
    refreshed = _parse_time(lock.get("refreshed_at"))
    expires = _parse_time(lock.get("expires_at"))
    expired = expires is not None and expires < now
    where = f"{lock.get('host', '?')}, pid {lock.get('pid', '?')}"
    status = '<span class="badge bad">expired</span>' if expired else '<span class="badge warn">held</span>'
    return (
        f'<p data-item="lock">Lock {status} by <code>{escape(str(lock.get("holder", "?")))}</code> '
        f"({escape(where)}) since {escape(_when(acquired))} ({escape(_age(acquired, now))} ago), last refreshed "
        f"{escape(_age(refreshed, now))} ago.</p>"
    )


def _quarantine_block(store: StoreState) -> str:
    if not store.quarantined_total:
        return '<p data-item="quarantine">Quarantined rows: none.</p>'
    rows = [
        f"<tr><td>{escape(str(record.get('id')))}</td><td>{escape(str(record.get('change') or ''))}</td>"
        f"<td>{escape(str(record.get('reason') or ''))}</td></tr>"
        for record in store.quarantined
    ]
    more = store.quarantined_total - len(store.quarantined)
    tail = f'<p class="note">and {more} more.</p>' if more > 0 else ""
    return (
        f'<p data-item="quarantine">Quarantined rows: <strong>{store.quarantined_total}</strong>, rejected by '
        "StopChurn and sent again by the next run.</p>"
        f'<table class="quarantine"><thead><tr><th>id</th><th>change</th><th>reason</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{tail}"
    )


def select_task(tasks: Sequence[SyncTask], key: str | None) -> SyncTask | None:
    """The task named ``key``; else the one that ran last; else the first."""
    if key:
        for task in tasks:
            if task.key == key:
                return task
    latest: dict[datetime, SyncTask] = {}
    for task in tasks:
        last = task.last_run
        if last is not None and last.run_after is not None:
            latest.setdefault(last.run_after, task)
    if latest:
        return latest[max(latest)]
    return tasks[0] if tasks else None


def render_page(
    tasks: Sequence[SyncTask],
    *,
    selected: str | None,
    airflow_base: str,
    user: str,
    now: datetime | None = None,
    refresh_s: int = REFRESH_S,
) -> str:
    """The whole page for ``tasks`` (already filtered to the DAGs the user may read).

    :param selected: the key of the task whose runs the chart shows (``?task=``); else the one that ran last.
    :param refresh_s: the page refreshes itself this often while visible; 0: never.
    """
    now = now or datetime.now(UTC)
    links = _Links(airflow_base)
    chosen = select_task(tasks, selected)
    dags = len({task.dag_id for task in tasks})
    if tasks:
        body = (
            f'<p class="muted" id="summary">{len(tasks)} StopChurn task{"s" if len(tasks) != 1 else ""} in {dags} '
            f"DAG{'s' if dags != 1 else ''} that {escape(user)} can read; counts are those the runs returned or "
            "recorded in their store.</p>"
            f"<h2>StopChurn tasks</h2>{_task_rows(tasks, links)}{_chart_section(tasks, chosen, links)}"
            f"{_store_section(tasks, now)}"
        )
    else:
        body = f'<p class="muted" id="summary">No StopChurn task in the DAGs that {escape(user)} can read.</p>'
    every = f", refreshed every {refresh_s} s while shown" if refresh_s > 0 else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>StopChurn</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
        f'<body data-refresh-s="{max(0, int(refresh_s))}"><h1>StopChurn syncs</h1>'
        f'<div id="content" data-generated="{escape(now.isoformat())}">'
        f'<div class="note">as of {escape(_when(now))}{every}<span id="refresh-status"></span></div>{body}</div>'
        f"<script>{_SCRIPT}</script></body></html>"
    )
