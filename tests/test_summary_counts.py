"""The scope of every summary count (docs/update-operator.md: What a run reports): a DAG run's tries add up to the
DAG run, and what a run settles of another run's plan is counted apart, never as its own.

Through ``run_sync`` with a ``run_key`` (a DAG run and task, as the operator passes it) against the sandbox.
A killed run is a real stop: the store refuses every write from the moment the sender dies, so its plan is left
pending exactly as a dead worker leaves it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from dying_fs import DieAfter, DyingMemoryFileSystem, Killed
from helpers_sync import BRAND, T0, TABLE, FailAfter, assert_sandbox_matches, make_client, options
from upath import UPath

from airflow_provider_stopchurn.exceptions import TransientDeliveryError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

N = 40


def table(qty: int = 0) -> pd.DataFrame:
    ids = np.arange(1, N + 1)
    return pd.DataFrame({"id": ids, "qty": ids * 0 + qty})


def run(frame: pd.DataFrame, store: SnapshotStore, sender: Any, tick: int, **opts: Any) -> Any:
    opts.setdefault("chunk_size", 5)
    opts.setdefault("max_concurrent_requests", 1)
    return run_sync(frame, store, sender, options(**opts), run_ms=T0 + 1000 * tick)


def test_three_tries_of_one_dag_run_report_the_dag_run(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    run(table(), store, make_client(sb), 0)
    changed = table(qty=7)
    key = "dag.task.run-2"
    for try_number in (1, 2):  # each try delivers two chunks (10 rows), then StopChurn fails
        with pytest.raises(TransientDeliveryError):
            run(changed, store, FailAfter(make_client(sb), sb, 2), try_number, run_key=key)
        sb.set_faults(FaultConfig())
    last = run(changed, store, make_client(sb), 3, run_key=key)
    assert_sandbox_matches(sb, changed)
    # the DAG run updated every row: counted once, by the DAG run, in both counts
    assert (last.inserted, last.updated, last.deleted, last.unchanged) == (0, N, 0, 0)
    assert last.settled_chunks == 4  # the earlier tries' acknowledged chunks
    assert last.settled_from_other_runs == {}
    assert (last.chunks, last.requests) == (4, 4)  # this try's own requests: the 20 rows left


@pytest.mark.usefixtures("revive")
def test_a_killed_plan_of_another_dag_run_is_counted_apart(sb: SandboxServer) -> None:
    name = f"stopchurn-counts/{uuid.uuid4().hex}"
    dying = SnapshotStore(UPath(f"dyingmem://{name}"), BRAND, TABLE)
    run(table(), dying, make_client(sb), 0)
    with pytest.raises(Killed):
        run(table(qty=1), dying, DieAfter(make_client(sb), 3), 1, run_key="dag.task.run-1")
    DyingMemoryFileSystem.dead = False  # a new process, on the store the dead one left
    store = SnapshotStore(UPath(f"memory://{name}"), BRAND, TABLE)
    assert store.pending_plan() is not None
    store.break_lock()  # the dead run's lock (the person knows it died)

    changed = table(qty=2)
    summary = run(changed, store, make_client(sb), 2, run_key="dag.task.run-2")
    assert_sandbox_matches(sb, changed)
    # run-2 updated every row itself; run-1's 15 acknowledged updates are reported apart
    assert (summary.inserted, summary.updated, summary.deleted, summary.unchanged) == (0, N, 0, 0)
    assert summary.settled_chunks == 0
    assert summary.settled_from_other_runs == {
        "plans": 1,
        "chunks": 3,
        "inserted": 0,
        "updated": 15,
        "deleted": 0,
        "rejected": 0,
    }
    # the history keeps the two apart too (the StopChurn page and `stopchurn history` read it)
    entry = store.read_history()[0]  # newest first
    assert (entry["run_key"], entry["updated"]) == ("dag.task.run-2", N)
    assert entry["settled_from_other_runs"] == summary.settled_from_other_runs
    # a later try of run-2 starts from run-2's own record, without run-1's rows
    retry = run(changed, store, make_client(sb), 3, run_key="dag.task.run-2")
    assert (retry.updated, retry.unchanged, retry.settled_from_other_runs) == (N, 0, {})
