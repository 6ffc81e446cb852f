"""The sync engine driven directly against the real sandbox through StopChurnClient (no Airflow).

Every run is checked by its outcome at StopChurn's side: after each run the sandbox table equals the source
(JSON-normalised), and what was sent is counted from the sandbox's own record of applied updates.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from helpers_sync import (
    BRAND,
    T0,
    TABLE,
    Churn,
    FailAfter,
    FailOne,
    RecordingSender,
    assert_sandbox_matches,
    change_counts,
    expected_rows,
    list_files,
    make_client,
    options,
    plain_rows,
    received_counts,
    sandbox_rows,
    tree_digest,
    update_requests,
)

from airflow_provider_stopchurn.exceptions import TransientDeliveryError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots", BRAND, TABLE)


# --- convergence under random churn ----------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "composite"), [(1, False), (2, True), (3, False)])
def test_random_churn_converges_after_every_run(
    sb: SandboxServer, store: SnapshotStore, seed: int, composite: bool
) -> None:
    churn = Churn(seed, 1500, composite=composite)
    client = make_client(sb)
    frame = churn.frame.copy()
    before: dict[Any, Any] = {}
    for run in range(5):
        mark = len(sb.received())
        summary = run_sync(frame, store, client, options(key_columns=churn.keys, chunk_size=173), run_ms=T0 + run)
        assert_sandbox_matches(sb, frame, churn.keys)
        after = expected_rows(frame, churn.keys)
        inserted, updated, deleted = change_counts(before, after)
        assert (summary.inserted, summary.updated, summary.deleted) == (inserted, updated, deleted)
        assert summary.unchanged == len(after) - inserted - updated
        # each change delivered exactly once, with the right type
        counts = received_counts(sb.received()[mark:])
        assert sum(counts.values()) == inserted + updated + deleted
        assert max(counts.values(), default=1) == 1
        assert sum(c for (kind, _), c in counts.items() if kind == "delete") == deleted
        assert summary.requests == summary.chunks == -(-(inserted + updated + deleted) // 173)
        before = after
        frame = churn.step()


def test_unchanged_source_sends_nothing(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(4, 300)
    client = make_client(sb)
    run_sync(churn.frame, store, client, options(), run_ms=T0)
    requests = update_requests(sb)
    digest = tree_digest(store._root, history=False)  # the run is recorded, nothing else is written
    summary = run_sync(churn.frame.sample(frac=1.0, random_state=1), store, client, options(), run_ms=T0 + 1)
    assert (summary.inserted, summary.updated, summary.deleted, summary.unchanged) == (0, 0, 0, 300)
    assert summary.chunks == summary.requests == 0
    assert update_requests(sb) == requests
    assert tree_digest(store._root, history=False) == digest


def test_nan_none_and_types_arrive_as_json(sb: SandboxServer, store: SnapshotStore) -> None:
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "score": [1.5, np.nan, 3.0],
            "name": ["a", None, "c"],
            "flag": [True, False, True],
            "meta": [{"b": 1, "a": [1, 2]}, None, {"x": None}],
        }
    )
    run_sync(frame, store, make_client(sb), options(), run_ms=T0)
    assert sandbox_rows(sb) == plain_rows(
        [
            {"id": 1, "score": 1.5, "name": "a", "flag": True, "meta": {"a": [1, 2], "b": 1}},
            {"id": 2, "score": None, "name": None, "flag": False, "meta": None},
            {"id": 3, "score": 3, "name": "c", "flag": True, "meta": {"x": None}},
        ]
    )
    # NaN -> a value -> NaN again: each is a change, NaN == NaN is not
    frame2 = frame.assign(score=[np.nan, 2.0, 3.0])
    s = run_sync(frame2, store, make_client(sb), options(), run_ms=T0 + 1)
    assert (s.inserted, s.updated, s.deleted, s.unchanged) == (0, 2, 0, 1)
    s = run_sync(frame2.copy(), store, make_client(sb), options(), run_ms=T0 + 2)
    assert (s.updated, s.unchanged) == (0, 3)
    assert_sandbox_matches(sb, frame2)


# --- first run: send vs baseline -------------------------------------------------------------------------------
def test_initial_load_send_inserts_every_row(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(5, 400)
    summary = run_sync(churn.frame, store, make_client(sb), options(initial_load="send"), run_ms=T0)
    assert summary.inserted == 400 and not summary.baseline
    assert {kind for kind, *_ in sb.received()} == {"insert"}
    assert_sandbox_matches(sb, churn.frame)


def test_initial_load_baseline_records_without_sending(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(6, 400)
    client = make_client(sb)
    summary = run_sync(churn.frame, store, client, options(initial_load="baseline"), run_ms=T0)
    assert summary.baseline and summary.unchanged == 400
    assert (summary.inserted, summary.requests, summary.chunks) == (0, 0, 0)
    assert update_requests(sb) == 0
    assert store.read_committed() is not None

    # the next run sends only the difference against the baseline
    before = expected_rows(churn.frame)
    frame = churn.step()
    after = expected_rows(frame)
    inserted, updated, deleted = change_counts(before, after)
    summary = run_sync(frame, store, client, options(initial_load="baseline"), run_ms=T0 + 1)
    assert (summary.inserted, summary.updated, summary.deleted) == (inserted, updated, deleted)
    counts = received_counts(sb.received())
    assert sum(1 for kind, _ in counts if kind == "insert") == inserted
    assert sum(1 for kind, _ in counts if kind == "update") == updated
    assert sum(1 for kind, _ in counts if kind == "delete") == deleted
    # the sandbox (empty before) now holds exactly the inserted and updated rows, as they are now
    got = sandbox_rows(sb)
    assert got == {k: v for k, v in after.items() if k not in before or before[k] != v}


# --- dry run ---------------------------------------------------------------------------------------------------
def test_dry_run_writes_nothing_and_sends_nothing(sb: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, BRAND, TABLE)
    churn = Churn(7, 500)
    client = make_client(sb)

    dry = run_sync(churn.frame, store, client, options(dry_run=True, chunk_size=100), run_ms=T0)
    assert dry.dry_run and dry.inserted == 500 and dry.chunks == 5 and dry.requests == 0
    assert len(dry.samples) == 5 and all(s["type"] == "insert" for s in dry.samples)
    assert "samples" in dry.as_dict()
    assert list_files(root) == []
    assert update_requests(sb) == 0

    # the next run behaves as if the dry run never happened: a first run
    real = run_sync(churn.frame, store, client, options(chunk_size=100), run_ms=T0 + 1)
    assert (real.inserted, real.chunks, real.requests) == (500, 5, 5)
    assert "samples" not in real.as_dict()
    assert_sandbox_matches(sb, churn.frame)

    # a dry run over a committed snapshot predicts the next run and changes nothing
    frame = churn.step()
    digest = tree_digest(root)
    requests = update_requests(sb)
    dry = run_sync(frame, store, client, options(dry_run=True, chunk_size=100), run_ms=T0 + 2)
    assert tree_digest(root) == digest
    assert update_requests(sb) == requests
    real = run_sync(frame, store, client, options(chunk_size=100), run_ms=T0 + 3)
    for field in ("inserted", "updated", "deleted", "unchanged", "chunks", "bytes"):
        assert getattr(dry, field) == getattr(real, field), field
    assert_sandbox_matches(sb, frame)


def test_dry_run_needs_no_sender(store: SnapshotStore) -> None:
    summary = run_sync(Churn(8, 50).frame, store, None, options(dry_run=True), run_ms=T0)
    assert summary.inserted == 50
    assert list_files(store._root) == []


# --- chunking --------------------------------------------------------------------------------------------------
def test_chunks_bounded_by_rows(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(9, 1000)
    sender = RecordingSender(make_client(sb))
    summary = run_sync(churn.frame, store, sender, options(chunk_size=90), run_ms=T0)
    sizes = [len(orjson.loads(b)["data"]) for b in sender.bodies]
    assert summary.chunks == summary.requests == update_requests(sb) == len(sizes) == 12
    assert max(sizes) == 90 and sum(sizes) == 1000
    assert summary.bytes == sum(len(b) for b in sender.bodies)
    assert_sandbox_matches(sb, churn.frame)


def test_chunks_bounded_by_bytes(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(10, 600)
    sender = RecordingSender(make_client(sb))
    limit = 4096
    summary = run_sync(churn.frame, store, sender, options(chunk_size=10_000, max_chunk_bytes=limit), run_ms=T0)
    sizes = [len(b) for b in sender.bodies]
    assert max(sizes) <= limit
    assert min(sizes[:-1]) > limit * 0.8  # chunks are filled, not cut early
    assert summary.chunks == update_requests(sb) == len(sizes) > 10
    assert summary.bytes == sum(sizes)
    assert sum(len(orjson.loads(b)["data"]) for b in sender.bodies) == 600
    assert_sandbox_matches(sb, churn.frame)


# --- what each update carries ----------------------------------------------------------------------------------
def test_deletes_carry_the_full_last_delivered_row(sb: SandboxServer, store: SnapshotStore) -> None:
    frame = pd.DataFrame({"id": [1, 2, 3], "plan": ["free", "pro", "pro"], "seats": [1, 5, np.nan]})
    sender = RecordingSender(make_client(sb))
    run_sync(frame, store, sender, options(), run_ms=T0)
    frame2 = pd.DataFrame({"id": [1, 2, 3], "plan": ["free", "team", "pro"], "seats": [1, 9, np.nan]})
    run_sync(frame2, store, sender, options(), run_ms=T0 + 1000)
    sender.bodies.clear()
    run_sync(frame2[frame2.id == 1], store, sender, options(allow_large_changes=True), run_ms=T0 + 2000)
    deletes = {u["data"]["data"]["id"]: u for u in sender.updates() if u["type"] == "delete"}
    assert set(deletes) == {2, 3}
    # row 2 as delivered by the second run (not the first), row 3 with its null
    assert deletes[2]["data"]["data"] == {"id": 2, "plan": "team", "seats": 9}
    assert deletes[3]["data"]["data"] == {"id": 3, "plan": "pro", "seats": None}
    for update in deletes.values():
        assert update["data"]["createdAt"] == T0  # first delivery
        assert update["data"]["updatedAt"] == T0 + 2000
        assert (update["data"]["brandId"], update["data"]["tableName"]) == (BRAND, TABLE)
    assert sandbox_rows(sb) == plain_rows([{"id": 1, "plan": "free", "seats": 1}])


def test_created_at_kept_from_first_delivery_updated_at_is_run_ms(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(11, 200)
    sender = RecordingSender(make_client(sb))
    first_seen: dict[Any, int] = {}
    frame = churn.frame
    for run in range(4):
        run_ms = T0 + run * 86_400_000
        sender.bodies.clear()
        run_sync(frame, store, sender, options(), run_ms=run_ms)
        for update in sender.updates():
            record = update["data"]
            row_id = record["data"]["id"]
            assert record["updatedAt"] == run_ms
            if update["type"] == "insert":
                assert row_id not in first_seen
                first_seen[row_id] = run_ms
                assert record["createdAt"] == run_ms
            else:
                assert record["createdAt"] == first_seen[row_id], update["type"]
        assert {u["type"] for u in sender.updates()} == ({"insert"} if run == 0 else {"insert", "update", "delete"})
        frame = churn.step()


def test_created_and_updated_from_columns(sb: SandboxServer, store: SnapshotStore) -> None:
    created = pd.to_datetime(["2023-01-01T00:00:00Z", "2023-02-01T12:30:00Z", "2023-03-01T00:00:00Z"])
    modified = pd.Series(pd.to_datetime(["2024-01-01T00:00:00Z", None, "2024-03-01T00:00:00Z"]))
    frame = pd.DataFrame({"id": ["a", "b", "c"], "created": created, "modified": modified, "v": [1, 2, 3]})
    sender = RecordingSender(make_client(sb))
    opts = options(created_at_column="created", updated_at_column="modified")
    run_sync(frame, store, sender, opts, run_ms=T0)
    by_id = {u["data"]["data"]["id"]: u["data"] for u in sender.updates()}

    def ms(text: str) -> int:
        return int(dt.datetime.fromisoformat(text).timestamp() * 1000)

    assert by_id["a"]["createdAt"] == ms("2023-01-01T00:00:00+00:00")
    assert by_id["b"]["createdAt"] == ms("2023-02-01T12:30:00+00:00")
    assert by_id["a"]["updatedAt"] == ms("2024-01-01T00:00:00+00:00")
    assert by_id["b"]["updatedAt"] == T0  # a missing updated_at falls back to the run's time
    assert by_id["c"]["updatedAt"] == ms("2024-03-01T00:00:00+00:00")
    assert_sandbox_matches(sb, frame)

    # an update takes updatedAt from its column; createdAt stays the column's value
    sender.bodies.clear()
    frame2 = frame.assign(
        v=[1, 20, 3], modified=pd.to_datetime(["2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z", "2024-03-01T00:00:00Z"])
    )
    run_sync(frame2, store, sender, opts, run_ms=T0 + 5)
    (update,) = sender.updates()
    assert update["type"] == "update" and update["data"]["data"]["id"] == "b"
    assert update["data"]["createdAt"] == ms("2023-02-01T12:30:00+00:00")
    assert update["data"]["updatedAt"] == ms("2024-06-01T00:00:00+00:00")


# --- concurrency -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 4])
def test_concurrent_requests_converge(stopchurn_sandbox_factory: Any, store: SnapshotStore, workers: int) -> None:
    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.002))
    churn = Churn(12, 1200, composite=True)
    client = make_client(sb)
    frame = churn.frame
    for run in range(3):
        mark = len(sb.received())
        run_sync(
            frame,
            store,
            client,
            options(key_columns=churn.keys, chunk_size=40, max_concurrent_requests=workers),
            run_ms=T0 + run,
        )
        assert_sandbox_matches(sb, frame, churn.keys)
        assert max(received_counts(sb.received()[mark:]).values()) == 1
        frame = churn.step()


# --- interrupted delivery and resume ---------------------------------------------------------------------------
def test_interrupted_delivery_settles_then_sends_only_the_rest(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(13, 1000, with_json=False)
    client = make_client(sb, max_retries=0)
    opts = options(chunk_size=100, max_concurrent_requests=1, run_key="dag.task.run-1")
    with pytest.raises(TransientDeliveryError) as info:
        run_sync(churn.frame, store, FailAfter(client, sb, 4), opts, run_ms=T0)
    assert "500" in str(info.value)
    assert len(sb.rows(BRAND, TABLE)) == 400
    committed = store.read_committed()  # the four acknowledged chunks were settled, the failed one is unsure
    assert committed is not None and committed.rows == 500
    assert store.pending_plan() is None

    sb.set_faults(FaultConfig())
    requests = update_requests(sb)
    summary = run_sync(churn.frame, store, client, opts, run_ms=T0 + 1)
    assert update_requests(sb) - requests == 6  # only what was not acknowledged
    assert summary.settled_chunks == 4  # acknowledged in the earlier try of this run
    assert (summary.inserted, summary.updated, summary.deleted) == (1000, 0, 0)  # the run's whole delivery
    counts = received_counts(sb.received())
    assert len(counts) == 1000 and set(counts.values()) == {1}  # every acknowledged update exactly once
    assert_sandbox_matches(sb, churn.frame)
    assert store.pending_plan() is None


def test_resume_then_diff_against_a_changed_source(sb: SandboxServer, store: SnapshotStore) -> None:
    churn = Churn(14, 800, with_json=False)
    client = make_client(sb, max_retries=0)
    opts = options(chunk_size=50, max_concurrent_requests=2)
    run_sync(churn.frame, store, client, opts, run_ms=T0)
    frame1 = churn.step()
    with pytest.raises(TransientDeliveryError):
        run_sync(frame1, store, FailAfter(client, sb, 3), opts, run_ms=T0 + 1)
    sb.set_faults(FaultConfig())
    frame2 = churn.step()  # the source moved on before the retry
    mark = len(sb.received())
    summary = run_sync(frame2, store, client, opts, run_ms=T0 + 2)
    assert summary.inserted + summary.updated + summary.deleted > 0
    assert_sandbox_matches(sb, frame2)
    # the settled plan, then the new diff: no update of one run twice
    assert max(received_counts(sb.received()[mark:]).values()) <= 2


def test_resume_after_out_of_order_acknowledgements(stopchurn_sandbox_factory: Any, store: SnapshotStore) -> None:
    sb = stopchurn_sandbox_factory(record=True, faults=FaultConfig(latency=0.005))
    broken = stopchurn_sandbox_factory(faults=FaultConfig(error_rate=1.0))
    churn = Churn(15, 1000, with_json=False)
    client = make_client(sb, max_retries=0)
    sender = FailOne(client, make_client(broken, max_retries=0), bad_id=250, delay_s=0.3)
    opts = options(chunk_size=50, max_concurrent_requests=4)
    with pytest.raises(TransientDeliveryError):
        run_sync(churn.frame, store, sender, opts, run_ms=T0)
    committed = store.read_committed()  # settled: the acknowledged chunks, with a gap where chunk 6 failed
    assert committed is not None and store.pending_plan() is None
    held = {r["id"] for r in sb.rows(BRAND, TABLE)}
    # the failed chunk's rows are recorded as unsure (its request may have been applied)
    assert len(held) + 50 == committed.rows and 250 not in held and max(held) > 300, len(held)

    summary = run_sync(churn.frame, store, client, opts, run_ms=T0 + 1)
    assert summary.inserted == 1000 - len(held)
    counts = received_counts(sb.received())
    assert len(counts) == 1000 and set(counts.values()) == {1}
    assert_sandbox_matches(sb, churn.frame)


def test_transient_failure_keeps_the_committed_rows_and_the_next_run_converges(
    sb: SandboxServer, store: SnapshotStore
) -> None:
    churn = Churn(16, 300, with_json=False)
    client = make_client(sb, max_retries=1)
    run_sync(churn.frame, store, client, options(chunk_size=100), run_ms=T0)
    committed = store.read_committed()
    assert committed is not None
    sb.set_faults(FaultConfig(error_rate=1.0))
    old = churn.frame.copy()
    frame = churn.step()
    with pytest.raises(TransientDeliveryError) as info:
        run_sync(frame, store, client, options(chunk_size=100), run_ms=T0 + 1)
    assert info.value.attempts == 2 and not info.value.permanent
    assert_sandbox_matches(sb, old)  # StopChurn applied nothing
    after = store.read_committed()  # the unsure chunk's rows are marked to be sent again, nothing is pending
    assert after is not None and after.version != committed.version and store.pending_plan() is None
    assert store.read_lock() is None  # the lock is released on failure
    sb.set_faults(FaultConfig())
    run_sync(frame, store, client, options(chunk_size=100), run_ms=T0 + 2)
    assert_sandbox_matches(sb, frame)
