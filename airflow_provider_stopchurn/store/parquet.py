"""Parquet files of the store: written whole or frame by frame, and read by row group.

No I/O of its own beyond the file or bytes it is given; :mod:`.backend` decides where the files live.
"""

from __future__ import annotations

import io
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from polars.io.plugins import register_io_source

__all__ = ["compacted", "rows_at", "rows_by_row_group", "write_parquet", "write_parquet_frames"]


def rows_by_row_group(source: Path | bytes, keys: pl.DataFrame) -> pl.DataFrame:
    """Rows of a Parquet file whose key (the columns of ``keys``) is in ``keys``, in file order.

    The wanted keys go through one join against the file's key columns, which yields the rows' positions; then only
    the row groups holding such a row are decoded, one at a time (a slice of the scan reads only the row groups it
    overlaps). Joining the keys against each row group apart would hash them once per row group: a delete of most
    of a large table (as many keys as rows) would cost the row groups' count times the table.
    """
    counts = _row_group_rows(source)
    if not counts:
        return pl.scan_parquet(source).head(0).collect()
    names = keys.columns
    found = (
        pl.scan_parquet(source)
        .select(names)
        .with_row_index(_ROW)
        .join(keys.lazy(), on=names, how="semi")
        .select(_ROW)
        .collect(engine="streaming")
        .get_column(_ROW)
        .to_numpy()
    )
    return _rows_at(source, np.sort(found), counts)  # file order, whatever order the join gave


def rows_at(source: Path | bytes, positions: np.ndarray) -> pl.DataFrame:
    """The rows of a Parquet file at ``positions`` (row numbers, ascending, each once), in file order.

    Only the row groups holding such a row are decoded, one at a time; no column is read to find them.

    :param source: the file, or its bytes.
    :param positions: the rows' numbers in the file, ascending.
    """
    return _rows_at(source, positions, _row_group_rows(source))


def _rows_at(source: Path | bytes, positions: np.ndarray, counts: list[int]) -> pl.DataFrame:
    parts = []
    offset = 0
    for rows in counts:
        first, last = np.searchsorted(positions, [offset, offset + rows])
        if last > first:
            group = pl.scan_parquet(source).slice(offset, rows).collect()
            parts.append(compacted(group[positions[first:last] - offset]))
        offset += rows
    if not parts:
        return pl.scan_parquet(source).head(0).collect()
    return pl.concat(parts)


_ROW = "__sc_file_row"


def _row_group_rows(source: Path | bytes) -> list[int]:
    """The number of rows of each row group of a Parquet file (read from its footer)."""
    metadata = pq.read_metadata(io.BytesIO(source) if isinstance(source, bytes) else source)
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def compacted(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with its own copy of the text it holds.

    A few rows taken from a large frame (a filter, a gather) share its text buffers (polars' string views): the
    rows of every row group or batch they came from would stay in memory with them. Converting through Arrow copies
    only the text the rows hold.
    """
    copied = pl.from_arrow(frame.to_arrow())
    assert isinstance(copied, pl.DataFrame)
    return copied.cast(frame.schema) if copied.schema != frame.schema else copied


def write_parquet(frame: pl.DataFrame, target: Path | io.BytesIO) -> None:
    frame.write_parquet(target, compression="zstd", compression_level=1, statistics=False)


def write_parquet_frames(frames: Iterable[pl.DataFrame], target: Path) -> int:
    """Write ``frames`` (one schema; at least one, possibly empty) to one Parquet file as they come, with the
    settings of :func:`write_parquet`; the file reads back as their concatenation, dtypes included. Returns the rows
    written. An error raised while the frames are made is raised as it is (the file is then incomplete).

    polars' own writer takes them (a source of frames sunk to Parquet): the same writer as :func:`write_parquet`,
    about half the CPU of pyarrow's writer here. It runs in a thread of its own and pulls the frames from its own
    threads, so the frames are made here, in the caller's thread, and handed over one at a time: Python runs signal
    handlers in the main thread only, and a SIGTERM (Airflow stopping the task) must stop the run at the next frame,
    not after the whole table.
    """
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("write_parquet_frames needs at least one frame (an empty one gives the schema)")
    handoff: queue.Queue[pl.DataFrame | _Stop] = queue.Queue(maxsize=1)
    failed: list[BaseException] = []

    def source(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        while not isinstance(item := handoff.get(), _Stop):
            yield item
        if item.abort:
            raise _Aborted("the frames of the file were not all made")

    def sink() -> None:
        try:
            register_io_source(source, schema=first.schema).sink_parquet(
                target, compression="zstd", compression_level=1, statistics=False
            )
        except BaseException as err:  # raised in the caller's thread
            failed.append(err)

    writer = threading.Thread(target=sink, name="stopchurn-parquet-writer", daemon=True)
    writer.start()
    rows = 0
    done = False
    try:
        for frame in itertools.chain([first], it):
            rows += frame.height
            if not _hand_over(handoff, frame, writer):
                break  # the writer failed: its error is raised below, no more frames are made
        done = True
    finally:
        _hand_over(handoff, _Stop(abort=not done), writer)
        writer.join()
    if failed:
        raise failed[0]
    return rows


@dataclass(frozen=True)
class _Stop:
    """The end of the frames: complete (the file is finished) or not (the writer fails, the file is incomplete)."""

    abort: bool


class _Aborted(Exception):
    """Raised in the writer when the frames stopped before their end (an error where they are made)."""


def _hand_over(
    handoff: queue.Queue[pl.DataFrame | _Stop], item: pl.DataFrame | _Stop, writer: threading.Thread
) -> bool:
    """Give ``item`` to the writer; False when the writer has stopped (its error is raised after it is joined)."""
    while writer.is_alive():
        try:
            handoff.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
