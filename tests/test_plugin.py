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
from airflow_provider_stopchurn.plugins.page import (
    Run,
    StoreState,
    SyncTask,
    inspect_store,
    inspect_stores,
    render_chart,
    render_page,
    select_task,
)
from airflow_provider_stopchurn.snapshot import SnapshotStore

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
    assert "No run of this task has returned a summary yet" in render_chart(SyncTask("d", "t", "StopChurnX"))


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
