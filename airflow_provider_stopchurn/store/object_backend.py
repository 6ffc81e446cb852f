"""The storage backend of an object store (s3://, gs://, memory://, ...): one PUT per small file, a snapshot written
on the worker's disk and uploaded a piece at a time, ``"xb"`` (or check-write-read-back) creates.

:mod:`.backend` describes both backends and picks one.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError
from airflow_provider_stopchurn.store.backend_common import (
    StagedFile,
    StagingBackend,
    display_location,
    name_parts,
    read_error,
    write_error,
)
from airflow_provider_stopchurn.store.parquet import rows_at, rows_by_row_group, write_parquet, write_parquet_frames
from airflow_provider_stopchurn.store.scratch import scratch_folder

__all__ = ["UPLOAD_PIECE", "ObjectStoreBackend"]

log = logging.getLogger(__name__)

#: Bytes of a local file read and handed to the object store's writer at once: the upload holds this much, not the
#: file (a 50M-row snapshot is about 2.4 GB). The writer buffers what it needs for a part (s3fs: its block size).
UPLOAD_PIECE = 2**20


class ObjectStoreBackend(StagingBackend):
    """Objects under a UPath-like directory: one PUT per file, ``"xb"`` (or check-write-read-back) creates."""

    is_local = False

    def __init__(self, directory: Any) -> None:
        self.directory = directory
        self._exclusive_mode: bool | None = None  # does the file system accept open(mode="xb")? None: not tried
        self._sliced: tuple[str, bytes] | None = None  # read_slice's last file: one download for all windows

    def __repr__(self) -> str:
        return f"ObjectStoreBackend({self.location()!r})"

    def _path(self, name: str) -> Any:
        path = self.directory
        for part in name_parts(name):
            path = path / part
        return path

    @staticmethod
    def _fresh(path: Any) -> Any:
        """Forget the file system's cached listing of ``path``: another process may have changed it."""
        with contextlib.suppress(Exception):
            path.fs.invalidate_cache(path.path)
        return path

    def location(self, name: str = "") -> str:
        return display_location(self._path(name))

    def exists(self, name: str) -> bool:
        try:
            return bool(self._fresh(self._path(name)).exists())
        except OSError as err:
            raise read_error(self.location(name), err) from err

    def read_bytes(self, name: str) -> bytes | None:
        path = self._fresh(self._path(name))
        try:
            with path.open("rb") as fh:
                return bytes(fh.read())
        except FileNotFoundError:
            return None
        except OSError as err:
            raise read_error(self.location(name), err) from err

    def write_bytes(self, name: str, data: bytes, *, durable: bool = False) -> None:
        # one PUT: an object becomes visible whole; ``durable`` holds once the store acknowledged it
        path = self._path(name)
        with contextlib.suppress(Exception):  # object stores have no folders; some file systems want them
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("wb") as fh:
                fh.write(data)
        except OSError as err:
            raise write_error(self.location(name), err) from err

    def create_exclusive(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        if self._exclusive_mode is not False:
            with contextlib.suppress(Exception):
                path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with path.open("xb") as fh:
                    fh.write(data)
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError) as err:
                if self._exclusive_mode:
                    raise write_error(self.location(name), err) from err
                log.debug(
                    "%s refuses open(mode='xb') (%s); creating by check, write, read back.", self.location(name), err
                )
                self._exclusive_mode = False
            except OSError as err:
                raise write_error(self.location(name), err) from err
            else:
                self._exclusive_mode = True
                return True
        if self.read_bytes(name) is not None:
            return False
        self.write_bytes(name, data)
        return self.read_bytes(name) == data

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return
        except OSError as err:
            raise SnapshotError(f"Cannot delete {self.location(name)}: {err.__class__.__name__}: {err}") from err

    def delete_tree(self, name: str) -> None:
        path = self._fresh(self._path(name))
        try:
            if path.exists():
                path.fs.rm(path.path, recursive=True)
        except Exception as err:  # best effort: leftovers are harmless, only space
            log.debug("Could not remove %s: %s", self.location(name), err)

    def list_sizes(self, name: str = "") -> dict[str, int]:
        path = self._fresh(self._path(name))
        try:
            if not path.exists():
                return {}
            if not hasattr(path, "fs"):  # a UPath-like object without its fsspec file system
                children = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
                return {p.name: int(p.stat().st_size) for p in children}
            entries = path.fs.ls(path.path, detail=True)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise read_error(self.location(name), err) from err
        sizes: dict[str, int] = {}
        for entry in entries:
            if entry.get("type") == "directory":
                continue
            leaf = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if leaf and not leaf.startswith("."):
                sizes[leaf] = int(entry.get("size") or 0)
        return sizes

    def list_names(self, name: str = "") -> list[str]:
        return sorted(self.list_sizes(name))

    def read_frame(self, name: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        raw = self.read_bytes(name)
        if raw is None:
            raise FileNotFoundError(self.location(name))
        return pl.read_parquet(io.BytesIO(raw), columns=None if columns is None else list(columns))

    def write_frame(self, name: str, frame: pl.DataFrame) -> None:
        buf = io.BytesIO()
        write_parquet(frame, buf)
        self.write_bytes(name, buf.getvalue(), durable=True)

    def read_rows(self, name: str, keys: pl.DataFrame) -> pl.DataFrame:
        raw = self.read_bytes(name)  # the file's bytes, decoded one row group at a time
        if raw is None:
            raise FileNotFoundError(self.location(name))
        return rows_by_row_group(raw, keys)

    def read_rows_at(self, name: str, positions: np.ndarray) -> pl.DataFrame:
        raw = self.read_bytes(name)  # the file's bytes, decoded one row group at a time
        if raw is None:
            raise FileNotFoundError(self.location(name))
        return rows_at(raw, positions)

    @contextlib.contextmanager
    def stage_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> Iterator[StagedFile]:
        # written to a local temporary file: nothing reaches the store before it is published, and then the object
        # appears whole (object stores have no rename)
        with scratch_folder() as folder:  # removed by the next run if this one is killed
            local = folder / "snapshot.parquet"
            rows = write_parquet_frames(frames, local)
            yield StagedFile(rows, lambda: self._upload(local, name))

    def _upload(self, local: Path, name: str) -> None:
        """Copy the local file ``local`` to ``name`` a piece of :data:`UPLOAD_PIECE` bytes at a time.

        The object is complete once the writer is closed (a PUT, or a multipart upload completed). A copy that fails
        part way is abandoned, never closed, since closing would complete the upload of what was sent so far; a part
        a store shows as it is written (memory, a folder) is removed. No pointer names the file yet either way.
        """
        path = self._path(name)
        with contextlib.suppress(Exception):  # object stores have no folders; some file systems want them
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            writer = path.open("wb")
        except OSError as err:
            raise write_error(self.location(name), err) from err
        try:
            with local.open("rb") as source:
                while piece := source.read(UPLOAD_PIECE):
                    writer.write(piece)
            writer.close()
        except OSError as err:
            self._abandon(writer, name)
            raise write_error(self.location(name), err) from err
        except BaseException:  # a signal (Airflow stopping the task) raised mid-copy
            self._abandon(writer, name)
            raise

    def _abandon(self, writer: Any, name: str) -> None:
        with contextlib.suppress(Exception):
            writer.discard()  # fsspec's buffered files: abort the multipart upload, drop the buffer
        with contextlib.suppress(Exception):
            writer.closed = True  # else close(), when the object is collected, would complete the upload
        with contextlib.suppress(Exception):
            self._path(name).unlink()

    def read_slice(self, name: str, offset: int, length: int) -> pl.DataFrame:
        if self._sliced is None or self._sliced[0] != name:  # snapshot files never change
            raw = self.read_bytes(name)
            if raw is None:
                raise FileNotFoundError(self.location(name))
            self._sliced = (name, raw)
        return pl.scan_parquet(self._sliced[1]).slice(offset, length).collect()
