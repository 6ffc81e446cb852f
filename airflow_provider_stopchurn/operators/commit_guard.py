"""The multi-worker guard: Airflow's own record of the last snapshot committed for each table.

Snapshots live where ``snapshot_uri`` points, by default on the worker's local disk. A run on a worker that
cannot see the last snapshot (another machine, a fresh container) takes itself for a first load and sends the
whole table again as inserts; a worker holding an old copy diffs against it and resends, or undoes, changes
that were already delivered. The store cannot notice this by itself: on that worker it looks consistent.
Airflow's metadata database is shared by every worker, so the operator records each commit there and, before
a run, compares the record with what the store holds:

* no record: nothing to compare (the first run, a run outside Airflow, or the record was deleted on purpose);
* the store holds the recorded version or a newer one: the run goes on;
* the store holds no snapshot, or one whose version sorts lower (a version starts with its UTC commit time):
  the run stops before the source is read or anything is sent, with :class:`SnapshotBehindError`.

**One store per table.** The record is kept per brand and table, whatever the store's location, and it names
the location of the commit. A run whose ``snapshot_uri`` points elsewhere (a moved ``snapshot_uri``, a second DAG
or a backfill with another location) is refused before the source is read, with :class:`SnapshotLocationError`:
two stores of one table each take the other's deliveries for undelivered changes and diverge for good, and a
store moved without its files resends every row. A move on purpose is named by the run itself
(``move_store_from=<the old snapshot_uri>``): the record then follows the store to its new location, after the
store there is checked like any other (copy the table's folder first, or add ``accept_missing_snapshot=True``).
The record is written at a commit, so two *first* runs at two locations at the same moment can both go on; the
first commit decides, and every later run at the other location is refused. Runs outside Airflow (the
``stopchurn`` commands, ``run_sync`` called directly) are not guarded.

**Where the record lives.** One Airflow Variable per brand and table, named
``stopchurn_commit__<brand_id>__<table>__<16 hex digits of the SHA-256 of "<brand_id>/<table>">``. Its value is
JSON: the snapshot version, its row count, the location (printed without user info), the task run that wrote it
and when (and ``moved_from`` after a move). It never holds an API key or connection details. Records of earlier
releases were named after the location's hash instead; a run reads its own location's old record when the table
has no new one, and writes the new one at its next commit. Variables exist in every Airflow 3 release (the task
SDK's ``Variable.get``/``Variable.set``), outlive runs, are shared by every DAG and task syncing the same table,
and can be seen and deleted in the UI (Admin > Variables) or with ``airflow variables``.
Airflow 3.3's state stores (AIP-103) do not fit: the task state store lasts only for the tries of one task
instance, and the asset state store, which outlives runs, answers only for an asset already registered by a
parsed DAG, whereas the brand (possibly from the connection), the table and the location (both templated)
are known only in ``execute()``.

Reading the record needs a running task instance (the task SDK talks to Airflow's API server). Without one,
for example ``execute()`` called by hand, the guard is off and says so in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_provider_stopchurn.exceptions import SnapshotError, StopChurnError

if TYPE_CHECKING:
    from airflow_provider_stopchurn.store import SnapshotStore

log = logging.getLogger(__name__)

RECORD_PREFIX = "stopchurn_commit"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")

__all__ = [
    "RECORD_PREFIX",
    "CommitGuard",
    "CommitRecord",
    "CommitRecordUnavailableError",
    "SnapshotBehindError",
    "SnapshotLocationError",
    "legacy_record_key",
    "other_location_message",
    "record_key",
    "stale_snapshot_message",
]


class SnapshotBehindError(SnapshotError):
    """Airflow recorded a commit that this worker's snapshot store does not hold (none, or an older one).

    Permanent: retrying on the same worker finds the same store. Nothing was read or sent.
    """


class SnapshotLocationError(SnapshotError):
    """Airflow recorded this table's last commit in a store at another location.

    Permanent: the same run finds the same record. Nothing was read or sent.
    """


class CommitRecordUnavailableError(StopChurnError):
    """Airflow's record of the last commit could not be read (the API server did not answer); retryable."""

    permanent = False


@dataclass(frozen=True)
class CommitRecord:
    """What Airflow remembers of a table's last commit, and where its store is."""

    version: str
    rows: int | None
    location: str
    written_by: str = ""
    recorded_at: str = ""
    #: the location the store was moved from by the run that wrote this record ("" when it was not moved)
    moved_from: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        if not self.moved_from:
            data.pop("moved_from")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CommitRecord:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("version"), str) or not data["version"]:
            raise ValueError("not an object with a 'version' string")
        rows = data.get("rows")
        return cls(
            version=data["version"],
            rows=rows if isinstance(rows, int) and not isinstance(rows, bool) else None,
            location=str(data.get("location", "")),
            written_by=str(data.get("written_by", "")),
            recorded_at=str(data.get("recorded_at", "")),
            moved_from=str(data.get("moved_from", "")),
        )


def record_key(brand_id: int, table_name: str) -> str:
    """The Variable that records the last commit of ``brand_id``/``table_name``, wherever its store is.

    Variable keys allow letters, digits, ``_``, ``-`` and ``.`` (up to 250 characters): the table name is
    shortened and other characters become ``_``; the hash of the exact brand and table keeps such tables apart.
    """
    table = _UNSAFE_KEY_CHARS.sub("_", table_name)[:80]
    digest = hashlib.sha256(f"{int(brand_id)}/{table_name}".encode()).hexdigest()[:16]
    return f"{RECORD_PREFIX}__{int(brand_id)}__{table}__{digest}"


def legacy_record_key(brand_id: int, table_name: str, location: str) -> str:
    """The Variable earlier releases kept per brand, table *and location* (read once, to carry it over)."""
    table = _UNSAFE_KEY_CHARS.sub("_", table_name)[:80]
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    return f"{RECORD_PREFIX}__{int(brand_id)}__{table}__{digest}"


def other_location_message(record: CommitRecord, location: str, *, key: str, table: str) -> str:
    """Why a run whose store is at ``location`` is refused: Airflow recorded the table's store elsewhere."""
    by = f" by {record.written_by}" if record.written_by else ""
    return (
        f"{table} is synced through a snapshot store at another location. Nothing was read or sent.\n"
        f"Airflow recorded its last commit, {_describe(record.version, record.rows)}, at {record.location}{by}; "
        f"this run's store is {location}. A table has one store: two stores of one table each take the other's "
        "deliveries for undelivered changes and diverge for good, and a store moved without its files resends "
        "every row.\n"
        "If another DAG (or a backfill) syncs this table, give it the same snapshot_uri as that one. To move the "
        f"store on purpose, copy the table's folder from {record.location} to {location}, then run the table's "
        "StopChurnUpdateOperator once with move_store_from set to the old snapshot_uri (the record then follows "
        "the store; add accept_missing_snapshot=True if the old store is lost); for an event stream, delete "
        f"Airflow Variable {key!r} once the folder is copied (the next run records the new location)."
    )


def _describe(version: str, rows: int | None) -> str:
    return f"snapshot {version}" + (f" ({rows} rows)" if rows is not None else "")


def stale_snapshot_message(
    record: CommitRecord, found_version: str | None, found_rows: int | None, *, key: str
) -> str | None:
    """Why the store (holding ``found_version``, or nothing) is behind ``record``; None when it is not."""
    if found_version is not None and found_version >= record.version:
        return None
    by = f" by {record.written_by}" if record.written_by else ""
    if found_version is None:
        found = "this worker finds no snapshot there"
        risk = "Going on would take this run for a first load and send the whole table again as inserts."
    else:
        found = f"this worker finds an older {_describe(found_version, found_rows)} there"
        risk = "Going on would diff the source against that old copy and resend or undo delivered changes."
    return (
        "This worker's snapshot store is behind what Airflow recorded. Nothing was sent.\n"
        f"Airflow recorded that {_describe(record.version, record.rows)} was committed at {record.location}{by}, "
        f"but {found}. {risk}\n"
        "This happens when several workers keep snapshots on their own disks (the default snapshot_uri, "
        "$AIRFLOW_HOME/stopchurn/snapshots, suits a single machine only): every worker must see the same "
        'snapshots, so point snapshot_uri at shared storage, e.g. snapshot_uri="s3://<bucket>/stopchurn/snapshots" '
        'with snapshot_conn_id="aws_default" (gs://, abfs://, any object store URL works), or copy the '
        "snapshot folder back to this location.\n"
        "To rebaseline on purpose, run this task once with accept_missing_snapshot=True (add "
        'initial_load="baseline" when StopChurn already holds the table, so that nothing is resent), or '
        f"delete the Airflow Variable {key!r}."
    )


def _variable_api() -> Any | None:
    """The task SDK's ``Variable`` class when it can get and set values, else None (no import-time failure)."""
    try:
        from airflow_provider_stopchurn.hooks._compat import Variable
    except ImportError:
        return None
    if not all(callable(getattr(Variable, name, None)) for name in ("get", "set")):
        return None
    return Variable


class CommitGuard:
    """Check a store against Airflow's record before a run (:meth:`check`); record its commit after (:meth:`record`).

    The constructor does no I/O.

    :param store: the run's snapshot store.
    :param brand_id: the run's brand.
    :param table_name: the run's table.
    :param writer: who writes the record (``dag.task run <run_id>``), or None outside a running task: the
        guard is then off.
    """

    def __init__(self, store: SnapshotStore, brand_id: int, table_name: str, writer: str | None) -> None:
        self.store = store
        self.key = record_key(brand_id, table_name)
        self.legacy_key = legacy_record_key(brand_id, table_name, store.location)
        self.table = f"Brand {brand_id} table {table_name!r}"
        self.writer = writer
        self._variable = _variable_api() if writer is not None else None
        self._before: CommitRecord | None = None
        self._rewrite = False  # the record must be written even if no new version is committed (moved, legacy)

    @classmethod
    def for_task(cls, store: SnapshotStore, brand_id: int, table_name: str, context: Any) -> CommitGuard:
        """The guard of the task instance in ``context`` (off when there is none)."""
        ti = context.get("ti") if hasattr(context, "get") else None
        writer = None
        if ti is not None:
            dag_id, task_id = getattr(ti, "dag_id", "?"), getattr(ti, "task_id", "?")
            writer = f"{dag_id}.{task_id} run {getattr(ti, 'run_id', None) or context.get('run_id')}"
        return cls(store, brand_id, table_name, writer)

    @property
    def enabled(self) -> bool:
        return self._variable is not None

    def read(self) -> CommitRecord | None:
        """The recorded commit, or None when there is none (or the guard is off).

        A table without a record under :func:`record_key` falls back to this location's record of an earlier
        release (:func:`legacy_record_key`), carried over at the next :meth:`record`.
        """
        if self._variable is None:
            return None
        text = self._get(self.key)
        if text is None:
            text = self._get(self.legacy_key)
            if text is not None:
                self._rewrite = True
        if text is None:
            return None
        try:
            return CommitRecord.from_json(text if isinstance(text, str) else json.dumps(text))
        except (TypeError, ValueError) as err:
            raise SnapshotBehindError(
                f"Airflow Variable {self.key!r} should record the last snapshot committed of this table, but it is "
                f"unreadable ({err}). Delete it (the next run then trusts the store at {self.store.location} as "
                "it is) or run once with accept_missing_snapshot=True."
            ) from err

    def _get(self, key: str) -> Any:
        assert self._variable is not None
        try:
            return self._variable.get(key, default=None)
        except Exception as err:
            raise CommitRecordUnavailableError(
                f"Cannot read Airflow Variable {key!r}, the record of the last snapshot committed of this "
                f"table: {type(err).__name__}: {err}"
            ) from err

    def check(
        self, *, accept_missing_snapshot: bool = False, move_store_from: str | None = None, dry_run: bool = False
    ) -> None:
        """Raise unless the store may go on; read-only unless a move is named.

        :class:`SnapshotLocationError` when Airflow recorded the table's store at another location (unless
        ``move_store_from`` names that location); :class:`SnapshotBehindError` when the store is behind the
        record.

        :param accept_missing_snapshot: skip the comparison with the recorded version (logged): the run uses the
            store as it is, and :meth:`record` then overwrites the record with what this run commits. It does not
            let a run use another location than the recorded one.
        :param move_store_from: the location (:attr:`SnapshotStore.location`) the table's store was moved from:
            when the record names it, the record is moved to this store's location (after the version check).
        :param dry_run: check a named move without recording it.
        """
        if self.writer is None:
            log.info(
                "Not inside a running Airflow task: the check of %s against Airflow's record of the last commit "
                "is skipped.",
                self.store.location,
            )
            return
        if not self.enabled:
            log.warning(
                "This Airflow's task SDK offers no Variable.get/Variable.set: the check of %s against a record of "
                "the last commit is skipped. Use shared storage for snapshot_uri if tasks run on several workers.",
                self.store.location,
            )
            return
        try:
            record = self._before = self.read()
        except SnapshotBehindError:
            if not accept_missing_snapshot:
                raise
            record = self._before = None  # an unreadable record is overwritten at the commit
        moving = record is not None and record.location != self.store.location
        if moving and record is not None:
            if move_store_from is None or move_store_from != record.location:
                raise SnapshotLocationError(
                    other_location_message(record, self.store.location, key=self.key, table=self.table)
                )
        elif move_store_from is not None:
            log.info(
                "move_store_from=%s: Airflow's record already names %s; nothing to move.",
                move_store_from,
                self.store.location if record is not None else "no store (nothing committed yet)",
            )
        if accept_missing_snapshot:
            log.warning(
                "accept_missing_snapshot=True: using the snapshot store at %s as it is; Airflow's record (%s) "
                "is %s and will be replaced by what this run commits.",
                self.store.location,
                self.key,
                "empty" if record is None else _describe(record.version, record.rows),
            )
        elif record is not None:
            current = self.store.read_current()  # the pointer alone: a warehouse-diffed table has no snapshot file
            message = stale_snapshot_message(
                record,
                None if current is None else str(current["version"]),
                None if current is None else current.get("rows"),
                key=self.key,
            )
            if message is not None:
                raise SnapshotBehindError(message)
        if moving and record is not None and not dry_run:
            self._move(record)

    def _move(self, record: CommitRecord) -> None:
        """Record that the table's store is now at this location (before anything is sent from it)."""
        assert self._variable is not None
        moved = CommitRecord(
            version=record.version,
            rows=record.rows,
            location=self.store.location,
            written_by=self.writer or "",
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            moved_from=record.location,
        )
        self._variable.set(self.key, moved.to_json(), description=self._description(moved))
        self._before = moved
        log.warning(
            "Moved the snapshot store of %s from %s to %s in Airflow Variable %s: runs at %s are refused from now "
            "on. Remove move_store_from from the task.",
            self.table,
            record.location,
            self.store.location,
            self.key,
            record.location,
        )

    @staticmethod
    def _description(record: CommitRecord) -> str:
        return (
            f"airflow-provider-stopchurn: last snapshot committed of this table, at {record.location}. Runs stop "
            "when the store there holds none or an older one, and runs with another snapshot location are refused."
        )

    def record(self) -> None:
        """Record the store's committed snapshot in Airflow when it changed; best effort, never raises.

        Called after every run that may have committed, failed runs included (a quarantine run commits before it
        fails); a dry run must not call it.
        """
        if self._variable is None:
            return
        try:
            current = self.store.read_current()
            before = self._before
            if current is None or (
                not self._rewrite
                and before is not None
                and before.version == str(current["version"])
                and before.location == self.store.location
            ):
                return
            record = CommitRecord(
                version=str(current["version"]),
                rows=current.get("rows"),
                location=self.store.location,
                written_by=self.writer or "",
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            self._variable.set(self.key, record.to_json(), description=self._description(record))
            self._rewrite = False
            self._before = record
            log.info("Recorded %s at %s in Airflow Variable %s.", record.version, record.location, self.key)
        except Exception:
            log.warning(
                "Could not record the committed snapshot of %s in Airflow Variable %s; the next run cannot "
                "check this worker's store against it.",
                self.store.location,
                self.key,
                exc_info=True,
            )
