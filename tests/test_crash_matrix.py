"""The crash matrix: a worker killed at every durable write of the store, then a clean run converges.

For each scenario (plain delivery, quarantine, settling after a rejection, isolating rows that keep failing) the
worker process first runs to the
end to count the store's writes; then one worker per write dies just before, or just after, that write. After
each death a clean in-process run (StopChurn accepting everything) must leave the sandbox equal to the source,
no plan pending and no lock held: no crash point needs a hand edit of the store.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from recovery_scenarios import SCENARIOS, first_table, moved_on
from worker_harness import run_worker
from worker_paths import worker_path  # noqa: F401 - the fixture, run on both worker paths

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.isolation import SUSPECT_AFTER
from airflow_provider_stopchurn.update.sync import run_sync

pytestmark = pytest.mark.usefixtures("worker_path")

WORKER = "crash_at_write_worker.py"
KEY_VAR = "STOPCHURN_CRASH_MATRIX_KEY"


def _worker(sb: Any, root: Path, scenario: str, crash_at: int, when: str) -> subprocess.CompletedProcess[str]:
    return run_worker(WORKER, sb.url, KEY_VAR, root, scenario, crash_at, when, key_var=KEY_VAR, token=sb.token)


def _fresh(sb: Any, root: Path, scenario: str) -> SnapshotStore:
    sb.reset()
    store = SnapshotStore(root, BRAND, TABLE)
    run_sync(first_table(), store, make_client(sb), options(chunk_size=8), run_ms=T0)
    sb.reject_ids(SCENARIOS[scenario].rejected)
    failing = SCENARIOS[scenario].failing
    if failing:  # what earlier runs that failed on these rows leave (isolation.next_failures)
        store.write_row_failures({str(i): {"failures": SUSPECT_AFTER, "reason": "HTTP 500"} for i in failing})
    sb.fail_ids(failing)
    return store


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_killed_at_every_store_write_then_a_clean_run_converges(
    stopchurn_sandbox_factory: Any, tmp_path: Path, scenario: str
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    _fresh(sb, tmp_path / "count", scenario)
    counted = _worker(sb, tmp_path / "count", scenario, 0, "never")
    assert counted.returncode == 0, counted.stderr
    writes = int(counted.stdout.strip().splitlines()[-1].split()[-1])
    if SCENARIOS[scenario].failing:  # the rows were held: the run named them
        assert "failed: TransientDeliveryError" in counted.stdout, counted.stdout
    assert writes >= 5, counted.stdout
    points = [(n, when) for n in range(1, writes + 1) for when in ("before", "after")]
    for n, when in points:
        root = tmp_path / f"{when}-{n}"
        store = _fresh(sb, root, scenario)
        died = _worker(sb, root, scenario, n, when)
        assert died.returncode == 9, (n, when, died.stdout, died.stderr)
        sb.reject_ids(())
        sb.fail_ids(())
        target = moved_on()  # the source moved on: what the dead run may have applied must be undone
        run_sync(target, store, make_client(sb), options(chunk_size=8), run_ms=T0 + 2000)
        assert_sandbox_matches(sb, target)
        assert store.pending_plan() is None, (n, when)
        assert store.read_lock() is None, (n, when)
        again = run_sync(target, store, make_client(sb), options(chunk_size=8), run_ms=T0 + 3000)
        assert again.inserted + again.updated + again.deleted == 0, (n, when)
