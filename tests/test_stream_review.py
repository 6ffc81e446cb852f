"""The streamed worker path under faults its own parts bring: a spool of customer rows in a temporary folder, and a
target snapshot read back a window at a time.

A SQL source is spooled, canonicalized, to temporary Arrow files before it is diffed. A run killed outright (the
OOM killer, SIGKILL) runs no cleanup, so those rows stay on the worker's disk; the next streamed run on that
host must remove them. A first load's inserts are encoded from the written target snapshot a window at a time; on an
object store each window must not download the whole snapshot again.
"""

from __future__ import annotations

import itertools
import json
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from killswitch_fs import quiet_upath
from polars.testing import assert_frame_equal
from test_streamed_worker_path import Side, Source, _row

from airflow_provider_stopchurn.exceptions import StopChurnError
from airflow_provider_stopchurn.sandbox import FaultConfig, SandboxServer
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), STREAM_ENV: "always"}
    args = [str(temporary), str(store_root), str(BRAND), TABLE]
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, *args], env=env, capture_output=True, timeout=300, check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    left = [p for p in temporary.rglob("*.arrow") if p.stat().st_size]
    assert left, "the killed run spooled customer rows before it died"

    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(store_root, BRAND, TABLE)
    summary = run_sync(_batches(range(5)), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    assert summary.inserted == 5
    assert sorted(p.name for p in temporary.rglob("*") if p.is_file()) == []


class ReadCountingMemoryFileSystem(MemoryFileSystem):
    """An object store of its own in memory that counts the opens of each snapshot file, for reading and writing."""

    protocol = ("readcountmem",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    snapshot_reads: ClassVar[Counter[str]] = Counter()
    snapshot_writes: ClassVar[Counter[str]] = Counter()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "/snapshots/" in str(path):
            (self.snapshot_reads if "r" in mode else self.snapshot_writes)[str(path)] += 1
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("readcountmem", ReadCountingMemoryFileSystem, clobber=True)


def test_a_streamed_first_load_on_an_object_store_downloads_its_target_once_not_per_window(
    stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its inserts are encoded a window at a time from the written target: one download of it, not one per window
    (a 10M-row first load has 40 windows of the default 250,000 rows)."""
    monkeypatch.setenv(STREAM_ENV, "always")
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


def _faulted_runs(
    factory: Callable[..., SandboxServer],
    monkeypatch: pytest.MonkeyPatch,
    runs: list[Any],
    faults: dict[str, Any],
    **kw: Any,
) -> None:
    """``runs`` (Sources) on both paths, run 2 against a faulty StopChurn (rejected ids, failing ids, a body
    limit, lost acknowledgements), the others clean; after each run both paths agree on everything observable."""
    with tempfile.TemporaryDirectory() as folder:
        sides = [Side(m, SnapshotStore(Path(folder) / m, BRAND, TABLE), factory()) for m in ("never", "always")]
        for number, source in enumerate(runs):
            seen = []
            for side in sides:
                monkeypatch.setenv(STREAM_ENV, side.mode)
                faulty = number == 1
                side.sandbox.set_faults(FaultConfig(**faults["config"]) if faulty else FaultConfig())
                side.sandbox.reject_ids(faults["rejected"] if faulty else ())
                side.sandbox.fail_ids(faults["failing"] if faulty else ())
                opts = options(chunk_size=4, max_concurrent_requests=1, max_delete_fraction=1.0, **kw)
                try:
                    summary = run_sync(source.stream(), side.store, make_client(side.sandbox), opts, run_ms=T0 + number)
                    outcome: Any = {
                        k: v for k, v in summary.as_dict().items() if k not in ("duration_s", "snapshot_uri")
                    }
                except StopChurnError as err:
                    outcome = (type(err).__name__, str(err).splitlines()[0])
                committed = side.store.read_committed()
                seen.append(
                    (
                        outcome,
                        sorted(side.sandbox.rows(BRAND, TABLE), key=repr),
                        side.store.pending_plan(cleanup=False) is not None,
                        sorted(map(repr, side.store.read_quarantine())),
                        None if committed is None else committed.frame,
                    )
                )
            (*whole, whole_frame), (*streamed, streamed_frame) = seen
            assert streamed == whole, f"run {number}"
            assert (whole_frame is None) == (streamed_frame is None)
            if whole_frame is not None:
                assert_frame_equal(streamed_frame, whole_frame)
        for side in sides:
            side.sandbox.stop()


FAULTS = {
    "rejected": {"rejected": {3, 17, 41}, "failing": set(), "config": {}},
    "failing": {"rejected": set(), "failing": {5}, "config": {}},
    "lost acks": {"rejected": {17}, "failing": set(), "config": {"seed": 3, "drop_after_apply_rate": 0.4}},
    "413": {"rejected": {3}, "failing": set(), "config": {"max_body_bytes": 700}},
    "html 200": {"rejected": set(), "failing": set(), "config": {"seed": 1, "html_ok_rate": 0.5}},
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_streamed_and_whole_paths_settle_a_faulty_delivery_the_same(
    fault: str, stopchurn_sandbox_factory: Callable[..., SandboxServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Source([_row(k, 0) for k in range(45)], [10, 30])
    churn = Source([_row(k, 1 if k % 2 else 0) for k in range(3, 50)][::-1], [7, 7, 20])
    again = Source([_row(k, 2 if k % 3 else 0) for k in range(2, 52)], [25])
    _faulted_runs(stopchurn_sandbox_factory, monkeypatch, [first, churn, churn, again], FAULTS[fault])


#: a child whose streamed first load dies (``os._exit``, as SIGKILL) just before its target snapshot is published:
#: the kill switch of ``crash_at_write_worker.py``, on the ``os.replace`` of a snapshot file
_DIES_BEFORE_PUBLISHING = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import pyarrow as pa
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.store import SnapshotStore
    from airflow_provider_stopchurn.update.stream import plan_streamed

    real_replace = os.replace

    def replace(src, dst):
        if "snapshots" in str(dst) and str(dst).endswith(".parquet"):
            os._exit(9)
        real_replace(src, dst)

    os.replace = replace
    rows = 50_000
    batch = pa.RecordBatch.from_pydict({"id": list(range(rows)), "email": [f"c{i}@example.com" for i in range(rows)]})
    store = SnapshotStore(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    plan_streamed(iter([batch]), store, SyncOptions(brand_id=int(sys.argv[2]), table_name=sys.argv[3]), 0)
    """
)


def test_a_target_left_half_published_by_a_killed_run_is_removed_by_the_next_run(
    tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed target is written aside for the whole second pass (minutes for a large table), so a run killed
    then (OOM, SIGKILL past the grace period) leaves a hidden temporary file of up to the whole table in the
    store; retries killed the same way would pile them up. The next run that writes a snapshot removes them."""
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), STREAM_ENV: "always"}
    child = subprocess.run(
        [sys.executable, "-c", _DIES_BEFORE_PUBLISHING, str(root), str(BRAND), TABLE],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 9, child.stderr.decode()[-2000:]
    assert [p.name for p in root.rglob("*.tmp")], "the killed run left its target aside"

    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(root, BRAND, TABLE)
    summary = run_sync(_batches(range(5)), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    assert summary.inserted == 5
    assert [p.name for p in root.rglob("*.tmp")] == []


_KINDS = {
    "int": (pa.int64(), lambda k, s: k * 3 + s),
    "float": (pa.float64(), lambda k, s: (k + s) / 2),
    "text": (pa.string(), lambda k, s: f"t{k}-{s}"),
    "bool": (pa.bool_(), lambda k, s: (k + s) % 2 == 0),
    "null": (pa.null(), lambda k, s: None),
    "nulls": (pa.int32(), lambda k, s: None),
}


@st.composite
def _kind_runs(draw: st.DrawFn) -> tuple[list[Any], dict[str, Any]]:
    """Three runs of a source whose columns ``x`` and ``y`` change kind from batch to batch (all-NULL batches,
    integers then floats or text or booleans), keys integers or text (retyped between runs), batches uneven."""
    runs = []
    keys = draw(st.sets(st.integers(0, 40), max_size=20))
    for run in range(3):
        if run:
            keys = (keys - draw(st.sets(st.sampled_from(sorted(keys)), max_size=5) if keys else st.just(set()))) | draw(
                st.sets(st.integers(0, 40), max_size=5)
            )
        text_keys = draw(st.booleans()) if run else False
        order = draw(st.permutations(sorted(keys)))
        cuts = sorted(draw(st.lists(st.integers(0, len(order)), max_size=4)))
        kinds = [
            (draw(st.sampled_from(sorted(_KINDS))), draw(st.sampled_from(sorted(_KINDS)))) for _ in range(len(cuts) + 1)
        ]
        seed = draw(st.integers(0, 2))
        runs.append((order, cuts, kinds, text_keys, seed))
    policy = {
        "on_schema_change": draw(st.sampled_from(["fail", "update_all", "rebaseline"])),
        "initial_load": draw(st.sampled_from(["send", "baseline"])),
    }
    return runs, policy


class _KindSource:
    def __init__(self, order: list[int], cuts: list[int], kinds: list[tuple[str, str]], text_keys: bool, seed: int):
        self.order, self.cuts, self.kinds, self.text_keys, self.seed = order, cuts, kinds, text_keys, seed

    def stream(self) -> Callable[[], Iterator[pa.RecordBatch]]:
        bounds = [0, *self.cuts, len(self.order)]
        batches = []
        for (start, end), (xk, yk) in zip(itertools.pairwise(bounds), self.kinds, strict=True):
            part = self.order[start:end]
            key_type = pa.string() if self.text_keys else pa.int64()
            ids = [str(k) if self.text_keys else k for k in part]
            (xt, xf), (yt, yf) = _KINDS[xk], _KINDS[yk]
            batches.append(
                pa.RecordBatch.from_arrays(
                    [
                        pa.array(ids, key_type),
                        pa.array([xf(k, self.seed) for k in part], xt),
                        pa.array([yf(k, 0) for k in part], yt),
                    ],
                    names=["id", "x", "y"],
                )
            )

        def read() -> Iterator[pa.RecordBatch]:
            yield from batches

        return read


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=_kind_runs())
def test_streamed_and_whole_paths_agree_when_kinds_change_between_batches_and_runs(
    drawn: tuple[list[Any], dict[str, Any]],
    stopchurn_sandbox_factory: Callable[..., SandboxServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs, policy = drawn
    sources = [_KindSource(*run) for run in runs]
    _faulted_runs(
        stopchurn_sandbox_factory,
        monkeypatch,
        sources,
        {"rejected": set(), "failing": set(), "config": {}},
        **policy,
    )


#: a child whose streamed first load into an object store dies (``os._exit``, as SIGKILL) as it uploads its target
#: snapshot: the file it wrote locally before the upload holds the table
_DIES_UPLOADING = textwrap.dedent(
    """
    import os, sys, tempfile
    import fsspec
    import pyarrow as pa
    from fsspec.implementations.memory import MemoryFileSystem
    from upath import UPath
    tempfile.tempdir = sys.argv[1]
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.store import SnapshotStore
    from airflow_provider_stopchurn.update.stream import plan_streamed

    class DiesUploading(MemoryFileSystem):
        protocol = ("diesuploading",)
        store = {}
        pseudo_dirs = [""]

        def _open(self, path, mode="rb", **kwargs):
            if "r" not in mode and "/snapshots/" in str(path):
                os._exit(9)
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("diesuploading", DiesUploading, clobber=True)
    rows = 50_000
    batch = pa.RecordBatch.from_pydict({"id": list(range(rows)), "email": [f"c{i}@example.com" for i in range(rows)]})
    store = SnapshotStore(UPath("diesuploading://stopchurn/t"), int(sys.argv[2]), sys.argv[3])
    plan_streamed(iter([batch]), store, SyncOptions(brand_id=int(sys.argv[2]), table_name=sys.argv[3]), 0)
    """
)


def test_a_local_copy_left_by_a_run_killed_uploading_its_target_is_removed_by_the_next_run(
    tmp_path: Path, stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an object store the streamed target is written to a local temporary file, then uploaded: a run killed
    before the upload ends (OOM, SIGKILL) leaves the table on the worker's disk; the next streamed run removes it."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), STREAM_ENV: "always"}
    child = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _DIES_UPLOADING, str(temporary), str(BRAND), TABLE],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 9, child.stderr.decode()[-2000:]
    assert [p for p in temporary.rglob("*.parquet") if p.stat().st_size], "the killed run left its target locally"

    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(tmp_path / "store", BRAND, TABLE)
    summary = run_sync(_batches(range(5)), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    assert summary.inserted == 5
    assert sorted(p.name for p in temporary.rglob("*") if p.is_file()) == []


#: a child whose temporary disk is too small for the spool (a file size limit, as a full disk): the run's error
_SPOOL_DISK_FULL = textwrap.dedent(
    """
    import json, resource, signal, sys, tempfile
    from pathlib import Path
    import pyarrow as pa
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
    tempfile.tempdir = sys.argv[1]
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.store import SnapshotStore
    from airflow_provider_stopchurn.update.stream import plan_streamed

    rows = 200_000
    emails = [f"customer{i}@example.com" for i in range(rows)]
    batch = pa.RecordBatch.from_pydict({"id": list(range(rows)), "email": emails})
    store = SnapshotStore(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    try:
        plan_streamed(iter([batch]), store, SyncOptions(brand_id=int(sys.argv[3]), table_name=sys.argv[4]), 0)
    except BaseException as err:
        print(json.dumps({"type": [c.__name__ for c in type(err).__mro__], "message": str(err)}))
    """
)


def test_a_full_temporary_disk_is_reported_as_the_spool_that_did_not_fit(tmp_path: Path) -> None:
    """The whole path writes nothing to the worker's temporary disk; the streamed path spools the whole source there
    uncompressed. When it does not fit, the run must fail with an error of the provider that says where and what to
    do, not a bare ``OSError: File too large (os error 27)`` naming no file."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), STREAM_ENV: "always"}
    child = subprocess.run(
        [sys.executable, "-c", _SPOOL_DISK_FULL, str(temporary), str(tmp_path / "store"), str(BRAND), TABLE],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    raised = json.loads(child.stdout.decode().strip().splitlines()[-1])
    assert "StopChurnError" in raised["type"], raised
    assert str(temporary) in raised["message"].splitlines()[0]
    assert "TMPDIR" in raised["message"]
    assert sorted(p.name for p in temporary.rglob("*") if p.is_file()) == []


def test_a_streamed_run_that_finds_nothing_changed_uploads_no_snapshot(
    stopchurn_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path writes no snapshot when the source equals the committed one; the streamed path writes the
    whole target to the object store, then deletes it: an unchanged large table is uploaded on every run."""
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(quiet_upath(f"readcountmem://stopchurn/{uuid.uuid4().hex}"), BRAND, TABLE)
    run_sync(_batches(range(60)), store, make_client(stopchurn_sandbox), options(), run_ms=T0)
    ReadCountingMemoryFileSystem.snapshot_writes.clear()
    summary = run_sync(_batches(range(60)), store, make_client(stopchurn_sandbox), options(), run_ms=T0 + 1)
    assert (summary.inserted, summary.updated, summary.deleted, summary.unchanged) == (0, 0, 0, 60)
    assert dict(ReadCountingMemoryFileSystem.snapshot_writes) == {}


#: a child whose temporary disk fills while it spools (a file size limit, as a full disk): a whole run, its error
_RUN_ON_A_FULL_DISK = textwrap.dedent(
    """
    import json, os, resource, signal, sys, tempfile
    from pathlib import Path
    import pyarrow as pa
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
    tempfile.tempdir = sys.argv[1]
    from airflow_provider_stopchurn.api.client import StopChurnClient
    from airflow_provider_stopchurn.options import SyncOptions
    from airflow_provider_stopchurn.store import SnapshotStore
    from airflow_provider_stopchurn.update.sync import run_sync

    keys = range(int(sys.argv[5]), int(sys.argv[6]))
    batch = pa.RecordBatch.from_pydict({"id": list(keys), "email": [f"c{k}@example.com" for k in keys]})
    store = SnapshotStore(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    client = StopChurnClient(os.environ["SANDBOX_URL"], os.environ["SANDBOX_TOKEN"], max_retries=0)
    try:
        run_sync(iter([batch]), store, client, SyncOptions(brand_id=int(sys.argv[3]), table_name=sys.argv[4]))
    except BaseException as err:
        print(json.dumps({"type": [c.__name__ for c in type(err).__mro__], "message": str(err)}))
    """
)


@pytest.mark.parametrize("remedy", ["space freed", "STOPCHURN_WORKER_STREAM=never"])
@pytest.mark.parametrize("committed", [False, True], ids=["first load", "churn"])
def test_the_run_after_a_full_temporary_disk_syncs_the_source_and_leaves_no_spool(
    tmp_path: Path,
    stopchurn_sandbox: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    committed: bool,
    remedy: str,
) -> None:
    """A streamed run whose spool does not fit fails before anything is sent. Once the user does what its error
    says (frees the temporary disk, or reads the source into memory), the next run must send exactly the change
    from what StopChurn holds to the source, leave no spool behind, and need no edit of the store."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv(STREAM_ENV, "always")
    store = SnapshotStore(tmp_path / "store", BRAND, TABLE)
    client = make_client(stopchurn_sandbox)
    if committed:  # keys 0..149_999 delivered; the source then drops the first 1,000 and adds 60,000
        run_sync(_batches(range(150_000)), store, client, options(), run_ms=T0)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        STREAM_ENV: "always",
        "SANDBOX_URL": stopchurn_sandbox.url,
        "SANDBOX_TOKEN": stopchurn_sandbox.token,
    }
    args = [str(temporary), str(tmp_path / "store"), str(BRAND), TABLE, "1000", "210000"]
    child = subprocess.run(
        [sys.executable, "-c", _RUN_ON_A_FULL_DISK, *args], env=env, capture_output=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    raised = json.loads(child.stdout.decode().strip().splitlines()[-1])
    assert "SnapshotError" in raised["type"] and "TMPDIR" in raised["message"], raised
    assert "delete" not in raised["message"].lower()  # no error advises deleting the store
    assert sorted(p.name for p in temporary.rglob("*") if p.is_file()) == []  # the failed run removed its spool
    held = stopchurn_sandbox.table(BRAND, TABLE)
    assert set(held) == (set(range(150_000)) if committed else set())  # nothing was sent

    if remedy != "space freed":
        monkeypatch.setenv(STREAM_ENV, "never")
    summary = run_sync(_batches(range(1_000, 210_000)), store, client, options(), run_ms=T0 + 1)
    assert (summary.inserted, summary.updated, summary.deleted) == (
        (60_000, 0, 1_000) if committed else (209_000, 0, 0)
    )
    held = stopchurn_sandbox.table(BRAND, TABLE)
    assert set(held) == set(range(1_000, 210_000))
    assert all(row["email"] == f"c{key}@example.com" for key, row in held.items())
    assert sorted(p.name for p in temporary.rglob("*") if p.is_file()) == []  # no spool, no local copy
    assert store.pending_plan() is None
    assert len(list((tmp_path / "store").rglob("*.parquet"))) == 1  # the committed snapshot alone
    assert [p.name for p in (tmp_path / "store").rglob("*.tmp")] == []
    again = run_sync(_batches(range(1_000, 210_000)), store, client, options(), run_ms=T0 + 2)
    assert (again.inserted, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 209_000)
    assert sorted(p.name for p in temporary.rglob("*")) == []
