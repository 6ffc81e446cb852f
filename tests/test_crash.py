"""A sync killed with SIGKILL mid-delivery, then run again: it converges and resends at most one chunk.

The sync runs in a subprocess (``crash_worker.py``) against a sandbox of this process that answers slowly
(``latency``), so the kill lands while a request is in flight; the test polls the sandbox until a random number
of requests was accepted, kills the worker, and runs the same sync in-process.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    assert_sandbox_matches,
    deterministic_table,
    make_client,
    options,
    received_counts,
    resent,
    tree_digest,
)
from worker_harness import kill_after, start_worker
from worker_paths import worker_path  # noqa: F401 - the fixture, run on both worker paths

from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

pytestmark = pytest.mark.usefixtures("worker_path")

WORKER = "crash_worker.py"
ROWS = 1500
CHUNK = 40
CHUNKS = -(-ROWS // CHUNK)
KEY_VAR = "STOPCHURN_CRASH_TEST_KEY"


def _start_worker(sb: SandboxServer, root: Path, seed: int) -> subprocess.Popen[str]:
    return start_worker(WORKER, sb.url, KEY_VAR, root, seed, ROWS, CHUNK, key_var=KEY_VAR, token=sb.token)


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_killed_sync_resumes_and_converges(stopchurn_sandbox_factory: Any, tmp_path: Path, seed: int) -> None:
    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.01))
    root = tmp_path / "snapshots"
    kill_at = random.Random(seed).randint(2, CHUNKS - 5)
    seen = kill_after(_start_worker(sb, root, seed), sb, kill_at)
    assert kill_at <= seen < CHUNKS

    store = SnapshotStore(root, BRAND, TABLE)
    lock = store.read_lock()
    assert lock is not None and lock["holder"] == "crash-worker"  # left behind by the killed run
    plan = store.pending_plan()
    assert plan is not None and store.read_committed() is None
    acked = store.acked(plan)
    assert acked == set(range(len(acked)))  # one worker: acknowledgements in order
    assert seen - 1 <= len(acked) <= seen

    sb.set_faults(FaultConfig())
    frame = deterministic_table(seed, ROWS)
    # a dry run predicts the next run (the pending plan settled in memory) and writes nothing
    digest = tree_digest(root)
    dry = run_sync(frame, store, None, options(dry_run=True), run_ms=T0 + 1)
    assert tree_digest(root) == digest
    summary = run_sync(frame, store, make_client(sb), options(chunk_size=CHUNK), run_ms=T0 + 1)
    # the killed plan is another run's (no run_key names this one as its later try): counted apart
    other = summary.settled_from_other_runs
    assert (summary.settled_chunks, other["plans"], other["chunks"]) == (0, 1, len(acked))
    assert other["inserted"] == CHUNK * len(acked)
    assert dry.inserted == ROWS - CHUNK * len(acked) == summary.inserted
    assert_sandbox_matches(sb, frame)
    counts = received_counts(sb.received())
    assert len(counts) == ROWS
    duplicates = resent(sb.received())
    print(f"seed {seed}: killed after {seen} accepted requests, {duplicates} updates received twice")
    assert duplicates <= CHUNK  # at most the chunk in flight
    assert store.pending_plan() is None and store.read_lock() is None


def test_killed_twice_including_during_the_resume(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.01))
    root = tmp_path / "snapshots"
    kill_after(_start_worker(sb, root, 404), sb, 6)
    first = int(sb.stats()["accepted_requests"])
    kill_after(_start_worker(sb, root, 404), sb, first + 8)  # the second worker dies while resuming
    sb.set_faults(FaultConfig())
    frame = deterministic_table(404, ROWS)
    store = SnapshotStore(root, BRAND, TABLE)
    run_sync(frame, store, make_client(sb), options(chunk_size=CHUNK), run_ms=T0 + 1)
    assert_sandbox_matches(sb, frame)
    duplicates = resent(sb.received())
    print(f"killed twice: {duplicates} updates received twice")
    assert duplicates <= 2 * CHUNK
