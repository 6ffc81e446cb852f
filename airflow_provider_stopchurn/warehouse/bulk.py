"""A baseline's rows into the state table's scratch table (``..__next``) in a few large loads.

A baseline reads every source row (with its key texts and row hash, computed in the warehouse), encodes each row's
JSON in the worker (a delete carries the row exactly as delivered, so the JSON is the worker's encoding, not SQL's)
and writes the rows back. Written a batch at a time, that was one staging load and one ``INSERT`` per source batch
(152 on PostgreSQL at 10M rows, 1,002 on Spark, one Spark job each). Here the encoded rows are gathered into loads
of about :data:`LOAD_BYTES` each, and each load is written (staging load + ``INSERT INTO ..__next``) before the
next rows are read: the worker holds about one load, whatever the table's size (DuckDB, which runs in the worker,
gets smaller loads). The loads are written in the run's own thread, not beside the read: a write in a thread of
its own could not be broken off by the task's timeout or termination, and on Spark's local driver a read and a
write at once share one heap.

The scratch table is only swapped in once every load is written: a crash leaves the state table as it was.
"""

from __future__ import annotations

import pyarrow as pa

from airflow_provider_stopchurn.warehouse import sql as S
from airflow_provider_stopchurn.warehouse.databases import Warehouse

__all__ = ["IN_PROCESS_LOAD_BYTES", "LOAD_BYTES", "NextWriter", "load_bytes"]

#: The Arrow bytes of one load (the encoded rows: key texts, hash, createdAt, row JSON).
LOAD_BYTES = 64 * 1024 * 1024
#: Smaller loads where a load passes through memory the warehouse itself computes in: DuckDB runs in the worker and
#: holds about three times a load's bytes while it writes it (1M rows: +680 MB peak with 64 MB loads, +496 MB with
#: 16 MB ones; benchmarks/RESULTS-pushdown.md); Spark turns a load into a DataFrame on its driver, which in local
#: mode is also the executor streaming the result (a 512 MB driver stalled with 64 MB loads).
IN_PROCESS_LOAD_BYTES = 16 * 1024 * 1024
_IN_PROCESS = frozenset({"duckdb", "spark"})


def load_bytes(dialect: str) -> int:
    """The size of one load into a warehouse of ``dialect``."""
    return IN_PROCESS_LOAD_BYTES if dialect in _IN_PROCESS else LOAD_BYTES


class NextWriter:
    """Gathers staged rows (``warehouse/settle.py``'s ``_staged`` tables) and writes them into ``state.next`` in
    loads of about ``size`` bytes (by default :func:`load_bytes` of its dialect). Call :meth:`finish` once every
    row is added (it writes what is left)."""

    def __init__(
        self,
        warehouse: Warehouse,
        state: S.StateTable,
        staging: str,
        *,
        size: int | None = None,
    ) -> None:
        self._warehouse = warehouse
        self._state = state
        self._staging = staging
        self._load_bytes = size if size is not None else load_bytes(warehouse.dialect)
        self._parts: list[pa.Table] = []
        self._gathered = 0
        #: loads written so far, and their rows
        self.loads = 0
        self.rows = 0

    def __enter__(self) -> NextWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._parts, self._gathered = [], 0  # rows of a baseline that stopped are never written

    def add(self, staged: pa.Table) -> None:
        """Add encoded rows; a load is written once about the load size is gathered."""
        if not staged.num_rows:
            return
        self._parts.append(staged)
        self._gathered += staged.nbytes
        if self._gathered >= self._load_bytes:
            self._write()

    def finish(self) -> None:
        """Write what is gathered."""
        self._write()

    def _write(self) -> None:
        if not self._parts:
            return
        data = pa.concat_tables(self._parts)
        self._parts, self._gathered = [], 0
        self._warehouse.load(self._staging, data)
        self._warehouse.execute([self._state.insert_next(self._staging)])
        self.loads += 1
        self.rows += data.num_rows
