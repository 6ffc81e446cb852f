"""The StopChurn page's HTML: server-rendered, its tables, store cards and one chart per store, no CDN.

The plugin (:mod:`.stopchurn`, :mod:`.app`) reads Airflow's metadata database into :class:`.model.SyncTask`
objects, one per StopChurn task of a DAG the user may read, and reads every snapshot store their runs used
(:mod:`.stores`). This module renders what they hold (:func:`render_page`): the tasks' overview, the runs of the
task chosen with its charts (:mod:`.chart`), and a card per store. It imports nothing from Airflow.

The page's only script (``static/page.js``, inline) does two things a server-rendered page cannot: links into
Airflow's own pages open in the whole window (Airflow shows this page in a sandboxed frame that may not navigate the
window itself, see :data:`_SCRIPT`), and the page refreshes itself while it is visible.

The page never shows a connection, so never an API key. Quarantined rows are shown by id, change type and
StopChurn's reason, not by their content.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from importlib.resources import files
from typing import Any
from urllib.parse import urlencode

from airflow_provider_stopchurn.plugins.chart import render_chart
from airflow_provider_stopchurn.plugins.formatting import Links, age, num, parse_time, state_badge, when
from airflow_provider_stopchurn.plugins.model import (
    CHART_RUNS,
    HTTP_RETRIES,
    SYNC_COUNTS,
    Run,
    StoreState,
    SyncTask,
    count_named,
    finite_int,
    record_try,
)

#: History records listed in a store's card.
HISTORY_ROWS = 8
#: The page reloads its data this often while it is visible (``?refresh=`` overrides it; 0 turns it off).
REFRESH_S = 45
#: The shortest refresh interval a ``?refresh=`` can ask for.
MIN_REFRESH_S = 2


def _static(name: str) -> str:
    """A file of the page's ``static`` folder (package data, shipped in the wheel), as text."""
    return files("airflow_provider_stopchurn.plugins").joinpath("static", name).read_text(encoding="utf-8")


#: The page's style sheet (inline, no CDN): ``static/page.css``.
_CSS = _static("page.css")

#: The page's script (inline, no CDN): ``static/page.js``.
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
_SCRIPT = _static("page.js")


def _chart_link(task: SyncTask) -> str:
    return "?" + urlencode({"task": task.key}) + "#chart"


def _watermark(run: Run) -> str:
    value = run.detail("watermark")
    return "-" if value in (None, "") else str(value)


def _status_cell(task: SyncTask, run: Run, links: Links | None, *, with_time: bool) -> str:
    """A run's state: Airflow's badge, the try, what it settled of an earlier try, its error's first line, the
    mass delete it was approved for, and earlier tries that failed."""
    parts = []
    if with_time and links is not None:
        parts.append(links.anchor(links.task_instance(task, run), when(run.run_after)))
    parts.append(state_badge(run.state))
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
        never_sent = None if record is None else finite_int(record.get("never_sent"))
        unacked = None if record is None else finite_int(record.get("unacknowledged"))
        if never_sent or unacked:
            notes.append(
                f'<div class="note" data-item="undelivered">{num(never_sent)} updates never sent, '
                f"{num(unacked)} sent without an acknowledgement</div>"
            )
    elif run.state in ("failed", "upstream_failed") and run.summary is None and record is None:
        notes.append('<div class="note">no record of this run in its store: see its log in Airflow</div>')
    approved = record.get("approved_deletes") if record is not None else None
    if isinstance(approved, dict):
        notes.append(
            f'<div class="note" data-item="approved">mass delete approved: {num(finite_int(approved.get("deletes")))} '
            f"deletes of {num(finite_int(approved.get('rows_before')))} rows"
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
            f'<td class="n" data-col="{count.col}">{num(None if run is None else run.value(count))}</td>'
            for count in counts
        )
        if task.kind == "events" and not overview:
            cells += f'<td data-col="watermark">{escape(_watermark(run)) if run else "-"}</td>'
        return cells
    span = len(SYNC_COUNTS[:4]) + 1
    if run is None:
        return f'<td class="other" colspan="{span}"><span class="muted">no counts yet</span></td>'
    items = [
        f'<span data-col="{count.col}">{count.heading} <strong>{num(run.value(count))}</strong></span>'
        for count in task.counts
        if count is not HTTP_RETRIES and count.col != "chunks"
    ]
    if task.kind == "events":
        items.append(f'<span data-col="watermark">watermark <strong>{escape(_watermark(run))}</strong></span>')
    return f'<td class="other" colspan="{span}">{"".join(items)}</td>'


def _task_rows(tasks: Sequence[SyncTask], links: Links) -> str:
    rows = []
    for task in tasks:
        last, counted = task.last_run, task.last_counted
        status = state_badge(None) if last is None else _status_cell(task, last, links, with_time=True)
        if counted is not None and counted is not last:
            status += f'<div class="note">counts: the run of {escape(when(counted.run_after))}</div>'
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


def _runs_table(task: SyncTask, runs: Sequence[Run], links: Links) -> str:
    rows = []
    for run in reversed(runs):
        tags = " (dry run)" if run.dry_run else " (baseline)" if run.baseline else ""
        extra = (
            "" if task.kind != "sync" else f'<td class="n" data-col="bytes">{num(run.value(count_named("bytes")))}</td>'
        )
        rows.append(
            f'<tr data-run-id="{escape(run.run_id)}"><td>'
            f"{links.anchor(links.task_instance(task, run), when(run.run_after))}"
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


def _chart_section(tasks: Sequence[SyncTask], selected: SyncTask | None, links: Links) -> str:
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
        badge = state_badge("failed" if status == "failed" else "success")
        error = record.get("error")
        rows.append(
            f"<tr><td>{escape(when(parse_time(record.get('finished_at'))))}</td>"
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
    acquired = parse_time(lock.get("acquired_at"))
    refreshed = parse_time(lock.get("refreshed_at"))
    expires = parse_time(lock.get("expires_at"))
    expired = expires is not None and expires < now
    where = f"{lock.get('host', '?')}, pid {lock.get('pid', '?')}"
    status = '<span class="badge bad">expired</span>' if expired else '<span class="badge warn">held</span>'
    return (
        f'<p data-item="lock">Lock {status} by <code>{escape(str(lock.get("holder", "?")))}</code> '
        f"({escape(where)}) since {escape(when(acquired))} ({escape(age(acquired, now))} ago), last refreshed "
        f"{escape(age(refreshed, now))} ago.</p>"
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
    links = Links(airflow_base)
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
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>\n{_CSS}</style></head>'
        f'<body data-refresh-s="{max(0, int(refresh_s))}"><h1>StopChurn syncs</h1>'
        f'<div id="content" data-generated="{escape(now.isoformat())}">'
        f'<div class="note">as of {escape(when(now))}{every}<span id="refresh-status"></span></div>{body}</div>'
        f"<script>\n{_SCRIPT}</script></body></html>"
    )
