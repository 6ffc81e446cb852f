"""What the worker path holds in memory, checked without measuring RSS (each fails on the code before it).

- A streamed Arrow source (a SQL cursor's batches) is not kept alive by the canonical frame built from it. A batch
  that comes through the Arrow C stream interface (as ADBC drivers hand them out) is released as one block: while
  any one of its buffers is referenced, every column of the batch stays. A canonical column taken zero-copy from such
  a batch (an integer key, a boolean) kept every batch alive beside the canonical frame: about 200 MB for 1M rows
  from PostgreSQL. The batches are counted here in a memory pool of their own, so what is left of them is exact.
- The columns a plan adds to a source of many batches are chunked like the source's (polars copies a frame whole at
  every lazy step while its columns are chunked differently).
- A delivery lets go of a window it sent before the next is encoded.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from airflow_provider_stopchurn.api.client import StopChurnClient
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.source.canonical import canonicalize_arrow, canonicalize_source
from airflow_provider_stopchurn.source.frame import Canonical
from airflow_provider_stopchurn.store import SnapshotStore
from airflow_provider_stopchurn.store.committed import Committed
from airflow_provider_stopchurn.update.deliver import deliver
from airflow_provider_stopchurn.update.diff import ROW_HASH
from airflow_provider_stopchurn.update.plan import make_plan
from airflow_provider_stopchurn.update.sync import canonical_source
from airflow_provider_stopchurn.update.window import Window

ROWS_PER_BATCH = 20_000
BATCHES = 4


def _batches(pool: pa.MemoryPool) -> Iterator[pa.RecordBatch]:
    for b in range(BATCHES):
        ids = np.arange(b * ROWS_PER_BATCH, (b + 1) * ROWS_PER_BATCH, dtype=np.int64)
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(ids, memory_pool=pool),
                pa.array(ids % 3 == 0, memory_pool=pool),
                pa.array((ids * 0.5).astype(np.float64), memory_pool=pool),
                pa.array([f"name-{i}" for i in ids], type=pa.string(), memory_pool=pool),
            ],
            names=["id", "flag", "score", "name"],
        )


def _through_c_stream(pool: pa.MemoryPool) -> pa.RecordBatchReader:
    """The batches as a driver hands them out: exported and imported through the Arrow C stream interface."""
    schema = pa.schema([("id", pa.int64()), ("flag", pa.bool_()), ("score", pa.float64()), ("name", pa.string())])
    return pa.RecordBatchReader.from_stream(pa.RecordBatchReader.from_batches(schema, _batches(pool)))


def test_the_canonical_frame_of_a_streamed_source_holds_none_of_its_batches() -> None:
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    canon = canonicalize_source(lambda: _through_c_stream(pool), key_columns=["id"])
    gc.collect()
    assert canon.frame.height == ROWS_PER_BATCH * BATCHES
    assert canon.frame.get_column("id").to_list()[-1] == ROWS_PER_BATCH * BATCHES - 1
    assert canon.frame.get_column("flag").sum() == len(range(0, ROWS_PER_BATCH * BATCHES, 3))
    # nothing of the source's batches is left once they were read: the frame holds copies of its own
    assert pool.bytes_allocated() == 0


def test_a_plain_iterator_of_batches_is_not_held_either() -> None:
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    canon = canonicalize_source(lambda: _batches(pool), key_columns=["id"])
    gc.collect()
    assert canon.frame.height == ROWS_PER_BATCH * BATCHES
    assert pool.bytes_allocated() == 0


def test_a_table_the_caller_holds_is_read_without_a_copy() -> None:
    """A table of one batch (as a polars or pandas frame gives it) stays the caller's: its key is not copied."""
    table = pa.Table.from_batches(list(_batches(pa.default_memory_pool()))[:1])
    canon = canonicalize_arrow(table, key_columns=["id"])
    ids = canon.frame.get_column("id")
    assert ids.to_list()[:3] == [0, 1, 2]
    assert ids.to_arrow().buffers()[1].address == table.column("id").chunk(0).buffers()[1].address


def _chunking(frame: pl.DataFrame) -> set[tuple[int, ...]]:
    return {tuple(frame.get_column(name).chunk_lengths()) for name in frame.columns}


def test_the_planned_snapshot_of_many_batches_is_chunked_like_the_source(tmp_path: Path) -> None:
    """polars copies a frame whole at every lazy step (select, filter, with_columns) while its columns are chunked
    differently; the columns the plan adds to a source of many batches (row hashes, createdAt, positions) are cut
    like the source's, so no step copies the table."""
    options = SyncOptions(brand_id=7, table_name="chunks", max_delete_fraction=1.0)
    canon = canonical_source(lambda: _through_c_stream(pa.default_memory_pool()), options)
    assert _chunking(canon.frame) == {(ROWS_PER_BATCH,) * BATCHES}
    first = make_plan(canon, None, options, 1_700_000_000_000)
    assert _chunking(first.target) == {(ROWS_PER_BATCH,) * BATCHES}
    store = SnapshotStore(tmp_path, 7, "chunks")
    committed = Committed(store, kinds=first.kinds, key_columns=["id"], version="v", frame=first.target)
    committed.row_hash = ROW_HASH
    again = canonical_source(lambda: _through_c_stream(pa.default_memory_pool()), options)
    changed = again.frame.with_columns(
        pl.when(pl.col("id") % 1000 == 0).then(pl.lit("x")).otherwise(pl.col("name")).alias("name")
    )
    plan = make_plan(Canonical(changed, again.kinds, again.key_columns), committed, options, 1_700_000_000_001)
    assert plan.updated == ROWS_PER_BATCH * BATCHES // 1000
    assert _chunking(plan.target) == {(ROWS_PER_BATCH,) * BATCHES}


def test_a_sent_window_is_let_go_before_the_next_is_encoded(stopchurn_sandbox: Any) -> None:
    """A delivery holds one window of update JSON (250,000 updates, about 100 MB, by default): the window it sent
    is released before the next is encoded, not kept until the next one is ready."""
    options = SyncOptions(brand_id=7, table_name="windows", chunk_size=2, window_rows=4, max_concurrent_requests=2)
    frame = pl.DataFrame({"id": list(range(10)), "name": [f"n{i}" for i in range(10)]})
    plan = make_plan(canonical_source(frame, options), None, options, 1_700_000_000_000)
    sent: list[weakref.ref[pl.Series]] = []
    held_while_encoding: list[bool] = []

    def windows() -> Iterator[Window]:
        source = plan.windows(options, 1_700_000_000_000)
        while True:
            gc.collect()
            held_while_encoding.append(any(ref() is not None for ref in sent))
            planned = next(source, None)
            if planned is None:
                return
            # a copy only this generator and the delivery hold (the planner keeps its own until it resumes)
            window = Window(planned.offset, pl.Series(planned.updates.to_list()), planned.chunks, planned.bytes)
            del planned
            sent.append(weakref.ref(window.updates))
            yield window
            del window  # this generator lets go of it too

    client = StopChurnClient(stopchurn_sandbox.url, stopchurn_sandbox.token)
    acked: list[int] = []
    try:
        report = deliver(windows(), client, options, lambda chunk, _rejections: acked.append(chunk))
    finally:
        client.close()
    assert report.complete and report.failure is None
    assert sorted(acked) == list(range(5))  # 10 inserts, 2 a chunk
    assert len(held_while_encoding) == 4  # 3 windows of 4, 4 and 2 updates, then the end
    assert held_while_encoding == [False, False, False, False]
