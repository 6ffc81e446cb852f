"""The StopChurn UI plugin without a browser: how Airflow finds it, what importing it costs, and the page's parts.

The page itself, in the real Airflow UI, is tested by ``test_ui_page.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from airflow_provider_stopchurn.get_provider_info import get_provider_info
from airflow_provider_stopchurn.plugins.chart import render_chart
from airflow_provider_stopchurn.plugins.model import Run, StoreState, SyncTask
from airflow_provider_stopchurn.plugins.page import render_page, select_task
from airflow_provider_stopchurn.plugins.stores import inspect_store, inspect_stores
from airflow_provider_stopchurn.store import SnapshotStore

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


# --- discovery -------------------------------------------------------------------------------------------------
def test_airflow_finds_the_plugin_through_its_entry_point() -> None:
    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    ours = [p for p in plugins if p.name == "stopchurn"]
    assert len(ours) == 1 and not [e for e in errors if "stopchurn" in e]
    assert "airflow-provider-stopchurn" in str(ours[0].source)  # loaded from the package's entry point
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert [a["url_prefix"] for a in apps if a["name"] == "StopChurn syncs"] == ["/stopchurn"]
    views, _ = plugins_manager._get_ui_plugins()
    view = next(v for v in views if v["name"] == "StopChurn")
    assert view["url_route"] == "stopchurn" and view["href"] == "stopchurn/" and view["destination"] == "nav"


def test_the_plugin_is_registered_once_when_providers_are_discovered_eagerly() -> None:
    # provider info does not list the plugin as well: Airflow would register it twice and report an import error
    assert "plugins" not in get_provider_info()
    code = (
        "from airflow import plugins_manager\n"
        "plugins, errors = plugins_manager._get_plugins()\n"
        "assert [p.name for p in plugins].count('stopchurn') == 1, plugins\n"
        "ours = {k: v for k, v in errors.items() if 'stopchurn' in (k + str(v)).lower()}\n"
        "assert not ours, ours  # other providers' plugins (OpenLineage's) may report their own duplicates\n"
    )
    done = _run_python(code, AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS="False")
    assert done.returncode == 0, done.stderr[-3000:]


def test_loading_the_plugin_imports_no_web_framework() -> None:
    # every task loads plugins (macros); FastAPI and the page's app are imported on the first page request only
    code = (
        "import sys\n"
        "import airflow_provider_stopchurn.plugins.stopchurn as plugin\n"
        "assert plugin.StopChurnPlugin.fastapi_apps[0]['app'] is not None\n"
        "loaded = [m for m in ('fastapi', 'starlette', 'airflow_provider_stopchurn.plugins.app') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = _run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]


# --- the stores ------------------------------------------------------------------------------------------------
def test_inspect_store_reads_lock_plan_and_quarantine_and_writes_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, 3, "account")
    state = inspect_store(tmp_path, 3, "account")
    assert state == StoreState(location=store.location, brand_id=3, table_name="account")
    rejected = {"id": 5, "reason": "bad email", "position": 0, "update": {"type": "insert", "data": {"id": 5}}}
    store.write_quarantine("20260101T000000000000Z-0000aaaa", [rejected])
    lock = store.table_lock("someone")
    lock.acquire()
    try:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        state = inspect_store(tmp_path, 3, "account", rows=10)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    finally:
        lock.release()
    assert state.error is None and state.plan is None
    assert state.lock is not None and state.lock["holder"] == "someone"
    # the row's content stays in the store: the page (and its JSON) get the id, the change and the reason
    assert (state.quarantined_total, state.quarantined) == (1, [{"id": 5, "change": "insert", "reason": "bad email"}])


def test_an_unreadable_store_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "3" / "account" / "LOCK").mkdir(parents=True)  # a folder where the lock file belongs
    state = inspect_store(tmp_path, 3, "account")
    assert state.error is not None and "LOCK" in state.error


def test_a_store_that_does_not_answer_is_reported_after_the_timeout(tmp_path: Path) -> None:
    folder = tmp_path / "3" / "account"
    folder.mkdir(parents=True)
    fifo = folder / "LOCK"
    os.mkfifo(fifo)  # reading it blocks until a writer comes: a store that hangs
    key = (str(folder), 3, "account")
    try:
        states = inspect_stores({key: tmp_path}, timeout_s=0.5)
        assert states[key].error == "no answer within 0.5 s"
    finally:  # let the blocked reader finish: it reads an empty LOCK
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# --- the page --------------------------------------------------------------------------------------------------
def _task(dag_id: str = "nightly", task_id: str = "sync", runs: int = 3) -> SyncTask:
    task = SyncTask(dag_id, task_id, "StopChurnUpdateOperator", table_name="user", brand_id=1)
    for day in range(runs):
        summary = {"inserted": 10**day, "updated": day, "deleted": 0, "quarantined": day % 2, "unchanged": 5}
        task.runs.append(Run(f"scheduled__{day}", NOW + timedelta(days=day), "success", 1, summary))
    return task


def test_the_chart_draws_one_bar_per_series_and_run_with_the_counts() -> None:
    svg = render_chart(_task())
    assert svg.count('data-series="inserted"') == 3
    for value in (1, 10, 100):
        assert f'data-series="inserted" data-value="{value}"' in svg
    assert 'data-series="rejected" data-value="1"' in svg


def test_dry_runs_stay_out_of_the_chart_and_a_task_without_runs_says_so() -> None:
    task = _task(runs=1)
    task.runs.append(Run("manual__dry", NOW + timedelta(days=5), "success", 1, {"inserted": 7, "dry_run": True}))
    assert render_chart(task).count('data-series="inserted"') == 1
    assert "No run of this task has left counts here yet" in render_chart(SyncTask("d", "t", "StopChurnX"))


def test_the_page_escapes_what_it_shows_and_links_into_airflow() -> None:
    task = _task(dag_id="<script>alert(1)</script>")
    task.runs[-1] = Run("run/with?odd&chars", NOW, "failed", 2, None)
    html = render_page([task], selected=None, airflow_base="/airflow", user="<b>eve</b>", now=NOW)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert "<b>eve</b>" not in html
    assert (
        'href="/airflow/dags/%3Cscript%3Ealert%281%29%3C%2Fscript%3E/runs/run%2Fwith%3Fodd%26chars/tasks/sync"' in html
    )
    assert 'data-state="failed"' in html and "counts: the run of" in html


def test_the_chart_shows_the_task_asked_for_else_the_one_that_ran_last() -> None:
    older, newer = _task("a", runs=1), _task("b", runs=2)
    assert select_task([older, newer], None) is newer
    assert select_task([older, newer], "a/sync") is older
    assert select_task([older, newer], "missing/task") is newer
    assert select_task([SyncTask("c", "t", "StopChurnUpdateOperator")], None) is not None


def test_no_task_no_tables() -> None:
    html = render_page([], selected=None, airflow_base="/", user="ann", now=NOW)
    assert "No StopChurn task in the DAGs that ann can read." in html and "<table" not in html


@pytest.mark.parametrize("lock_age_s, expired", [(30, False), (7200, True)])
def test_the_lock_line_names_holder_age_and_expiry(lock_age_s: int, expired: bool) -> None:
    task = _task()
    since = NOW - timedelta(seconds=lock_age_s)
    task.store = StoreState(
        location="/data/snapshots/1/user",
        brand_id=1,
        table_name="user",
        lock={
            "holder": "nightly.sync run x try 1",
            "host": "worker-1",
            "pid": 42,
            "acquired_at": since.isoformat(),
            "refreshed_at": since.isoformat(),
            "expires_at": (since + timedelta(hours=1)).timestamp(),
        },
    )
    html = render_page([task], selected=None, airflow_base="/", user="ann", now=NOW)
    assert "nightly.sync run x try 1" in html and "worker-1, pid 42" in html
    assert ('<span class="badge bad">expired</span>' in html) is expired


# --- failed and resumed runs, events and export tasks, several stores ------------------------------------------
def _record(run_id: str, **fields: object) -> dict[str, object]:
    """A history record of run ``run_id`` of ``nightly.sync``, in the agreed schema."""
    return {
        "kind": "sync",
        "status": "success",
        "dag_id": "nightly",
        "task_id": "sync",
        "run_id": run_id,
        "finished_at": NOW.isoformat(),
        **fields,
    }


def _page(*tasks: SyncTask, selected: str | None = None) -> str:
    return render_page(list(tasks), selected=selected, airflow_base="/", user="ann", now=NOW)


def _row(html: str, key: str) -> str:
    start = html.index(f'<tr data-task="{key}"')
    return html[start : html.index("</tr>", start)]


def test_a_failed_run_shows_its_status_try_and_error_from_its_history_record() -> None:
    task = _task(runs=1)
    failed = Run("scheduled__failed", NOW + timedelta(days=3), "failed", 2, None)
    failed.records = [
        _record(
            "scheduled__failed",
            status="failed",
            error="StopChurn refused the API key (401).",
            error_type="StopChurnAuthError",
            try_number=2,
            inserted=40,
            updated=0,
            deleted=0,
            rejected=0,
            http_retries=3,
            never_sent=60,
            unacknowledged=10,
        ),
        _record("scheduled__failed", status="failed", error="Lock held by another run.", try_number=1),
    ]
    task.runs.append(failed)
    row = _row(_page(task), "nightly/sync")
    assert 'data-state="failed"' in row and "StopChurn refused the API key (401)." in row
    assert '<span class="note" data-item="try">try 2</span>' in row
    assert "try 1 failed: Lock held by another run." in row
    assert "60 updates never sent, 10 sent without an acknowledgement" in row
    # the counts are the failed run's own (what it delivered), not dashes and not an older run's
    assert '<td class="n" data-col="inserted">40</td>' in row and '<td class="n" data-col="http_retries">3</td>' in row
    assert "counts: the run of" not in row


def test_a_resumed_run_shows_its_try_what_it_settled_and_http_retries() -> None:
    task = _task(runs=1)
    summary = {"inserted": 50, "updated": 0, "deleted": 0, "quarantined": 0, "settled_chunks": 3, "retries": 2}
    task.runs.append(Run("scheduled__resumed", NOW + timedelta(days=3), "success", 2, summary))
    html = _page(task)
    row = _row(html, "nightly/sync")
    assert "try 2" in row and "settled 3 chunks from an earlier try" in row
    assert '<td class="n" data-col="http_retries">2</td>' in row
    assert '<th class="n">http retries</th>' in html and '<th class="n">retries</th>' not in html


def test_an_old_record_without_the_new_fields_reads_retries_as_http_retries_and_the_try_from_its_holder() -> None:
    task = _task(runs=0)
    run = Run("manual__1", NOW, "failed", 0, None)
    run.records = [
        {
            "kind": "sync",
            "status": "failed",
            "error": "StopChurn rejected chunk 4.",
            "run_key": "nightly.sync run manual__1 map -1",
            "holder": "nightly.sync run manual__1 try 3",
            "inserted": 7,
            "retries": 4,
        }
    ]
    task.runs.append(run)
    row = _row(_page(task), "nightly/sync")
    assert "try 3" in row and "StopChurn rejected chunk 4." in row
    assert '<td class="n" data-col="http_retries">4</td>' in row


def test_a_record_belongs_to_its_task_instance_by_the_agreed_fields_or_its_run_key() -> None:
    from airflow_provider_stopchurn.plugins.model import record_belongs

    assert record_belongs(_record("r1"), "nightly", "sync", "r1", -1)
    assert not record_belongs(_record("r1"), "nightly", "sync", "r2", -1)
    old = {"run_key": "a.b.c run r1 map 2"}  # dotted ids: the run key is compared whole
    assert record_belongs(old, "a.b", "c", "r1", 2) and not record_belongs(old, "a", "b.c", "r1", 1)


def test_an_events_task_shows_its_own_counts_and_its_stream() -> None:
    task = SyncTask("ev", "send", "StopChurnEventOperator", table_name="ev.send", brand_id=4)
    summary = {
        "sent": 1200,
        "duplicates": 7,
        "before_window": 4,
        "held_future": 2,
        "watermark": "2026-01-10T11:00:00.000Z",
        "ledger_keys": 5000,
        "retries": 1,
        "chunks": 2,
    }
    task.runs.append(Run("r1", NOW, "success", 1, summary))
    html = _page(task, selected="ev/send")
    row = _row(html, "ev/send")
    assert "events: ev.send (brand 4)" in row and ">?<" not in row
    for col, text in (
        ("events_sent", "1,200"),
        ("duplicates", "7"),
        ("before_window", "4"),
        ("held_future", "2"),
        ("ledger_size", "5,000"),
        ("watermark", "2026-01-10T11:00:00.000Z"),
    ):
        assert f'data-col="{col}">' in row and f"<strong>{text}</strong>" in row, col
    assert 'data-series="events_sent" data-value="1200"' in html  # the chart draws the events' counts


def test_an_export_task_shows_rows_files_and_bytes_exported_and_a_record_fills_in_for_a_summary() -> None:
    task = SyncTask("ex", "export", "StopChurnHistoricalExportOperator", table_name="plan", brand_id=1)
    run = Run("r1", NOW, "success", 1, None)  # XCom gone: the record's fields
    run.records = [
        {
            "kind": "export",
            "run_key": "ex.export run r1 map -1",
            "rows_exported": 25,
            "files": 1,
            "bytes_exported": 4096,
        }
    ]
    task.runs.append(run)
    row = _row(_page(task), "ex/export")
    for col, text in (("rows_exported", "25"), ("files", "1"), ("bytes_exported", "4,096")):
        assert f'<span data-col="{col}">' in row and f"<strong>{text}</strong>" in row, col


def test_an_approved_mass_delete_is_shown_with_its_run_and_counts() -> None:
    task = _task(runs=1)
    task.runs[-1].records = [
        _record("scheduled__0", approved_deletes={"run_id": "manual__approve", "deletes": 900, "rows_before": 1000})
    ]
    assert "mass delete approved: 900 deletes of 1,000 rows (run manual__approve)" in _page(task)


def test_every_store_of_a_task_is_listed_and_each_gets_its_own_titled_chart() -> None:
    task = _task(runs=3)
    first = StoreState(location="/s/1/user", brand_id=1, table_name="user")
    second = StoreState(location="/s/2/user", brand_id=2, table_name="user")
    for run, store in zip(task.runs, (first, first, second), strict=True):
        run.store_key = store.key
    task.stores, task.store = [second, first], second
    html = _page(task, selected="nightly/sync")
    assert html.count('<div class="store" data-store="user"') == 2
    sections = html.split('<section class="store-runs"')[1:]
    assert [s.split(">", 1)[0] for s in sections] == [
        ' data-store="user" data-brand="2"',
        ' data-store="user" data-brand="1"',
    ]
    assert [s.count('<g class="run"') for s in sections] == [1, 2]
    assert "<h3>user (brand 2)" in sections[0] and "<h3>user (brand 1)" in sections[1]


def test_links_into_airflow_are_opened_by_the_script_and_the_page_refreshes_while_shown() -> None:
    html = _page(_task())
    assert 'target="_top"' not in html
    assert '<a href="/dags/nightly" data-airflow-link>nightly</a>' in html
    assert 'data-refresh-s="45"' in html and "visibilityState" in html and "window.parent.document" in html
    off = render_page([_task()], selected=None, airflow_base="/", user="ann", now=NOW, refresh_s=0)
    assert 'data-refresh-s="0"' in off


def test_stores_are_read_with_their_history_newest_first(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, 3, "account")
    store.append_history(_record("r1"))
    store.append_history(_record("r2", status="failed", error="boom"))
    key = (store.location, 3, "account")
    (state,) = inspect_stores({key: tmp_path}).values()
    assert [r["run_id"] for r in state.history] == ["r2", "r1"] and state.history_error is None
    html = _page(_with_store(state))
    assert "History: the newest 2 records" in html and '<td class="error">boom</td>' in html
    # a history that did not answer in time is said so; the rest of the store is still shown
    late = StoreState(location="/s", brand_id=3, table_name="account", history_error="no answer within 5 s")
    html = _page(_with_store(late))
    assert "History not readable: no answer within 5 s" in html and "Lock: free." in html


def _with_store(store: StoreState) -> SyncTask:
    task = _task(runs=1)
    task.runs[-1].store_key = store.key
    task.stores, task.store = [store], store
    return task
