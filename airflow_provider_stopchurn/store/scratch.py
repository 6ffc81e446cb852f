"""Private temporary folders on the worker, for files that hold a source's rows while a run lives (a streamed run's
spool, a snapshot written locally before its upload to an object store). No Airflow import.

A folder is removed on every exit its process lives through. A process killed outright (the OOM killer, SIGKILL
after Airflow's grace period) runs no cleanup and would leave the rows on the worker's disk, so each folder holds an
exclusive lock on its ``owner.lock`` while its process lives (the system drops it when the process dies), and each
new folder first removes those whose lock is free. A folder is made under another name and renamed once its lock
is held, so a sweep never takes a folder whose owner is still starting.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from airflow_provider_stopchurn.exceptions import SnapshotError

__all__ = ["SCRATCH_PREFIX", "scratch_folder", "scratch_write_error"]

#: the names of the folders, in the system's temporary directory (``TMPDIR``)
SCRATCH_PREFIX = "stopchurn-scratch-"
_STARTING = f".{SCRATCH_PREFIX}new-"
_OWNER = "owner.lock"


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new private folder (mode 0700) for the block, removed after it; dead runs' folders are removed first."""
    _sweep()
    made = Path(tempfile.mkdtemp(prefix=_STARTING))
    try:
        with (made / _OWNER).open("wb") as owner:
            if sys.platform != "win32":
                import fcntl

                fcntl.flock(owner.fileno(), fcntl.LOCK_EX)
            folder = made.with_name(SCRATCH_PREFIX + made.name.removeprefix(_STARTING))
            made.rename(folder)
            made = folder
            yield folder
    finally:
        shutil.rmtree(made, ignore_errors=True)


def scratch_write_error(folder: Path, err: OSError) -> SnapshotError:
    """The error of a write into a scratch folder that failed (most often a full temporary disk).

    The whole worker path writes nothing there; a streamed run writes about the source's canonical size, so the
    message names the directory and what to change.
    """
    return SnapshotError(
        f"Cannot write the run's temporary files in {folder.parent}: {err.__class__.__name__}: {err}.\n"
        "A streamed run spools the source there (about its uncompressed size) before it diffs it. Free space there, "
        "point TMPDIR at a larger disk, or set STOPCHURN_WORKER_STREAM=never to read the source into memory."
    )


def _sweep() -> None:
    """Remove the folders of processes that died (their owner lock is free); a live process holds its lock."""
    if sys.platform == "win32":
        return
    import fcntl

    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            with (folder / _OWNER).open("rb") as owner:
                fcntl.flock(owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # held by a live process, another user's, or gone already
            continue
