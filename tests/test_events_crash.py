"""An event delivery killed with SIGKILL mid-delivery, then run again: every event arrives, and only the chunk
that was in flight at the kill can arrive twice (its answer was lost with the process).

The delivery runs in a subprocess (``events_crash_worker.py``) against a sandbox of this process that answers
slowly (``latency``), so the kill lands while a request is in flight; the test polls the sandbox until a number of
requests was accepted, kills the worker, and runs the same delivery in-process (as the task's next try would).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from events_crash_worker import BRAND, STREAM, options, source
from helpers_sync import make_client
from worker_harness import kill_after, start_worker

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer

WORKER = "events_crash_worker.py"
ROWS = 1200
CHUNK = 40
KEY_VAR = "STOPCHURN_EVENTS_CRASH_TEST_KEY"


def _start(sb: SandboxServer, root: Path) -> subprocess.Popen[str]:
    return start_worker(WORKER, sb.url, KEY_VAR, root, ROWS, CHUNK, key_var=KEY_VAR, token=sb.token)


def _per_deposit(sb: SandboxServer) -> Counter[int]:
    return Counter(int(e["value"]) // 3 for e in sb.events(BRAND))


@pytest.mark.parametrize("kill_at", [3, 17])
def test_killed_delivery_resumes_and_sends_each_event_once_but_the_chunk_in_flight(
    stopchurn_sandbox_factory: Any, tmp_path: Path, kill_at: int
) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(latency=0.01))
    root = tmp_path / "state"
    kill_after(_start(sb, root), sb, kill_at)
    store = event_store(root, BRAND, STREAM)
    plan = store.pending_plan()
    assert plan is not None and store.read_committed() is None  # the plan was written before the first request
    acked = store.acked(plan)
    assert acked == set(range(len(acked))) and len(acked) >= kill_at - 1

    sb.set_faults(FaultConfig())
    summary = run_events(source(ROWS), store, make_client(sb), options(CHUNK))  # the next try
    assert summary.resumed_chunks == ROWS // CHUNK - len(acked)
    counts = _per_deposit(sb)
    assert set(counts) == set(range(ROWS))
    twice = sorted(d for d, n in counts.items() if n > 1)
    print(f"killed after {len(acked)} acknowledged chunks; {len(twice)} events received twice")
    assert max(counts.values()) <= 2
    assert twice in ([], list(range(len(acked) * CHUNK, (len(acked) + 1) * CHUNK)))  # only the chunk in flight
    assert store.pending_plan() is None and store.read_lock() is None
    again = run_events(source(ROWS), store, make_client(sb), options(CHUNK))  # and a re-run sends nothing
    assert again.sent == 0 and sum(_per_deposit(sb).values()) == sum(counts.values())


def test_killed_twice_including_during_the_resume(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    sb = stopchurn_sandbox_factory(faults=FaultConfig(latency=0.01))
    root = tmp_path / "state"
    kill_after(_start(sb, root), sb, 5)
    first = int(sb.stats()["accepted_requests"])
    kill_after(_start(sb, root), sb, first + 6)  # the second worker dies while resuming the plan
    sb.set_faults(FaultConfig())
    store = event_store(root, BRAND, STREAM)
    summary = run_events(source(ROWS), store, make_client(sb), options(CHUNK))
    counts = _per_deposit(sb)
    assert set(counts) == set(range(ROWS))
    extra = sum(counts.values()) - ROWS
    print(f"killed twice: {extra} events received twice; the last run resumed {summary.resumed_chunks} chunks")
    assert extra <= 2 * CHUNK and max(counts.values()) <= 2
    assert json.loads(json.dumps(summary.as_dict()))["sent"] == summary.sent
