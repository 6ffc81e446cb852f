"""Writing the historical-upload files and their manifest into the run's folder, fenced by the table's lease.

Each file is ``[``, one record per line separated by ``,``, and ``]``, never more than ``max_file_bytes`` bytes. The
rows are the update engine's canonical JSON, byte for byte what an ``insert`` of the row would carry. Rows are
encoded and written a batch at a time, so beside the table itself only one batch of JSON text is held in memory,
whatever the table's size. The ``manifest.json`` (rows, bytes and SHA-256 of each file) is written last, after the
baseline's commit: a folder with a manifest is complete; a folder without one is the leftover of a failed try.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl

from airflow_provider_stopchurn.encode.records import row_pieces
from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.export.options import ExportOptions
from airflow_provider_stopchurn.export.summary import ExportSummary
from airflow_provider_stopchurn.store import CREATED_AT, backend_for
from airflow_provider_stopchurn.update.diff import data_columns

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "stopchurn-historical-upload/1"
_HEAD, _SEPARATOR, _TAIL = b"[\n", b",\n", b"\n]\n"
#: A file of n records of sizes s_i is ``sum(s_i + 2) + 3`` bytes: each record costs its size and a 2-byte head
#: or separator, and the tail costs 3.
_PER_RECORD, _TAIL_BYTES = 2, 3
_BATCH_ROWS = 100_000
_PART_NAME = "part-{:05d}.json"


class _Part:
    """One output file. Its size and rows are planned on the encoding thread; the writer thread does the I/O."""

    def __init__(self, folder: Any, number: int) -> None:
        self.name = _PART_NAME.format(number)
        self.path = folder / self.name
        self.planned = 0  # bytes of the records planned into it, each with its head or separator
        self.rows = 0
        self._handle: Any = None
        self._sha = hashlib.sha256()
        self._bytes = 0

    # writer thread
    def _put(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._sha.update(data)
        self._bytes += len(data)

    def write(self, data: memoryview, first: bool) -> None:
        """Records ``data`` (each followed by ``,\n`` but the last): the file's first ones, or more."""
        if first:
            self._handle = self.path.open("wb")
            self._put(_HEAD)
        else:
            self._put(_SEPARATOR)
        self._put(data)

    def close(self) -> dict[str, Any]:
        self._put(_TAIL)
        self._handle.close()
        self._handle = None
        return {"name": self.name, "rows": self.rows, "bytes": self._bytes, "sha256": self._sha.hexdigest()}

    def abandon(self) -> None:
        if self._handle is not None:
            self._handle.close()


class _Writer:
    """Writes and hashes the files on one thread, in order, while the next batch is encoded (both release the GIL).

    At most one batch waits beside the one being encoded, so memory stays bounded.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stopchurn-export")
        self._last: Future[None] | None = None
        self.files: list[dict[str, Any]] = []

    def submit(self, jobs: list[Callable[[], None]]) -> None:
        future = self._pool.submit(_run_all, jobs)
        if self._last is not None:
            self._last.result()  # raises the writer's error, if any
        self._last = future

    def finish(self) -> list[dict[str, Any]]:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        return self.files

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _run_all(jobs: list[Callable[[], None]]) -> None:
    for job in jobs:
        job()


def _close_into(files: list[dict[str, Any]], part: _Part) -> None:
    files.append(part.close())


def write_files(
    target: pl.DataFrame,
    kinds: Mapping[str, str],
    folder: Any,
    options: ExportOptions,
    run_ms: int,
    fence: Callable[[], None],
) -> list[dict[str, Any]]:
    """Encode ``target`` a batch at a time and fill files up to ``max_file_bytes``; return what each file holds.

    :param fence: raises unless this run still holds the table's lease; called before the folder is cleared and
        before each batch is written. Every try of a DAG run writes the same folder: a try that was paused past its
        lease (a zombie) must not remove or rewrite the files and manifest of the try that took the table over.
    """
    fence()
    _prepare(folder)
    columns = data_columns(target)
    pieces = row_pieces(
        target.select(columns).schema,
        {c: kinds[c] for c in columns},
        nest_dotted_columns=options.nest_dotted_columns,
        decimal_as_string=options.decimal_as_string,
    )
    limit = options.max_file_bytes - _TAIL_BYTES  # room for records (each with its head or separator)
    writer = _Writer()
    parts: list[_Part] = []
    try:
        for offset in range(0, target.height, _BATCH_ROWS):
            batch = target.slice(offset, _BATCH_ROWS)
            data, ends = _records(batch, pieces, options, run_ms)
            jobs: list[Callable[[], None]] = []
            start = 0
            while start < len(ends) - 1:
                if not parts or parts[-1].planned + (ends[start + 1] - ends[start]) > limit:
                    if parts and parts[-1].rows:
                        jobs.append(functools.partial(_close_into, writer.files, parts[-1]))
                    parts.append(_Part(folder, len(parts) + 1))
                part = parts[-1]
                end = int(np.searchsorted(ends, ends[start] + limit - part.planned, side="right")) - 1
                if end <= start:
                    raise _too_large(batch, start, int(ends[start + 1] - ends[start]), options)
                view = data[int(ends[start]) : int(ends[end]) - len(_SEPARATOR)]
                jobs.append(functools.partial(part.write, view, not part.rows))
                part.planned += int(ends[end] - ends[start])
                part.rows += end - start
                start = end
            if offset + _BATCH_ROWS >= target.height and parts and parts[-1].rows:
                jobs.append(functools.partial(_close_into, writer.files, parts[-1]))
            fence()
            writer.submit(jobs)
        return writer.finish()
    except BaseException:
        writer.abort()
        for part in parts:
            part.abandon()
        raise


def _records(
    batch: pl.DataFrame, pieces: list[pl.Expr], options: ExportOptions, run_ms: int
) -> tuple[memoryview, np.ndarray]:
    """``{"data": <row>, "createdAt": <ms>, "updatedAt": <ms>},\n`` of each row of a batch of the target, as one
    buffer of UTF-8 bytes and the offsets where each record ends (``ends[0] == 0``)."""
    if options.updated_at_column is not None:
        updated = pl.col(options.updated_at_column).cast(pl.Int64).fill_null(run_ms)
    else:
        updated = pl.lit(run_ms, dtype=pl.Int64)
    records = batch.select(
        pl.concat_str(
            pl.lit('{"data":'),
            *pieces,
            pl.lit(',"createdAt":'),
            pl.col(CREATED_AT).cast(pl.String),
            pl.lit(',"updatedAt":'),
            updated.cast(pl.String),
            pl.lit("}" + _SEPARATOR.decode()),
        ).alias("record")
    ).to_series()
    # the Arrow layout: one buffer of every record's bytes and an offset per record, read without a copy
    array = records.rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    return memoryview(array.buffers()[2]), offsets


def _too_large(batch: pl.DataFrame, position: int, cost: int, options: ExportOptions) -> SourceDataError:
    row_id = batch.get_column("id")[position] if "id" in batch.columns else None
    return SourceDataError(
        f"The row with id {row_id!r} of {options.table_name!r} needs {cost + _TAIL_BYTES} bytes as a file of its own, "
        f"more than max_file_bytes={options.max_file_bytes}. Nothing was committed and no manifest was written; "
        "shrink the row or raise max_file_bytes."
    )


def _prepare(folder: Any) -> None:
    """Create the run's folder, and remove what an earlier try of the same run left in it."""
    try:
        children = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        children = []
    for child in children:
        name = str(child).rstrip("/").rsplit("/", 1)[-1]
        if name == MANIFEST or (name.startswith("part-") and name.endswith(".json")):
            child.unlink()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError:  # object stores have no folders
        if getattr(folder, "protocol", "file") in ("file", "local", ""):
            raise


def write_manifest(folder: Any, summary: ExportSummary, options: ExportOptions, fence: Callable[[], None]) -> None:
    fence()  # a try that lost its lease after its commit leaves the folder to the try that took the table over
    manifest = {
        "format": MANIFEST_FORMAT,
        "brand_id": options.brand_id,
        "table_name": options.table_name,
        "run_id": options.run_id,
        "rows": summary.rows,
        "bytes": summary.bytes,
        "max_file_bytes": options.max_file_bytes,
        "files": summary.file_list,
        "snapshot": {
            "location": summary.snapshot_uri,
            "version": summary.snapshot_version,
            "rows": summary.rows + summary.kept_rows,
            "kept_rows": summary.kept_rows,
        },
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "upload": (
            "Upload every part file in StopChurn's Back Office as a historical load of this table and brand, "
            "before the first update run; the update run then sends only what changed since this export."
        ),
    }
    backend_for(folder).write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n", durable=True)


__all__ = ["MANIFEST", "write_files", "write_manifest"]
