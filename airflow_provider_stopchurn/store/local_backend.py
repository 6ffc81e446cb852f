"""The storage backend of a local or mounted file system: atomic renames, fsync, hard-link (or ``O_EXCL``) creates.

:mod:`.backend` describes both backends and picks one; this one serves :class:`pathlib.Path` locations and
``file://`` ObjectStoragePaths.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError
from airflow_provider_stopchurn.store.backend_common import (
    StagedFile,
    StagingBackend,
    name_parts,
    read_error,
    write_error,
)
from airflow_provider_stopchurn.store.parquet import rows_at, rows_by_row_group, write_parquet, write_parquet_frames

__all__ = ["LocalBackend"]

# errors of os.link that mean "this file system has no hard links", not "the name is taken"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}


class LocalBackend(StagingBackend):
    """Files in a local directory: atomic replace, fsync for durable writes, hard-link (or ``O_EXCL``) creates."""

    is_local = True

    def __init__(self, directory: Path, *, display: str | None = None) -> None:
        self.directory = Path(directory)
        self._display = display if display is not None else str(self.directory)

    def __repr__(self) -> str:
        return f"LocalBackend({self._display!r})"

    def _path(self, name: str) -> Path:
        return self.directory.joinpath(*name_parts(name))

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
            raise read_error(self.location(name), err) from err

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
            raise write_error(self.location(name), err) from err

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
            raise write_error(self.location(name), err) from err

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
            raise read_error(self.location(name), err) from err
        return sizes

    def list_names(self, name: str = "") -> list[str]:
        return sorted(self.list_sizes(name))

    def read_frame(self, name: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(self.location(name))
        return pl.read_parquet(path, columns=None if columns is None else list(columns))

    def write_frame(self, name: str, frame: pl.DataFrame) -> None:
        with self._aside(name, lambda tmp: _write_whole(frame, tmp)) as staged:
            staged.publish()

    @contextlib.contextmanager
    def _aside(self, name: str, write: Callable[[Path], int]) -> Iterator[StagedFile]:
        """``write`` the file aside (a hidden temporary file beside its name) and make it durable; publishing renames
        it into place, so a pointer written after never names a torn file and a reader never sees a half one. Not
        published, it is removed on the way out."""
        path = self._path(name)
        tmp = self._temporary(path)
        with contextlib.ExitStack() as stack:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(_owned(tmp))  # held while the file lives aside: a sweep leaves it
                stack.callback(_unlink_quietly, tmp)
                rows = write(tmp)  # into the same file (same inode): the lock stays on it
                with tmp.open("rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError as err:
                raise write_error(self.location(name), err) from err
            yield StagedFile(rows, lambda: self._rename(tmp, path, name))

    def _rename(self, tmp: Path, path: Path, name: str) -> None:
        try:
            os.replace(tmp, path)
            _fsync_directory(path.parent)
        except OSError as err:
            raise write_error(self.location(name), err) from err

    def read_rows(self, name: str, keys: pl.DataFrame) -> pl.DataFrame:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(self.location(name))
        return rows_by_row_group(path, keys)

    def read_rows_at(self, name: str, positions: np.ndarray) -> pl.DataFrame:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(self.location(name))
        return rows_at(path, positions)

    @contextlib.contextmanager
    def stage_frames(self, name: str, frames: Iterable[pl.DataFrame]) -> Iterator[StagedFile]:
        folder = self._path(name).parent
        try:  # a killed run's half-written snapshot; a live run's staged one holds its lock and stays
            for left in folder.glob(".*.parquet.*.tmp") if folder.is_dir() else ():
                _remove_if_dead(left)
        except OSError as err:
            raise write_error(self.location(name), err) from err
        with self._aside(name, lambda tmp: write_parquet_frames(frames, tmp)) as staged:
            yield staged

    def read_slice(self, name: str, offset: int, length: int) -> pl.DataFrame:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(self.location(name))
        return pl.scan_parquet(path).slice(offset, length).collect()


def _flock(fd: int, blocking: bool) -> bool:
    """An exclusive ``flock`` on ``fd``: False when another process holds it (non-blocking) or the file system has
    none (then no file counts as dead: leftovers stay, a live run's file is never taken)."""
    if sys.platform == "win32":
        return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _owned(tmp: Path) -> Iterator[None]:
    """Create ``tmp`` and hold an exclusive lock on it for the block; the system drops the lock when the process
    dies, so a file whose lock is free was left by a dead run. A sweep that took the name between the create and
    the lock (it removes what it locks) is seen by the name no longer being this file, and the file is made again."""
    for _ in range(3):
        with tmp.open("xb") as fh:
            if not _flock(fh.fileno(), blocking=True):
                yield  # no locks here: sweeps leave every file
                return
            with contextlib.suppress(FileNotFoundError):
                if os.stat(tmp).st_ino == os.fstat(fh.fileno()).st_ino:
                    yield
                    return
    raise OSError(errno.EAGAIN, f"{tmp.name} was removed as it was made, three times")


def _remove_if_dead(left: Path) -> None:
    """Remove a hidden snapshot file whose run died (its lock is free); one a live run holds stays."""
    try:
        with left.open("rb") as fh:
            if _flock(fh.fileno(), blocking=False):
                left.unlink(missing_ok=True)  # under its lock: a run making it anew sees the name go
    except FileNotFoundError:
        return


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


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


def _write_whole(frame: pl.DataFrame, target: Path) -> int:
    write_parquet(frame, target)
    return frame.height
