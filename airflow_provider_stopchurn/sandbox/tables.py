"""The sandbox's memory: tables, events, the log of applied updates and the request counters, with StopChurn's
update semantics (an insert or an update replaces the row of its ``id``, a delete removes it).

Nothing here locks: :class:`~airflow_provider_stopchurn.sandbox.server.SandboxServer` holds its lock around
every call, so that one request's changes and counts are seen whole.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_stopchurn.sandbox.contract import _Op
from airflow_provider_stopchurn.sandbox.faults import FAULT_KINDS

#: A row's key in its table: (type name of the id, id), so that ``1`` and ``"1"`` stay two rows.
RowKey = tuple[str, Any]


@dataclass
class _Counters:
    requests: int = 0
    accepted_requests: int = 0
    rejected_requests: int = 0
    unauthorized: int = 0
    too_large_requests: int = 0
    insert: int = 0
    update: int = 0
    delete: int = 0
    events: int = 0
    historical_files: int = 0
    historical_rows: int = 0
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))


class _Tables:
    """Tables by ``(brandId, tableName)``, events by brand, the recorded updates and the counters."""

    def __init__(self) -> None:
        self.tables: dict[tuple[int, str], dict[RowKey, dict[str, Any]]] = {}
        self.events: dict[int, list[dict[str, Any]]] = {}
        self.received: list[tuple[str, int, str, Any]] = []
        self.counters = _Counters()

    def clear(self) -> None:
        """Forget tables, events, recorded updates and counters."""
        self.tables.clear()
        self.events.clear()
        self.received.clear()
        self.counters = _Counters()

    def apply_updates(self, ops: list[_Op], *, record: bool, freeze_gc: bool) -> None:
        """Apply one validated update batch in order.

        :param ops: the batch's operations, as the contract check returns them.
        :param record: append each update to :attr:`received`.
        :param freeze_gc: move every object out of the cyclic collector's reach afterwards (``gc.freeze()``).
        """
        counters = self.counters
        tables = self.tables
        received = self.received if record else None
        last_name: tuple[int, str] | None = None
        table: dict[RowKey, dict[str, Any]] = {}
        for kind, brand_id, table_name, key, row in ops:
            if last_name != (brand_id, table_name):
                last_name = (brand_id, table_name)
                table = tables.setdefault(last_name, {})
            if kind == "delete":
                table.pop(key, None)
                counters.delete += 1
            else:
                table[key] = row
                if kind == "insert":
                    counters.insert += 1
                else:
                    counters.update += 1
            if received is not None:
                received.append((kind, brand_id, table_name, key[1]))
        if freeze_gc:
            gc.freeze()

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """Keep one validated event batch, in arrival order per brand.

        :param events: the batch's events, as the contract check returns them.
        """
        for event in events:
            self.events.setdefault(event["brandId"], []).append(event)
        self.counters.events += len(events)

    def apply_historical(
        self, brand_id: int, table_name: str, rows: list[tuple[RowKey, dict[str, Any]]], *, record: bool
    ) -> None:
        """Upsert every row of one validated historical-upload file into its table, by ``id``.

        :param brand_id: the brand of the table.
        :param table_name: the table.
        :param rows: the file's rows as ``(key, row)``.
        :param record: append each row to :attr:`received` as a ``historical`` update.
        """
        table = self.tables.setdefault((brand_id, table_name), {})
        for key, row in rows:
            table[key] = row
            if record:
                self.received.append(("historical", brand_id, table_name, key[1]))
        self.counters.historical_files += 1
        self.counters.historical_rows += len(rows)

    def rows(self, brand_id: int, table_name: str) -> list[dict[str, Any]]:
        """Rows of a table, sorted by (type name of the id, id); copies.

        :param brand_id: the brand of the table.
        :param table_name: the table.
        :return: the rows; empty for an unknown table.
        """
        table = self.tables.get((brand_id, table_name), {})
        return [dict(table[key]) for key in sorted(table)]

    def events_of(self, brand_id: int) -> list[dict[str, Any]]:
        """Accepted events of a brand, in arrival order (copies).

        :param brand_id: the brand.
        :return: the events; empty for an unknown brand.
        """
        return [dict(event) for event in self.events.get(brand_id, [])]

    def stats(self) -> dict[str, Any]:
        """The counters in the shape of :meth:`SandboxServer.stats`."""
        c = self.counters
        return {
            "requests": c.requests,
            "accepted_requests": c.accepted_requests,
            "rejected_requests": c.rejected_requests,
            "unauthorized": c.unauthorized,
            "too_large_requests": c.too_large_requests,
            "updates": {"insert": c.insert, "update": c.update, "delete": c.delete},
            "events": c.events,
            "historical": {"files": c.historical_files, "rows": c.historical_rows},
            "faults": dict(c.faults),
        }
