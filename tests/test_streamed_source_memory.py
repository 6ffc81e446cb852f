"""A streamed Arrow source (a SQL cursor's batches) is not kept alive by the canonical frame built from it.

A batch that comes through the Arrow C stream interface (as ADBC drivers hand them out) is released as one block:
while any one of its buffers is referenced, every column of the batch stays in memory. A canonical column taken
zero-copy from such a batch (an integer key, a boolean) kept every batch of the source alive beside the canonical
frame: for 1M rows from PostgreSQL, about 200 MB held for the whole run. The batches are counted here in a memory
pool of their own, so what the canonical frame still holds of them is measured exactly.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from airflow_provider_stopchurn.source.canonical import canonicalize_arrow, canonicalize_source

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
    """A whole table (as a polars or pandas frame gives it) stays the caller's: its key column is not copied."""
    table = pa.Table.from_batches(list(_batches(pa.default_memory_pool())))
    canon = canonicalize_arrow(table, key_columns=["id"])
    ids = canon.frame.get_column("id")
    assert ids.to_list()[:3] == [0, 1, 2]
    first = table.column("id").chunk(0).buffers()[1].address
    assert ids.n_chunks() == BATCHES
    # the table's own memory, read zero-copy
    assert ids.slice(0, ROWS_PER_BATCH).to_arrow().buffers()[1].address == first
