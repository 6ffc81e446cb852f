"""The committed snapshot: the CURRENT pointer, the immutable snapshot files, and the commit that moves CURRENT.

A snapshot file is written once (:meth:`CommittedSnapshots.write_snapshot`) and becomes what was last delivered
only when :meth:`CommittedSnapshots.commit` writes CURRENT, after checking that CURRENT still names the snapshot
the run started from. The rules are in the docstring of :mod:`airflow_provider_stopchurn.store`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError, SnapshotLockedError, StopChurnConfigError
from airflow_provider_stopchurn.store.folder import TableFolder, new_version, snapshot_name, version_time
from airflow_provider_stopchurn.store.lock import TableLock

log = logging.getLogger(__name__)


class Committed:
    """The committed snapshot: what describes it, and its table as last delivered, read on demand."""

    def __init__(  # noqa: PLR0913 - keyword-only fields of the CURRENT pointer
        self,
        store: CommittedSnapshots,
        *,
        kinds: dict[str, str],
        key_columns: Sequence[str],
        version: str,
        committed_at: str = "",
        rows: int | None = None,
        row_hash: str | None = None,
        plan_id: str | None = None,
        run: dict[str, Any] | None = None,
        frame: pl.DataFrame | None = None,
        state: dict[str, Any] | None = None,
        shape: dict[str, Any] | None = None,
    ) -> None:
        """:param run: what the run that committed it had delivered (``SyncSummary`` counts and its ``run_key``).
        :param frame: the table itself when it is already in memory (a dry run's preview of a settled plan).
        :param state: what the committing engine keeps beside the table (the event engine's watermark), or None.
        :param shape: the shape options (``options.SHAPE_OPTIONS``) its rows were sent with; None when not recorded.
        """
        self.store = store
        self.kinds = kinds
        self.key_columns = tuple(key_columns)
        self.version = version
        self.committed_at = committed_at
        self.rows = rows
        self.row_hash = row_hash
        self.plan_id = plan_id
        self.run = run
        self.state = state
        self.shape = shape
        self._frame: pl.DataFrame | None = frame
        #: the key columns as the check of the file read them, kept for the first caller asking for them
        self._keys: pl.DataFrame | None = None

    @property
    def frame(self) -> pl.DataFrame:
        """The whole snapshot (read once, then kept)."""
        if self._frame is None:
            self._keys = None  # kept keys serve only the next read (see :meth:`columns`)
            self._frame = self.store.read_snapshot(self.version)
        return self._frame

    def rows_with_keys(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The snapshot's rows whose key is in ``keys`` (a frame of key columns)."""
        if self._frame is not None:
            return self._frame.join(keys, on=keys.columns, how="semi")
        return self.store.read_rows(self.version, keys)

    def rows_at(self, positions: np.ndarray) -> pl.DataFrame:
        """The snapshot's rows at ``positions`` (row numbers, ascending, each once), in snapshot order.

        :param positions: the rows' numbers in the snapshot (``BASE_ROW``).
        """
        if self._frame is not None:
            return self._frame[positions]
        return self.store.read_rows_at(self.version, positions)

    def keep_keys(self, keys: pl.DataFrame) -> None:
        """Keep the key columns read from the file for the next :meth:`columns` call, if it asks for them.

        :param keys: the snapshot's key columns, as read from its file.
        """
        self._keys = keys

    def columns(self, names: Sequence[str]) -> pl.DataFrame:
        """Only some columns of the snapshot (Parquet reads just those).

        The key columns kept by ``read_committed(keep_keys=True)`` serve only the next call: handed to it if it asks
        for them, else dropped before it reads (a plan by other key columns never asks for them, and they would stay
        in memory beside its own for as long as the snapshot is held).
        """
        kept, self._keys = self._keys, None
        if self._frame is not None:
            return self._frame.select(names)
        if kept is not None and tuple(names) == self.key_columns:
            return kept
        del kept
        return self.store.read_snapshot(self.version, columns=names)


class CommittedSnapshots(TableFolder):
    """The store's part that reads, writes and commits snapshots (a base of ``SnapshotStore``)."""

    def read_current(self) -> dict[str, Any] | None:
        """The CURRENT pointer as written at the last commit (version, rows, kinds, key columns, committed_at,
        plan_id, run), or None before the first commit. Unlike :meth:`read_committed`, the snapshot file is not
        opened.
        """
        return self._read_json("CURRENT")

    def read_committed(self, *, keep_keys: bool = False) -> Committed | None:
        """The committed snapshot, or None before the first commit.

        The file is checked by reading its key columns. ``keep_keys`` keeps them for the diff that follows (its
        next ``columns`` call, when that asks for the key columns), instead of reading them again (on an object
        store, a second download of the file). Callers that read a large source first leave it False, so the keys
        are not held while the source is.
        """
        pointer = self._read_json("CURRENT")
        if pointer is None:
            return None
        if (pointer.get("state") or {}).get("diff_location") == "warehouse":
            raise StopChurnConfigError(
                f"Brand {self.brand_id} table {self.table_name!r} is diffed in the warehouse (its state table is "
                f"{pointer['state'].get('state_table')}); the worker diff cannot continue it. Keep "
                "diff_location='warehouse', or run `stopchurn reconcile --reset` and start again with "
                "initial_load='baseline' (docs: the diff in the warehouse)."
            )
        committed = Committed(
            self,
            kinds=dict(pointer["kinds"]),
            key_columns=tuple(pointer["key_columns"]),
            version=str(pointer["version"]),
            committed_at=str(pointer.get("committed_at", "")),
            rows=pointer.get("rows"),
            row_hash=pointer.get("row_hash"),
            plan_id=pointer.get("plan_id"),
            run=pointer.get("run"),
            state=pointer.get("state"),
            shape=pointer.get("shape"),
        )
        keys = committed.columns(list(committed.key_columns))  # fail now, not mid-plan, if the file is unreadable
        if keep_keys:
            committed.keep_keys(keys)
        return committed

    def write_snapshot(self, frame: pl.DataFrame) -> str:
        """Write an immutable snapshot file and return its version (not yet committed)."""
        version = new_version()
        self._backend.write_frame(snapshot_name(version), frame)
        return version

    def write_snapshot_frames(self, frames: Iterable[pl.DataFrame]) -> tuple[str, int]:
        """Write an immutable snapshot file from frames of one schema as they come (the same file as
        :meth:`write_snapshot` of their concatenation, never held whole); return its version and rows."""
        version = new_version()
        rows = self._backend.write_frames(snapshot_name(version), frames)
        return version, rows

    def read_snapshot_slice(self, version: str, offset: int, length: int) -> pl.DataFrame:
        """``length`` rows of a snapshot from row ``offset``, decoding only the row groups holding them."""
        name = snapshot_name(version)
        with self._reading_frame(name):
            return self._backend.read_slice(name, offset, length)

    def read_snapshot(self, version: str, *, columns: Sequence[str] | None = None) -> pl.DataFrame:
        return self._read_frame(snapshot_name(version), columns)

    def read_rows_at(self, version: str, positions: np.ndarray) -> pl.DataFrame:
        """Rows of a snapshot at ``positions`` (ascending, each once), decoding only the row groups holding them."""
        name = snapshot_name(version)
        with self._reading_frame(name):
            return self._backend.read_rows_at(name, positions)

    def read_rows(self, version: str, keys: pl.DataFrame) -> pl.DataFrame:
        """Rows of a snapshot whose key is in ``keys``, decoded one row group at a time (never the whole table)."""
        name = snapshot_name(version)
        with self._reading_frame(name):
            return self._backend.read_rows(name, keys)

    def delete_snapshot(self, version: str) -> None:
        """Remove a snapshot file that no pointer names (one replaced before its commit)."""
        self._backend.delete(snapshot_name(version))

    def commit(  # noqa: PLR0913 - keyword-only fields of the CURRENT pointer
        self,
        version: str,
        *,
        base_version: str | None,
        kinds: dict[str, str],
        key_columns: Sequence[str],
        rows: int,
        plan_id: str | None,
        row_hash: str | None = None,
        lock: TableLock | None = None,
        run: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
        shape: Mapping[str, Any] | None = None,
        frame: pl.DataFrame | None = None,
    ) -> None:
        """Publish ``version`` as the committed snapshot, then forget the plan and the replaced snapshot.

        A snapshot file of this store (``state`` None: not a warehouse state table, not an event ledger) must hold
        each key once: one holding a key twice is refused with :class:`SnapshotError` and nothing is written, so
        the committed snapshot stays the last good one and the next run diffs (or settles) against it.

        :param base_version: the committed version this run started from (None: there was none). If CURRENT no
            longer names it, another run committed meanwhile: :class:`SnapshotError`, and nothing is written.
        :param plan_id: the plan this commit finishes (recorded in CURRENT; its files are then removed).
        :param row_hash: names the function that made the row-hash columns (hashes compare only when it matches).
        :param lock: the run's lock; checked first (:class:`SnapshotLockedError` if another run took it over).
        :param run: what the committing run delivered so far (kept in CURRENT, so a later try of the same run can
            report the run's whole delivery).
        :param state: engine state committed with the snapshot (kept in CURRENT only when given).
        :param shape: the shape options the snapshot's rows were sent with (``options.SHAPE_OPTIONS``).
        :param frame: the snapshot's table when the caller holds it in memory (its keys are checked there instead
            of reading the file back).
        """
        if lock is not None:
            lock.check()
        if state is None:
            self._check_unique_keys(version, key_columns, frame)
        previous = self._read_json("CURRENT")
        current_version = None if previous is None else previous.get("version")
        if current_version != base_version:
            raise SnapshotError(
                f"The committed snapshot of {self.brand_id}/{self.table_name} moved from {base_version!r} to "
                f"{current_version!r} while this run was working; nothing was committed. The next run diffs "
                "against the new snapshot."
            )
        self._write_json(
            "CURRENT",
            {
                "version": version,
                "kinds": kinds,
                "key_columns": list(key_columns),
                "rows": rows,
                "row_hash": row_hash,
                "committed_at": datetime.now(UTC).isoformat(),
                "plan_id": plan_id,
                "brand_id": self.brand_id,
                "table_name": self.table_name,
                "run": dict(run) if run is not None else None,
                **({"state": dict(state)} if state is not None else {}),
                **({"shape": dict(shape)} if shape is not None else {}),
            },
        )
        if plan_id is not None:
            self._forget_plan(plan_id)
        if current_version is not None and current_version != version:
            self._backend.delete(snapshot_name(str(current_version)))
        if lock is not None:
            self._sweep_unnamed(version, lock)

    def _sweep_unnamed(self, version: str, lock: TableLock) -> None:
        """Delete the snapshot files no pointer names that were made before this run took the lock: a run killed
        after publishing its target but before its plan named it, or killed part way through an upload to a store
        that shows an object while it is written (a folder, SFTP). Nothing reads them, and without this nothing
        would remove them: every such kill would leave a part of the table's size behind.

        Only the lock's holder sweeps, after its commit, and only files older than its lock (by their versions'
        time): a file made since is a run's that took the lock after this one lost it. Best effort: the commit is
        done, so a failure here is logged and the next commit sweeps again."""
        since = lock.acquired_at
        if since is None:
            return
        try:
            keep = {f"{version}.parquet"}
            plan = self._read_json("PLAN")  # a plan the next run settles or discards keeps its target until then
            if plan is not None and plan.get("target_version"):
                keep.add(f"{plan['target_version']}.parquet")
            lock.check()
            for name in self._backend.list_names("snapshots"):
                made = version_time(name)
                if name in keep or not name.endswith(".parquet") or made is None or made >= since:
                    continue
                log.info("Removing %s: a snapshot file no run finished (its run died before a plan named it).", name)
                self._backend.delete(f"snapshots/{name}")
        except SnapshotLockedError:
            log.info("Left the unfinished snapshot files for the next run: this run no longer holds the lock.")
        except Exception as err:  # the commit is done: only tidying failed
            log.warning("Could not remove unfinished snapshot files (the next commit tries again): %s", err)

    def _check_unique_keys(self, version: str, key_columns: Sequence[str], frame: pl.DataFrame | None) -> None:
        """Refuse a snapshot file that holds a key twice (a diff against it could not pair rows with keys)."""
        names = list(key_columns)
        keys = frame.select(names) if frame is not None else self.read_snapshot(version, columns=names)
        # counting distinct keys costs about half of marking the repeated ones; mark them only to name them
        distinct = keys.to_series().n_unique() if len(names) == 1 else keys.n_unique()
        if distinct == keys.height:
            return
        twice = keys.filter(keys.is_duplicated()).unique(maintain_order=True)
        if twice.height:
            shown = ", ".join(repr(row[0] if len(row) == 1 else row) for row in twice.head(5).rows())
            raise SnapshotError(
                f"Refused to commit a snapshot of {self.brand_id}/{self.table_name} that holds a key twice; nothing "
                "was committed.\n"
                f"{twice.height} key(s) of {list(key_columns)} appear more than once, e.g. {shown}. The committed "
                "snapshot stays as it was, so the next run diffs the source against it and sends what it lacks."
            )

    def forget_current(self, *, lock: TableLock | None = None) -> None:
        """Remove ``CURRENT`` and the snapshot it names: the table is unknown again (``stopchurn reconcile --reset``
        of a warehouse-diffed table). The history and quarantine files stay."""
        if lock is not None:
            lock.check()
        previous = self._read_json("CURRENT")
        self._backend.delete("CURRENT")
        if previous is not None and previous.get("version"):
            self._backend.delete(snapshot_name(str(previous["version"])))
