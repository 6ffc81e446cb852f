"""The crash matrix on an object store: the run dies at every write of the store, then a clean run converges.

A killed process takes an in-memory object store with it, so this matrix runs in-process on a real fsspec
memory filesystem with a kill switch: at the N-th write (just before it, or just after it completes) the
filesystem raises :class:`Killed`, a ``BaseException`` nothing in the engine catches, and from then on refuses
every write and delete, as a dead process would make none. The store is left exactly as the dying run left
it. The lock that run held would belong to a process that is gone (broken at once on its host, see
tests/test_lock.py); here it is broken by hand, then a clean run must make the sandbox equal to the source.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from killswitch_fs import KillableMemoryFileSystem, Killed, quiet_upath
from recovery_scenarios import SCENARIOS, first_table, moved_on
from worker_paths import worker_path  # noqa: F401 - the fixture, run on both worker paths

from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

pytestmark = pytest.mark.usefixtures("worker_path")


def _fresh(sb: Any, scenario: str) -> SnapshotStore:
    KillableMemoryFileSystem.arm(0, "never")
    sb.reset()
    root = quiet_upath(f"killmem://stopchurn/{uuid.uuid4().hex}")
    store = SnapshotStore(root, BRAND, TABLE)
    run_sync(first_table(), store, make_client(sb), options(chunk_size=8), run_ms=T0)
    sb.reject_ids(SCENARIOS[scenario].rejected)
    return store


def _second_run(sb: Any, store: SnapshotStore, scenario: str) -> None:
    target, opts = SCENARIOS[scenario].second()
    try:
        run_sync(target, store, make_client(sb), opts, run_ms=T0 + 1000)
    except Exception:  # the scenario's own failure (a 400 under "fail"); a Killed is not an Exception
        return


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_object_store_killed_at_every_write_then_a_clean_run_converges(
    stopchurn_sandbox_factory: Any, scenario: str
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    store = _fresh(sb, scenario)
    KillableMemoryFileSystem.arm(0, "never")
    _second_run(sb, store, scenario)
    writes = KillableMemoryFileSystem.writes
    assert writes >= 5
    for n in range(1, writes + 1):
        for when in ("before", "after"):
            store = _fresh(sb, scenario)
            KillableMemoryFileSystem.arm(n, when)
            with pytest.raises(Killed):
                _second_run(sb, store, scenario)
            KillableMemoryFileSystem.arm(0, "never")  # a new process on a live store
            store.break_lock()  # the dead run's process is gone: its lock would be broken at once
            sb.reject_ids(())
            target = moved_on()  # the source moved on: what the dead run may have applied must be undone
            run_sync(target, store, make_client(sb), options(chunk_size=8), run_ms=T0 + 2000)
            assert_sandbox_matches(sb, target)
            assert store.pending_plan() is None, (n, when)
            again = run_sync(target, store, make_client(sb), options(chunk_size=8), run_ms=T0 + 3000)
            assert again.inserted + again.updated + again.deleted == 0, (n, when)
