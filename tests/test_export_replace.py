"""``replace_snapshot=True``: an export replacing the update path's snapshot leaves no phantom at StopChurn,
settles (never discards) an unfinished update plan, and takes the table's lock like an update run.

Every scenario ends as a user's would: the export's files are uploaded through the sandbox's Back Office route,
then an update run of the current source; the sandbox must then hold exactly that source.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers_sync import RecordingSender, assert_sandbox_matches, make_client
from killswitch_fs import Killed, KillSwitchFileSystem, fresh_root

from airflow_provider_stopchurn.exceptions import SafeguardError, SnapshotLockedError, StopChurnConfigError
from airflow_provider_stopchurn.export.engine import run_export
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.export.summary import ExportSummary
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

BRAND = 9
TABLE = "account"
T0 = 1_750_000_000_000


def table(ids: list[int], plan: str = "free") -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "plan": [plan] * len(ids), "seats": [i % 7 for i in ids]})


def sync_options(**kwargs: Any) -> SyncOptions:
    return SyncOptions(brand_id=BRAND, table_name=TABLE, **kwargs)


def export(store: SnapshotStore, output: Any, source: Any, **kwargs: Any) -> ExportSummary:
    kwargs.setdefault("replace_snapshot", True)
    kwargs.setdefault("run_id", "export-1")
    options = ExportOptions(brand_id=BRAND, table_name=TABLE, **kwargs)
    return run_export(source, store, output, options, run_ms=T0 + 50_000)


def upload_all(sb: SandboxServer, summary: ExportSummary, output: Any) -> None:
    """The Back Office upload of every part file the manifest lists."""
    folder = output / str(BRAND) / TABLE / summary.output_uri.rstrip("/").rsplit("/", 1)[-1]
    manifest = json.loads((folder / "manifest.json").read_bytes())
    for item in manifest["files"]:
        request = urllib.request.Request(
            f"{sb.url}/_sandbox/historical/{BRAND}/{TABLE}", data=(folder / item["name"]).read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["message"] == "Historical data received"


def updates_of(recorder: RecordingSender) -> list[tuple[str, Any]]:
    return sorted((u["type"], u["data"]["data"]["id"]) for u in recorder.updates())


# --- phantoms --------------------------------------------------------------------------------------------------
def test_rows_the_export_lacks_are_deleted_by_the_next_update_run(
    stopchurn_sandbox: SandboxServer, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    run_sync(table([1, 2, 3]), store, make_client(stopchurn_sandbox), sync_options(), run_ms=T0)
    source = table([1, 2, 4], plan="pro")  # 3 is gone, 4 is new, 1 and 2 changed
    summary = export(store, tmp_path / "export", source)
    assert summary.replaced_snapshot and summary.rows == 3 and summary.kept_rows == 1
    upload_all(stopchurn_sandbox, summary, tmp_path / "export")
    recorder = RecordingSender(make_client(stopchurn_sandbox))
    result = run_sync(source, store, recorder, sync_options(), run_ms=T0 + 100_000)
    assert updates_of(recorder) == [("delete", 3)]  # only the phantom: the rest came with the upload
    assert (result.deleted, result.inserted, result.updated) == (1, 0, 0)
    assert_sandbox_matches(stopchurn_sandbox, source, brand_id=BRAND, table=TABLE)


def test_a_lacking_row_that_comes_back_is_sent_not_lost(stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    run_sync(table([1, 2, 3]), store, make_client(stopchurn_sandbox), sync_options(), run_ms=T0)
    summary = export(store, tmp_path / "export", table([1, 2]))
    upload_all(stopchurn_sandbox, summary, tmp_path / "export")
    back = pd.concat([table([1, 2]), table([3], plan="team")], ignore_index=True)  # 3 is back, changed
    recorder = RecordingSender(make_client(stopchurn_sandbox))
    run_sync(back, store, recorder, sync_options(), run_ms=T0 + 100_000)
    assert updates_of(recorder) == [("update", 3)]
    assert_sandbox_matches(stopchurn_sandbox, back, brand_id=BRAND, table=TABLE)


def test_the_replaced_snapshot_with_other_key_types_is_refused(
    stopchurn_sandbox: SandboxServer, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    run_sync(table([1, 2, 3]), store, make_client(stopchurn_sandbox), sync_options(), run_ms=T0)
    version = store.read_committed().version
    retyped = table([1, 2]).assign(id=["1", "2"])
    with pytest.raises(SafeguardError, match="'id'") as info:
        export(store, tmp_path / "export", retyped)
    assert "Nothing was written" in str(info.value)
    assert store.read_committed().version == version
    assert not list((tmp_path / "export").glob("**/manifest.json"))


def test_an_id_that_moved_to_another_key_is_not_deleted(stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    """The key is not the id: an id the export gives another key stays (deleting it would remove the new row)."""
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    first = pd.DataFrame({"tenant": ["a", "b"], "num": [1, 1], "id": [10, 20], "v": [1, 2]})
    opts = sync_options(key_columns=("tenant", "num"))
    run_sync(first, store, make_client(stopchurn_sandbox), opts, run_ms=T0)
    moved = pd.DataFrame({"tenant": ["b", "c"], "num": [1, 1], "id": [20, 10], "v": [2, 3]})  # id 10: a -> c
    summary = export(store, tmp_path / "export", moved, key_columns=("tenant", "num"))
    assert summary.kept_rows == 0
    upload_all(stopchurn_sandbox, summary, tmp_path / "export")
    run_sync(moved, store, make_client(stopchurn_sandbox), opts, run_ms=T0 + 100_000)
    assert_sandbox_matches(stopchurn_sandbox, moved, ("tenant", "num"), brand_id=BRAND, table=TABLE)


def test_a_key_whose_id_changed_is_refused(stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    first = pd.DataFrame({"tenant": ["a", "b"], "num": [1, 1], "id": [10, 20], "v": [1, 2]})
    run_sync(first, store, make_client(stopchurn_sandbox), sync_options(key_columns=("tenant", "num")), run_ms=T0)
    renumbered = first.assign(id=[11, 20])
    with pytest.raises(SafeguardError, match="10") as info:
        export(store, tmp_path / "export", renumbered, key_columns=("tenant", "num"))
    assert "Nothing was written" in str(info.value)


# --- a pending update plan --------------------------------------------------------------------------------------
def _killed_update_run(sb: SandboxServer, store: SnapshotStore, source: pd.DataFrame, acks: int) -> None:
    """An update run whose process dies just before it records acknowledgement number ``acks + 1``."""
    KillSwitchFileSystem.arm(lambda path, _n: "/acks/" in path and int(path.rsplit("/", 1)[-1]) == acks)
    with pytest.raises(Killed):
        run_sync(source, store, make_client(sb), sync_options(chunk_size=5, max_concurrent_requests=1), run_ms=T0 + 1)
    KillSwitchFileSystem.arm(None)  # a new process on the store the dead one left
    store.break_lock()  # the dead run's process is gone: its lock would be broken at once


def test_a_pending_update_plan_is_settled_not_discarded(stopchurn_sandbox: SandboxServer) -> None:
    sb = stopchurn_sandbox
    store = SnapshotStore(fresh_root("snapshots"), BRAND, TABLE)
    output = fresh_root("export")
    run_sync(table(list(range(1, 11))), store, make_client(sb), sync_options(), run_ms=T0)
    grown = table(list(range(1, 31)))  # inserts 11..30: 4 chunks of 5
    _killed_update_run(sb, store, grown, acks=2)
    pending = store.pending_plan(cleanup=False)
    assert pending is not None and len(store.acks(pending)) == 2
    assert {r["id"] for r in sb.rows(BRAND, TABLE)} == set(range(1, 26))  # chunk 3 was applied, never recorded
    # the export's source is the table as it is now: the rows the dead run inserted are gone again
    now = table(list(range(1, 9)))
    summary = export(store, output, now)
    # kept: 9, 10, the 10 acknowledged, and the 10 of the two chunks recorded but not acknowledged (a dead run
    # cannot tell whether it sent them)
    assert summary.settled_chunks == 2 and summary.kept_rows == 2 + 10 + 10
    assert store.pending_plan(cleanup=False) is None
    upload_all(sb, summary, output)
    recorder = RecordingSender(make_client(sb))
    run_sync(now, store, recorder, sync_options(allow_large_changes=True), run_ms=T0 + 100_000)
    # deletes of the rows StopChurn may hold, nothing else
    assert updates_of(recorder) == [("delete", i) for i in range(9, 31)]
    assert_sandbox_matches(sb, now, brand_id=BRAND, table=TABLE)


def test_after_settling_the_next_update_run_resends_only_unacknowledged_rows(stopchurn_sandbox: SandboxServer) -> None:
    sb = stopchurn_sandbox
    store = SnapshotStore(fresh_root("snapshots"), BRAND, TABLE)
    output = fresh_root("export")
    run_sync(table(list(range(1, 21))), store, make_client(sb), sync_options(), run_ms=T0)
    changed = table(list(range(1, 21)), plan="pro")  # 20 updates: 4 chunks of 5
    _killed_update_run(sb, store, changed, acks=1)
    # the export covers rows 1..10 only (a partial export of the table): 11..20 keep what StopChurn holds
    summary = export(store, output, changed[changed["id"] <= 10])
    assert summary.settled_chunks == 1
    upload_all(sb, summary, output)
    recorder = RecordingSender(make_client(sb))
    run_sync(changed, store, recorder, sync_options(), run_ms=T0 + 100_000)
    sent = updates_of(recorder)
    # chunk 2 (6..10) was applied but never acknowledged; the export covers it. Chunks 3 and 4 (11..20) were never
    # acknowledged: sent again, and nothing else
    assert sent == [("update", i) for i in range(11, 21)]
    assert_sandbox_matches(sb, changed, brand_id=BRAND, table=TABLE)


def test_a_warehouse_plan_is_not_settled_by_the_export(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    store.write_plan(
        target_version="token",
        base_version=None,
        changes=None,
        chunks=[],
        meta={"diff_location": "warehouse", "brand_id": BRAND, "table_name": TABLE},
    )
    with pytest.raises(StopChurnConfigError, match="warehouse"):
        export(store, tmp_path / "export", table([1]))
    assert store.pending_plan(cleanup=False) is not None


# --- the lock ----------------------------------------------------------------------------------------------------
def test_the_export_waits_for_and_then_refuses_a_table_an_update_run_holds(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    with store.lock("an update run"), pytest.raises(SnapshotLockedError, match="an update run"):
        export(store, tmp_path / "export", table([1, 2]), lock_wait_s=0.2)
    assert store.read_committed() is None and not (tmp_path / "export").exists()


def test_an_export_that_lost_its_lock_commits_nothing(stopchurn_sandbox: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    run_sync(table([1, 2, 3]), store, make_client(stopchurn_sandbox), sync_options(), run_ms=T0)
    version = store.read_committed().version
    taker = store.table_lock("another run")

    def source() -> pd.DataFrame:  # read under the export's lock: meanwhile its lease is taken over
        store.break_lock()
        taker.acquire()
        return table([1, 2, 4])

    with pytest.raises(SnapshotLockedError, match="lost its lock"):
        export(store, tmp_path / "export", source)
    taker.release()
    assert store.read_committed().version == version
    assert not list((tmp_path / "export").glob("**/manifest.json"))
    # the update path goes on from its own snapshot
    run_sync(table([1, 2, 4]), store, make_client(stopchurn_sandbox), sync_options(), run_ms=T0 + 1)
    assert_sandbox_matches(stopchurn_sandbox, table([1, 2, 4]), brand_id=BRAND, table=TABLE)
