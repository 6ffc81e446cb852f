"""The snapshot store of one brand/table: its parts joined in one class, and how a run takes the table's lock.

:class:`SnapshotStore` is what the engines and the on-call commands use. Its methods come from its parts, one
module each: the committed snapshot (:mod:`.committed`), the plan in flight and its acknowledgements
(:mod:`.plans`), the quarantine (:mod:`.quarantine`) and the history's files (:mod:`.history_files`), all over the
table's folder (:mod:`.folder`). The layout and the crash-safety rules are described in the docstring of
:mod:`airflow_provider_stopchurn.store`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotLockedError
from airflow_provider_stopchurn.store.backend_common import StagedFile
from airflow_provider_stopchurn.store.committed import CommittedSnapshots
from airflow_provider_stopchurn.store.folder import new_version, snapshot_name
from airflow_provider_stopchurn.store.history_files import RunHistory
from airflow_provider_stopchurn.store.lock import TableLock
from airflow_provider_stopchurn.store.lock_records import loose_json
from airflow_provider_stopchurn.store.plans import PlanLedger
from airflow_provider_stopchurn.store.quarantine import Quarantine

log = logging.getLogger(__name__)

_LOCK_POLL_FIRST_S = 1.0  # a run waiting for the lock looks again after this, then twice as long each time
_LOCK_POLL_MAX_S = 15.0


class SnapshotStore(CommittedSnapshots, PlanLedger, Quarantine, RunHistory):
    """Committed snapshot, in-flight plan, chunk ledger, lock and quarantine of one brand/table.

    :param root: the snapshot location: a :class:`pathlib.Path`, or an ``ObjectStoragePath`` / UPath.
    :param brand_id: the StopChurn brand; with ``table_name`` it names the table's folder under ``root``.
    :param table_name: the StopChurn table.

    The constructor does no I/O.
    """

    def __repr__(self) -> str:
        return f"SnapshotStore({self.location!r})"

    @contextlib.contextmanager
    def staged_snapshot(self, frames: Iterable[pl.DataFrame]) -> Iterator[StagedSnapshot]:
        """Write a snapshot file from frames of one schema as they come (as :meth:`write_snapshot_frames`), but
        only aside: :meth:`StagedSnapshot.publish` puts it under its version, after which a pointer may name it.
        Leaving the block without publishing drops it, so a run that finds nothing to change writes nothing to the
        store.

        :param frames: the snapshot's rows (at least one frame, possibly empty: it gives the schema).
        """
        version = new_version()
        with self._backend.stage_frames(snapshot_name(version), frames) as staged:
            yield StagedSnapshot(version, staged)

    def table_lock(self, holder: str, *, ttl_s: float = 3600.0, heartbeat_s: float | None = None) -> TableLock:
        """A lock on this table for ``holder``, not yet acquired."""
        return TableLock(
            self._backend, holder, ttl_s=ttl_s, label=f"{self.brand_id}/{self.table_name}", heartbeat_s=heartbeat_s
        )

    @contextlib.contextmanager
    def lock(
        self, holder: str, *, ttl_s: float = 3600.0, heartbeat_s: float | None = None, wait_s: float = 0.0
    ) -> Iterator[TableLock]:
        """Hold the table's lock for the block.

        While another run holds it, this waits up to ``wait_s`` seconds, polling with a growing pause (1 s, then
        up to 15 s apart), then raises the last :class:`SnapshotLockedError`, which names the holder. The lock is
        not refreshed by itself: call ``refresh()`` on progress, or run ``with lock.heartbeat():``.
        """
        table_lock = self.table_lock(holder, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
        _acquire_waiting(table_lock, wait_s)
        try:
            yield table_lock
        finally:
            table_lock.release()

    def read_lock(self) -> dict[str, Any] | None:
        """The LOCK record, or None when there is none (or it is unreadable: its writer died mid-write)."""
        return loose_json(self._backend.read_bytes("LOCK"))

    def break_lock(self, token: str | None = None) -> bool:
        """Remove the lock. Safe only when the run holding it is known to be dead (or must be stopped).

        :param token: remove it only while it still holds this lease (the ``token`` of a LOCK record read
            before), through the lock's claim protocol: a run that took the table meanwhile keeps it. None
            removes whatever is there.
        :return: whether a lock was removed (always True without ``token``).
        """
        if token is None:
            self._backend.delete("LOCK")
            return True
        return self.table_lock("stopchurn unlock").break_lease(token)


@dataclass(frozen=True)
class StagedSnapshot:
    """A snapshot written aside (:meth:`SnapshotStore.staged_snapshot`), not yet in the store's ``snapshots/``."""

    #: the version it is published under
    version: str
    file: StagedFile

    @property
    def rows(self) -> int:
        return self.file.rows

    @property
    def published(self) -> bool:
        return self.file.published

    def publish(self) -> None:
        """Put it under its version, durable (an object store: uploaded); a second call does nothing."""
        self.file.publish()


def _acquire_waiting(table_lock: TableLock, wait_s: float) -> None:
    started = time.monotonic()
    pause = _LOCK_POLL_FIRST_S
    while True:
        try:
            table_lock.acquire()
            return
        except SnapshotLockedError as err:
            waited = time.monotonic() - started
            if waited >= wait_s:
                if wait_s <= 0:
                    raise
                raise SnapshotLockedError(f"{err}\nWaited {waited:.0f} s for it (lock_wait_s={wait_s:g}).") from None
            if pause == _LOCK_POLL_FIRST_S:
                log.warning("%s\nWaiting up to %.0f s for it (lock_wait_s).", err, wait_s)
            time.sleep(min(pause * random.uniform(0.8, 1.2), wait_s - waited))
            pause = min(pause * 2, _LOCK_POLL_MAX_S)
