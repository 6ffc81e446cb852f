"""The snapshot store under the engine: local paths and object storage, pointers, plan ledger, lock, corruption.

Airflow is imported here only for ``ObjectStoragePath`` (the store itself imports none).
"""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import fsspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    Churn,
    FailAfter,
    assert_sandbox_matches,
    list_files,
    make_client,
    options,
    read_json,
    received_counts,
    tree_digest,
    update_requests,
)

from airflow_provider_stopchurn.exceptions import (
    SnapshotError,
    SnapshotLockedError,
    StopChurnConfigError,
    StopChurnError,
    TransientDeliveryError,
)
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.store import (
    CREATED_AT,
    FORMAT_VERSION,
    Backend,
    LocalBackend,
    ObjectStoreBackend,
    Plan,
    SnapshotStore,
    backend_for,
)
from airflow_provider_stopchurn.update.sync import run_sync


@pytest.fixture(scope="module")
def object_storage_path() -> Callable[[str], Any]:
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import attach

    attach("memory", fs=fsspec.filesystem("memory"))
    return ObjectStoragePath


@pytest.fixture(params=["pathlib", "file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path, object_storage_path: Callable[[str], Any]) -> Any:
    if request.param == "pathlib":
        return tmp_path / "snapshots"
    if request.param == "file":
        return object_storage_path(f"file://{tmp_path}/snapshots")
    return object_storage_path(f"memory://stopchurn-tests/{uuid.uuid4().hex}")


def _table_dir(root: Any) -> Any:
    return root / str(BRAND) / TABLE


def _synced_store(sb: SandboxServer, root: Any, rows: int = 200) -> tuple[SnapshotStore, Churn]:
    store = SnapshotStore(root, BRAND, TABLE)
    churn = Churn(21, rows, with_json=False)
    run_sync(churn.frame, store, make_client(sb), options(chunk_size=50), run_ms=T0)
    return store, churn


# --- convergence on every kind of root -------------------------------------------------------------------------
def test_convergence_on_every_root(sb: SandboxServer, root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    churn = Churn(20, 800, composite=True)
    client = make_client(sb)
    frame = churn.frame
    for run in range(4):
        run_sync(frame, store, client, options(key_columns=churn.keys, chunk_size=120), run_ms=T0 + run)
        assert_sandbox_matches(sb, frame, churn.keys)
        frame = churn.step()
    # only the pointer and one snapshot remain after a clean run, beside one history record per run
    names = sorted(str(p)[len(str(_table_dir(root))) :] for p in list_files(root))
    history = [n for n in names if n.startswith("/history/")]
    names = [n for n in names if n not in history]
    assert len(names) == 2 and names[0] == "/CURRENT" and names[1].startswith("/snapshots/"), names
    assert len(history) == 4 and all(n.endswith(".json") for n in history), history
    assert store.location.endswith(f"{BRAND}/{TABLE}")


def test_pointer_after_a_clean_run(sb: SandboxServer, root: Any) -> None:
    store, _ = _synced_store(sb, root)
    current = read_json(_table_dir(root) / "CURRENT")
    assert current["format_version"] == FORMAT_VERSION
    assert (current["brand_id"], current["table_name"]) == (BRAND, TABLE)
    assert current["key_columns"] == ["id"]
    assert current["kinds"]["id"] == "int" and current["kinds"]["score"] == "float"
    assert isinstance(current["plan_id"], str)
    assert (_table_dir(root) / "snapshots" / f"{current['version']}.parquet").exists()
    assert not (_table_dir(root) / "PLAN").exists()
    committed = store.read_committed()
    assert committed is not None and committed.version == current["version"]
    assert committed.frame.height == 200
    assert committed.frame.get_column(CREATED_AT).unique().to_list() == [T0]
    assert store.pending_plan() is None and store.read_lock() is None


def test_pointer_records_the_row_count(sb: SandboxServer, root: Any) -> None:
    _synced_store(sb, root)
    assert read_json(_table_dir(root) / "CURRENT")["rows"] == 200


# --- plan and ledger -------------------------------------------------------------------------------------------
class _LedgerPeek:
    """A sender that, before each request, records what the store shows: the pending plan, its ledger, CURRENT."""

    def __init__(self, inner: Any, store: SnapshotStore) -> None:
        self.inner = inner
        self.store = store
        self.seen: list[tuple[Plan | None, set[int], str | None, bytes | None]] = []

    def post_update_body(self, body: bytes) -> Any:
        plan = self.store.pending_plan(cleanup=False)
        acked = set() if plan is None else self.store.acked(plan)
        committed = self.store.read_committed()
        pointer = self.store.backend.read_bytes("PLAN")
        self.seen.append((plan, acked, None if committed is None else committed.version, pointer))
        return self.inner.post_update_body(body)


def test_plan_ledger_of_an_interrupted_delivery(sb: SandboxServer, root: Any) -> None:
    store, churn = _synced_store(sb, root)
    committed = store.read_committed()
    assert committed is not None
    frame = churn.step(deletes=0.2, updates=0.5, inserts=0.3)
    client = make_client(sb)
    opts = options(chunk_size=20, max_concurrent_requests=1)
    peek = _LedgerPeek(FailAfter(client, sb, 2), store)
    with pytest.raises(TransientDeliveryError):
        run_sync(frame, store, peek, opts, run_ms=T0 + 1)
    sb.set_faults(FaultConfig())

    # while delivering: the plan is durable before the first request, each acknowledgement is recorded
    assert len(peek.seen) >= 3
    plan = peek.seen[0][0]
    assert plan is not None and plan.base_version == committed.version != plan.target_version
    assert all(p is not None and p.plan_id == plan.plan_id for p, *_ in peek.seen)
    assert [acked for _, acked, *_ in peek.seen[:3]] == [set(), {0}, {0, 1}]
    assert {version for _, _, version, _ in peek.seen} == {committed.version}  # nothing committed meanwhile
    assert plan.chunks[0][0] == 0 and all(a[1] == b[0] for a, b in zip(plan.chunks, plan.chunks[1:], strict=False))

    # the failed run settled what was acknowledged: CURRENT records the plan, its files are gone
    table = _table_dir(root)
    current = read_json(table / "CURRENT")
    assert current["plan_id"] == plan.plan_id and current["version"] != committed.version
    assert store.pending_plan() is None and not (table / "PLAN").exists()
    assert not (table / "plans" / plan.plan_id).exists()
    assert not (table / "snapshots" / f"{committed.version}.parquet").exists()  # the old snapshot is gone

    # a PLAN pointer that outlived its commit (a crash between the two writes) is recognised and dropped
    store.backend.write_bytes("PLAN", peek.seen[0][3] or b"")
    assert store.pending_plan(cleanup=False) is None and (table / "PLAN").exists()
    assert store.pending_plan() is None and not (table / "PLAN").exists()

    run_sync(frame, store, client, opts, run_ms=T0 + 2)
    assert_sandbox_matches(sb, frame)
    requests = update_requests(sb)
    run_sync(frame, store, client, opts, run_ms=T0 + 3)
    assert update_requests(sb) == requests  # converged: nothing left to send


def test_plan_made_against_another_snapshot_is_discarded(sb: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    store, churn = _synced_store(sb, root)
    table = _table_dir(root)
    (table / "PLAN").write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "plan_id": "p1",
                "base_version": "some-other-version",
                "target_version": "t1",
                "chunks": [[0, 1]],
                "meta": {"brand_id": BRAND, "table_name": TABLE},
            }
        )
    )
    assert store.pending_plan(cleanup=False) is None and (table / "PLAN").exists()  # a dry look changes nothing
    frame = churn.step()
    run_sync(frame, store, make_client(sb), options(), run_ms=T0 + 1)  # its changes are simply diffed again
    assert_sandbox_matches(sb, frame)
    assert not (table / "PLAN").exists() and not (table / "plans" / "p1").exists()
    assert store.read_lock() is None


def test_plan_of_another_table_is_refused(sb: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    store, churn = _synced_store(sb, root)
    current = read_json(_table_dir(root) / "CURRENT")
    (_table_dir(root) / "PLAN").write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "plan_id": "p1",
                "base_version": current["version"],
                "target_version": "t1",
                "chunks": [[0, 1]],
                "meta": {"brand_id": BRAND + 1, "table_name": TABLE},
            }
        )
    )
    requests = update_requests(sb)
    with pytest.raises(StopChurnError, match="another brand or table"):
        run_sync(churn.step(), store, make_client(sb), options(), run_ms=T0 + 1)
    assert update_requests(sb) == requests


# --- lock ------------------------------------------------------------------------------------------------------
def _write_lock(store: SnapshotStore, **fields: Any) -> None:
    record = {
        "format_version": FORMAT_VERSION,
        "holder": "someone",
        "token": "t0ken",
        "host": socket.gethostname(),
        "pid": 1,
        "acquired_at": "2024-01-01T00:00:00+00:00",
        "expires_at": time.time() + 3600,
        **fields,
    }
    store.backend.write_bytes("LOCK", json.dumps(record).encode())


def test_second_run_fails_fast_while_the_lock_is_held(sb: SandboxServer, root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    churn = Churn(22, 100)
    other = SnapshotStore(root, BRAND, TABLE)
    with other.lock("dag_a.sync_users run 2024-05-01"):
        started = time.monotonic()
        with pytest.raises(SnapshotLockedError) as info:
            run_sync(churn.frame, store, make_client(sb), options(lock_wait_s=0), run_ms=T0)
        assert time.monotonic() - started < 2.0
        text = str(info.value)
        assert text.splitlines()[0] == f"{BRAND}/{TABLE} is being synced by another run."  # short first line
        assert "dag_a.sync_users run 2024-05-01" in text and f"{BRAND}/{TABLE}" in text
        assert not info.value.permanent
        assert update_requests(sb) == 0
        assert store.read_lock() is not None  # the holder's lock is left alone
    assert store.read_lock() is None
    run_sync(churn.frame, store, make_client(sb), options(), run_ms=T0)
    assert_sandbox_matches(sb, churn.frame)


def test_second_run_waits_for_the_lock_then_goes_through(sb: SandboxServer, root: Any) -> None:
    """Two runs of one table started together (a trigger beside the scheduled run): the second waits its turn."""
    churn = Churn(27, 60)
    held = threading.Event()
    release_after_s = 2.0

    def first_run_holding_the_lock() -> None:
        with SnapshotStore(root, BRAND, TABLE).lock("dag_a.sync run scheduled"):
            held.set()
            time.sleep(release_after_s)

    thread = threading.Thread(target=first_run_holding_the_lock)
    thread.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        summary = run_sync(churn.frame, SnapshotStore(root, BRAND, TABLE), make_client(sb), options(lock_wait_s=60))
        waited = time.monotonic() - started
    finally:
        thread.join(timeout=30)
    assert summary.inserted == 60
    assert release_after_s - 0.5 < waited < release_after_s + 20  # polled, not given up, not spun forever
    assert_sandbox_matches(sb, churn.frame)


def test_waiting_for_the_lock_is_bounded(sb: SandboxServer, root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    with SnapshotStore(root, BRAND, TABLE).lock("dag_a.sync run backfill"):
        started = time.monotonic()
        with pytest.raises(SnapshotLockedError) as info:
            run_sync(Churn(28, 10).frame, store, make_client(sb), options(lock_wait_s=1.5), run_ms=T0)
        waited = time.monotonic() - started
    assert 1.5 <= waited < 10
    assert not info.value.permanent  # the operator makes it a retryable failure
    lines = str(info.value).splitlines()
    assert lines[0] == f"{BRAND}/{TABLE} is being synced by another run."
    assert "dag_a.sync run backfill" in lines[1]
    assert lines[-1].startswith("Waited ") and lines[-1].endswith("s for it (lock_wait_s=1.5).")
    assert update_requests(sb) == 0


@pytest.mark.parametrize("bad", [-1, float("nan"), "300", True, 86_401])
def test_lock_wait_s_is_validated(bad: Any) -> None:
    with pytest.raises(StopChurnConfigError, match="lock_wait_s"):
        options(lock_wait_s=bad)


def test_live_lock_of_another_host_is_respected(sb: SandboxServer, root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    _write_lock(store, holder="worker-7", host="some-other-host", pid=4242)
    with pytest.raises(SnapshotLockedError, match="worker-7"):
        run_sync(Churn(23, 10).frame, store, make_client(sb), options(lock_wait_s=0), run_ms=T0)
    assert update_requests(sb) == 0


def test_expired_lock_is_taken_over(sb: SandboxServer, root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    _write_lock(store, holder="crashed-worker", host="some-other-host", pid=4242, expires_at=time.time() - 5)
    churn = Churn(24, 50)
    run_sync(churn.frame, store, make_client(sb), options(), run_ms=T0)
    assert_sandbox_matches(sb, churn.frame)
    assert store.read_lock() is None


def test_lock_of_a_dead_process_on_this_host_is_broken(sb: SandboxServer, root: Any) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, timeout=30)
    dead_pid = int(proc.stdout)
    store = SnapshotStore(root, BRAND, TABLE)
    _write_lock(store, holder="killed-run", pid=dead_pid)  # not expired, but its process is gone
    churn = Churn(25, 50)
    run_sync(churn.frame, store, make_client(sb), options(), run_ms=T0)
    assert_sandbox_matches(sb, churn.frame)
    assert store.read_lock() is None


def test_lock_of_a_live_process_on_this_host_is_respected(sb: SandboxServer, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(store, holder="live-run", pid=proc.pid)
        with pytest.raises(SnapshotLockedError, match="live-run"):
            run_sync(Churn(26, 10).frame, store, make_client(sb), options(lock_wait_s=0), run_ms=T0)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert update_requests(sb) == 0


# --- corruption ------------------------------------------------------------------------------------------------
def _truncate_snapshot(table: Path) -> None:
    version = json.loads((table / "CURRENT").read_text())["version"]
    path = table / "snapshots" / f"{version}.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_current(table: Path) -> None:
    text = (table / "CURRENT").read_text()
    (table / "CURRENT").write_text(text[: len(text) // 2])


def _newer_format(table: Path) -> None:
    data = json.loads((table / "CURRENT").read_text())
    data["format_version"] = FORMAT_VERSION + 98
    (table / "CURRENT").write_text(json.dumps(data))


def _missing_snapshot(table: Path) -> None:
    for path in (table / "snapshots").iterdir():
        path.unlink()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncate_snapshot, ["unreadable", "truncated or corrupt", ".parquet"]),
        (_corrupt_current, ["CURRENT", "not valid JSON"]),
        (_newer_format, ["format version 99", "Upgrade"]),
        (_missing_snapshot, ["missing", ".parquet"]),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_damaged_snapshot_raises_a_clear_error_and_sends_nothing(
    sb: SandboxServer, tmp_path: Path, damage: Callable[[Path], None], words: list[str], dry_run: bool
) -> None:
    root = tmp_path / "snapshots"
    store, churn = _synced_store(sb, root)
    damage(_table_dir(root))
    digest = tree_digest(root, history=False)
    requests = update_requests(sb)
    with pytest.raises(SnapshotError) as info:
        run_sync(churn.step(), store, make_client(sb), options(dry_run=dry_run), run_ms=T0 + 1)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert update_requests(sb) == requests
    assert tree_digest(root, history=False) == digest  # nothing written but the run's record, the lock released


# --- unwritable location ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pathlib", "file"])
def test_unwritable_location_fails_before_sending(
    sb: SandboxServer, tmp_path: Path, kind: str, object_storage_path: Callable[[str], Any]
) -> None:
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("not a directory")  # tests run as root: chmod would not block writes, a file does
    root: Any = blocker / "sub" if kind == "pathlib" else object_storage_path(f"file://{blocker}/sub")
    store = SnapshotStore(root, BRAND, TABLE)
    with pytest.raises(SnapshotError) as info:
        run_sync(Churn(27, 20).frame, store, make_client(sb), options(), run_ms=T0)
    assert "a-regular-file" in str(info.value)
    assert update_requests(sb) == 0
    assert blocker.read_text() == "not a directory"


def test_unwritable_snapshot_folder_fails_before_sending(sb: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    table = _table_dir(root)
    table.mkdir(parents=True)
    (table / "snapshots").write_text("in the way")  # the folder cannot be created
    store = SnapshotStore(root, BRAND, TABLE)
    with pytest.raises(SnapshotError, match="writable"):
        run_sync(Churn(28, 20).frame, store, make_client(sb), options(), run_ms=T0)
    assert update_requests(sb) == 0
    assert store.read_lock() is None


def test_each_acknowledged_update_once_across_resumes_on_object_storage(
    sb: SandboxServer, object_storage_path: Callable[[str], Any]
) -> None:
    root = object_storage_path(f"memory://stopchurn-tests/{uuid.uuid4().hex}")
    store = SnapshotStore(root, BRAND, TABLE)
    churn = Churn(29, 600, with_json=False)
    client = make_client(sb)
    opts = options(chunk_size=40, max_concurrent_requests=3)
    for n in (3, 5, 2):
        with pytest.raises(TransientDeliveryError):
            run_sync(churn.frame, store, FailAfter(client, sb, n), opts, run_ms=T0)
        sb.set_faults(FaultConfig())
    run_sync(churn.frame, store, client, opts, run_ms=T0)
    assert_sandbox_matches(sb, churn.frame)
    counts = received_counts(sb.received())
    assert len(counts) == 600 and set(counts.values()) == {1}


def test_lock_is_refreshed_while_delivering(stopchurn_sandbox_factory: Any, tmp_path: Path) -> None:
    import threading

    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.05))
    root = tmp_path / "snapshots"
    churn = Churn(30, 800, with_json=False)
    # ~4 s delivery, 2 s lease: a lease fences requests of at most 1.5 s (timeouts) plus a tenth of it
    opts = options(chunk_size=10, max_concurrent_requests=1, lock_ttl_s=2.0, lock_wait_s=0)
    outcome: dict[str, Any] = {}

    def first() -> None:
        try:
            client = make_client(sb, timeout=1.0, connect_timeout=0.5)
            outcome["first"] = run_sync(churn.frame, SnapshotStore(root, BRAND, TABLE), client, opts)
        except Exception as exc:  # reported below
            outcome["first"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        time.sleep(1.5)
        with pytest.raises(SnapshotLockedError):
            run_sync(churn.frame, SnapshotStore(root, BRAND, TABLE), make_client(sb), opts)
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert not isinstance(outcome["first"], Exception), outcome["first"]
    counts = received_counts(sb.received())
    assert set(counts.values()) == {1}  # no chunk sent by two runs


# --- the store's API on its own (no engine) --------------------------------------------------------------------
KINDS = {"id": "int", "name": "str"}


def _frame(*ids: int) -> pl.DataFrame:
    return pl.DataFrame({"id": list(ids), "name": [f"n{i}" for i in ids], CREATED_AT: [T0] * len(ids)})


def _commit(store: SnapshotStore, version: str, base: str | None, plan_id: str | None = None) -> None:
    store.commit(version, base_version=base, kinds=KINDS, key_columns=["id"], rows=1, plan_id=plan_id)


def _plan(store: SnapshotStore, base: str | None, *ids: int) -> Plan:
    return store.write_plan(
        target_version=store.write_snapshot(_frame(*ids)),
        base_version=base,
        changes=_frame(*ids),
        chunks=[(0, 1), (1, len(ids))],
        meta={"brand_id": BRAND, "table_name": TABLE, "kinds": KINDS, "key_columns": ["id"]},
    )


def test_commit_checks_its_base_and_writes_nothing_when_it_moved(root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    first = store.write_snapshot(_frame(1))
    _commit(store, first, None)
    second = store.write_snapshot(_frame(1, 2))
    digest = tree_digest(root)
    for stale_base in (None, "some-older-version"):
        with pytest.raises(SnapshotError, match=r"moved from .* while this run was working; nothing was committed"):
            _commit(store, second, stale_base)
        assert tree_digest(root) == digest
    committed = store.read_committed()
    assert committed is not None and committed.version == first and committed.plan_id is None
    _commit(store, second, first)
    committed = store.read_committed()
    assert committed is not None and committed.version == second
    assert not (_table_dir(root) / "snapshots" / f"{first}.parquet").exists()  # the replaced snapshot is gone


def test_commit_records_its_plan_and_removes_only_that_plan(root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    plan = _plan(store, None, 1, 2)
    store.ack(plan, 0)
    _commit(store, plan.target_version, None, plan.plan_id)
    assert read_json(_table_dir(root) / "CURRENT")["plan_id"] == plan.plan_id
    assert not (_table_dir(root) / "PLAN").exists() and store.acked(plan) == set()
    assert not (_table_dir(root) / "plans" / plan.plan_id).exists()


def test_pending_plan_already_committed_is_recognised_by_its_plan_id(root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    plan = _plan(store, None, 1, 2)
    store.ack(plan, 0, [{"position": 1, "reason": "bad name", "key": {"id": 2}}])
    pointer = store.backend.read_bytes("PLAN")
    settled = store.write_snapshot(_frame(1))  # committed without the rejected row: another version
    _commit(store, settled, None, plan.plan_id)
    store.backend.write_bytes("PLAN", pointer or b"")  # as if the run died between CURRENT and removing PLAN
    store.ack(plan, 0)
    assert store.pending_plan(cleanup=False) is None
    assert (_table_dir(root) / "PLAN").exists()  # a dry look writes nothing
    assert store.pending_plan() is None
    assert not (_table_dir(root) / "PLAN").exists() and store.acked(plan) == set()
    assert not (_table_dir(root) / "snapshots" / f"{plan.target_version}.parquet").exists()
    assert (_table_dir(root) / "snapshots" / f"{settled}.parquet").exists()


def test_pending_plan_of_another_base_is_discarded_with_a_warning(root: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    base = store.write_snapshot(_frame(1))
    _commit(store, base, None)
    plan = _plan(store, "a-version-never-committed", 1, 2, 3)
    store.ack(plan, 0)
    digest = tree_digest(root)
    assert store.pending_plan(cleanup=False) is None
    assert tree_digest(root) == digest
    with caplog.at_level(logging.WARNING):
        assert store.pending_plan() is None
    assert "Discarding the pending plan" in caplog.text and "a-version-never-committed" in caplog.text
    assert not (_table_dir(root) / "PLAN").exists() and store.acked(plan) == set()
    assert not (_table_dir(root) / "snapshots" / f"{plan.target_version}.parquet").exists()
    committed = store.read_committed()
    assert committed is not None and committed.version == base and committed.frame.height == 1


def test_pending_plan_on_its_base_is_returned_whole(root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    assert store.pending_plan() is None
    plan = _plan(store, None, 1, 2)
    found = store.pending_plan()
    assert found == plan
    assert store.read_changes(found).get_column("id").to_list() == [1, 2]
    store.discard_plan(found)
    assert store.pending_plan() is None
    assert store.backend.list_names("snapshots") == [] and store.backend.list_names() == []


def test_acks_carry_the_rejections_of_their_chunk(root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    plan = _plan(store, None, 1, 2, 3)
    rejections = [
        {"position": 1, "reason": "name too long", "key": {"id": 2}},
        {"position": 2, "reason": "bad date", "key": {"id": 3}, "at": datetime(2024, 5, 1, tzinfo=UTC)},
    ]
    store.ack(plan, 1, rejections)
    store.ack(plan, 0)
    store.ack(plan, 0)  # idempotent
    acks = store.acks(plan)
    assert sorted(acks) == [0, 1] and acks[0] == []
    assert acks[1][0] == rejections[0]
    assert acks[1][1]["at"] == "2024-05-01 00:00:00+00:00"  # not JSON-native: stored as text
    assert store.acked(plan) == {0, 1}
    folder = _table_dir(root) / "plans" / plan.plan_id / "acks"
    assert sorted(p.name for p in folder.iterdir()) == ["0000000", "0000001"]  # no temporary file left
    assert (folder / "0000000").read_bytes() == b""
    lines = (folder / "0000001").read_bytes().splitlines()
    assert [json.loads(line)["position"] for line in lines] == [1, 2]
    store.ack(plan, 1)  # sent again and accepted this time: the record is replaced
    assert store.acks(plan) == {0: [], 1: []}
    with pytest.raises(ValueError):
        store.ack(plan, -1)


def test_quarantine_holds_the_rows_still_rejected(root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    assert store.read_quarantine() == [] and store.read_quarantine(all_files=True) == []
    older = [{"id": 1, "reason": "a", "position": 0}, {"id": 2, "reason": "a", "position": 1}]
    newer = [{"id": 2, "reason": "b", "position": 3}, {"id": "1", "reason": "c", "position": 4}]
    uri = store.write_quarantine("20240101T000000000000Z-aaaa", older)
    assert uri is not None
    assert uri.endswith("quarantine/20240101T000000000000Z-aaaa.jsonl") and uri.startswith(store.location)
    # settled without a staged record (after a crash): the earlier rows not refused again stay (1 and "1" differ)
    store.write_quarantine("20240102T000000000000Z-bbbb", newer)
    assert store.read_quarantine() == [*newer, older[0]]
    # staged by the delivery: only what it did not resolve stays
    store.stage_quarantine("20240103T000000000000Z-cccc", [])
    assert store.write_quarantine("20240103T000000000000Z-cccc", []) is None
    assert store.read_quarantine() == []
    store.quarantine_retention_s = 0.0  # older files go; the newest (empty) one says nothing is rejected
    store.clear_quarantine()
    assert store.read_quarantine(all_files=True) == [] and len(store.quarantine_files()) == 1


def test_delete_plan_files_keeps_the_snapshots(root: Any) -> None:
    store = SnapshotStore(root, BRAND, TABLE)
    plan = _plan(store, None, 1)
    other = _plan(store, None, 2)  # the PLAN pointer now names this one
    store.delete_plan_files(plan)
    assert store.pending_plan(cleanup=False) == other  # another plan's pointer is left alone
    assert store.backend.exists(f"snapshots/{plan.target_version}.parquet")
    assert not store.backend.exists(f"plans/{plan.plan_id}/changes.parquet")
    store.delete_plan_files(other)
    assert store.pending_plan() is None


# --- the backend seam ------------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "file", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, object_storage_path: Callable[[str], Any]) -> Backend:
    if request.param == "local":
        return backend_for(tmp_path / "table")
    if request.param == "file":
        return backend_for(object_storage_path(f"file://{tmp_path}/table"))
    return backend_for(object_storage_path(f"memory://stopchurn-tests/{uuid.uuid4().hex}"))


def test_backend_selection(tmp_path: Path, object_storage_path: Callable[[str], Any]) -> None:
    assert isinstance(backend_for(tmp_path), LocalBackend)
    assert isinstance(backend_for(str(tmp_path)), LocalBackend)
    local_uri = backend_for(object_storage_path(f"file://{tmp_path}/t"))
    assert isinstance(local_uri, LocalBackend) and local_uri.location("CURRENT") == f"file://{tmp_path}/t/CURRENT"
    memory = backend_for(object_storage_path("memory://bucket/t"))
    assert isinstance(memory, ObjectStoreBackend)
    # universal-pathlib before 0.3 (Airflow 3.1) prints a memory URL with an empty host
    assert memory.location("CURRENT") in ("memory://bucket/t/CURRENT", "memory:///bucket/t/CURRENT")
    with pytest.raises(TypeError, match="ObjectStoragePath"):
        backend_for(42)


def test_a_remote_path_that_subclasses_pathlib_is_not_the_local_disk(tmp_path: Path) -> None:
    """universal-pathlib before 0.3 (Airflow 3.1's ObjectStoragePath) subclasses ``pathlib.Path``: its protocol,
    not its base class, decides, or ``s3://bucket/prefix`` would be written to ``/bucket/prefix`` on local disk."""

    class RemoteLikePath(type(Path())):  # type: ignore[misc]
        protocol = "s3"

    assert isinstance(backend_for(RemoteLikePath("/bucket/prefix")), ObjectStoreBackend)

    class LocalLikePath(type(Path())):  # type: ignore[misc]
        protocol = "file"

        @property
        def path(self) -> str:
            return str(self)

    assert isinstance(backend_for(LocalLikePath(tmp_path)), LocalBackend)


def test_backend_contract(backend: Backend) -> None:
    assert backend.read_bytes("missing") is None and not backend.exists("missing")
    assert backend.list_names() == [] and backend.list_sizes("nowhere") == {}
    backend.delete("missing")  # no error
    backend.write_bytes("a/b/file", b"one")
    backend.write_bytes("a/b/file", b"two", durable=True)
    assert backend.read_bytes("a/b/file") == b"two" and backend.exists("a/b/file")
    assert backend.create_exclusive("a/b/lock", b"first")
    assert not backend.create_exclusive("a/b/lock", b"second")
    assert backend.read_bytes("a/b/lock") == b"first"
    assert backend.list_names("a/b") == ["file", "lock"] and backend.list_sizes("a/b") == {"file": 3, "lock": 5}
    backend.delete("a/b/lock")
    assert backend.read_bytes("a/b/lock") is None
    frame = _frame(1, 2, 3)
    backend.write_frame("f/x.parquet", frame)
    assert backend.read_frame("f/x.parquet").equals(frame)
    assert backend.read_frame("f/x.parquet", ["id"]).columns == ["id"]
    rows = backend.read_rows("f/x.parquet", pl.DataFrame({"id": [3, 1, 9]}))
    assert sorted(rows.get_column("id").to_list()) == [1, 3]
    with pytest.raises(FileNotFoundError):
        backend.read_frame("f/none.parquet")
    backend.delete_tree("a")
    assert backend.read_bytes("a/b/file") is None and backend.list_names("a/b") == []
    with pytest.raises(ValueError):
        backend.read_bytes("../escape")


class _NoExclusiveMode:
    """A UPath-like path whose file system refuses ``open(mode="xb")`` (like some fsspec back ends)."""

    def __init__(self, path: Any) -> None:
        self._path = path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._path, name)

    def __truediv__(self, other: str) -> _NoExclusiveMode:
        return _NoExclusiveMode(self._path / other)

    @property
    def parent(self) -> _NoExclusiveMode:
        return _NoExclusiveMode(self._path.parent)

    def open(self, mode: str = "r", **kwargs: Any) -> Any:
        if "x" in mode:
            raise NotImplementedError("File mode not supported")
        return self._path.open(mode, **kwargs)


def test_exclusive_create_falls_back_without_x_mode(object_storage_path: Callable[[str], Any]) -> None:
    backend = backend_for(_NoExclusiveMode(object_storage_path(f"memory://stopchurn-tests/{uuid.uuid4().hex}")))
    assert isinstance(backend, ObjectStoreBackend)
    assert backend.create_exclusive("LOCK", b"mine")
    assert not backend.create_exclusive("LOCK", b"theirs")
    assert backend.read_bytes("LOCK") == b"mine"
    store = SnapshotStore(_NoExclusiveMode(object_storage_path(f"memory://stopchurn-tests/{uuid.uuid4().hex}")), 1, "t")
    with store.lock("run"):
        assert store.read_lock() is not None
    assert store.read_lock() is None


class _CredentialedNoExclusiveMode(_NoExclusiveMode):
    """The same, printed as an address holding credentials (``s3://key:secret@bucket/...``), as UPath prints one."""

    def __truediv__(self, other: str) -> _CredentialedNoExclusiveMode:
        return _CredentialedNoExclusiveMode(self._path / other)

    @property
    def parent(self) -> _CredentialedNoExclusiveMode:
        return _CredentialedNoExclusiveMode(self._path.parent)

    def __str__(self) -> str:
        return "s3://AKIAEXAMPLE:s3cr3t-storage-key@bucket/" + str(self._path).split("://", 1)[-1]


def test_the_fallback_for_a_store_without_x_mode_logs_no_credential(
    object_storage_path: Callable[[str], Any], caplog: pytest.LogCaptureFixture
) -> None:
    backend = backend_for(
        _CredentialedNoExclusiveMode(object_storage_path(f"memory://stopchurn-tests/{uuid.uuid4().hex}"))
    )
    with caplog.at_level(logging.DEBUG, logger="airflow_provider_stopchurn"):
        assert backend.create_exclusive("LOCK", b"mine")
    said = [r.getMessage() for r in caplog.records]
    assert any("refuses open(mode='xb')" in line and "s3://bucket/" in line for line in said), said
    assert not any("s3cr3t" in line or "AKIAEXAMPLE" in line for line in said), said


def test_a_local_write_is_never_half_visible(tmp_path: Path) -> None:
    backend = backend_for(tmp_path)
    versions = [bytes([65 + i]) * 2_000_000 for i in range(2)]
    backend.write_bytes("plans/p/acks/0000001", versions[0])
    seen: set[int] = set()
    stop = threading.Event()

    def read() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            data = backend.read_bytes("plans/p/acks/0000001")
            seen.add(-1 if data not in versions else versions.index(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            backend.write_bytes("plans/p/acks/0000001", versions[i % 2])
    finally:
        stop.set()
        reader.join(timeout=60)
    assert -1 not in seen and seen
    assert backend.list_names("plans/p/acks") == ["0000001"]


def test_only_the_backend_knows_about_pathlib() -> None:
    package = Path(__file__).resolve().parent.parent / "airflow_provider_stopchurn" / "snapshot"
    for path in package.glob("*.py"):
        if path.name != "backend.py":
            text = path.read_text()
            assert "isinstance(" not in text or "Path)" not in text, path.name
            assert "from pathlib" not in text and "import pathlib" not in text, path.name


def test_read_rows_decodes_one_row_group_at_a_time_and_keeps_file_order(backend: Backend) -> None:
    """The deleted rows of a diff are read from the old snapshot one row group at a time on every backend (an object
    store's file was decoded whole into a frame before): ``pl.read_parquet`` of the whole file is never called, and
    the rows come back in file order from every row group."""
    n = 300_001  # several row groups
    frame = pl.DataFrame({"id": pl.int_range(n, eager=True) * 3, "v": pl.int_range(n, eager=True).cast(pl.String)})
    backend.write_frame("f/big.parquet", frame)
    keys = pl.DataFrame({"id": [n * 3 - 3, 0, 7, 150_000 * 3, -5, 3, 299_999 * 3]})
    reads: list[Any] = []
    original = pl.read_parquet

    def recorded(*args: Any, **kwargs: Any) -> pl.DataFrame:
        reads.append(args)
        return original(*args, **kwargs)

    with mock.patch.object(pl, "read_parquet", autospec=True, side_effect=recorded):
        rows = backend.read_rows("f/big.parquet", keys)
    assert reads == []
    assert rows.equals(frame.join(keys, on="id", how="semi", maintain_order="left"))
    assert rows.get_column("id").to_list() == [0, 3, 450_000, 899_997, 900_000]
    none = backend.read_rows("f/big.parquet", pl.DataFrame({"id": [-1]}))
    assert none.height == 0 and none.schema == frame.schema


def test_read_rows_hashes_the_wanted_keys_once_and_skips_row_groups_without_them(backend: Backend) -> None:
    """A delete of most of a table (an approved mass delete, a key that changed type) asks for as many keys as the
    snapshot has rows. Joining them against every row group apart built their hash table once per row group: a
    read of 4M rows took about 15 times the whole-file join. The keys go through one join, and only the row groups
    holding a wanted key are decoded."""
    n = 300_001
    frame = pl.DataFrame({"id": pl.int_range(n, eager=True).cast(pl.String), "v": pl.int_range(n, eager=True)})
    backend.write_frame("f/big.parquet", frame)
    written = backend.read_bytes("f/big.parquet")
    assert written is not None
    assert pq.read_metadata(io.BytesIO(written)).num_row_groups >= 3
    joins: list[int] = []
    slices: list[int] = []
    join, cut = pl.LazyFrame.join, pl.LazyFrame.slice

    def counted_join(self: pl.LazyFrame, other: pl.LazyFrame, *args: Any, **kwargs: Any) -> pl.LazyFrame:
        joins.append(1)
        return join(self, other, *args, **kwargs)

    def counted_slice(self: pl.LazyFrame, offset: int, length: int | None = None) -> pl.LazyFrame:
        slices.append(offset)
        return cut(self, offset, length)

    every = frame.select("id")
    with (
        mock.patch.object(pl.LazyFrame, "join", autospec=True, side_effect=counted_join),
        mock.patch.object(pl.LazyFrame, "slice", autospec=True, side_effect=counted_slice),
    ):
        rows = backend.read_rows("f/big.parquet", every)
        assert len(joins) == 1, f"the wanted keys were joined {len(joins)} times"
        assert rows.equals(frame)
        slices.clear()
        two = backend.read_rows("f/big.parquet", pl.DataFrame({"id": ["300000", "5", "7"]}))
    assert two.get_column("v").to_list() == [5, 7, 300_000]
    assert len(slices) == 2 and slices[0] == 0, "only the first and the last row group hold a wanted key"


@pytest.mark.parametrize("root", ["pathlib", "memory"], indirect=True)
def test_a_commit_removes_only_the_snapshot_files_no_run_can_still_finish(root: Any) -> None:
    """A holder's commit removes the snapshot files no pointer names that were made before it took the lock (a
    run killed between publishing its target and its plan, or mid-upload). It keeps the one it commits, the target
    of a plan still on record (the next run settles or discards it) and any file made after it took the lock."""
    store = SnapshotStore(root, BRAND, TABLE)
    frame = pl.DataFrame({"id": [1, 2]})
    orphan = store.write_snapshot(frame)  # a dead run's target: no pointer names it
    with store.lock("run") as lock:
        time.sleep(0.01)  # the versions' time has microseconds; the lock's acquisition must be after the orphan's
        planned = store.write_snapshot(frame)
        store.write_plan(target_version=planned, base_version=None, changes=None, chunks=[(0, 2)], meta={})
        mine = store.write_snapshot(frame)
        store.commit(mine, base_version=None, kinds={"id": "int"}, key_columns=["id"], rows=2, plan_id=None, lock=lock)
    left = set(store.backend.list_names("snapshots"))
    assert f"{orphan}.parquet" not in left
    assert {f"{planned}.parquet", f"{mine}.parquet"} <= left


@pytest.mark.parametrize("root", ["pathlib"], indirect=True)
def test_a_commit_without_the_lock_removes_no_unnamed_snapshot_file(root: Any) -> None:
    """A commit made without the table's lock (an on-call command's) cannot tell a dead run's file from a live
    one's, so it leaves them all."""
    store = SnapshotStore(root, BRAND, TABLE)
    frame = pl.DataFrame({"id": [1]})
    other = store.write_snapshot(frame)
    mine = store.write_snapshot(frame)
    store.commit(mine, base_version=None, kinds={"id": "int"}, key_columns=["id"], rows=1, plan_id=None)
    assert f"{other}.parquet" in store.backend.list_names("snapshots")


def test_read_rows_at_decodes_only_the_row_groups_holding_the_positions_and_joins_nothing(backend: Backend) -> None:
    """The deleted rows of a diff are read at the positions the key match found, on every backend: in file order,
    only the row groups holding one decoded, and no join of keys against the file."""
    n = 300_001
    frame = pl.DataFrame({"id": pl.int_range(n, eager=True).cast(pl.String), "v": pl.int_range(n, eager=True)})
    backend.write_frame("f/big.parquet", frame)
    slices: list[int] = []
    cut = pl.LazyFrame.slice

    def counted_slice(self: pl.LazyFrame, offset: int, length: int | None = None) -> pl.LazyFrame:
        slices.append(offset)
        return cut(self, offset, length)

    with (
        mock.patch.object(pl.LazyFrame, "join", autospec=True) as join,
        mock.patch.object(pl.LazyFrame, "slice", autospec=True, side_effect=counted_slice),
    ):
        rows = backend.read_rows_at("f/big.parquet", np.array([5, 7, 300_000], dtype=np.uint32))
    assert join.call_count == 0
    assert rows.equals(frame[[5, 7, 300_000]])
    assert len(slices) == 2 and slices[0] == 0, "only the first and the last row group hold a position"


@pytest.mark.parametrize("root", ["pathlib", "memory"], indirect=True)
def test_a_commit_by_a_run_whose_lock_was_taken_over_sweeps_nothing_of_the_new_holders(root: Any) -> None:
    """A run whose lock was broken and taken by a run on a host whose clock is an hour behind (its target's version
    time is older than the first run's lock): the first run's commit is refused, and the new holder's target and
    plan stay for it to deliver and commit."""
    store = SnapshotStore(root, BRAND, TABLE)
    frame = pl.DataFrame({"id": [1, 2]})
    first = store.table_lock("first")
    first.acquire()
    time.sleep(0.01)
    mine = store.write_snapshot(frame)
    assert store.break_lock()  # broken by hand while the first run still works
    with store.lock("second") as second:
        behind = datetime.fromtimestamp(time.time() - 3600, UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-0badc10c"
        store.backend.write_frame(f"snapshots/{behind}.parquet", frame)
        store.write_plan(target_version=behind, base_version=None, changes=None, chunks=[(0, 2)], meta={})
        with pytest.raises(SnapshotLockedError):
            store.commit(
                mine, base_version=None, kinds={"id": "int"}, key_columns=["id"], rows=2, plan_id=None, lock=first
            )
        assert f"{behind}.parquet" in store.backend.list_names("snapshots")
        store.commit(
            behind, base_version=None, kinds={"id": "int"}, key_columns=["id"], rows=2, plan_id=None, lock=second
        )
    assert store.read_committed() is not None and store.read_committed().version == behind  # type: ignore[union-attr]
