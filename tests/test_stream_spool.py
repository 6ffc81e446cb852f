"""The streamed path's spool: what it holds and when it hashes.

- A source that hands over its whole table as one record batch (a one-chunk ``pa.Table``, a driver that fetched
  everything at once) is cut before it is spooled: the streamed path then holds one spool file's rows at a time, not
  the whole table beside the caller's copy. The peak is measured in a fresh child process (its VmHWM, reset once the
  table is built), with a wide bound: the whole table read back at once costs more than the bound; a batch at a time
  costs a fraction of it.
- Each batch is hashed as it is spooled (while a SQL source's next batch is read), and only once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import polars as pl
import pyarrow as pa
import pyarrow.compute
import pytest
from helpers_sync import BRAND, T0, TABLE, options
from polars.testing import assert_frame_equal

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.store import HASH_1, HASH_2, SnapshotStore
from airflow_provider_stopchurn.update.diff import with_hashes
from airflow_provider_stopchurn.update.stream import SPOOL_ROWS, STREAM_ENV, StreamedPlan, plan_streamed

ROWS = 1_000_000

_CHILD = r"""
import gc, json, sys
from pathlib import Path
import pyarrow as pa
import pyarrow.compute as pc
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.update.stream import plan_streamed

root, rows = sys.argv[1], int(sys.argv[2])
ids = pa.array(range(rows), pa.int64())
pad = pa.scalar("x" * 200)
names = pc.binary_join_element_wise(pc.cast(ids, pa.string()), pad, "")
table = pa.table({"id": ids, "name": names, "score": pc.multiply(pc.cast(ids, pa.float64()), 0.5)})
assert table.column("name").num_chunks == 1
table_bytes = table.nbytes


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


store = SnapshotStore(Path(root), 7, "huge")
opts = SyncOptions(brand_id=7, table_name="huge", initial_load="baseline")
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM: the peak from here on is the plan's
plan, _ = plan_streamed(table, store, opts, 1_700_000_000_000)
print(json.dumps({"table_bytes": table_bytes, "peak_above": status("VmHWM") - before, "rows": plan.target_rows}))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists(),
    reason="needs Linux's VmHWM reset",
)
def test_a_one_batch_table_is_spooled_a_piece_at_a_time(tmp_path: Path) -> None:
    """A first load of a 1M-row table of one chunk (about 230 MB of Arrow) peaks below 1.5 times its size above
    what the process held before (about 0.9x); read, canonicalized and written whole, it peaked at 2.25x."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "snapshots"), str(ROWS)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**_env(), STREAM_ENV: "always"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["rows"] == ROWS
    ratio = got["peak_above"] / got["table_bytes"]
    assert ratio < 1.5, f"peak {got['peak_above'] / 2**20:.0f} MB above start, {ratio:.2f}x the table"


def _env() -> dict[str, str]:
    return dict(os.environ)


def test_a_one_batch_table_is_planned_the_same_as_its_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut or not, the same rows reach the snapshot, in order, with their row numbers in errors unchanged."""
    monkeypatch.setenv(STREAM_ENV, "always")
    rows = SPOOL_ROWS * 2 + 5
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "v": pa.array([i % 7 for i in range(rows)])})
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    plan, _ = plan_streamed(table, store, options(initial_load="baseline"), T0)
    assert isinstance(plan, StreamedPlan)
    written = store.read_snapshot(plan.target_version)
    assert written.get_column("id").to_list() == list(range(rows))
    assert written.get_column("v").to_list() == [i % 7 for i in range(rows)]


def test_a_missing_key_in_a_cut_batch_is_named_by_its_row_in_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STREAM_ENV, "always")
    rows = SPOOL_ROWS + 10
    keys = [None if i == SPOOL_ROWS + 3 else i for i in range(rows)]
    batch = pa.RecordBatch.from_pydict({"id": pa.array(keys, pa.int64()), "v": pa.array(range(rows))})
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    for source in (batch, iter([batch]), pa.RecordBatchReader.from_batches(batch.schema, [batch])):
        with pytest.raises(SourceDataError, match=f"at row\\(s\\) {SPOOL_ROWS + 3};"):
            plan_streamed(source, store, options(initial_load="baseline"), T0)


def test_rows_are_hashed_while_the_source_is_read_and_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each spooled batch is hashed as it is spooled, while a SQL source's next batch is read, not after the last
    batch; the pass that writes the target uses those hashes and hashes no row again."""
    monkeypatch.setenv(STREAM_ENV, "always")
    batches = 3
    hashed_at_the_end: list[int] = []
    original = pl.DataFrame.hash_rows

    def rows_hashed(spy: mock.MagicMock) -> int:
        return sum(call.args[0].height for call in spy.call_args_list)

    with mock.patch.object(pl.DataFrame, "hash_rows", autospec=True, side_effect=original) as spy:

        def source() -> Iterator[pa.RecordBatch]:
            for b in range(batches):
                ids = pa.array(range(b * SPOOL_ROWS, (b + 1) * SPOOL_ROWS), pa.int64())
                yield pa.RecordBatch.from_arrays([ids, pa.compute.cast(ids, pa.string())], names=["id", "name"])
            hashed_at_the_end.append(rows_hashed(spy))

        store = SnapshotStore(tmp_path, BRAND, TABLE)
        plan, _ = plan_streamed(source(), store, options(initial_load="baseline"), T0)
        hashed_in_all = rows_hashed(spy)
    assert isinstance(plan, StreamedPlan)
    assert plan.target_rows == batches * SPOOL_ROWS
    # two seeds: every row twice, all but the last batch before the source ended
    assert hashed_at_the_end[0] >= 2 * (batches - 1) * SPOOL_ROWS
    assert hashed_in_all == 2 * batches * SPOOL_ROWS
    written = store.read_snapshot(plan.target_version)
    assert_frame_equal(written.select(HASH_1, HASH_2), with_hashes(written.drop(HASH_1, HASH_2)).select(HASH_1, HASH_2))


def test_a_spool_on_a_file_system_that_cannot_map_files_is_read_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems (FUSE mounts) refuse ``mmap``: the spool is then read into memory, and the run plans the
    same snapshot, instead of failing on a bare ``OSError``."""
    monkeypatch.setenv(STREAM_ENV, "always")
    rows = SPOOL_ROWS + 5
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "v": pa.array([i % 5 for i in range(rows)])})
    store = SnapshotStore(tmp_path, BRAND, TABLE)
    refused = OSError(19, "No such device")
    with mock.patch("pyarrow.memory_map", autospec=True, side_effect=refused) as mapped:
        plan, _ = plan_streamed(table, store, options(initial_load="baseline"), T0)
    assert mapped.called
    assert isinstance(plan, StreamedPlan)
    written = store.read_snapshot(plan.target_version)
    assert written.get_column("id").to_list() == list(range(rows))
