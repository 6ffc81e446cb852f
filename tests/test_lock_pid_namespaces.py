"""A lock held by a worker in another PID namespace with the same host name (containers sharing the host's
network, hence its name) is not taken for a dead process of this host: its pid means nothing here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_sync import BRAND, TABLE

from airflow_provider_stopchurn.cli import operate
from airflow_provider_stopchurn.exceptions import SnapshotLockedError
from airflow_provider_stopchurn.store import SnapshotStore

HERE = Path(__file__).parent


@pytest.fixture
def container_holder(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A process holding the table's lock, started in a new PID namespace after a few hundred other processes
    there (so its pid is one that no process of this namespace has)."""
    if shutil.which("unshare") is None or not Path("/proc/self/ns/pid").exists():
        pytest.skip("needs Linux and unshare")
    burn = "i=0; while [ $i -lt 400 ]; do /bin/true; i=$((i+1)); done"
    script = f'{burn}; "$0" "$1" "$2"; true'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    command = ["unshare", "--pid", "--fork", "--map-root-user", "--mount-proc", "sh", "-c", script]
    command += [sys.executable, str(HERE / "pid_namespace_holder.py"), str(tmp_path / "s")]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            pytest.skip("unshare cannot make a PID namespace here")
        held = json.loads(line)
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            pass
        else:
            pytest.skip("the holder's pid is also a process of this namespace")
        yield held
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)


def test_a_run_does_not_take_a_live_lock_of_another_pid_namespace(
    container_holder: dict[str, object], tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    with pytest.raises(SnapshotLockedError), store.lock("other-run", ttl_s=30.0, wait_s=0):
        pass
    assert (store.read_lock() or {}).get("token") == container_holder["token"]


def test_unlock_refuses_a_live_lock_of_another_pid_namespace(
    container_holder: dict[str, object], tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path / "s", BRAND, TABLE)
    with pytest.raises(SnapshotLockedError, match="heartbeat is fresh"):
        operate.unlock(store, token=str(container_holder["token"]))
    assert (store.read_lock() or {}).get("token") == container_holder["token"]
