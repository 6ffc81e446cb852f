"""A sync killed with SIGKILL mid-delivery, then run again: it converges and resends at most one chunk.

The sync runs in a subprocess (``crash_worker.py``) against a sandbox of this process that answers slowly
(``latency``), so the kill lands while a request is in flight; the test polls the sandbox until a random number
of requests was accepted, kills the worker, and runs the same sync in-process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
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
    wait_until,
)

from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.snapshot import SnapshotStore
from airflow_provider_stopchurn.sync import run_sync

WORKER = Path(__file__).with_name("crash_worker.py")
ROWS = 1500
CHUNK = 40
CHUNKS = -(-ROWS // CHUNK)
KEY_VAR = "STOPCHURN_CRASH_TEST_KEY"


def _start_worker(sb: SandboxServer, root: Path, seed: int) -> subprocess.Popen[str]:
    env = {**os.environ, KEY_VAR: sb.token, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), sb.url, KEY_VAR, str(root), str(seed), str(ROWS), str(CHUNK)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=WORKER.parent,
    )


def _kill_after(proc: subprocess.Popen[str], sb: SandboxServer, accepted: int) -> int:
    """SIGKILL the worker once the sandbox accepted ``accepted`` requests; return how many it had then."""
    try:
        reached = wait_until(
            lambda: sb.stats()["accepted_requests"] >= accepted or proc.poll() is not None, timeout_s=60
        )
        assert reached, "the worker made no progress within 60 s"
        assert proc.poll() is None, f"the worker ended before the kill: {proc.communicate(timeout=10)}"
        proc.send_signal(signal.SIGKILL)
        seen = int(sb.stats()["accepted_requests"])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)  # reap it: a zombie's pid still looks alive
    assert proc.returncode == -signal.SIGKILL
    return seen


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_killed_sync_resumes_and_converges(stopchurn_sandbox_factory: Any, tmp_path: Path, seed: int) -> None:
    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.01))
    root = tmp_path / "snapshots"
    kill_at = random.Random(seed).randint(2, CHUNKS - 5)
    seen = _kill_after(_start_worker(sb, root, seed), sb, kill_at)
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
    _kill_after(_start_worker(sb, root, 404), sb, 6)
    first = int(sb.stats()["accepted_requests"])
    _kill_after(_start_worker(sb, root, 404), sb, first + 8)  # the second worker dies while resuming
    sb.set_faults(FaultConfig())
    frame = deterministic_table(404, ROWS)
    store = SnapshotStore(root, BRAND, TABLE)
    run_sync(frame, store, make_client(sb), options(chunk_size=CHUNK), run_ms=T0 + 1)
    assert_sandbox_matches(sb, frame)
    duplicates = resent(sb.received())
    print(f"killed twice: {duplicates} updates received twice")
    assert duplicates <= 2 * CHUNK
