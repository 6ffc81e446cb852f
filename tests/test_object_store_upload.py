"""The streamed target's way into an object store: written aside on the worker, uploaded only when a run needs it,
a bounded piece at a time, and a failed upload leaves nothing a pointer names or the next run trips on.

The object store here is an fsspec file system of its own whose objects are files under a local folder
(:class:`DiskObjects`): what an upload holds in Python's memory is then only the upload's own, and
``tracemalloc`` measures it (the Parquet writer's buffers are Rust's and are not traced).
"""

from __future__ import annotations

import gc
import os
import tempfile
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import fsspec
import numpy as np
import pandas as pd
import polars as pl
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.spec import AbstractBufferedFile
from helpers_sync import BRAND, T0, TABLE, assert_sandbox_matches, make_client, options
from killswitch_fs import Killed, quiet_upath
from polars.testing import assert_frame_equal

from airflow_provider_stopchurn.exceptions import SnapshotError
from airflow_provider_stopchurn.sandbox import SandboxServer
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.stream import STREAM_ENV
from airflow_provider_stopchurn.update.sync import run_sync


class DiskObjects(LocalFileSystem):
    """An object store whose objects are local files (``diskobjects:///abs/folder``): a write goes to disk as it
    comes, so nothing of an upload stays in Python's memory but what the uploader holds."""

    protocol = ("diskobjects",)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        return super()._strip_protocol(path.removeprefix("diskobjects://"))


class _BrokenUpload:
    """A write handle that stores ``limit`` bytes, then fails as a dropped connection (or a dying process) would."""

    def __init__(self, inner: Any, limit: int, error: BaseException) -> None:
        self._inner, self._limit, self._error, self._written = inner, limit, error, 0

    def write(self, data: bytes) -> int:
        room = self._limit - self._written
        if len(data) > room:
            self._inner.write(bytes(data[: max(room, 0)]))
            self._inner.flush()
            if isinstance(self._error, Killed):
                FailingDiskObjects.dead = True
            raise self._error
        self._written += len(data)
        return int(self._inner.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> _BrokenUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


class FailingDiskObjects(DiskObjects):
    """:class:`DiskObjects` whose next snapshot upload fails after ``fail_after`` bytes with ``error``; a
    :class:`Killed` one also refuses every later write and delete (a dead process makes none)."""

    protocol = ("failingdiskobjects",)
    fail_after: ClassVar[int | None] = None
    error: ClassVar[BaseException] = OSError("Connection reset by peer")
    dead: ClassVar[bool] = False

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(str(path).replace("failingdiskobjects://", "diskobjects://", 1))

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" not in mode and type(self).dead:
            raise Killed
        handle = super()._open(path, mode, *args, **kwargs)
        limit = type(self).fail_after
        if "r" not in mode and "/snapshots/" in str(path) and limit is not None:
            type(self).fail_after = None  # this upload only
            return _BrokenUpload(handle, limit, type(self).error)
        return handle

    def rm_file(self, path: Any) -> None:
        if type(self).dead:
            raise Killed
        super().rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        if type(self).dead:
            raise Killed
        super().rm(path, recursive=recursive, maxdepth=maxdepth)


class _MultipartFile(AbstractBufferedFile):
    """A write as S3's multipart upload makes it: parts sent as the buffer fills, the object created whole when the
    upload completes (on close), never before; the second part fails once ``fail_second_part`` is set."""

    def _initiate_upload(self) -> None:
        self.parts: list[bytes] = []

    def _upload_chunk(self, final: bool = False) -> bool:
        self.buffer.seek(0)
        while part := self.buffer.read(self.blocksize):  # the buffer in parts of the block size, as s3fs sends it
            if len(self.parts) == 1 and MultipartObjects.fail_second_part is not None:
                error, MultipartObjects.fail_second_part = MultipartObjects.fail_second_part, None
                raise error
            self.parts.append(part)
        if final:  # the upload completes: the object appears, whole
            MultipartObjects.store[self.path] = MemoryFile(self.fs, self.path, b"".join(self.parts))
        return True


class MultipartObjects(MemoryFileSystem):
    """An object store of its own in memory whose objects appear only when their upload completes, as on S3."""

    protocol = ("multipartobjects",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    fail_second_part: ClassVar[BaseException | None] = None

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(str(path).replace("multipartobjects://", "memory://", 1))

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            return super()._open(path, mode, *args, **kwargs)
        return _MultipartFile(self, self._strip_protocol(path), mode, block_size=2**18)


fsspec.register_implementation("diskobjects", DiskObjects, clobber=True)
fsspec.register_implementation("failingdiskobjects", FailingDiskObjects, clobber=True)
fsspec.register_implementation("multipartobjects", MultipartObjects, clobber=True)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The worker's temporary folder (where a streamed target is written before its upload), empty."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _incompressible(rows: int) -> pl.DataFrame:
    rng = np.random.default_rng(22)
    columns = {f"c{i}": rng.integers(-(2**62), 2**62, size=rows, dtype=np.int64) for i in range(8)}
    return pl.DataFrame({"id": np.arange(rows, dtype=np.int64), **columns})


def test_a_streamed_target_is_uploaded_a_piece_at_a_time_not_read_whole_into_memory(
    tmp_path: Path, scratch: Path
) -> None:
    """At 50M rows the target is about 2.4 GB compressed: read whole before its upload, it was held whole."""
    frame = _incompressible(450_000)  # about 32 MB of Parquet: random integers do not compress
    store = SnapshotStore(quiet_upath(f"diskobjects://{tmp_path}/objects"), BRAND, TABLE)

    def frames() -> Iterator[pl.DataFrame]:
        for offset in range(0, frame.height, 65_536):
            yield frame.slice(offset, 65_536)

    tracemalloc.start()
    try:
        version, rows = store.write_snapshot_frames(frames())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    uploaded = tmp_path / "objects" / str(BRAND) / TABLE / "snapshots" / f"{version}.parquet"
    size = uploaded.stat().st_size
    assert rows == frame.height
    assert size > 24 * 2**20, size
    assert peak < size / 4, (peak, size)  # a bounded piece at a time (the whole file before)
    assert_frame_equal(store.read_snapshot(version), frame)
    assert sorted(p.name for p in scratch.rglob("*") if p.is_file()) == []


class Stopped(BaseException):
    """What a signal handler raises in a task told to stop (Airflow's SIGTERM)."""


def _failed_write(store: SnapshotStore, frame: pl.DataFrame) -> type[BaseException] | None:
    """The type of the error a write raised; the error itself (and the frames it holds) is dropped here."""
    try:
        store.write_snapshot_frames(iter([frame]))
    except (SnapshotError, Stopped) as err:
        return type(err)
    return None


@pytest.mark.parametrize("how", ["connection reset", "sigterm"])
def test_a_multipart_upload_stopped_part_way_is_abandoned_not_completed(how: str, scratch: Path) -> None:
    """Closing the writer of a failed upload completes it: S3 would then show a snapshot of the parts sent so far (or
    all of them) under its name. The upload must be abandoned instead, even when the writer is collected later."""
    frame = _incompressible(30_000)  # about 2 MB: several parts of 256 KiB
    store = SnapshotStore(quiet_upath(f"multipartobjects://stopchurn/{uuid.uuid4().hex}"), BRAND, TABLE)
    # made here: an error kept by the test (a parameter) would keep the abandoned writer alive through its traceback
    MultipartObjects.fail_second_part = OSError("Connection reset by peer") if how == "connection reset" else Stopped()
    assert _failed_write(store, frame) is (SnapshotError if how == "connection reset" else Stopped)
    assert MultipartObjects.fail_second_part is None, "the upload reached its second part"
    gc.collect()  # a writer left open would complete the upload when collected (nothing refers to it any more)
    assert store.backend.list_names("snapshots") == []
    assert sorted(p.name for p in scratch.rglob("*") if p.is_file()) == []

    version, rows = store.write_snapshot_frames(iter([frame]))  # the next try is whole
    assert rows == frame.height
    assert store.backend.list_names("snapshots") == [f"{version}.parquet"]
    assert_frame_equal(store.read_snapshot(version), frame)


def _table(seed: int, rows: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"id": range(rows), "email": [f"c{k}-{seed if k % 3 == 0 else 0}@x.io" for k in range(rows)]})


@pytest.mark.parametrize("how", ["connection reset", "process killed"])
def test_an_upload_that_fails_part_way_leaves_nothing_named_and_the_next_run_converges(
    how: str, tmp_path: Path, scratch: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed churn's target fails after its first bytes reached the store. No pointer may name it, the run's
    local copy must go, a part uploaded by a run that lived to see the error is removed, and the next run (a new
    process after a kill) sends the changes and commits."""
    monkeypatch.setenv(STREAM_ENV, "always")
    FailingDiskObjects.fail_after, FailingDiskObjects.dead = None, False
    store = SnapshotStore(quiet_upath(f"failingdiskobjects://{tmp_path}/objects"), BRAND, TABLE)
    snapshots = tmp_path / "objects" / str(BRAND) / TABLE / "snapshots"
    run_sync(_table(0), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    first = store.read_committed()
    assert first is not None

    killed = how == "process killed"
    FailingDiskObjects.error = Killed() if killed else OSError("Connection reset by peer")
    FailingDiskObjects.fail_after = 100
    with pytest.raises(Killed if killed else SnapshotError) as raised:
        run_sync(_table(1), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + 1)
    assert FailingDiskObjects.fail_after is None, "the target's upload was reached"
    if not killed:
        assert str(raised.value).splitlines()[0].startswith("Cannot write ")
        assert sorted(p.name for p in snapshots.iterdir()) == [f"{first.version}.parquet"]
    assert sorted(p.name for p in scratch.rglob("*") if p.is_file()) == []
    FailingDiskObjects.dead = False  # a new process
    store.break_lock()  # the killed run's lock belongs to a process that is gone
    committed = store.read_committed()
    assert committed is not None and committed.version == first.version
    assert store.pending_plan() is None

    summary = run_sync(_table(1), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + 2)
    assert (summary.inserted, summary.updated, summary.deleted) == (0, 14, 0)
    assert_sandbox_matches(stopchurn_sandbox, _table(1))
    assert store.read_committed().version != first.version  # type: ignore[union-attr]


def test_a_local_streamed_run_that_finds_nothing_changed_publishes_no_snapshot(
    tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local twin of the object store's: the target is written aside, then dropped unpublished (no rename into
    ``snapshots/``, no file left)."""
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(tmp_path / "store", BRAND, TABLE)
    run_sync(_table(0), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    before = sorted(os.listdir(tmp_path / "store" / str(BRAND) / TABLE / "snapshots"))
    with mock.patch("os.replace", autospec=True, side_effect=os.replace) as replace:
        summary = run_sync(_table(0), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + 1)
    assert (summary.inserted, summary.updated, summary.deleted, summary.unchanged) == (0, 0, 0, 40)
    published = [str(call.args[1]) for call in replace.call_args_list if "snapshots" in str(call.args[1])]
    assert published == []
    assert sorted(os.listdir(tmp_path / "store" / str(BRAND) / TABLE / "snapshots")) == before


def test_an_unchanged_source_on_an_object_store_leaves_no_local_copy(
    tmp_path: Path, scratch: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target written aside and not needed is removed from the worker's disk, like one uploaded."""
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(quiet_upath(f"diskobjects://{tmp_path}/objects/{uuid.uuid4().hex}"), BRAND, TABLE)
    for run in range(2):
        run_sync(_table(0), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + run)
    assert sorted(p.name for p in scratch.rglob("*") if p.is_file()) == []
