"""The storage seam under the snapshot store and its lock: whole files and Parquet frames by relative name.

The store and the lock name files relative to one directory (``"CURRENT"``, ``"plans/<id>/acks/0000003"``) and use
only the methods of :class:`Backend`; which kind of storage is behind them is decided once, in
:func:`backend_for`. Two implementations:

* :class:`~.local_backend.LocalBackend`, a directory of a local or mounted file system. A whole-file write goes to a
  temporary file that is renamed over the target (``os.replace``), so a reader sees the old content or the new one,
  never a part; a ``durable`` write (the pointers) is fsynced, file and directory, before it returns. An exclusive
  create publishes a complete temporary file under the name with ``os.link``, which fails when the name exists
  (``O_EXCL`` where the file system has no hard links).
* :class:`~.object_backend.ObjectStoreBackend`, any UPath-like object (Airflow's ``ObjectStoragePath``,
  universal_pathlib's ``UPath``) for s3://, gs://, memory://, ... offering ``/``, ``open``, ``exists``,
  ``iterdir``, ``unlink``, ``mkdir`` and ``.fs``. A whole-file write is one PUT, visible all at once (object stores
  have no rename). A snapshot written frame by frame goes to the worker's disk first and is uploaded a piece at a
  time (:data:`~.object_backend.UPLOAD_PIECE`), so the upload never holds the file. An exclusive create opens the
  object with mode ``"xb"`` (a conditional PUT where the file system implements it); where the file system refuses
  that mode, it falls back to check, write and read back, which two writers starting in the same instant can both
  pass.

A snapshot written frame by frame can be staged (:meth:`Backend.stage_frames`): written aside now (beside its name
on a local disk, on the worker's disk for an object store), published under its name only if the run needs it.
A streamed run that finds nothing changed drops it, as the whole path writes nothing then.

A ``file://`` ObjectStoragePath is served by the local backend: the same files, with the stronger guarantees.

Missing files: :meth:`Backend.read_bytes` returns None, :meth:`Backend.read_frame` and :meth:`Backend.read_rows`
raise :class:`FileNotFoundError` (other decoding errors propagate), deletes ignore them. Failed I/O raises
:class:`SnapshotError` naming the location, never credentials.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from airflow_provider_stopchurn.store.backend_common import StagedFile, display_location
from airflow_provider_stopchurn.store.local_backend import LocalBackend
from airflow_provider_stopchurn.store.object_backend import ObjectStoreBackend

__all__ = ["Backend", "LocalBackend", "ObjectStoreBackend", "StagedFile", "backend_for", "display_location"]


class Backend(Protocol):
    """What the store and the lock need from storage; ``name`` is a ``/``-separated path under one directory."""

    @property
    def is_local(self) -> bool:
        """True when the files are on a file system this process can rename and fsync on."""
        ...

    def location(self, name: str = "") -> str:
        """A printable URI of ``name`` (of the directory when empty), without credentials."""
        ...

    def exists(self, name: str) -> bool: ...

    def read_bytes(self, name: str) -> bytes | None:
        """The whole file, or None when it does not exist."""
        ...

    def write_bytes(self, name: str, data: bytes, *, durable: bool = False) -> None:
        """Replace the whole file atomically; ``durable`` also flushes it to stable storage before returning."""
        ...

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create the file with ``data`` only if it does not exist; False when it does (someone else's)."""
        ...

    def delete(self, name: str) -> None:
        """Remove one file; a missing file is not an error."""
        ...

    def delete_tree(self, name: str) -> None:
        """Remove a folder and everything under it, best effort (leftovers cost only space)."""
        ...

    def list_names(self, name: str = "") -> list[str]:
        """Names of the files directly under a folder, sorted; [] when it does not exist."""
        ...

    def list_sizes(self, name: str = "") -> dict[str, int]:
        """``{file name: size in bytes}`` of the files directly under a folder; {} when it does not exist."""
        ...

    def read_frame(self, name: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        """A Parquet file, or only some of its columns."""
        ...

    def write_frame(self, name: str, frame: pl.DataFrame) -> None:
        """Write a Parquet file, visible only once complete, durable before the call returns."""
        ...

    def read_rows(self, name: str, keys: pl.DataFrame) -> pl.DataFrame:
        """Rows of a Parquet file whose key (the columns of ``keys``) is in ``keys``."""
        ...

    def read_rows_at(self, name: str, positions: np.ndarray) -> pl.DataFrame:
        """Rows of a Parquet file at ``positions`` (row numbers, ascending, each once), in file order."""
        ...

    def write_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> int:
        """Write a Parquet file from frames of one schema as they come (one row group or more each), visible only
        once complete and durable before the call returns, as :meth:`write_frame`; returns its rows."""
        ...

    def read_slice(self, name: str, offset: int, length: int) -> pl.DataFrame:
        """``length`` rows of a Parquet file from row ``offset`` (only the row groups they lie in are decoded)."""
        ...

    def stage_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> contextlib.AbstractContextManager[StagedFile]:
        """Write a Parquet file from ``frames`` as :meth:`write_frames` does, but aside: nothing shows it under
        ``name`` until :meth:`StagedFile.publish`; leaving the block unpublished drops it (a killed run's copy is
        removed by the next run that stages one)."""
        ...


def backend_for(path: Any) -> Backend:
    """The backend for a directory: a :class:`pathlib.Path`, a path string, or a UPath-like object."""
    if isinstance(path, LocalBackend | ObjectStoreBackend):
        return path
    if isinstance(path, str) and "://" not in path:
        path = Path(path)
    # universal-pathlib before 0.3 (Airflow 3.1's ObjectStoragePath) subclasses pathlib.Path: an object with a
    # protocol is a file system path, whatever its base classes, and only a local protocol means the local disk.
    protocol = getattr(path, "protocol", None)
    if isinstance(path, Path) and protocol is None:
        return LocalBackend(path)
    if protocol in ("file", "local", "") and isinstance(getattr(path, "path", None), str):
        return LocalBackend(Path(path.path), display=display_location(path))
    missing = [a for a in ("__truediv__", "open", "exists", "iterdir", "unlink") if not hasattr(path, a)]
    if missing:
        raise TypeError(
            f"A snapshot location must be a pathlib.Path or an ObjectStoragePath (or a UPath), not "
            f"{type(path).__name__} (it has no {', '.join(missing)})."
        )
    return ObjectStoreBackend(path)
