"""The storage seam under the snapshot store and its lock: whole files and Parquet frames by relative name.

The store and the lock name files relative to one directory (``"CURRENT"``, ``"plans/<id>/acks/0000003"``) and use
only the methods of :class:`Backend`; which kind of storage is behind them is decided once, in
:func:`backend_for`. Two implementations:

* :class:`LocalBackend`, a directory of a local or mounted file system. A whole-file write goes to a temporary
  file that is renamed over the target (``os.replace``), so a reader sees the old content or the new one, never
  a part; a ``durable`` write (the pointers) is fsynced, file and directory, before it returns. An exclusive
  create publishes a complete temporary file under the name with ``os.link``, which fails when the name exists
  (``O_EXCL`` where the file system has no hard links).
* :class:`ObjectStoreBackend`, any UPath-like object (Airflow's ``ObjectStoragePath``, universal_pathlib's
  ``UPath``) for s3://, gs://, memory://, ... offering ``/``, ``open``, ``exists``, ``iterdir``, ``unlink``,
  ``mkdir`` and ``.fs``. A whole-file write is one PUT, visible all at once (object stores have no rename). An
  exclusive create opens the object with mode ``"xb"`` (a conditional PUT where the file system implements it);
  where the file system refuses that mode, it falls back to check, write and read back, which two writers
  starting in the same instant can both pass.

A ``file://`` ObjectStoragePath is served by :class:`LocalBackend`: the same files, with the stronger guarantees.

Missing files: :meth:`Backend.read_bytes` returns None, :meth:`Backend.read_frame` and :meth:`Backend.read_rows`
raise :class:`FileNotFoundError` (other decoding errors propagate), deletes ignore them. Failed I/O raises
:class:`SnapshotError` naming the location, never credentials.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError
from airflow_provider_stopchurn.store.parquet import rows_by_row_group, write_parquet, write_parquet_frames
from airflow_provider_stopchurn.store.scratch import scratch_folder

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# errors of os.link that mean "this file system has no hard links", not "the name is taken"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}


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

    def write_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> int:
        """Write a Parquet file from frames of one schema as they come (one row group or more each), visible only
        once complete and durable before the call returns, as :meth:`write_frame`; returns its rows."""
        ...

    def read_slice(self, name: str, offset: int, length: int) -> pl.DataFrame:
        """``length`` rows of a Parquet file from row ``offset`` (only the row groups they lie in are decoded)."""
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


def display_location(path: Any) -> str:
    """A printable location without credentials (URL user info is dropped)."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", str(path))


def _parts(name: str) -> list[str]:
    parts = name.split("/") if name else []
    if any(p in {"", ".", ".."} for p in parts):
        raise ValueError(f"Not a relative file name: {name!r}")
    return parts


def _write_error(location: str, err: BaseException) -> SnapshotError:
    return SnapshotError(
        f"Cannot write {location}: {err.__class__.__name__}: {err}. "
        "Check that the snapshot location exists and is writable."
    )


def _read_error(location: str, err: BaseException) -> SnapshotError:
    return SnapshotError(f"Cannot read {location}: {err.__class__.__name__}: {err}")


class LocalBackend:
    """Files in a local directory: atomic replace, fsync for durable writes, hard-link (or ``O_EXCL``) creates."""

    is_local = True

    def __init__(self, directory: Path, *, display: str | None = None) -> None:
        self.directory = Path(directory)
        self._display = display if display is not None else str(self.directory)

    def __repr__(self) -> str:
        return f"LocalBackend({self._display!r})"

    def _path(self, name: str) -> Path:
        return self.directory.joinpath(*_parts(name))

    def location(self, name: str = "") -> str:
        return f"{self._display.rstrip('/')}/{name}" if name else self._display

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _read_error(self.location(name), err) from err

    def _temporary(self, path: Path) -> Path:
        # hidden, unique, in the same folder: os.replace and os.link need the same file system
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")

    @contextlib.contextmanager
    def _staged(self, path: Path, data: bytes, *, durable: bool) -> Iterator[Path]:
        """A complete temporary file holding ``data`` beside ``path`` (fsynced when ``durable``), for the block to
        publish under ``path``; removed after the block (a published one lives on under its new name)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temporary(path)
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, name: str, data: bytes, *, durable: bool = False) -> None:
        path = self._path(name)
        try:
            with self._staged(path, data, durable=durable) as tmp:
                os.replace(tmp, path)
            if durable:
                _fsync_directory(path.parent)
        except OSError as err:
            raise _write_error(self.location(name), err) from err

    def create_exclusive(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        try:
            with self._staged(path, data, durable=True) as tmp:
                try:
                    os.link(tmp, path)  # the name appears with its whole content, or not at all
                except FileExistsError:
                    # NFS may answer EEXIST to a retried link that did succeed: the link count tells
                    return tmp.stat().st_nlink == 2
                except OSError as err:
                    if err.errno not in _NO_LINKS:
                        raise
                    return self._create_with_o_excl(path, data)
            _fsync_directory(path.parent)
            return True
        except OSError as err:
            raise _write_error(self.location(name), err) from err

    @staticmethod
    def _create_with_o_excl(path: Path, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink(missing_ok=True)
        except NotADirectoryError:
            return
        except OSError as err:
            raise SnapshotError(f"Cannot delete {self.location(name)}: {err.__class__.__name__}: {err}") from err

    def delete_tree(self, name: str) -> None:
        shutil.rmtree(self._path(name), ignore_errors=True)

    def list_sizes(self, name: str = "") -> dict[str, int]:
        sizes: dict[str, int] = {}
        try:
            with os.scandir(self._path(name)) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue  # a temporary file of a write in progress
                    with contextlib.suppress(FileNotFoundError):
                        if entry.is_file():
                            sizes[entry.name] = entry.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as err:
            raise _read_error(self.location(name), err) from err
        return sizes

    def list_names(self, name: str = "") -> list[str]:
        return sorted(self.list_sizes(name))

    def read_frame(self, name: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(self.location(name))
        return pl.read_parquet(path, columns=None if columns is None else list(columns))

    def write_frame(self, name: str, frame: pl.DataFrame) -> None:
        self._publish(name, lambda tmp: write_parquet(frame, tmp))

    def _publish(self, name: str, write: Callable[[Path], _T]) -> _T:
        """``write`` the file aside, make it durable, then rename it into place: a pointer written after this call
        never names a torn file, and a reader never sees a half one."""
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._temporary(path)
            try:
                result = write(tmp)
                with tmp.open("rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_directory(path.parent)
        except OSError as err:
            raise _write_error(self.location(name), err) from err
        return result

    def read_rows(self, name: str, keys: pl.DataFrame) -> pl.DataFrame:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(self.location(name))
        return rows_by_row_group(path, keys)

    def write_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> int:
        folder = self._path(name).parent
        try:  # a killed run's half-written snapshot (snapshots are written under the lock)
            for left in folder.glob(".*.parquet.*.tmp") if folder.is_dir() else ():
                left.unlink(missing_ok=True)
        except OSError as err:
            raise _write_error(self.location(name), err) from err
        return self._publish(name, lambda tmp: write_parquet_frames(frames, tmp))

    def read_slice(self, name: str, offset: int, length: int) -> pl.DataFrame:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(self.location(name))
        return pl.scan_parquet(path).slice(offset, length).collect()


def _fsync_directory(directory: Path) -> None:
    """Make a rename or a new name in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStoreBackend:
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
        for part in _parts(name):
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
            raise _read_error(self.location(name), err) from err

    def read_bytes(self, name: str) -> bytes | None:
        path = self._fresh(self._path(name))
        try:
            with path.open("rb") as fh:
                return bytes(fh.read())
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _read_error(self.location(name), err) from err

    def write_bytes(self, name: str, data: bytes, *, durable: bool = False) -> None:
        # one PUT: an object becomes visible whole; ``durable`` holds once the store acknowledged it
        path = self._path(name)
        with contextlib.suppress(Exception):  # object stores have no folders; some file systems want them
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("wb") as fh:
                fh.write(data)
        except OSError as err:
            raise _write_error(self.location(name), err) from err

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
                    raise _write_error(self.location(name), err) from err
                log.debug("%s refuses open(mode='xb') (%s); creating by check, write, read back.", path, err)
                self._exclusive_mode = False
            except OSError as err:
                raise _write_error(self.location(name), err) from err
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
            raise _read_error(self.location(name), err) from err
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

    def write_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> int:
        # written to a local temporary file first, then one PUT of it (an object is visible whole, or not at all)
        with scratch_folder() as folder:  # removed by the next run if this one is killed
            local = folder / "snapshot.parquet"
            rows = write_parquet_frames(frames, local)
            self.write_bytes(name, local.read_bytes(), durable=True)
        return rows

    def read_slice(self, name: str, offset: int, length: int) -> pl.DataFrame:
        if self._sliced is None or self._sliced[0] != name:  # snapshot files never change
            raw = self.read_bytes(name)
            if raw is None:
                raise FileNotFoundError(self.location(name))
            self._sliced = (name, raw)
        return pl.scan_parquet(self._sliced[1]).slice(offset, length).collect()
