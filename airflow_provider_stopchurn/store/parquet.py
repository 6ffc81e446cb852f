"""Parquet files of the store: written whole or frame by frame, and read by row group.

No I/O of its own beyond the file or bytes it is given; :mod:`.backend` decides where the files live.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from polars.io.plugins import register_io_source

__all__ = ["compacted", "rows_by_row_group", "write_parquet", "write_parquet_frames"]


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
    found = np.sort(found)  # file order, whatever order the join gave
    parts = []
    offset = 0
    for rows in counts:
        first, last = np.searchsorted(found, [offset, offset + rows])
        if last > first:
            group = pl.scan_parquet(source).slice(offset, rows).collect()
            parts.append(compacted(group[found[first:last] - offset]))
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
    about half the CPU of pyarrow's writer here.
    """
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("write_parquet_frames needs at least one frame (an empty one gives the schema)")
    rows = 0
    failed: list[BaseException] = []

    def source(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        nonlocal rows
        try:
            for frame in itertools.chain([first], it):
                rows += frame.height
                yield frame
        except BaseException as err:
            failed.append(err)
            raise

    try:
        register_io_source(source, schema=first.schema).sink_parquet(
            target, compression="zstd", compression_level=1, statistics=False
        )
    except Exception:
        if failed:
            raise failed[0] from None
        raise
    return rows
