"""Recoverable delivery: every failure settles what StopChurn acknowledged, and the next run repairs the rest.

Each case reproduces one way a run used to lose a change, wedge a table or collapse rows, through the public
engine (``run_sync``) against the sandbox on 127.0.0.1, and then checks what StopChurn holds: after the cause is
fixed (the source, an option, StopChurn accepting again), one more run makes the sandbox equal to the source,
without anyone editing the snapshot store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from helpers_sync import (
    BRAND,
    T0,
    FailAfter,
    RecordingSender,
    assert_sandbox_matches,
    make_client,
    options,
    sandbox_rows,
    update_requests,
)
from sync_world import N, SyncWorld, table
from worker_paths import worker_path  # noqa: F401 - the fixture, run on both worker paths

from airflow_provider_stopchurn.exceptions import (
    SafeguardError,
    SnapshotError,
    SourceDataError,
    StopChurnPayloadTooLargeError,
    StopChurnRejectedError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.sandbox import FaultConfig
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

pytestmark = pytest.mark.usefixtures("worker_path")


class World(SyncWorld):
    def value(self, key: Any, column: str) -> Any:
        kind = "int" if isinstance(key, int) else "str"
        return sandbox_rows(self.sb)[(kind, key)][column]


@pytest.fixture
def world(stopchurn_sandbox_factory: Any, tmp_path: Path) -> Iterator[World]:
    sb = stopchurn_sandbox_factory(record=True)
    root = tmp_path / "snapshots"
    w = World(sb, root)
    w.run(table())
    yield w


# --- 1. rejected rows survive a failure later in the run -------------------------------------------------------
def test_rejected_row_is_not_committed_when_a_later_chunk_fails(world: World) -> None:
    changed = table()
    changed.loc[changed["id"] == 3, "v"] = "CHANGED"  # chunk 1, rejected
    changed.loc[changed["id"] > 20, "qty"] = -1  # chunks 2..5 of the plan
    world.sb.reject_ids([3])
    # the rejected chunk is bisected (several requests); the sandbox fails everything after the 5th acceptance
    failing = FailAfter(make_client(world.sb), world.sb, 5)
    with pytest.raises(TransientDeliveryError):
        world.run(changed, on_rejected_rows="quarantine", sender=failing)
    world.sb.set_faults(FaultConfig())
    retry = world.run(changed, on_rejected_rows="quarantine")
    assert retry.quarantined == 1 and retry.rejected[0]["id"] == 3
    assert world.value(3, "v") == "v3"  # StopChurn still holds the old row
    world.sb.reject_ids([])
    fixed = world.run(changed, on_rejected_rows="quarantine")
    assert fixed.updated == 1 and fixed.quarantined == 0
    assert_sandbox_matches(world.sb, changed)


# --- 6. a 400 under "fail" or a 413 never wedges the table -----------------------------------------------------
def test_rejection_under_fail_then_fixed_source_goes_through(world: World) -> None:
    bad = table()
    bad.loc[bad["id"] <= 30, "v"] = "BAD"  # 30 updates, 6 chunks; StopChurn refuses the last one
    world.sb.reject_ids([30])
    with pytest.raises(StopChurnRejectedError, match="committed"):
        world.run(bad)
    assert world.value(2, "v") == "BAD" and world.value(30, "v") == "v30"
    assert world.store.pending_plan() is None  # settled: chunks 1-5 committed, nothing wedged
    fixed = bad.copy()
    fixed.loc[fixed["id"] == 30, "v"] = "v30"  # the source no longer holds the refused change
    world.sb.reject_ids([])  # and StopChurn takes the fixed row
    recorder = RecordingSender(make_client(world.sb))
    summary = world.run(fixed, sender=recorder)
    # the refused chunk applied nothing: its rows kept their last delivered state, and row 30 no longer changes
    assert summary.settled_chunks == 0 and summary.updated == 4
    assert sorted(u["data"]["data"]["id"] for u in recorder.updates()) == [26, 27, 28, 29]
    assert_sandbox_matches(world.sb, fixed)
    assert world.run(fixed).updated == 0


def test_413_splits_the_body_and_delivers_everything(world: World) -> None:
    changed = table(v=[("x" * 200) + str(i) for i in range(N)])
    world.sb.set_faults(FaultConfig(max_body_bytes=1500))
    summary = world.run(changed, chunk_size=10)
    assert summary.updated == N
    assert summary.requests > summary.chunks  # halves were sent
    assert_sandbox_matches(world.sb, changed)


def test_413_of_one_update_names_it_and_a_smaller_row_then_goes_through(world: World) -> None:
    changed = table()
    changed.loc[changed["id"] == 12, "v"] = "y" * 5000
    world.sb.set_faults(FaultConfig(max_body_bytes=2000))
    with pytest.raises(StopChurnPayloadTooLargeError, match="12"):
        world.run(changed)
    changed.loc[changed["id"] == 12, "v"] = "short"
    world.run(changed)
    assert_sandbox_matches(world.sb, changed)


# --- 9. only StopChurn's acknowledgement counts ---------------------------------------------------------------
def test_a_200_html_page_is_not_an_acknowledgement(world: World) -> None:
    changed = table(qty=np.arange(N) * 7)
    world.sb.set_faults(FaultConfig(html_ok_rate=1.0))
    with pytest.raises(TransientDeliveryError, match="html"):
        world.run(changed)
    assert world.value(1, "qty") == 3  # nothing was applied, nothing committed
    world.sb.set_faults(FaultConfig())
    summary = world.run(changed)
    assert summary.updated == N
    assert_sandbox_matches(world.sb, changed)


# --- 11. a retried try reports what the DAG run delivered ------------------------------------------------------
def test_retry_after_failure_reports_the_run_counts(world: World) -> None:
    changed = table(qty=np.arange(N) * 11)
    with pytest.raises(TransientDeliveryError):
        world.run(changed, sender=FailAfter(make_client(world.sb), world.sb, 3), run_key="dag.task.run-2")
    world.sb.set_faults(FaultConfig())
    retry = world.run(changed, run_key="dag.task.run-2")
    assert retry.settled_chunks == 3
    assert retry.updated == N  # 15 settled from the first try + 25 sent now
    assert_sandbox_matches(world.sb, changed)
    later = world.run(changed.assign(qty=1), run_key="dag.task.run-3")  # another DAG run counts afresh
    assert later.settled_chunks == 0 and later.updated == N


# --- 3. the id actually sent ----------------------------------------------------------------------------------
def test_ids_repeating_across_tenants_are_refused_before_sending(world: World) -> None:
    frame = pd.DataFrame({"tenant": ["eu", "eu", "us", "us"], "id": [1, 2, 1, 2], "v": list("abcd")})
    sent = update_requests(world.sb)
    with pytest.raises(SourceDataError, match="id"):
        run_sync(
            frame,
            SnapshotStore(world.root, BRAND, "tenants"),
            make_client(world.sb),
            options(table_name="tenants", key_columns=("tenant", "id")),
            run_ms=T0,
        )
    assert update_requests(world.sb) == sent


# --- 4. update_all across dropped, retyped and key-retyped columns ---------------------------------------------
@pytest.mark.parametrize(
    ("float_base", "change"),
    [
        pytest.param(False, lambda f: f.drop(columns=["qty"]), id="dropped"),
        pytest.param(False, lambda f: f.assign(qty=f["qty"] % 2 == 0), id="int-to-bool"),
        pytest.param(True, lambda f: f.assign(qty=f["qty"] > 10), id="float-to-bool"),
    ],
)
def test_update_all_with_deleted_rows_across_a_schema_change(world: World, float_base: bool, change: Any) -> None:
    if float_base:
        world.run(table(qty=np.arange(N) * 0.5))  # qty becomes a float column (compatible with int)
    new = change(table().iloc[:30].reset_index(drop=True))  # 10 rows deleted
    summary = world.run(new, on_schema_change="update_all")
    assert summary.deleted == 10 and summary.updated == 30
    assert_sandbox_matches(world.sb, new)
    again = world.run(new)
    assert again.inserted + again.updated + again.deleted == 0


def test_a_retyped_key_is_a_new_identity(world: World) -> None:
    """StopChurn does not promise that 1 and "1" are one id: the old rows are deleted, the new ones inserted."""
    new = table().assign(id=lambda f: f["id"].astype(str))
    with pytest.raises(SafeguardError, match="deletes 40 of 40"):
        world.run(new, on_schema_change="update_all")
    summary = world.run(new, on_schema_change="update_all", allow_large_changes=True)
    assert (summary.deleted, summary.inserted, summary.updated) == (N, N, 0)
    assert_sandbox_matches(world.sb, new)


# --- 5. settling keeps the snapshot's types: one rejected row resends one row ----------------------------------
def test_one_rejected_row_resends_one_row(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    w = World(sb, tmp_path)
    n = 2000
    frame = pd.DataFrame({"id": np.arange(n), "flag": pd.array([None] * n, dtype="boolean"), "x": np.arange(n) * 1.5})
    w.run(frame, chunk_size=500)
    changed = frame.copy()
    changed.loc[changed["id"].isin([5, 1500]), "x"] = -1.0
    sb.reject_ids([5])
    first = w.run(changed, chunk_size=500, on_rejected_rows="quarantine")
    assert first.quarantined == 1 and first.updated == 1
    sb.reject_ids([])
    recorder = RecordingSender(make_client(sb))
    second = w.run(changed, chunk_size=500, sender=recorder)
    assert second.updated == 1 and len(recorder.updates()) == 1
    third = w.run(changed.iloc[1:].reset_index(drop=True), chunk_size=500)  # deleting a row works
    assert third.deleted == 1
    assert_sandbox_matches(sb, changed.iloc[1:])


# --- 2 and 8. a moved CURRENT is never overwritten -------------------------------------------------------------
def test_commit_refuses_when_current_moved(world: World) -> None:
    committed = world.store.read_committed()
    assert committed is not None
    other = world.store.write_snapshot(world.store.read_snapshot(committed.version))
    with pytest.raises(SnapshotError, match="moved"):
        world.store.commit(
            other,
            base_version="not-the-current-version",
            kinds=committed.kinds,
            key_columns=committed.key_columns,
            rows=N,
            plan_id=None,
        )
    after = world.store.read_committed()
    assert after is not None and after.version == committed.version


# --- plans delivered window by window -----------------------------------------------------------------------
def test_a_plan_of_many_windows_settles_and_converges(world: World) -> None:
    """Windows of 7 updates (chunks of 5): a failure in a later window settles the earlier ones."""
    changed = table(qty=np.arange(N) * 13)
    with pytest.raises(TransientDeliveryError):
        world.run(changed, window_rows=7, sender=FailAfter(make_client(world.sb), world.sb, 4))
    committed = world.store.read_committed()
    assert committed is not None and world.store.pending_plan() is None
    world.sb.set_faults(FaultConfig())
    recorder = RecordingSender(make_client(world.sb))
    summary = world.run(changed, window_rows=7, sender=recorder)
    # chunks never pack across windows: 7 updates -> chunks of 5 and 2
    assert all(len(orjson.loads(b)["data"]) in (5, 2, 1) for b in recorder.bodies)
    assert_sandbox_matches(world.sb, changed)
    assert summary.inserted + summary.updated + summary.deleted > 0
    assert world.run(changed, window_rows=7).updated == 0
