"""The snapshot store of one brand/table: committed snapshot, pending plan, its ledger, quarantine and lock.

The layout and the crash-safety rules are described in the docstring of :mod:`airflow_provider_stopchurn.store`.
Every file access goes through the storage :class:`~.backend.Backend`; nothing here knows whether it is a local
disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError, SnapshotLockedError, StopChurnConfigError
from airflow_provider_stopchurn.store.backend import Backend, backend_for
from airflow_provider_stopchurn.store.constants import FORMAT_VERSION
from airflow_provider_stopchurn.store.lock import TableLock, loose_json

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_ACK_DIGITS = 7
_LOCK_POLL_FIRST_S = 1.0  # a run waiting for the lock looks again after this, then twice as long each time
_LOCK_POLL_MAX_S = 15.0

#: How many run records the history keeps (the oldest beyond it are removed when a run is appended).
HISTORY_LIMIT = 1000
_HISTORY = "history"
#: How long a quarantine file is kept once a newer one holds the rows still rejected: 7 days.
QUARANTINE_RETENTION_S = 7 * 86_400.0
_FAILURES = "quarantine/failures.json"
_VERSION_TIME = re.compile(r"^(\d{8}T\d{6}\d{6})Z")


def _safe(part: str) -> str:
    """A path segment that is the same on every file system and object store."""
    cleaned = _SAFE_NAME.sub(lambda m: f"%{ord(m.group()):02X}", part)
    return cleaned if cleaned not in {"", ".", ".."} else f"%{cleaned}"


#: The path segment a name becomes in the store (``/``, ``:`` and other characters percent-escaped).
safe_name = _safe


def _new_version() -> str:
    """A unique name that sorts by creation time."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]


def _history_name(names: Sequence[str]) -> str:
    """A history record's file name, sorting after every name in ``names`` (the history's, sorted).

    Names sort by time, and readers take the last as the newest: a worker whose clock is behind another's (or
    was set back) names its record one microsecond after the newest, not before it, where pruning would remove it
    first and every reader would show an older run as the last."""
    name = _new_version()
    newest = names[-1] if names else ""
    match = _VERSION_TIME.match(newest)
    if match is not None and newest >= name:
        try:
            after = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%f") + timedelta(microseconds=1)
        except (ValueError, OverflowError):  # a name no clock makes (year 9999): this record is still written
            return f"{name}.json"
        name = after.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]
    return f"{name}.json"


def _version_time(name: str) -> float | None:
    """When a versioned name (``_new_version``) was made, in epoch seconds; None for another name."""
    match = _VERSION_TIME.match(name)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC).timestamp()


def _id_key(value: Any) -> str:
    """A row id as one text, its type kept (``1`` and ``"1"`` are different rows at StopChurn)."""
    return json.dumps(value, sort_keys=True, default=str)


def _snapshot(version: str) -> str:
    return f"snapshots/{version}.parquet"


def _plan_dir(plan_id: str) -> str:
    return f"plans/{plan_id}"


def _ack_name(plan_id: str, chunk: int) -> str:
    return f"plans/{plan_id}/acks/{chunk:0{_ACK_DIGITS}d}"


def _quarantine(plan_id: str) -> str:
    return f"quarantine/{plan_id}.jsonl"


def _json_lines(records: Sequence[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(dict(r), sort_keys=True, default=str).encode() + b"\n" for r in records)


class Committed:
    """The committed snapshot: what describes it, and its table as last delivered, read on demand."""

    def __init__(  # noqa: PLR0913 - keyword-only fields of the CURRENT pointer
        self,
        store: SnapshotStore,
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

    @property
    def frame(self) -> pl.DataFrame:
        """The whole snapshot (read once, then kept)."""
        if self._frame is None:
            self._frame = self.store.read_snapshot(self.version)
        return self._frame

    def rows_with_keys(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The snapshot's rows whose key is in ``keys`` (a frame of key columns)."""
        if self._frame is not None:
            return self._frame.join(keys, on=keys.columns, how="semi")
        return self.store.read_rows(self.version, keys)

    def columns(self, names: Sequence[str]) -> pl.DataFrame:
        """Only some columns of the snapshot (Parquet reads just those)."""
        if self._frame is not None:
            return self._frame.select(names)
        return self.store.read_snapshot(self.version, columns=names)


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


class SnapshotStore:
    """Committed snapshot, in-flight plan, chunk ledger, lock and quarantine of one brand/table.

    :param root: the snapshot location: a :class:`pathlib.Path`, or an ``ObjectStoragePath`` / UPath.
    :param brand_id: the StopChurn brand; with ``table_name`` it names the table's folder under ``root``.
    :param table_name: the StopChurn table.

    The constructor does no I/O.
    """

    #: records kept by :meth:`append_history` (a class default; a store may set its own)
    history_limit: int = HISTORY_LIMIT
    #: seconds an older quarantine file is kept after a newer one replaced it (a class default)
    quarantine_retention_s: float = QUARANTINE_RETENTION_S

    def __init__(self, root: Any, brand_id: int, table_name: str) -> None:
        self._root = root
        self.brand_id = brand_id
        self.table_name = table_name
        self._backend = backend_for(root / str(int(brand_id)) / _safe(table_name))

    def __repr__(self) -> str:
        return f"SnapshotStore({self.location!r})"

    @property
    def backend(self) -> Backend:
        """The storage of this table's folder."""
        return self._backend

    @property
    def location(self) -> str:
        """Where the table's files live, as a printable URI (never carries credentials)."""
        return self._backend.location()

    @property
    def is_local(self) -> bool:
        return self._backend.is_local

    # --- JSON pointers ---------------------------------------------------------------------------------------
    def _read_json(self, name: str) -> dict[str, Any] | None:
        raw = self._backend.read_bytes(name)
        if raw is None:
            return None
        where = self._backend.location(name)
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise SnapshotError(
                f"{where} is not valid JSON (truncated or corrupt): {err}. "
                "Restore it from a backup. Do not delete the table's folder: the next run would resend the whole "
                "table; `stopchurn rebaseline` records what StopChurn holds without sending it."
            ) from err
        if not isinstance(data, dict):
            raise SnapshotError(f"{where} does not hold a JSON object.")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise SnapshotError(
                f"{where} has snapshot format version {version!r}; this provider reads versions up to "
                f"{FORMAT_VERSION}. Upgrade airflow-provider-stopchurn."
            )
        return data

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        payload = {"format_version": FORMAT_VERSION, **data}
        self._backend.write_bytes(name, json.dumps(payload, indent=1, sort_keys=True).encode(), durable=True)

    def _read_frame(self, name: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        try:
            return self._backend.read_frame(name, columns)
        except FileNotFoundError as err:
            raise SnapshotError(
                f"Snapshot file {self._backend.location(name)} is missing although a pointer names it. Restore "
                f"it from a backup; else `stopchurn rebaseline` records the source as what StopChurn holds, "
                "without sending it (deleting the table's folder would resend the whole table)."
            ) from err
        except SnapshotError:
            raise
        except Exception as err:
            raise SnapshotError(
                f"Snapshot file {self._backend.location(name)} is unreadable (truncated or corrupt): "
                f"{err.__class__.__name__}: {err}. Restore it from a backup; else `stopchurn rebaseline` records "
                "the source as what StopChurn holds, without sending it."
            ) from err

    # --- committed snapshot ----------------------------------------------------------------------------------
    def read_current(self) -> dict[str, Any] | None:
        """The CURRENT pointer as written at the last commit (version, rows, kinds, key columns, committed_at,
        plan_id, run), or None before the first commit. Unlike :meth:`read_committed`, the snapshot file is not
        opened.
        """
        return self._read_json("CURRENT")

    def read_committed(self) -> Committed | None:
        """The committed snapshot, or None before the first commit."""
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
        committed.columns(list(committed.key_columns))  # fail now, not mid-plan, if the file is unreadable
        return committed

    def write_snapshot(self, frame: pl.DataFrame) -> str:
        """Write an immutable snapshot file and return its version (not yet committed)."""
        version = _new_version()
        self._backend.write_frame(_snapshot(version), frame)
        return version

    def read_snapshot(self, version: str, *, columns: Sequence[str] | None = None) -> pl.DataFrame:
        return self._read_frame(_snapshot(version), columns)

    def read_rows(self, version: str, keys: pl.DataFrame) -> pl.DataFrame:
        """Rows of a snapshot whose key is in ``keys``; a local file is streamed, never held whole."""
        name = _snapshot(version)
        try:
            return self._backend.read_rows(name, keys)
        except FileNotFoundError as err:
            raise SnapshotError(
                f"Snapshot file {self._backend.location(name)} is missing although a pointer names it."
            ) from err
        except SnapshotError:
            raise
        except Exception as err:
            raise SnapshotError(
                f"Snapshot file {self._backend.location(name)} is unreadable (truncated or corrupt): "
                f"{err.__class__.__name__}: {err}. Restore it from a backup; else `stopchurn rebaseline` records "
                "the source as what StopChurn holds, without sending it."
            ) from err

    def delete_snapshot(self, version: str) -> None:
        """Remove a snapshot file that no pointer names (one replaced before its commit)."""
        self._backend.delete(_snapshot(version))

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
            self._backend.delete(_snapshot(str(current_version)))

    def _check_unique_keys(self, version: str, key_columns: Sequence[str], frame: pl.DataFrame | None) -> None:
        """Refuse a snapshot file that holds a key twice (a diff against it could not pair rows with keys)."""
        names = list(key_columns)
        keys = frame.select(names) if frame is not None else self.read_snapshot(version, columns=names)
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
            self._backend.delete(_snapshot(str(previous["version"])))

    def _forget_plan(self, plan_id: str) -> None:
        """Remove a plan's files, and the PLAN pointer if it names that plan (never another plan's)."""
        pointer = loose_json(self._backend.read_bytes("PLAN"))
        if pointer is not None and pointer.get("plan_id") == plan_id:
            self._backend.delete("PLAN")
        self._backend.delete_tree(_plan_dir(plan_id))

    # --- plan and ledger -------------------------------------------------------------------------------------
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
        plan_id = _new_version()
        meta = dict(meta, changes_from_target=changes is None)
        if changes is not None:
            self._backend.write_frame(f"{_plan_dir(plan_id)}/changes.parquet", changes)
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
                self._backend.delete_tree(_plan_dir(plan.plan_id))
                if plan.target_version != current_version:  # replaced at commit (rejected rows left out)
                    self._backend.delete(_snapshot(plan.target_version))
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
        name = f"{_plan_dir(plan.plan_id)}/chunks/{first:0{_ACK_DIGITS}d}"
        self._backend.write_bytes(name, json.dumps([list(c) for c in ranges]).encode(), durable=True)
        return dataclasses.replace(plan, chunks=plan.chunks + ranges)

    def _recorded_chunks(self, plan: Plan) -> Plan:
        """The plan with the chunks recorded by :meth:`add_chunks` after its PLAN pointer was written."""
        folder = f"{_plan_dir(plan.plan_id)}/chunks"
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
        return self._read_frame(f"{_plan_dir(plan.plan_id)}/changes.parquet")

    def ack(self, plan: Plan, chunk: int, rejections: Sequence[Mapping[str, Any]] = ()) -> None:
        """Record that StopChurn acknowledged ``chunk``, with the records it rejected inside it.

        One file per chunk, written whole (never half-visible); empty when nothing was rejected, else one JSON
        object per line. Acknowledging again replaces the record; chunks may be acknowledged in any order.
        """
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0, got {chunk}")
        data = _json_lines(rejections)
        try:
            self._backend.write_bytes(_ack_name(plan.plan_id, chunk), data, durable=bool(data))
        except SnapshotError as err:
            raise SnapshotError(f"Cannot record an acknowledgement of plan {plan.plan_id}: {err}") from err

    def acks(self, plan: Plan) -> dict[int, list[dict[str, Any]]]:
        """Every acknowledged chunk of ``plan`` with the records rejected inside it ([] when none)."""
        folder = f"{_plan_dir(plan.plan_id)}/acks"
        result: dict[int, list[dict[str, Any]]] = {}
        for name, size in sorted(self._backend.list_sizes(folder).items()):
            if not name.isdigit():
                continue
            records: list[dict[str, Any]] = []
            if size:
                raw = self._backend.read_bytes(f"{folder}/{name}")
                records = _read_json_lines(raw or b"", self._backend.location(f"{folder}/{name}"))
            result[int(name)] = records
        return result

    def acked(self, plan: Plan) -> set[int]:
        """The acknowledged chunks of ``plan`` (a listing only; :meth:`acks` also reads the rejections)."""
        names = self._backend.list_names(f"{_plan_dir(plan.plan_id)}/acks")
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
            self._backend.delete(_snapshot(plan.target_version))

    # --- quarantine ------------------------------------------------------------------------------------------
    def write_quarantine(self, plan_id: str, records: Sequence[Mapping[str, Any]]) -> str | None:
        """Record the rows still rejected once ``plan_id`` is settled; return the file holding them (None: none).

        The still-rejected rows are ``records`` (this plan's refusals) plus the earlier ones this plan did not
        resolve: those the delivery staged with :meth:`stage_quarantine`, or, for a plan settled without it (after a
        crash), every earlier row not refused again here. They are written whole as ``quarantine/<plan_id>.jsonl``;
        the newest file is the quarantine, an empty one says that nothing is rejected any more. Older files are
        removed once older than :attr:`quarantine_retention_s`.
        """
        staged = self._backend.read_bytes(f"{_plan_dir(plan_id)}/quarantine.jsonl")
        if staged is not None:
            earlier = _read_json_lines(staged, self._backend.location(f"{_plan_dir(plan_id)}/quarantine.jsonl"))
        else:
            earlier = self.read_quarantine()
        refused = {_id_key(r.get("id")) for r in records}
        rows = [dict(r) for r in records] + [r for r in earlier if _id_key(r.get("id")) not in refused]
        return self._publish_quarantine(_quarantine(plan_id), rows)

    def stage_quarantine(self, plan_id: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Keep, with plan ``plan_id``, the earlier rejected rows its delivery did not resolve (read at its settle)."""
        self._backend.write_bytes(f"{_plan_dir(plan_id)}/quarantine.jsonl", _json_lines(records), durable=True)

    def clear_quarantine(self) -> None:
        """Nothing is rejected any more (the source equals the committed snapshot): say so, and apply the retention.

        Also forgets the per-row failure counts: no row has a change left to deliver.
        """
        self._publish_quarantine(_quarantine(_new_version()), [])
        if self._backend.exists(_FAILURES):
            self._backend.delete(_FAILURES)

    def _publish_quarantine(self, name: str, rows: Sequence[Mapping[str, Any]]) -> str | None:
        files = self.quarantine_files()
        newest_empty = not files or not self._backend.read_bytes(f"quarantine/{files[-1]}")
        if rows or not newest_empty:
            self._backend.write_bytes(name, _json_lines(rows), durable=True)
        self._prune_quarantine()
        return self._backend.location(name) if rows else None

    def _prune_quarantine(self) -> None:
        """Remove quarantine files older than the retention, never the newest (it is the quarantine)."""
        cutoff = datetime.now(UTC).timestamp() - float(self.quarantine_retention_s)
        for name in self.quarantine_files()[:-1]:
            written = _version_time(name)
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
            raw = self._backend.read_bytes(f"quarantine/{name}")
            records += _read_json_lines(raw or b"", self._backend.location(f"quarantine/{name}"))
        return records

    def read_quarantine_file(self, name: str) -> list[dict[str, Any]]:
        """The records of one quarantine file (a name from :meth:`quarantine_files`); [] when it is gone."""
        raw = self._backend.read_bytes(f"quarantine/{name}")
        return _read_json_lines(raw or b"", self._backend.location(f"quarantine/{name}"))

    def record_failed_try(self, plan_id: str) -> int:
        """Record that one try of a plan ended with a retryable StopChurn failure; return how many tries did.

        One empty file per try under the plan's folder (an exclusive name, so concurrent writers cannot lose a
        count); the files go with the plan when it is settled or discarded.
        """
        folder = f"{_plan_dir(plan_id)}/failed_tries"
        self._backend.write_bytes(f"{folder}/{time.time_ns():020d}", b"")
        return len(self._backend.list_names(folder))

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

    # --- history ---------------------------------------------------------------------------------------------
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

    # --- lock ------------------------------------------------------------------------------------------------
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


def _read_json_lines(raw: bytes, where: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise SnapshotError(f"{where} line {number} is not valid JSON (corrupt): {err}") from err
        records.append(record if isinstance(record, dict) else {"value": record})
    return records
