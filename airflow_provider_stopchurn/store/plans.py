"""The plan in flight: the PLAN pointer, its change set and chunks, and the acknowledgements StopChurn gave them.

A plan is written durably before its first request (:meth:`PlanLedger.write_plan`), its later chunks before
theirs (:meth:`PlanLedger.add_chunks`); each chunk StopChurn acknowledged is one file with the records it rejected
(:meth:`PlanLedger.ack`), so a run after a crash settles exactly what was delivered. The rules are in the
docstring of :mod:`airflow_provider_stopchurn.store`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError
from airflow_provider_stopchurn.store.folder import (
    TableFolder,
    json_lines,
    new_version,
    plan_dir,
    read_json_lines,
    snapshot_name,
)
from airflow_provider_stopchurn.store.lock_records import loose_json

# the logger of the snapshot store, which users and tests filter on (a discarded plan is logged through it)
log = logging.getLogger("airflow_provider_stopchurn.store.snapshots")

_ACK_DIGITS = 7


def _ack_name(plan_id: str, chunk: int) -> str:
    return f"{plan_dir(plan_id)}/acks/{chunk:0{_ACK_DIGITS}d}"


@dataclass(frozen=True)
class Plan:
    """A plan written durably before its first request; ``meta`` holds what re-encoding it needs."""

    plan_id: str
    base_version: str | None
    target_version: str
    chunks: tuple[tuple[int, int], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def changes_from_target(self) -> bool:
        return bool(self.meta.get("changes_from_target"))


class PlanLedger(TableFolder):
    """The store's part that keeps the plan in flight and its chunk ledger (a base of ``SnapshotStore``)."""

    def write_plan(
        self,
        *,
        target_version: str,
        base_version: str | None,
        changes: pl.DataFrame | None,
        chunks: Sequence[tuple[int, int]],
        meta: dict[str, Any],
    ) -> Plan:
        """Make a plan durable: its change set first, then the PLAN pointer (written last)."""
        plan_id = new_version()
        meta = dict(meta, changes_from_target=changes is None)
        if changes is not None:
            self._backend.write_frame(f"{plan_dir(plan_id)}/changes.parquet", changes)
        plan = Plan(plan_id, base_version, target_version, tuple((int(a), int(b)) for a, b in chunks), meta)
        self._write_json(
            "PLAN",
            {
                "plan_id": plan_id,
                "base_version": base_version,
                "target_version": target_version,
                "chunks": [list(c) for c in plan.chunks],
                "meta": meta,
                "created_at": datetime.now(UTC).isoformat(),
            },
        )
        return plan

    def pending_plan(self, *, cleanup: bool = True) -> Plan | None:
        """The unfinished plan, if one exists and still applies to the committed snapshot.

        * no PLAN: None.
        * committed already (CURRENT records its ``plan_id``, or names its target): None; with ``cleanup`` its
          files are removed (a crash between writing CURRENT and deleting PLAN leaves this).
        * made against the committed snapshot: the plan, to resume or settle.
        * made against another snapshot: None; with ``cleanup`` it is discarded with a warning. Its changes are
          simply diffed again (may resend, never loses what the snapshot does not yet hold).

        ``cleanup=False`` (dry runs) never writes.
        """
        data = self._read_json("PLAN")
        if data is None:
            return None
        plan = Plan(
            plan_id=str(data["plan_id"]),
            base_version=data.get("base_version"),
            target_version=str(data["target_version"]),
            chunks=tuple((int(a), int(b)) for a, b in data["chunks"]),
            meta=dict(data.get("meta") or {}),
        )
        current = self._read_json("CURRENT")
        current_version = None if current is None else current.get("version")
        current_plan = None if current is None else current.get("plan_id")
        if current_plan == plan.plan_id or current_version == plan.target_version:
            if cleanup:
                self._backend.delete("PLAN")
                self._backend.delete_tree(plan_dir(plan.plan_id))
                if plan.target_version != current_version:  # replaced at commit (rejected rows left out)
                    self._backend.delete(snapshot_name(plan.target_version))
            return None
        if current_version != plan.base_version:
            if cleanup:
                log.warning(
                    "Discarding the pending plan %s in %s: it was made against snapshot %r but the committed "
                    "snapshot is %r. Its changes are diffed and sent again.",
                    plan.plan_id,
                    self.location,
                    plan.base_version,
                    current_version,
                )
                self.discard_plan(plan)
            return None
        return self._recorded_chunks(plan)

    def add_chunks(self, plan: Plan, first: int, chunks: Sequence[tuple[int, int]]) -> Plan:
        """Record the next chunks of a plan (numbered from ``first``) before any of them is sent.

        A plan is cut into chunks window by window as it is encoded; each window's ranges become durable in
        ``plans/<id>/chunks/<first>`` before its first request, so a settle after a crash knows every chunk that
        may have been sent. Returns the plan with the chunks added.
        """
        if first != len(plan.chunks):
            raise ValueError(
                f"Chunks of plan {plan.plan_id} must be added in order: got {first}, expected {len(plan.chunks)}."
            )
        ranges = tuple((int(a), int(b)) for a, b in chunks)
        name = f"{plan_dir(plan.plan_id)}/chunks/{first:0{_ACK_DIGITS}d}"
        self._backend.write_bytes(name, json.dumps([list(c) for c in ranges]).encode(), durable=True)
        return dataclasses.replace(plan, chunks=plan.chunks + ranges)

    def _recorded_chunks(self, plan: Plan) -> Plan:
        """The plan with the chunks recorded by :meth:`add_chunks` after its PLAN pointer was written."""
        folder = f"{plan_dir(plan.plan_id)}/chunks"
        extra: list[tuple[int, int]] = list(plan.chunks)
        for name in sorted(n for n in self._backend.list_names(folder) if n.isdigit()):
            if int(name) != len(extra):
                break  # a gap: chunks after it were never recorded in order (cannot happen; read no further)
            raw = self._backend.read_bytes(f"{folder}/{name}")
            if raw is None:
                break
            try:
                extra.extend((int(a), int(b)) for a, b in json.loads(raw))
            except (ValueError, TypeError) as err:
                raise SnapshotError(f"{self._backend.location(f'{folder}/{name}')} is corrupt: {err}") from err
        return dataclasses.replace(plan, chunks=tuple(extra))

    def read_changes(self, plan: Plan) -> pl.DataFrame:
        return self._read_frame(f"{plan_dir(plan.plan_id)}/changes.parquet")

    def ack(self, plan: Plan, chunk: int, rejections: Sequence[Mapping[str, Any]] = ()) -> None:
        """Record that StopChurn acknowledged ``chunk``, with the records it rejected inside it.

        One file per chunk, written whole (never half-visible); empty when nothing was rejected, else one JSON
        object per line. Acknowledging again replaces the record; chunks may be acknowledged in any order.
        """
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0, got {chunk}")
        data = json_lines(rejections)
        try:
            self._backend.write_bytes(_ack_name(plan.plan_id, chunk), data, durable=bool(data))
        except SnapshotError as err:
            raise SnapshotError(f"Cannot record an acknowledgement of plan {plan.plan_id}: {err}") from err

    def acks(self, plan: Plan) -> dict[int, list[dict[str, Any]]]:
        """Every acknowledged chunk of ``plan`` with the records rejected inside it ([] when none)."""
        folder = f"{plan_dir(plan.plan_id)}/acks"
        result: dict[int, list[dict[str, Any]]] = {}
        for name, size in sorted(self._backend.list_sizes(folder).items()):
            if not name.isdigit():
                continue
            records: list[dict[str, Any]] = []
            if size:
                raw = self._backend.read_bytes(f"{folder}/{name}")
                records = read_json_lines(raw or b"", self._backend.location(f"{folder}/{name}"))
            result[int(name)] = records
        return result

    def acked(self, plan: Plan) -> set[int]:
        """The acknowledged chunks of ``plan`` (a listing only; :meth:`acks` also reads the rejections)."""
        names = self._backend.list_names(f"{plan_dir(plan.plan_id)}/acks")
        return {int(n) for n in names if n.isdigit()}

    def delete_plan_files(self, plan: Plan) -> None:
        """Remove the plan's files (change set, ledger) and the PLAN pointer if it names this plan.

        The snapshots stay: use this once the plan is committed or settled; :meth:`discard_plan` also removes
        its target snapshot.
        """
        self._forget_plan(plan.plan_id)

    def discard_plan(self, plan: Plan) -> None:
        """Forget a plan that will never be committed: its pointer, its files and its target snapshot."""
        self._forget_plan(plan.plan_id)
        current = loose_json(self._backend.read_bytes("CURRENT"))
        if current is None or current.get("version") != plan.target_version:
            self._backend.delete(snapshot_name(plan.target_version))

    def record_failed_try(self, plan_id: str) -> int:
        """Record that one try of a plan ended with a retryable StopChurn failure; return how many tries did.

        One empty file per try under the plan's folder (an exclusive name, so concurrent writers cannot lose a
        count); the files go with the plan when it is settled or discarded.
        """
        folder = f"{plan_dir(plan_id)}/failed_tries"
        self._backend.write_bytes(f"{folder}/{time.time_ns():020d}", b"")
        return len(self._backend.list_names(folder))
