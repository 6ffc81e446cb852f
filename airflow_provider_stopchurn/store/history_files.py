"""The history's files: one JSON file per run record, named to sort by time, bounded to the newest records.

What a record holds, and when a run writes one, is :mod:`airflow_provider_stopchurn.store.history`; this module
only stores and reads the records of one table.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from airflow_provider_stopchurn.store.folder import VERSION_TIME, TableFolder, new_version
from airflow_provider_stopchurn.store.lock_records import loose_json

#: How many run records the history keeps (the oldest beyond it are removed when a run is appended).
HISTORY_LIMIT = 1000
_HISTORY = "history"


def _history_name(names: Sequence[str]) -> str:
    """A history record's file name, sorting after every name in ``names`` (the history's, sorted).

    Names sort by time, and readers take the last as the newest: a worker whose clock is behind another's (or
    was set back) names its record one microsecond after the newest, not before it, where pruning would remove it
    first and every reader would show an older run as the last."""
    name = new_version()
    newest = names[-1] if names else ""
    match = VERSION_TIME.match(newest)
    if match is not None and newest >= name:
        try:
            after = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%f") + timedelta(microseconds=1)
        except (ValueError, OverflowError):  # a name no clock makes (year 9999): this record is still written
            return f"{name}.json"
        name = after.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]
    return f"{name}.json"


class RunHistory(TableFolder):
    """The store's part that keeps the history of runs (a base of ``SnapshotStore``)."""

    #: records kept by :meth:`append_history` (a class default; a store may set its own)
    history_limit: int = HISTORY_LIMIT

    def append_history(self, record: Mapping[str, Any], *, prune: bool = True) -> str:
        """Add one run's record to the history and return its file's location; keep the newest ``history_limit``.

        One small JSON file per record, ``history/<time>-<random>.json`` (names sort by time, each after the
        newest already there whatever this machine's clock says), written whole (a
        temporary file and a rename locally, one PUT on an object store): object stores cannot append, and a
        crash leaves either the whole record or none. Records beyond the bound are removed oldest first, after
        the write; a crash in between only leaves a few extra records, removed by the next append.

        :param prune: remove the records beyond the bound. False for a run that does not hold the table's lock
            (it was busy): it adds its own file and touches nothing else (the next run holding it prunes), unless
            the history already holds twice the bound; then it removes the oldest records beyond twice the bound.
        """
        names = self._history_names()
        name = f"{_HISTORY}/{_history_name(names)}"
        self._write_json(name, dict(record))
        # A run without the lock leaves pruning to the next run holding it, unless runs without it pile up (the
        # lock held for long while a frequent DAG keeps failing on it): then it trims to twice the bound, records
        # the holder would remove anyway, so the history stays bounded whoever writes it.
        limit = max(1, int(self.history_limit)) * (1 if prune else 2)
        names = self._history_names() if prune or len(names) >= limit else []
        for old in names[: max(0, len(names) - limit)]:
            self._backend.delete(f"{_HISTORY}/{old}")
        return self._backend.location(name)

    def read_history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` records of the history (all when None), newest first.

        A record that cannot be read (removed by a concurrent append's pruning, or damaged) is skipped.
        """
        names = self._history_names()
        records: list[dict[str, Any]] = []
        for name in reversed(names):
            if limit is not None and len(records) >= limit:
                break
            # an unreadable record is passed over, not counted: the newest ``limit`` are the newest readable
            record = loose_json(self._backend.read_bytes(f"{_HISTORY}/{name}"))
            if record is not None:
                records.append(record)
        return records

    def _history_names(self) -> list[str]:
        return [n for n in self._backend.list_names(_HISTORY) if n.endswith(".json")]
