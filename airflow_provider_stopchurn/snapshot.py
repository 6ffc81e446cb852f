"""The snapshot store: what was last delivered for one (brand, table), and the plan being delivered now.

Layout under ``<root>/<brand_id>/<table_name>/`` (every file but the pointers is written once, never changed)::

    CURRENT                       pointer to the committed snapshot (JSON), written last at commit
    snapshots/<version>.parquet   a canonical table + the ``__sc_created_at`` column (epoch ms per key)
    PLAN                          pointer to the plan in flight (JSON), written after its files
    plans/<plan_id>/changes.parquet   the change set in send order (absent when every update is an insert)
    plans/<plan_id>/acks/<chunk>      one small file per chunk StopChurn acknowledged
    LOCK                          the run holding this table (JSON), with an expiry
    quarantine/<plan_id>.jsonl    rows StopChurn rejected, with its reason

Object stores have no atomic rename, so nothing is ever overwritten in place except the two pointers, and a
pointer is written only after everything it points to exists. On a local disk the pointers are replaced
atomically (write to a temporary file, then ``os.replace``).

The root is any path object: a :class:`pathlib.Path`, or an ``ObjectStoragePath`` (or any UPath-like object
offering ``/``, ``open``, ``exists``, ``iterdir``, ``unlink``, ``mkdir``) for s3://, gs://, memory://, ...
This module imports no Airflow.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from airflow_provider_stopchurn.exceptions import SnapshotError, SnapshotLockedError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CREATED_AT = "__sc_created_at"
HASH_1 = "__sc_hash_1"
HASH_2 = "__sc_hash_2"
META_COLUMNS = (CREATED_AT, HASH_1, HASH_2)
OP = "__sc_op"
UPDATED_AT = "__sc_updated_at"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class PathLike(Protocol):
    """The subset of pathlib / UPath that the store uses."""

    def __truediv__(self, other: str) -> Any: ...
    def open(self, mode: str = ...) -> Any: ...
    def exists(self) -> bool: ...


def _safe(part: str) -> str:
    """A path segment that is the same on every file system and object store."""
    cleaned = _SAFE_NAME.sub(lambda m: f"%{ord(m.group()):02X}", part)
    return cleaned if cleaned not in {"", ".", ".."} else f"%{cleaned}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _new_version() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]


class Committed:
    """The committed snapshot: what describes it, and its table as last delivered, read on demand."""

    def __init__(
        self,
        store: SnapshotStore,
        *,
        kinds: dict[str, str],
        key_columns: Sequence[str],
        version: str,
        committed_at: str = "",
        rows: int | None = None,
        row_hash: str | None = None,
    ) -> None:
        self.store = store
        self.kinds = kinds
        self.key_columns = tuple(key_columns)
        self.version = version
        self.committed_at = committed_at
        self.rows = rows
        self.row_hash = row_hash
        self._frame: pl.DataFrame | None = None

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

    The constructor does no I/O.
    """

    def __init__(self, root: Any, brand_id: int, table_name: str) -> None:
        self._root = root
        self.brand_id = brand_id
        self.table_name = table_name
        self._dir = root / str(int(brand_id)) / _safe(table_name)

    def __repr__(self) -> str:
        return f"SnapshotStore({self.location!r})"

    # --- locations -------------------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        """Where the table's files live, as a printable URI (never carries credentials)."""
        return _display(self._dir)

    @property
    def is_local(self) -> bool:
        return isinstance(self._dir, Path)

    def _path(self, *parts: str) -> Any:
        path = self._dir
        for part in parts:
            path = path / part
        return path

    # --- low-level I/O ---------------------------------------------------------------------------------------
    def _read_bytes(self, *parts: str) -> bytes | None:
        path = self._path(*parts)
        try:
            with path.open("rb") as fh:
                data: bytes = fh.read()
                return data
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SnapshotError(f"Cannot read {_display(path)}: {err.__class__.__name__}: {err}") from err

    def _write_bytes(self, data: bytes, *parts: str, replace: bool = False) -> None:
        """Write one whole file. Locally, ``replace=True`` swaps it in atomically."""
        path = self._path(*parts)
        try:
            if isinstance(path, Path):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
                with tmp.open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    if replace:
                        os.fsync(fh.fileno())
                os.replace(tmp, path)
            else:
                with contextlib.suppress(Exception):
                    path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("wb") as fh:
                    fh.write(data)
        except OSError as err:
            raise SnapshotError(
                f"Cannot write {_display(path)}: {err.__class__.__name__}: {err}. "
                "Check that the snapshot location exists and is writable."
            ) from err

    def _delete(self, *parts: str) -> None:
        path = self._path(*parts)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _delete_tree(self, *parts: str) -> None:
        path = self._path(*parts)
        try:
            if isinstance(path, Path):
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.fs.rm(path.path, recursive=True)
        except Exception as err:  # best effort: leftovers are harmless, only space
            log.debug("Could not remove %s: %s", _display(path), err)

    def _read_json(self, *parts: str) -> dict[str, Any] | None:
        raw = self._read_bytes(*parts)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise SnapshotError(
                f"{_display(self._path(*parts))} is not valid JSON (truncated or corrupt): {err}. "
                "Restore it from a backup, or delete the table's snapshot folder to start again."
            ) from err
        if not isinstance(data, dict):
            raise SnapshotError(f"{_display(self._path(*parts))} does not hold a JSON object.")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise SnapshotError(
                f"{_display(self._path(*parts))} has snapshot format version {version!r}; this provider reads "
                f"versions up to {FORMAT_VERSION}. Upgrade airflow-provider-stopchurn."
            )
        return data

    def _write_json(self, data: dict[str, Any], *parts: str) -> None:
        payload = {"format_version": FORMAT_VERSION, **data}
        self._write_bytes(json.dumps(payload, indent=1, sort_keys=True).encode(), *parts, replace=True)

    def _read_frame(self, *parts: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        path = self._path(*parts)
        wanted = None if columns is None else list(columns)
        try:
            if isinstance(path, Path):
                return pl.read_parquet(path, columns=wanted)
            raw = self._read_bytes(*parts)
            if raw is None:
                raise FileNotFoundError(str(path))
            return pl.read_parquet(io.BytesIO(raw), columns=wanted)
        except FileNotFoundError as err:
            raise SnapshotError(
                f"Snapshot file {_display(path)} is missing although a pointer names it. Restore it, or delete "
                "the table's snapshot folder to start again."
            ) from err
        except SnapshotError:
            raise
        except Exception as err:
            raise SnapshotError(
                f"Snapshot file {_display(path)} is unreadable (truncated or corrupt): "
                f"{err.__class__.__name__}: {err}. Restore it, or delete the table's snapshot folder to start "
                "again."
            ) from err

    def _write_frame(self, frame: pl.DataFrame, *parts: str) -> None:
        path = self._path(*parts)
        if isinstance(path, Path):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                frame.write_parquet(tmp, compression="zstd", compression_level=1, statistics=False)
                os.replace(tmp, path)
            except OSError as err:
                raise SnapshotError(
                    f"Cannot write {_display(path)}: {err.__class__.__name__}: {err}. "
                    "Check that the snapshot location exists and is writable."
                ) from err
            return
        buf = io.BytesIO()
        frame.write_parquet(buf, compression="zstd", compression_level=1, statistics=False)
        self._write_bytes(buf.getvalue(), *parts)

    # --- committed snapshot ----------------------------------------------------------------------------------
    def read_committed(self) -> Committed | None:
        """The committed snapshot, or None before the first commit."""
        pointer = self._read_json("CURRENT")
        if pointer is None:
            return None
        version = str(pointer["version"])
        committed = Committed(
            self,
            kinds=dict(pointer["kinds"]),
            key_columns=tuple(pointer["key_columns"]),
            version=version,
            committed_at=str(pointer.get("committed_at", "")),
            rows=pointer.get("rows"),
            row_hash=pointer.get("row_hash"),
        )
        committed.columns(list(committed.key_columns))  # fail now, not mid-plan, if the file is unreadable
        return committed

    def write_snapshot(self, frame: pl.DataFrame) -> str:
        """Write an immutable snapshot file and return its version (not yet committed)."""
        version = _new_version()
        self._write_frame(frame, "snapshots", f"{version}.parquet")
        return version

    def read_rows(self, version: str, keys: pl.DataFrame) -> pl.DataFrame:
        """Rows of a snapshot whose key is in ``keys``; a local file is streamed, never held whole."""
        path = self._path("snapshots", f"{version}.parquet")
        if not isinstance(path, Path):
            return self.read_snapshot(version).join(keys, on=keys.columns, how="semi")
        try:
            scan = pl.scan_parquet(path).join(keys.lazy(), on=keys.columns, how="semi")
            return scan.collect(engine="streaming")
        except FileNotFoundError as err:
            raise SnapshotError(f"Snapshot file {_display(path)} is missing although a pointer names it.") from err
        except Exception as err:
            raise SnapshotError(
                f"Snapshot file {_display(path)} is unreadable (truncated or corrupt): {err.__class__.__name__}: "
                f"{err}. Restore it, or delete the table's snapshot folder to start again."
            ) from err

    def delete_snapshot(self, version: str) -> None:
        """Remove a snapshot file that no pointer names (one replaced before its commit)."""
        self._delete("snapshots", f"{version}.parquet")

    def read_snapshot(self, version: str, *, columns: Sequence[str] | None = None) -> pl.DataFrame:
        return self._read_frame("snapshots", f"{version}.parquet", columns=columns)

    def commit(
        self,
        version: str,
        *,
        kinds: dict[str, str],
        key_columns: Sequence[str],
        rows: int,
        plan_id: str | None,
        row_hash: str | None = None,
    ) -> None:
        """Publish ``version`` as the committed snapshot, then forget the plan and older files.

        ``row_hash`` names the function that made the snapshot's row-hash columns (hashes are only comparable
        when it matches).
        """
        previous = self._read_json("CURRENT")
        self._write_json(
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
            },
            "CURRENT",
        )
        if plan_id is not None:
            self._delete("PLAN")
            self._delete_tree("plans", plan_id)
        if previous is not None and previous.get("version") != version:
            self._delete("snapshots", f"{previous['version']}.parquet")

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
            self._write_frame(changes, "plans", plan_id, "changes.parquet")
        plan = Plan(plan_id, base_version, target_version, tuple((int(a), int(b)) for a, b in chunks), meta)
        self._write_json(
            {
                "plan_id": plan_id,
                "base_version": base_version,
                "target_version": target_version,
                "chunks": [list(c) for c in plan.chunks],
                "meta": meta,
                "created_at": datetime.now(UTC).isoformat(),
            },
            "PLAN",
        )
        return plan

    def pending_plan(self, *, cleanup: bool = True) -> Plan | None:
        """The unfinished plan, if one exists and still applies to the committed snapshot.

        ``cleanup=False`` (dry runs) never writes: a plan already committed is simply not returned.
        """
        data = self._read_json("PLAN")
        if data is None:
            return None
        current = self._read_json("CURRENT")
        current_version = None if current is None else current.get("version")
        if current_version == data["target_version"]:
            # committed already; the PLAN pointer outlived a crash between the two writes
            if cleanup:
                self._delete("PLAN")
                self._delete_tree("plans", str(data["plan_id"]))
            return None
        if current_version != data.get("base_version"):
            raise SnapshotError(
                f"The pending plan in {self.location} was made against snapshot {data.get('base_version')!r} but "
                f"the committed snapshot is {current_version!r}. Delete the PLAN file to discard it."
            )
        return Plan(
            plan_id=str(data["plan_id"]),
            base_version=data.get("base_version"),
            target_version=str(data["target_version"]),
            chunks=tuple((int(a), int(b)) for a, b in data["chunks"]),
            meta=dict(data.get("meta") or {}),
        )

    def read_changes(self, plan: Plan) -> pl.DataFrame:
        return self._read_frame("plans", plan.plan_id, "changes.parquet")

    def ack(self, plan: Plan, chunk: int) -> None:
        """Record that StopChurn acknowledged ``chunk`` (one empty file, created atomically, safe in any order)."""
        path = self._path("plans", plan.plan_id, "acks", f"{chunk:07d}")
        if not isinstance(path, Path):
            self._write_bytes(b"", "plans", plan.plan_id, "acks", f"{chunk:07d}")
            return
        try:
            try:
                path.touch()
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        except OSError as err:
            raise SnapshotError(f"Cannot record an acknowledgement in {_display(path.parent)}: {err}") from err

    def acked(self, plan: Plan) -> set[int]:
        path = self._path("plans", plan.plan_id, "acks")
        try:
            if not path.exists():
                return set()
            names = [p.name for p in path.iterdir()]
        except FileNotFoundError:
            return set()
        return {int(n) for n in names if n.isdigit()}

    def discard_plan(self, plan: Plan) -> None:
        self._delete("PLAN")
        self._delete_tree("plans", plan.plan_id)
        self._delete("snapshots", f"{plan.target_version}.parquet")

    # --- quarantine ------------------------------------------------------------------------------------------
    def write_quarantine(self, plan_id: str, records: Sequence[dict[str, Any]]) -> str:
        """Write rejected rows (one JSON object per line) and return the file's location."""
        body = b"".join(json.dumps(r, sort_keys=True, default=str).encode() + b"\n" for r in records)
        self._write_bytes(body, "quarantine", f"{plan_id}.jsonl")
        return _display(self._path("quarantine", f"{plan_id}.jsonl"))

    # --- lock ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, holder: str, *, ttl_s: float = 3600.0) -> Iterator[TableLock]:
        """Hold the table's lock for the block; a second run fails fast naming the holder."""
        table_lock = TableLock(self, holder, ttl_s)
        table_lock.acquire()
        try:
            yield table_lock
        finally:
            table_lock.release()

    def read_lock(self) -> dict[str, Any] | None:
        raw = self._read_bytes("LOCK")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None  # a torn lock file is treated as absent: its writer died mid-write
        return data if isinstance(data, dict) else None

    def break_lock(self) -> None:
        """Remove the lock whoever holds it. Safe only when that run is known to be dead."""
        self._delete("LOCK")


class TableLock:
    """A lease on one brand/table: a LOCK file with a holder, a token and an expiry.

    A lock expires ``ttl_s`` after its last refresh; one left by a killed process on this same host is broken
    at once (its pid is gone). Locally the file is created exclusively (``O_EXCL``); on object stores the lock
    is written and read back, which guards against everything but two runs starting in the same instant.
    """

    def __init__(self, store: SnapshotStore, holder: str, ttl_s: float) -> None:
        self.store = store
        self.holder = holder
        self.ttl_s = ttl_s
        self.token = uuid.uuid4().hex
        self._last_refresh = 0.0

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "format_version": FORMAT_VERSION,
            "holder": self.holder,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "expires_at": now + self.ttl_s,
        }

    def _stale(self, current: dict[str, Any]) -> str | None:
        if float(current.get("expires_at", 0)) < time.time():
            return "expired"
        if current.get("host") == socket.gethostname():
            pid = int(current.get("pid", 0))
            if pid and pid != os.getpid() and not _pid_alive(pid):
                return f"its process {pid} is gone"
        return None

    def acquire(self) -> None:
        store = self.store
        current = store.read_lock()
        if current is not None:
            reason = self._stale(current)
            if reason is None:
                raise SnapshotLockedError(
                    f"{store.brand_id}/{store.table_name} is being synced by another run: "
                    f"{current.get('holder')!r} (host {current.get('host')}, pid {current.get('pid')}, since "
                    f"{current.get('acquired_at')}). Wait for it to finish; a lock left by a killed run expires "
                    f"at {datetime.fromtimestamp(float(current.get('expires_at', 0)), UTC).isoformat()}, or delete "
                    f"{_display(store._path('LOCK'))} once that run is known to be dead."
                )
            log.warning("Breaking the lock of %r on %s: %s.", current.get("holder"), store.location, reason)
            store.break_lock()
        data = json.dumps(self._record(), sort_keys=True).encode()
        path = store._path("LOCK")
        if isinstance(path, Path):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise SnapshotLockedError(
                    f"{store.brand_id}/{store.table_name} was locked by another run a moment ago: "
                    f"{(store.read_lock() or {}).get('holder')!r}."
                ) from None
            except OSError as err:
                raise SnapshotError(
                    f"Cannot write {_display(path)}: {err}. Check that the snapshot location is writable."
                ) from err
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        else:
            store._write_bytes(data, "LOCK")
            back = store.read_lock()
            if back is None or back.get("token") != self.token:
                raise SnapshotLockedError(
                    f"{store.brand_id}/{store.table_name} was locked by another run at the same moment: "
                    f"{(back or {}).get('holder')!r}."
                )
        self._last_refresh = time.monotonic()

    def refresh(self) -> None:
        """Extend the lease; call it while a long delivery makes progress.

        Rate-limited to one write per third of the lease (at most every 30 s), so a lease never lapses while
        its run is making progress.
        """
        if time.monotonic() - self._last_refresh < min(30.0, self.ttl_s / 3):
            return
        self.store._write_json({k: v for k, v in self._record().items() if k != "format_version"}, "LOCK")
        self._last_refresh = time.monotonic()

    def release(self) -> None:
        current = self.store.read_lock()
        if current is not None and current.get("token") == self.token:
            self.store.break_lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _display(path: Any) -> str:
    """A printable location without credentials (URL user info is dropped)."""
    text = str(path)
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", text)
