"""The streamed worker path under faults its own parts bring: a spool of customer rows in a temporary folder, and a
target snapshot read back a window at a time.

A SQL source is spooled, canonicalized, to temporary Arrow files before it is diffed. A run killed outright (the
OOM killer, SIGKILL) runs no cleanup, so those rows stay on the worker's disk; the next streamed run on that
host must remove them. A first load's inserts are encoded from the written target snapshot a window at a time; on an
object store each window must not download the whole snapshot again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import polars as pl
import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from helpers_sync import BRAND, T0, TABLE, make_client, options
from killswitch_fs import quiet_upath

from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.stream import STREAM_ENV
from airflow_provider_stopchurn.update.sync import run_sync

ROOT = Path(__file__).resolve().parent.parent

#: a child that spools a first batch of customer rows (more than one spool file holds), then dies by SIGKILL
_KILLED_CHILD = textwrap.dedent(
    """
    import os, signal, sys, tempfile
    from pathlib import Path
    import pyarrow as pa
    tempfile.tempdir = sys.argv[1]
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.store import SnapshotStore
    from airflow_provider_stopchurn.update.stream import SPOOL_ROWS, plan_streamed

    def batches():
        rows = SPOOL_ROWS + 10
        emails = [f"customer{i}@example.com" for i in range(rows)]
        yield pa.RecordBatch.from_pydict({"id": list(range(rows)), "email": emails})
        os.kill(os.getpid(), signal.SIGKILL)
        yield pa.RecordBatch.from_pydict({"id": [-1], "email": ["never"]})

    store = SnapshotStore(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    plan_streamed(batches(), store, SyncOptions(brand_id=int(sys.argv[3]), table_name=sys.argv[4]), 0)
    """
)


def _batches(keys: range) -> Callable[[], Iterator[pa.RecordBatch]]:
    def read() -> Iterator[pa.RecordBatch]:
        yield pa.RecordBatch.from_pydict({"id": list(keys), "email": [f"c{k}@example.com" for k in keys]})

    return read


def test_a_spool_left_by_a_killed_run_is_removed_by_the_next_streamed_run(
    tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    store_root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), STREAM_ENV: "auto"}
    args = [str(temporary), str(store_root), str(BRAND), TABLE]
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, *args], env=env, capture_output=True, timeout=300, check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    left = [p for p in temporary.rglob("*.arrow") if p.stat().st_size]
    assert left, "the killed run spooled customer rows before it died"

    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv(STREAM_ENV, "auto")
    store = SnapshotStore(store_root, BRAND, TABLE)
    summary = run_sync(_batches(range(5)), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    assert summary.inserted == 5
    assert sorted(p.name for p in temporary.rglob("*") if p.is_file()) == []


class ReadCountingMemoryFileSystem(MemoryFileSystem):
    """An object store of its own in memory that counts the opens for reading of each snapshot file."""

    protocol = ("readcountmem",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    snapshot_reads: ClassVar[Counter[str]] = Counter()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode and "/snapshots/" in str(path):
            self.snapshot_reads[str(path)] += 1
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("readcountmem", ReadCountingMemoryFileSystem, clobber=True)


def test_a_streamed_first_load_on_an_object_store_downloads_its_target_once_not_per_window(
    stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its inserts are encoded a window at a time from the written target: one download of it, not one per window
    (a 10M-row first load has 40 windows of the default 250,000 rows)."""
    monkeypatch.setenv(STREAM_ENV, "auto")
    store = SnapshotStore(quiet_upath(f"readcountmem://stopchurn/{uuid.uuid4().hex}"), BRAND, TABLE)
    ReadCountingMemoryFileSystem.snapshot_reads.clear()
    opts = options(window_rows=10, chunk_size=10)
    summary = run_sync(_batches(range(60)), store, make_client(stopchurn_sandbox), opts, run_ms=T0)
    assert summary.inserted == 60
    assert len(stopchurn_sandbox.rows(BRAND, TABLE)) == 60
    reads = ReadCountingMemoryFileSystem.snapshot_reads
    assert len(reads) == 1, reads  # the target, now the committed snapshot
    assert max(reads.values()) <= 2, reads


class Terminated(Exception):
    """What Airflow's SIGTERM handler raises in a task (the task is told to stop)."""


def test_sigterm_stops_a_streamed_target_write_before_the_rest_of_the_table_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python runs signal handlers in the main thread only. The target's frames (the spool read back, retyped,
    hashed) must be made there, not in the Parquet writer's threads: else a SIGTERM (Airflow's ``execution_timeout``,
    a task stopped by hand) waits for the whole table, past Airflow's grace period, and the run dies by SIGKILL
    with nothing cleaned up."""

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    made: list[int] = []

    def frames() -> Iterator[pl.DataFrame]:
        for number in range(20):
            made.append(number)
            if number == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield pl.DataFrame({"id": [number], "email": [f"c{number}@example.com"]})

    store = SnapshotStore(tmp_path, BRAND, TABLE)
    try:
        with pytest.raises(Terminated):
            store.write_snapshot_frames(frames())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert made == [0, 1, 2]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
