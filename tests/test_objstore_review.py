"""A streamed target written aside and published only when a run needs it, against the table's lock and later runs.

The target of a large table takes minutes to upload. A run whose lease is taken over meanwhile (it paused past
``lock_ttl_s``, or a person broke the lock) must not then write its plan over the new owner's: the ``PLAN`` pointer
is the ledger of what the owner may have sent, and a run killed after that cannot be settled from the acks it
recorded if another run's pointer replaced its own.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import fsspec
import numpy as np
import pandas as pd
import polars as pl
import pytest
from deploy_harness import BUCKET
from fsspec.implementations.memory import MemoryFileSystem
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from killswitch_fs import Killed, quiet_upath
from polars.testing import assert_frame_equal

from airflow_provider_stopchurn.exceptions import SnapshotError, SnapshotLockedError
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.stream import STREAM_ENV
from airflow_provider_stopchurn.update.sync import run_sync


class TakeoverMemory(MemoryFileSystem):
    """An object store in memory that calls :attr:`on_upload` once, as a snapshot's upload starts."""

    protocol = ("takeovermem",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    on_upload: ClassVar[Callable[[], None] | None] = None

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        hook = type(self).on_upload
        if "r" not in mode and "/snapshots/" in str(path) and hook is not None:
            type(self).on_upload = None
            hook()
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("takeovermem", TakeoverMemory, clobber=True)


def _table(seed: int, rows: int = 30) -> pd.DataFrame:
    return pd.DataFrame({"id": range(rows), "email": [f"c{k}-{seed if k % 3 == 0 else 0}@x.io" for k in range(rows)]})


def _take_over(store: SnapshotStore, plans: list[str]) -> Callable[[], None]:
    """Another run breaks the lease and takes the table, and records the plan it starts delivering."""

    def take() -> None:
        store.break_lock()
        other = store.table_lock("the run that took over")
        other.acquire()
        committed = store.read_committed()
        assert committed is not None
        plan = store.write_plan(
            target_version=committed.version, base_version=committed.version, changes=None, chunks=[], meta={}
        )
        plans.append(plan.plan_id)

    return take


def _plan_id(store: SnapshotStore) -> str | None:
    raw = store.backend.read_bytes("PLAN")
    return None if raw is None else str(json.loads(raw)["plan_id"])


@pytest.mark.parametrize("where", ["object store", "local"])
def test_a_run_that_lost_its_lock_while_publishing_its_target_writes_no_plan_over_the_new_owners(
    where: str, tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STREAM_ENV, "always")
    root: Any = quiet_upath(f"takeovermem://stopchurn/{uuid.uuid4().hex}") if where == "object store" else tmp_path
    store = SnapshotStore(root, BRAND, TABLE)
    run_sync(_table(0), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    snapshots_before = set(store.backend.list_names("snapshots"))
    plans: list[str] = []
    take = _take_over(store, plans)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if "snapshots" in str(dst) and not plans:
            take()
        real_replace(src, dst)

    TakeoverMemory.on_upload = take if where == "object store" else None
    with (
        mock.patch("os.replace", autospec=True, side_effect=replace),
        pytest.raises(SnapshotLockedError),
    ):
        run_sync(_table(1), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + 1)
    assert plans, "the lock was taken over while the target was published"
    assert _plan_id(store) == plans[0], "the run that lost the table replaced the new owner's plan"
    assert set(store.backend.list_names("snapshots")) == snapshots_before, "its target is left named by nothing"


@pytest.mark.parametrize("where", ["object store", "local"])
def test_an_unchanged_run_then_a_changed_one_commits_the_changed_table(
    where: str, tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unchanged run's target is never published; the next run's must be, and be what CURRENT names."""
    monkeypatch.setenv(STREAM_ENV, "always")
    root: Any = quiet_upath(f"takeovermem://stopchurn/{uuid.uuid4().hex}") if where == "object store" else tmp_path
    store = SnapshotStore(root, BRAND, TABLE)
    client = make_client(stopchurn_sandbox)
    run_sync(_table(0), store, client, options(), run_ms=T0)
    first = store.read_committed()
    assert first is not None
    unchanged = run_sync(_table(0), store, client, options(), run_ms=T0 + 1)
    assert unchanged.inserted + unchanged.updated + unchanged.deleted == 0
    assert store.read_committed().version == first.version  # type: ignore[union-attr]
    assert store.backend.list_names("snapshots") == [f"{first.version}.parquet"]
    changed = run_sync(_table(1, rows=28), store, client, options(), run_ms=T0 + 2)
    assert (changed.inserted, changed.updated, changed.deleted) == (0, 10, 2)
    committed = store.read_committed()
    assert committed is not None and committed.version != first.version
    assert store.backend.list_names("snapshots") == [f"{committed.version}.parquet"]
    assert_frame_equal(committed.frame.select("id", "email").sort("id"), pl.from_pandas(_table(1, rows=28)).sort("id"))
    assert_sandbox_matches(stopchurn_sandbox, _table(1, rows=28))
    again = run_sync(_table(1, rows=28), store, client, options(), run_ms=T0 + 3)
    assert again.inserted + again.updated + again.deleted == 0


#: a storage credential that must reach no log line or exception
_S3_SECRET = "s3-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with the bucket :data:`BUCKET`."""
    from deploy_harness import running_s3

    with running_s3() as url:
        yield url


def _s3_root(endpoint: str) -> Any:
    from upath import UPath

    return UPath(
        f"s3://{BUCKET}/{uuid.uuid4().hex}",
        key="testing",
        secret=_S3_SECRET,
        client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
        default_block_size=5 * 2**20,  # S3's smallest part: a target of a few parts is a multipart upload
        skip_instance_cache=True,
    )


def _wide(rows: int) -> pd.DataFrame:
    """Random 64-bit integers (they do not compress: about 7 MB of Parquet at 120,000 rows)."""
    rng = np.random.default_rng(22)
    columns = {f"c{i}": rng.integers(-(2**62), 2**62, size=rows, dtype=np.int64) for i in range(6)}
    return pd.DataFrame({"id": np.arange(rows, dtype=np.int64), **columns})


def test_an_s3_multipart_upload_that_fails_part_way_is_aborted_and_leaves_no_object(
    s3_endpoint: str,
    stopchurn_sandbox: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On S3 a target of several parts is a multipart upload: one that fails after its first part must be aborted
    (else S3 keeps the parts, billed, out of sight) and never completed as a truncated object, and the error names
    no credential. (A first load: it publishes its target as a churn run does, with one run of the table.)"""
    import s3fs

    monkeypatch.setenv(STREAM_ENV, "always")
    root = _s3_root(s3_endpoint)
    store = SnapshotStore(root, BRAND, TABLE)
    client = make_client(stopchurn_sandbox)
    real_upload = s3fs.core.S3File._upload_chunk
    parts: list[bool] = []

    def upload_chunk(self: Any, final: bool = False) -> Any:
        if "/snapshots/" in str(self.path):
            if parts:
                raise ConnectionResetError("Connection reset by peer")
            parts.append(final)
        return real_upload(self, final)

    caplog.set_level("DEBUG", logger="airflow_provider_stopchurn")
    with (
        mock.patch.object(s3fs.core.S3File, "_upload_chunk", autospec=True, side_effect=upload_chunk),
        pytest.raises(SnapshotError) as raised,
    ):
        run_sync(_wide(120_000), store, client, options(initial_load="baseline"), run_ms=T0)
    assert parts == [False], "the target went up in several parts"
    assert _S3_SECRET not in str(raised.value) and _S3_SECRET not in repr(raised.value)
    assert _S3_SECRET not in "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    uploads = root.fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])
    assert uploads == [], "a multipart upload was left open"
    assert store.backend.list_names("snapshots") == []
    assert store.read_committed() is None and store.pending_plan() is None


def test_an_upload_killed_part_way_leaves_no_object_after_the_next_run(
    tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose objects grow as they are written (a folder, SFTP, memory) shows a killed upload's part under the
    target's own name. No pointer names it, so no run reads it; but no run removes it either (a run that lived to
    see its error does), and every such kill adds a part of the table's size."""
    from test_object_store_upload import FailingDiskObjects

    monkeypatch.setenv(STREAM_ENV, "always")
    FailingDiskObjects.fail_after, FailingDiskObjects.dead = None, False
    store = SnapshotStore(quiet_upath(f"failingdiskobjects://{tmp_path}/objects"), BRAND, TABLE)
    client = make_client(stopchurn_sandbox)
    run_sync(_table(0), store, client, options(), run_ms=T0)
    FailingDiskObjects.error, FailingDiskObjects.fail_after = Killed(), 100
    with pytest.raises(Killed):
        run_sync(_table(1), store, client, options(), run_ms=T0 + 1)
    FailingDiskObjects.dead = False  # a new process
    store.break_lock()
    run_sync(_table(2), store, client, options(), run_ms=T0 + 2)
    committed = store.read_committed()
    assert committed is not None
    assert store.backend.list_names("snapshots") == [f"{committed.version}.parquet"]


def test_a_staged_local_target_survives_another_runs_sweep(tmp_path: Path) -> None:
    """A target staged on a local disk stays aside for the whole of its run's planning (minutes for a large table),
    no longer only while it is written. A run whose lease lapsed meanwhile and that reaches its own target's write
    sweeps every hidden snapshot file: the owner's publish then fails with "Cannot write ... Check that the snapshot
    location exists and is writable", and the owner's run is lost for a run that was about to stop anyway."""
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    frame = pl.DataFrame({"id": [1, 2, 3]})
    with store.staged_snapshot(iter([frame])) as owners:
        store.write_snapshot_frames(iter([frame]))  # the other run's target: its write sweeps first
        owners.publish()
    assert_frame_equal(store.read_snapshot(owners.version), frame)
