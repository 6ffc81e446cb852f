"""Fencing: a run that lost its table's lease sends nothing more, even from inside the client's retry loop.

A run is paused (SIGSTOP: a frozen VM, a stopped container, a long GC pause) while its client waits to retry a
429 (``Retry-After``) or a 5xx; its lease expires, another run takes the table and delivers a newer value, then the
paused run wakes up. It must not send its older value (StopChurn would keep it, and the newer run's snapshot says
the newer one was delivered, so no later run would repair it): the sandbox must count no request of it after it
woke, its error must say it lost its lock, and the next run converges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers_sync import BRAND, T0, TABLE, make_client, options, wait_until

from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.snapshot import SnapshotStore
from airflow_provider_stopchurn.sync import run_sync

WORKER = Path(__file__).with_name("lock_loss_worker.py")
KEY_VAR = "STOPCHURN_LOCK_LOSS_TEST_KEY"
TTL_S = 3.0  # the paused run's lease; its client's requests last at most 1.5 s


def _start(sb: SandboxServer, root: Path, value: str) -> subprocess.Popen[str]:
    env = {**os.environ, KEY_VAR: sb.token, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), sb.url, KEY_VAR, str(root), value, str(TTL_S)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=WORKER.parent,
    )


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
