"""Fencing: a run that lost its table's lease sends nothing more, even from inside the client's retry loop.

A run is paused (SIGSTOP: a frozen VM, a stopped container, a long GC pause) while its client waits to retry a
429 (``Retry-After``) or a 5xx; its lease expires, another run takes the table and delivers a newer value, then the
paused run wakes up. It must not send its older value (StopChurn would keep it, and the newer run's snapshot says
the newer one was delivered, so no later run would repair it): the sandbox must count no request of it after it
woke, its error must say it lost its lock, and the next run converges.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers_events import deposit_options
from helpers_sync import BRAND, T0, TABLE, make_client, options, wait_until
from worker_harness import start_worker

from airflow_provider_stopchurn.events.engine import run_events
from airflow_provider_stopchurn.events.ledger import event_store
from airflow_provider_stopchurn.exceptions import SnapshotLockedError
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.sync import run_sync

WORKER = "lock_loss_worker.py"
KEY_VAR = "STOPCHURN_LOCK_LOSS_TEST_KEY"
TTL_S = 3.0  # the paused run's lease; its client's requests last at most 1.5 s


def _start(sb: SandboxServer, root: Path, value: str) -> subprocess.Popen[str]:
    return start_worker(WORKER, sb.url, KEY_VAR, root, value, TTL_S, key_var=KEY_VAR, token=sb.token)


def _names(sb: SandboxServer) -> dict[Any, Any]:
    return {key: row.get("name") for key, row in sb.table(BRAND, TABLE).items()}


@pytest.mark.parametrize("status", [429, 503])
def test_a_run_that_lost_its_lock_while_waiting_to_retry_sends_nothing_more(
    stopchurn_sandbox_factory: Any, tmp_path: Path, status: int
) -> None:
    sb = stopchurn_sandbox_factory(record=True)
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, BRAND, TABLE)
    # the paused run's first request is answered "retry in 4 s": its client sleeps (a 429 through the shared
    # pacer, a 503 in the backoff sleep)
    sb.queue_response(status, {"statusCode": status, "message": "busy"}, headers={"Retry-After": "4"})
    proc = _start(sb, root, "older")
    try:
        assert wait_until(lambda: sb.stats()["requests"] >= 1 or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.communicate(timeout=10)
        proc.send_signal(signal.SIGSTOP)
        # its lease lapses while it is stopped; another run breaks it, takes the table and delivers a newer value
        assert wait_until(lambda: float((store.read_lock() or {}).get("expires_at", 0)) < time.time(), 30)
        newer = pl.DataFrame({"id": [1], "name": ["newer"]})
        run_sync(newer, store, make_client(sb), options(holder="next-run", lock_wait_s=0), run_ms=T0 + 1)
        assert _names(sb) == {1: "newer"}
        requests_before_wakeup = sb.stats()["requests"]
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["error"] == "SnapshotLockedError" and "lost its lock" in outcome["message"], outcome
    assert sb.stats()["requests"] == requests_before_wakeup  # not one request after it woke up
    assert _names(sb) == {1: "newer"}
    # the next run converges (nothing to resend: StopChurn holds the source)
    summary = run_sync(newer, store, make_client(sb), options(holder="later-run", lock_wait_s=0), run_ms=T0 + 2)
    assert _names(sb) == {1: "newer"}
    assert (summary.inserted, summary.updated, summary.deleted) == (0, 0, 0)


# --- every engine's sender is fenced: a lease broken while the client sleeps stops the retry ------------------------
def _fenced_client(sb: SandboxServer) -> Any:
    return make_client(sb, max_retries=3, timeout=1.0, connect_timeout=0.5)  # fits a 6 s lease


def _run_worker(sb: SandboxServer, root: Path, request: Any) -> tuple[SnapshotStore, Callable[[], Any]]:
    store = SnapshotStore(root, BRAND, TABLE)
    frame = pl.DataFrame({"id": [1, 2], "name": ["a", "b"]})
    opts = options(holder="sleeping-run", lock_ttl_s=6.0, lock_wait_s=0, max_concurrent_requests=1)
    return store, lambda: run_sync(frame, store, _fenced_client(sb), opts, run_ms=T0)


def _run_warehouse(name: str) -> Callable[..., tuple[SnapshotStore, Callable[[], Any]]]:
    def make(sb: SandboxServer, root: Path, request: pytest.FixtureRequest) -> tuple[SnapshotStore, Callable[[], Any]]:
        import pandas as pd
        from pushdown_engines import engine_fixture

        from airflow_provider_stopchurn.warehouse import WarehouseSource, run_warehouse_sync

        engine = next(engine_fixture(name, request, root.parent))
        engine.load(pd.DataFrame({"id": [1, 2], "name": ["a", "b"]}))
        store = SnapshotStore(root, BRAND, TABLE)
        opts = options(holder="sleeping-run", lock_ttl_s=6.0, lock_wait_s=0, max_concurrent_requests=1)

        def run() -> Any:
            source = WarehouseSource("SELECT * FROM src", engine.warehouse(), state_schema="stopchurn_state")
            return run_warehouse_sync(source, store, _fenced_client(sb), opts, run_ms=T0)

        return store, run

    return make


def _run_events(sb: SandboxServer, root: Path, request: Any) -> tuple[SnapshotStore, Callable[[], Any]]:
    import pandas as pd

    store = event_store(root, BRAND, "deposits")
    frame = pd.DataFrame({"user_id": [1, 2], "amount": [10, 20], "deposit_id": [1, 2]})
    opts = deposit_options(
        BRAND,
        holder="sleeping-run",
        lock_ttl_s=6.0,
        max_concurrent_requests=1,
    )
    return store, lambda: run_events(frame, store, _fenced_client(sb), opts, stream="deposits")


ENGINES: dict[str, Callable[..., tuple[SnapshotStore, Callable[[], Any]]]] = {
    "worker": _run_worker,
    "warehouse-duckdb": _run_warehouse("duckdb"),
    "warehouse-postgres": _run_warehouse("postgres"),
    "warehouse-spark": _run_warehouse("spark"),
    "events": _run_events,
}
MARKS = {"warehouse-postgres": pytest.mark.postgres, "warehouse-spark": pytest.mark.spark}


@pytest.mark.parametrize("engine", [pytest.param(e, marks=MARKS.get(e, ())) for e in ENGINES])
def test_every_engine_stops_a_retry_once_its_lease_was_taken(
    stopchurn_sandbox_factory: Any, tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    """The lease is broken by hand (``stopchurn unlock --force``) and taken while the run's client sleeps on a
    ``Retry-After``: its heartbeat finds the lock gone (within 2 s), and the fence before the retry stops it."""
    sb = stopchurn_sandbox_factory(record=True)
    store, run = ENGINES[engine](sb, tmp_path / "snapshots", request)
    sb.queue_response(429, {"statusCode": 429, "message": "slow down"}, headers={"Retry-After": "4"})
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = run()
        except Exception as err:  # examined below
            outcome["result"] = err

    thread = threading.Thread(target=target)
    thread.start()
    try:
        assert wait_until(lambda: sb.stats()["requests"] >= 1 or not thread.is_alive(), 60)
        record = store.read_lock()
        assert record is not None and record["holder"] == "sleeping-run", outcome
        assert store.break_lock(token=record["token"])
        thief = store.table_lock("next-run", ttl_s=60)
        thief.acquire()
        taken_at = sb.stats()["requests"]
    finally:
        thread.join(60)
    assert not thread.is_alive()
    error = outcome["result"]
    assert isinstance(error, SnapshotLockedError), error
    assert "lost its lock to 'next-run'" in str(error)
    assert sb.stats()["requests"] == taken_at  # the retry was never sent
    assert store.read_lock()["token"] == thief.token  # type: ignore[index]
    thief.release()


def test_an_events_run_that_waited_for_the_lock_is_fenced_by_its_own_lease(
    stopchurn_sandbox_factory: Any, tmp_path: Path
) -> None:
    """The event operator's ``lock_wait_s``: a run that waited for another run's lock and then took it holds its
    own lease, and that lease still fences every request. Here the lease is broken and taken while the client
    sleeps on a ``Retry-After``: the retry is never sent."""
    import pandas as pd

    sb = stopchurn_sandbox_factory(record=True)
    store = event_store(tmp_path / "snapshots", BRAND, "deposits")
    frame = pd.DataFrame({"user_id": [1, 2], "amount": [10, 20], "deposit_id": [1, 2]})
    opts = deposit_options(
        BRAND,
        holder="waiting-run",
        lock_ttl_s=6.0,
        lock_wait_s=60.0,
        max_concurrent_requests=1,
    )
    sb.queue_response(429, {"statusCode": 429, "message": "slow down"}, headers={"Retry-After": "4"})
    first = store.table_lock("first-run", ttl_s=60)
    first.acquire()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = run_events(frame, store, _fenced_client(sb), opts, stream="deposits")
        except Exception as err:  # examined below
            outcome["result"] = err

    thread = threading.Thread(target=target)
    thread.start()
    try:
        time.sleep(1.5)  # the run polls the lock meanwhile (not asserted: only what follows is)
        assert thread.is_alive(), outcome  # waiting, not failed at once
        assert sb.stats()["requests"] == 0  # nothing sent while another run holds the stream
        first.release()
        assert wait_until(lambda: sb.stats()["requests"] >= 1 or not thread.is_alive(), 60)
        record = store.read_lock()
        assert record is not None and record["holder"] == "waiting-run", outcome
        assert store.break_lock(token=record["token"])
        thief = store.table_lock("next-run", ttl_s=60)
        thief.acquire()
        taken_at = sb.stats()["requests"]
    finally:
        thread.join(60)
    assert not thread.is_alive()
    error = outcome["result"]
    assert isinstance(error, SnapshotLockedError), error
    assert "lost its lock to 'next-run'" in str(error)
    assert sb.stats()["requests"] == taken_at  # the retry was never sent
    thief.release()
