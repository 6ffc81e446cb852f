"""The folder of one brand/table in the store: the names of its files, and how its pointers and Parquet files are read.

The layout and the crash-safety rules are described in the docstring of :mod:`airflow_provider_stopchurn.store`.
:class:`TableFolder` is the base of the store's parts (:mod:`.committed`, :mod:`.plans`, :mod:`.quarantine`,
:mod:`.history_files`): every file access goes through its storage :class:`~.backend.Backend`; nothing here knows
whether it is a local disk.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError
from airflow_provider_stopchurn.store.backend import Backend, backend_for
from airflow_provider_stopchurn.store.constants import FORMAT_VERSION
from airflow_provider_stopchurn.store.lock_records import loose_json

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
#: The time at the start of a versioned name (:func:`new_version`).
VERSION_TIME = re.compile(r"^(\d{8}T\d{6}\d{6})Z")


def safe_name(part: str) -> str:
    """The path segment a name becomes in the store (``/``, ``:`` and other characters percent-escaped): the same
    on every file system and object store."""
    cleaned = _SAFE_NAME.sub(lambda m: f"%{ord(m.group()):02X}", part)
    return cleaned if cleaned not in {"", ".", ".."} else f"%{cleaned}"


def new_version() -> str:
    """A unique name that sorts by creation time."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]


def version_time(name: str) -> float | None:
    """When a versioned name (:func:`new_version`) was made, in epoch seconds; None for another name."""
    match = VERSION_TIME.match(name)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC).timestamp()


def snapshot_name(version: str) -> str:
    """The file of the snapshot ``version``."""
    return f"snapshots/{version}.parquet"


def plan_dir(plan_id: str) -> str:
    """The folder of the plan ``plan_id``'s files."""
    return f"plans/{plan_id}"


def json_lines(records: Sequence[Mapping[str, Any]]) -> bytes:
    """``records`` as one JSON object per line."""
    return b"".join(json.dumps(dict(r), sort_keys=True, default=str).encode() + b"\n" for r in records)


def read_json_lines(raw: bytes, where: str) -> list[dict[str, Any]]:
    """The records of a file written by :func:`json_lines` (``where`` names it in an error)."""
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


class TableFolder:
    """The files of one brand/table under the snapshot location, through its storage backend.

    :param root: the snapshot location: a :class:`pathlib.Path`, or an ``ObjectStoragePath`` / UPath.
    :param brand_id: the StopChurn brand; with ``table_name`` it names the table's folder under ``root``.
    :param table_name: the StopChurn table.

    The constructor does no I/O.
    """

    def __init__(self, root: Any, brand_id: int, table_name: str) -> None:
        self._root = root
        self.brand_id = brand_id
        self.table_name = table_name
        self._backend = backend_for(root / str(int(brand_id)) / safe_name(table_name))

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

    # --- Parquet files ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading_frame(self, name: str) -> Iterator[None]:
        """Turn a failed read of the Parquet file ``name``, which a pointer names, into a :class:`SnapshotError`."""
        try:
            yield
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

    def _read_frame(self, name: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        with self._reading_frame(name):
            return self._backend.read_frame(name, columns)

    # --- plans -----------------------------------------------------------------------------------------------
    def _forget_plan(self, plan_id: str) -> None:
        """Remove a plan's files, and the PLAN pointer if it names that plan (never another plan's).

        Here, not with the plans, because a commit that finishes a plan removes it too."""
        pointer = loose_json(self._backend.read_bytes("PLAN"))
        if pointer is not None and pointer.get("plan_id") == plan_id:
            self._backend.delete("PLAN")
        self._backend.delete_tree(plan_dir(plan_id))
