"""The quarantine: the rows StopChurn still rejects, one file per settled plan, and the per-row failure counts.

Each settled plan writes the rows still rejected, whole, as ``quarantine/<plan_id>.jsonl``; the newest file is the
quarantine (an empty one: nothing is rejected any more), older ones are removed once older than the retention.
``quarantine/failures.json`` holds, per row, the tries whose request failed with a retryable error (a hint for
isolating rows, see :mod:`airflow_provider_stopchurn.update.deliver`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from airflow_provider_stopchurn.store.folder import (
    TableFolder,
    json_lines,
    new_version,
    plan_dir,
    read_json_lines,
    version_time,
)
from airflow_provider_stopchurn.store.lock_records import loose_json

#: How long a quarantine file is kept once a newer one holds the rows still rejected: 7 days.
QUARANTINE_RETENTION_S = 7 * 86_400.0
_FAILURES = "quarantine/failures.json"


def _quarantine(plan_id: str) -> str:
    return f"quarantine/{plan_id}.jsonl"


def _staged(plan_id: str) -> str:
    return f"{plan_dir(plan_id)}/quarantine.jsonl"


def _id_key(value: Any) -> str:
    """A row id as one text, its type kept (``1`` and ``"1"`` are different rows at StopChurn)."""
    return json.dumps(value, sort_keys=True, default=str)


class Quarantine(TableFolder):
    """The store's part that keeps the rows still rejected and the rows' failure counts (a base of
    ``SnapshotStore``)."""

    #: seconds an older quarantine file is kept after a newer one replaced it (a class default)
    quarantine_retention_s: float = QUARANTINE_RETENTION_S

    def write_quarantine(self, plan_id: str, records: Sequence[Mapping[str, Any]]) -> str | None:
        """Record the rows still rejected once ``plan_id`` is settled; return the file holding them (None: none).

        The still-rejected rows are ``records`` (this plan's refusals) plus the earlier ones this plan did not
        resolve: those the delivery staged with :meth:`stage_quarantine`, or, for a plan settled without it (after a
        crash), every earlier row not refused again here. They are written whole as ``quarantine/<plan_id>.jsonl``;
        the newest file is the quarantine, an empty one says that nothing is rejected any more. Older files are
        removed once older than :attr:`quarantine_retention_s`.
        """
        staged = self._backend.read_bytes(_staged(plan_id))
        if staged is not None:
            earlier = read_json_lines(staged, self._backend.location(_staged(plan_id)))
        else:
            earlier = self.read_quarantine()
        refused = {_id_key(r.get("id")) for r in records}
        rows = [dict(r) for r in records] + [r for r in earlier if _id_key(r.get("id")) not in refused]
        return self._publish_quarantine(_quarantine(plan_id), rows)

    def stage_quarantine(self, plan_id: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Keep, with plan ``plan_id``, the earlier rejected rows its delivery did not resolve (read at its settle)."""
        self._backend.write_bytes(_staged(plan_id), json_lines(records), durable=True)

    def clear_quarantine(self) -> None:
        """Nothing is rejected any more (the source equals the committed snapshot): say so, and apply the retention.

        Also forgets the per-row failure counts: no row has a change left to deliver.
        """
        self._publish_quarantine(_quarantine(new_version()), [])
        if self._backend.exists(_FAILURES):
            self._backend.delete(_FAILURES)

    def _publish_quarantine(self, name: str, rows: Sequence[Mapping[str, Any]]) -> str | None:
        files = self.quarantine_files()
        newest_empty = not files or not self._backend.read_bytes(f"quarantine/{files[-1]}")
        if rows or not newest_empty:
            self._backend.write_bytes(name, json_lines(rows), durable=True)
        self._prune_quarantine()
        return self._backend.location(name) if rows else None

    def _prune_quarantine(self) -> None:
        """Remove quarantine files older than the retention, never the newest (it is the quarantine)."""
        cutoff = datetime.now(UTC).timestamp() - float(self.quarantine_retention_s)
        for name in self.quarantine_files()[:-1]:
            written = version_time(name)
            if written is not None and written < cutoff:
                self._backend.delete(f"quarantine/{name}")

    def quarantine_files(self) -> list[str]:
        """Names of the quarantine files, oldest first (plan ids sort by time)."""
        return [n for n in self._backend.list_names("quarantine") if n.endswith(".jsonl")]

    def read_quarantine(self, *, all_files: bool = False) -> list[dict[str, Any]]:
        """The rows still rejected: the records of the newest quarantine file ([] when there is none); with
        ``all_files``, of every file kept (the retention's), newest last."""
        files = self.quarantine_files()
        if not all_files:
            files = files[-1:]
        records: list[dict[str, Any]] = []
        for name in files:
            records += self.read_quarantine_file(name)
        return records

    def read_quarantine_file(self, name: str) -> list[dict[str, Any]]:
        """The records of one quarantine file (a name from :meth:`quarantine_files`); [] when it is gone."""
        raw = self._backend.read_bytes(f"quarantine/{name}")
        return read_json_lines(raw or b"", self._backend.location(f"quarantine/{name}"))

    def read_row_failures(self) -> dict[str, dict[str, Any]]:
        """Per row (by id text) how many tries its request failed with a retryable error, and whether it failed
        alone (``deliver.next_failures``); {} when none. An unreadable file counts as none (it is only a hint)."""
        data = loose_json(self._backend.read_bytes(_FAILURES))
        rows = (data or {}).get("rows")
        return {str(k): dict(v) for k, v in rows.items() if isinstance(v, dict)} if isinstance(rows, dict) else {}

    def write_row_failures(self, rows: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the per-row failure counts (removes the file when there are none)."""
        if not rows:
            if self._backend.exists(_FAILURES):
                self._backend.delete(_FAILURES)
            return
        self._write_json(_FAILURES, {"rows": {k: dict(v) for k, v in rows.items()}})
