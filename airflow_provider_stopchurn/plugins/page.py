"""What the StopChurn page shows, and its HTML: server-rendered, one inline SVG chart, no script, no CDN.

The plugin (:mod:`.stopchurn`) reads Airflow's metadata database into :class:`SyncTask` objects, one per StopChurn
task of a DAG the user may read, with the task's runs and the summaries they returned (XCom). This module looks
into the snapshot stores of those tasks through the store's public API (:func:`inspect_stores`) and renders the
page (:func:`render_page`). It imports nothing from Airflow.

The page never shows a connection, so never an API key. Quarantined rows are shown by id, change type and
StopChurn's reason, not by their content.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from airflow_provider_stopchurn.snapshot import SnapshotStore

#: The chart's series: (name, summary key, colour).
SERIES: tuple[tuple[str, str, str], ...] = (
    ("inserted", "inserted", "#2e7d32"),
    ("updated", "updated", "#1565c0"),
    ("deleted", "deleted", "#c62828"),
    ("rejected", "quarantined", "#ef6c00"),
)
#: The count columns of the tables: (heading, summary key).
_COUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    *((name, key) for name, key, _ in SERIES),
    ("unchanged", "unchanged"),
    ("chunks", "chunks"),
    ("retries", "retries"),
)
#: Runs shown in a task's chart and run table (the newest).
CHART_RUNS = 30
#: Quarantined rows listed per store (the count is always the full one).
QUARANTINE_ROWS = 20
#: How long the page waits for all snapshot stores together before it reports the rest as not answering.
STORE_TIMEOUT_S = 5.0


# --- the model -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run (task instance) of a sync task; ``summary`` is what it returned, if it returned anything."""

    run_id: str
    run_after: datetime | None
    state: str | None
    try_number: int = 0
    summary: dict[str, Any] | None = None

    def count(self, key: str) -> int | None:
        """``summary[key]`` as an int; None without a summary or that key."""
        if self.summary is None:
            return None
        value = self.summary.get(key)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def dry_run(self) -> bool:
        return bool(self.summary and self.summary.get("dry_run"))

    @property
    def baseline(self) -> bool:
        return bool(self.summary and self.summary.get("baseline"))


@dataclass
class PendingPlan:
    plan_id: str
    acked: int
    total: int


@dataclass
class StoreState:
    """What a snapshot store holds besides its snapshot: lock, pending plan, quarantined rows."""

    location: str
    brand_id: int
    table_name: str
    error: str | None = None
    lock: dict[str, Any] | None = None
    plan: PendingPlan | None = None
    #: the newest quarantine file's first rows: ``id``, ``change`` (insert/update/delete) and ``reason``
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    quarantined_total: int = 0


@dataclass
class SyncTask:
    """A StopChurn task of a DAG (one map index of a mapped task), its runs (oldest first) and its store."""

    dag_id: str
    task_id: str
    operator: str
    map_index: int = -1
    table_name: str | None = None
    brand_id: int | None = None
    runs: list[Run] = field(default_factory=list)
    #: ``snapshot_uri`` as the newest run rendered it (None: the default location), when known
    snapshot_uri: str | None = None
    snapshot_uri_known: bool = False
    store: StoreState | None = None

    @property
    def key(self) -> str:
        base = f"{self.dag_id}/{self.task_id}"
        return base if self.map_index < 0 else f"{base}/{self.map_index}"

    @property
    def label(self) -> str:
        return self.key.replace("/", " / ")

    @property
    def last_run(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    @property
    def last_summary(self) -> Run | None:
        """The newest run that returned a summary."""
        return next((run for run in reversed(self.runs) if run.summary is not None), None)

    @property
    def table_label(self) -> str:
        table = self.table_name or "?"
        return f"{table} (brand {self.brand_id})" if self.brand_id is not None else table


# --- the stores ----------------------------------------------------------------------------------------------
def inspect_store(root: Any, brand_id: int, table_name: str, *, rows: int = QUARANTINE_ROWS) -> StoreState:
    """Read the lock, the pending plan and the newest quarantine file of one table's store. Writes nothing."""
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
    return state


def _rejection(record: Mapping[str, Any]) -> dict[str, Any]:
    """A quarantined row as the page shows it: its id, the change and StopChurn's reason (not its content)."""
    update = record.get("update")
    update = update if isinstance(update, dict) else {}
    data = update.get("data")
    data = data if isinstance(data, dict) else {}
    return {"id": record.get("id", data.get("id")), "change": update.get("type"), "reason": record.get("reason")}


def inspect_stores(
    targets: Mapping[tuple[str, int, str], Any], *, timeout_s: float = STORE_TIMEOUT_S
) -> dict[tuple[str, int, str], StoreState]:
    """Inspect several stores at once, keyed ``(location, brand_id, table_name)`` with the root as value.

    A store that has not answered after ``timeout_s`` (an object store that hangs) is reported as such; its
    reader thread is left to finish on its own.
    """
    if not targets:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets)), thread_name_prefix="stopchurn")
    try:
        futures = {
            key: pool.submit(inspect_store, root, key[1], key[2])
            for key, root in targets.items()  # one reader per store
        }
        concurrent.futures.wait(futures.values(), timeout=timeout_s)
        states = {}
        for key, future in futures.items():
            if future.done():
                states[key] = future.result()
            else:
                future.cancel()
                states[key] = StoreState(
                    location=key[0], brand_id=key[1], table_name=key[2], error=f"no answer within {timeout_s:g} s"
                )
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
        return datetime.fromtimestamp(value, UTC)
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
    """Links into Airflow's own UI (opened in the whole window, not in the page's frame)."""

    def __init__(self, airflow_base: str) -> None:
        self.base = airflow_base if airflow_base.endswith("/") else airflow_base + "/"

    def dag(self, dag_id: str) -> str:
        return f"{self.base}dags/{quote(dag_id, safe='')}"

    def task_instance(self, task: SyncTask, run: Run) -> str:
        url = f"{self.dag(task.dag_id)}/runs/{quote(run.run_id, safe='')}/tasks/{quote(task.task_id, safe='')}"
        return url if task.map_index < 0 else f"{url}/mapped/{task.map_index}"

    def anchor(self, url: str, text: str) -> str:
        return f'<a href="{escape(url)}" target="_top">{escape(text)}</a>'


def _chart_link(task: SyncTask) -> str:
    return "?" + urlencode({"task": task.key}) + "#chart"


# --- the chart -----------------------------------------------------------------------------------------------
def chart_runs(task: SyncTask, limit: int = CHART_RUNS) -> list[Run]:
    """The runs the chart shows: the newest ``limit`` that returned a summary, dry runs left out."""
    return [run for run in task.runs if run.summary is not None and not run.dry_run][-limit:]


def render_chart(task: SyncTask) -> str:
    """Grouped bars (inserted, updated, deleted, rejected) per run, on a logarithmic scale."""
    runs = chart_runs(task)
    if not runs:
        return '<p class="muted" id="chart-empty">No run of this task has returned a summary yet.</p>'
    peak = max((run.count(key) or 0) for run in runs for _, key, _ in SERIES)
    decades = max(1, math.ceil(math.log10(peak + 1)))
    top = math.log10(10**decades + 1)
    bar, gap, left, right, head, plot_h, foot = 14, 22, 52, 12, 12, 180, 26
    group = len(SERIES) * bar + gap
    width = max(480, left + len(runs) * group + right)
    height = head + plot_h + foot

    def y_of(value: int) -> float:
        return head + plot_h - plot_h * math.log10(value + 1) / top

    parts = [
        f'<svg id="sync-chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'data-task="{escape(task.key)}" aria-label="Changes per run of {escape(task.label)}">'
    ]
    for tick in [0, *(10**i for i in range(decades + 1))]:
        y = y_of(tick)
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_short(tick)}</text>')
    every = max(1, math.ceil(72 / group))  # a label (about 65 px wide) every few runs
    for index, run in enumerate(runs):
        x0 = left + index * group + gap / 2
        parts.append(f'<g class="run" data-run-id="{escape(run.run_id)}">')
        for offset, (name, key, colour) in enumerate(SERIES):
            value = run.count(key) or 0
            y = y_of(value)
            parts.append(
                f'<rect class="bar" data-series="{name}" data-value="{value}" x="{x0 + offset * bar:.1f}" '
                f'y="{y:.1f}" width="{bar - 2}" height="{head + plot_h - y:.1f}" fill="{colour}">'
                f"<title>{escape(run.run_id)}: {value:,} {name}</title></rect>"
            )
        parts.append("</g>")
        if index % every == 0:
            label = run.run_after.astimezone(UTC).strftime("%m-%d %H:%M") if run.run_after else run.run_id[:11]
            cx = x0 + len(SERIES) * bar / 2
            parts.append(
                f'<text class="tick" x="{cx:.1f}" y="{head + plot_h + 16}" text-anchor="middle">{escape(label)}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend-item"><span class="swatch" style="background:{colour}"></span>{name}</span>'
        for name, _, colour in SERIES
    )
    return (
        f'<div class="legend">{legend}</div><div class="chart-box">{"".join(parts)}</div>'
        '<p class="note">Runs oldest first, on a logarithmic scale; a bar\'s tooltip names its run.</p>'
    )


# --- the page ------------------------------------------------------------------------------------------------
_CSS = """
:root { color-scheme: light dark; --fg: #1f2933; --muted: #66727f; --line: #d9dee3; --head: #f3f5f7; }
@media (prefers-color-scheme: dark) { :root { --fg: #e4e7eb; --muted: #9aa5b1; --line: #3e4c59; --head: #1f2933; } }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 16px 20px; }
h1 { font-size: 20px; margin: 0 0 2px; } h2 { font-size: 16px; margin: 26px 0 8px; }
.muted { color: var(--muted); } a { color: #3c6df0; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; white-space: nowrap; }
th { background: var(--head); font-weight: 600; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.badge { border-radius: 9px; padding: 1px 8px; font-size: 12px; background: #e4e7eb; color: #1f2933; }
.badge.ok { background: #c8e6c9; } .badge.bad { background: #ffcdd2; } .badge.warn { background: #ffe0b2; }
.badge.run { background: #bbdefb; }
.note { font-size: 12px; color: var(--muted); }
td[data-col="store"] { white-space: normal; min-width: 7em; }
td[data-col="store"] .badge { display: inline-block; margin: 1px 0; }
td[data-col="state"] .note { white-space: normal; }
.legend { margin: 4px 0; } .legend-item { margin-right: 14px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }
.chart-box, .scroll { overflow-x: auto; }
svg .grid { stroke: var(--line); } svg .tick { fill: var(--muted); font-size: 11px; }
.store { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.store h3 { font-size: 14px; margin: 0 0 4px; } .store .loc { font-family: monospace; font-size: 12px; }
.error { color: #c62828; }
"""


def _task_rows(tasks: Sequence[SyncTask], links: _Links) -> str:
    rows = []
    for task in tasks:
        last, counted = task.last_run, task.last_summary
        status = _state_badge(None if last is None else last.state)
        if last is not None:
            status = f"{links.anchor(links.task_instance(task, last), _when(last.run_after))} {status}"
        if counted is not None and counted is not last:
            status += f'<div class="note">counts: the run of {escape(_when(counted.run_after))}</div>'
        if counted is not None and counted.dry_run:
            status += '<div class="note">dry run: nothing sent</div>'
        counts = "".join(
            f'<td class="n" data-col="{name}">{_num(None if counted is None else counted.count(key))}</td>'
            for name, key in _COUNT_COLUMNS
            if name != "chunks"
        )
        duration = "-"
        seconds = None if counted is None or counted.summary is None else counted.summary.get("duration_s")
        if isinstance(seconds, int | float):
            duration = f"{seconds:.1f} s"
        task_name = task.task_id if task.map_index < 0 else f"{task.task_id} [{task.map_index}]"
        rows.append(
            f'<tr data-task="{escape(task.key)}"><td>{links.anchor(links.dag(task.dag_id), task.dag_id)}'
            f'<div class="note" title="{escape(task.operator)}">{escape(task_name)}</div></td>'
            f'<td data-col="table"><a href="{escape(_chart_link(task))}" title="chart of its runs">'
            f"{escape(task.table_label)}</a></td>"
            f'<td data-col="state">{status}</td>{counts}<td class="n">{duration}</td>'
            f'<td data-col="store">{_store_flags(task.store)}</td></tr>'
        )
    head = (
        "<tr><th>DAG / task</th><th>Table</th><th>Last run</th>"
        + "".join(f'<th class="n">{name}</th>' for name, _ in _COUNT_COLUMNS if name != "chunks")
        + '<th class="n">duration</th><th>Store</th></tr>'
    )
    return (
        f'<div class="scroll"><table id="sync-tasks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
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
    runs = list(reversed(selected.runs[-CHART_RUNS:]))
    rows = []
    for run in runs:
        tags = " (dry run)" if run.dry_run else " (baseline)" if run.baseline else ""
        counts = "".join(f'<td class="n" data-col="{name}">{_num(run.count(key))}</td>' for name, key in _COUNT_COLUMNS)
        rows.append(
            f'<tr data-run-id="{escape(run.run_id)}"><td>'
            f"{links.anchor(links.task_instance(selected, run), _when(run.run_after))}"
            f'<div class="note">{escape(run.run_id)}{escape(tags)}</div></td>'
            f'<td data-col="state">{_state_badge(run.state)}</td>{counts}'
            f'<td class="n">{_num(run.count("bytes"))}</td></tr>'
        )
    head = (
        "<tr><th>Run</th><th>Status</th>"
        + "".join(f'<th class="n">{name}</th>' for name, _ in _COUNT_COLUMNS)
        + '<th class="n">bytes</th></tr>'
    )
    return (
        f'<h2 id="chart">Runs of {escape(selected.label)}: {escape(selected.table_label)}</h2>{picker}'
        f"{render_chart(selected)}"
        f'<div class="scroll"><table id="sync-runs"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
        '<p class="note">Up to the newest 30 runs. A run that failed before it finished returned no summary; '
        "what it delivered is counted in the run that completed its plan.</p>"
    )


def _store_section(tasks: Sequence[SyncTask], now: datetime) -> str:
    stores: dict[tuple[str, int, str], StoreState] = {}
    users: dict[tuple[str, int, str], list[str]] = {}
    for task in tasks:
        if task.store is not None:
            key = (task.store.location, task.store.brand_id, task.store.table_name)
            stores.setdefault(key, task.store)
            users.setdefault(key, []).append(task.label)
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
        cards.append(
            f'<div class="store" data-store="{escape(store.table_name)}" data-brand="{store.brand_id}">'
            f"<h3>{escape(store.table_name)} (brand {store.brand_id})</h3>"
            f'<div class="loc">{escape(store.location)}</div>'
            f'<div class="note">used by {escape(", ".join(users[key]))}</div>{"".join(body)}</div>'
        )
    return (
        '<h2 id="stores">Snapshot stores</h2><p class="note">Read from the API server, where it can reach them; '
        f"nothing here is changed by this page.</p>{''.join(cards)}"
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
    tasks: Sequence[SyncTask], *, selected: str | None, airflow_base: str, user: str, now: datetime | None = None
) -> str:
    """The whole page for ``tasks`` (already filtered to the DAGs the user may read)."""
    now = now or datetime.now(UTC)
    links = _Links(airflow_base)
    chosen = select_task(tasks, selected)
    dags = len({task.dag_id for task in tasks})
    if tasks:
        body = (
            f'<p class="muted" id="summary">{len(tasks)} StopChurn task{"s" if len(tasks) != 1 else ""} in {dags} '
            f"DAG{'s' if dags != 1 else ''} that {escape(user)} can read; counts are those the runs returned.</p>"
            f"<h2>Sync tasks</h2>{_task_rows(tasks, links)}{_chart_section(tasks, chosen, links)}"
            f"{_store_section(tasks, now)}"
        )
    else:
        body = f'<p class="muted" id="summary">No StopChurn task in the DAGs that {escape(user)} can read.</p>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>StopChurn</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
        f'<body><h1>StopChurn syncs</h1><div class="note">as of {escape(_when(now))}</div>{body}</body></html>'
    )
