"""What the on-call commands read from a store and do to it (no Airflow import; the other cli modules print it).

Reading (``status``, ``history``, ``rejected``) never writes: a pending plan is looked at with
``pending_plan(cleanup=False)``, exactly as a dry run does. Changing (``unlock``, ``settle``, ``rebaseline``)
goes through the engine's own functions, so the store stays crash-safe exactly as after a run:

* ``settle_pending`` takes the table's lock like a run (a stale lock of a dead run is broken, a live one is
  respected), then :func:`~airflow_provider_stopchurn.update.settle.settle` commits what StopChurn acknowledged of the
  pending plan, from the acknowledgements recorded in the store, and drops the rest;
* ``rebaseline`` takes the lock, settles a pending plan first (as a run does), canonicalizes the given source,
  plans a baseline (:func:`~airflow_provider_stopchurn.update.plan.baseline_plan`: nothing to send) and commits it
  with the commit's base check;
* ``unlock`` removes the LOCK through the lock's own claim protocol, and only if it still holds the lease that
  was inspected (a run that took the table meanwhile keeps it).

Commits made here are appended to the store's history, like a run's.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from airflow_provider_stopchurn.exceptions import SnapshotLockedError, StopChurnConfigError
from airflow_provider_stopchurn.options import SyncOptions
from airflow_provider_stopchurn.source.frame import Canonical
from airflow_provider_stopchurn.store import SnapshotStore, history
from airflow_provider_stopchurn.store.lock_records import heartbeat, holder_state
from airflow_provider_stopchurn.update.plan import baseline_plan, kind_changes
from airflow_provider_stopchurn.update.settle import commit_unsent, settle
from airflow_provider_stopchurn.update.sync import canonical_source

#: How long a lock taken by an on-call command lasts without a refresh (its heartbeat refreshes it).
LOCK_TTL_S = 600.0


def operator_name(command: str) -> str:
    """Who holds the lock while an on-call command works: the command, the user, the host and the pid."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in a container without a passwd entry
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"stopchurn {command} by {user}@{socket.gethostname()} pid {os.getpid()}"


def _iso_ms(epoch_ms: Any) -> str | None:
    try:
        return datetime.fromtimestamp(int(epoch_ms) / 1000, UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _age_s(iso: Any, now: float) -> float | None:
    try:
        return round(now - datetime.fromisoformat(str(iso)).timestamp(), 1)
    except (TypeError, ValueError):
        return None


# --- reading -------------------------------------------------------------------------------------------------
def lock_info(record: dict[str, Any] | None, *, present: bool, now: float | None = None) -> dict[str, Any] | None:
    """The LOCK as the person on call needs it: holder, host, pid, age, expiry, and whether its process lives.

    :param record: the parsed LOCK (None when absent or unreadable).
    :param present: whether a LOCK file exists (an unreadable one is reported as such).
    """
    if record is None:
        if not present:
            return None
        unknown = dict.fromkeys(
            ("holder", "host", "pid", "acquired_at", "refreshed_at", "expires_at", "age_s", "heartbeat_age_s")
        )
        return {
            **unknown,
            "expired": True,
            "state": "unreadable",
            "heartbeat_fresh": False,
            "heartbeat_s": None,
            "token": None,
        }
    now = time.time() if now is None else now
    try:
        expires = float(record.get("expires_at", 0))
    except (TypeError, ValueError):
        expires = 0.0
    state = holder_state(record)
    fresh, beat_age, beat_s = heartbeat(record, now)
    return {
        "holder": record.get("holder"),
        "host": record.get("host"),
        "pid": record.get("pid"),
        "acquired_at": record.get("acquired_at"),
        "refreshed_at": record.get("refreshed_at"),
        "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds"),
        "age_s": _age_s(record.get("acquired_at"), now),
        "expired": expires < now,
        # alive: a process of this host that still runs; gone: of this host, no longer running; unknown: another host
        "state": state,
        # refreshed within two heartbeat intervals (and unexpired): its run is alive, on whatever host
        "heartbeat_fresh": fresh and state != "gone",
        "heartbeat_age_s": None if beat_age is None else round(beat_age, 1),
        "heartbeat_s": beat_s,
        "token": record.get("token"),
    }


def _pending(store: SnapshotStore) -> dict[str, Any] | None:
    plan = store.pending_plan(cleanup=False)
    if plan is None:
        return None
    return {
        "plan_id": plan.plan_id,
        "base_version": plan.base_version,
        "target_version": plan.target_version,
        "acknowledged_chunks": len(store.acked(plan)),
        "total_chunks": len(plan.chunks),
        "updates": plan.chunks[-1][1] if plan.chunks else 0,
        "planned_at": _iso_ms(plan.meta.get("run_ms")),
    }


def _quarantine(store: SnapshotStore, current: dict[str, Any] | None) -> dict[str, Any]:
    files = store.quarantine_files()
    if not files:
        return {"rows": 0, "plan_id": None, "current": False, "files": 0}
    plan_id = files[-1].removesuffix(".jsonl")
    return {
        "rows": len(store.read_quarantine()),
        "plan_id": plan_id,
        # the newest rejections belong to the plan the committed snapshot finished: they are still outstanding
        "current": current is not None and current.get("plan_id") == plan_id,
        "files": len(files),
    }


def table_status(store: SnapshotStore) -> dict[str, Any]:
    """Committed snapshot, pending plan, lock, quarantine and the last recorded run of one table (reads only)."""
    current = store.read_current()
    committed = None
    if current is not None:
        keys = list(current.get("key_columns") or [])
        committed = {
            "version": current.get("version"),
            "rows": current.get("rows"),
            "committed_at": current.get("committed_at"),
            "key_columns": keys,
            "columns": dict(current.get("kinds") or {}),
            "plan_id": current.get("plan_id"),
        }
    last = store.read_history(1)
    return {
        "location": store.location,
        "brand_id": store.brand_id,
        "table_name": store.table_name,
        "committed": committed,
        "pending_plan": _pending(store),
        "lock": lock_info(store.read_lock(), present=store.backend.exists("LOCK")),
        "quarantine": _quarantine(store, current),
        "last_run": last[0] if last else None,
    }


def rejected_rows(store: SnapshotStore, *, all_files: bool = False) -> list[dict[str, Any]]:
    """The rows StopChurn rejected, with its reasons: of the newest quarantine file, or of all (newest last)."""
    files = store.quarantine_files()
    if not all_files:
        files = files[-1:]
    rows: list[dict[str, Any]] = []
    for name in files:
        plan_id = name.removesuffix(".jsonl")
        for record in store.read_quarantine_file(name):
            rows.append({"plan_id": plan_id, **record})
    return rows


# --- changing ------------------------------------------------------------------------------------------------
def unlock(store: SnapshotStore, *, token: str | None, force: bool = False) -> bool:
    """Break the table's lock if it still holds the lease ``token`` (None: an unreadable LOCK).

    Refuses (:class:`SnapshotLockedError`) while its run is alive, unless ``force``: a process of this host that
    still runs, or a fresh heartbeat from any host (:func:`~airflow_provider_stopchurn.store.lock_records.heartbeat`).
    Returns False when the lock is gone or another run holds it now (nothing is removed then).
    """
    record = store.read_lock()
    if record is not None and record.get("token") != token:
        return False
    if record is not None and not force:
        info = lock_info(record, present=True) or {}
        if info.get("state") == "alive":
            raise SnapshotLockedError(
                f"{store.brand_id}/{store.table_name} is locked by {record.get('holder')!r}, process "
                f"{record.get('pid')} on this host, which is still running; stop it first, or use --force."
            )
        if info.get("heartbeat_fresh"):
            raise SnapshotLockedError(live_lock_refusal(store, info))
    return store.break_lock(token=token)


def live_lock_refusal(store: SnapshotStore, info: dict[str, Any]) -> str:
    """Why ``unlock`` without --force refuses a lock whose heartbeat is fresh (one line)."""
    return (
        f"refused: {store.brand_id}/{store.table_name} is locked by {info.get('holder')!r} (host {info.get('host')}, "
        f"pid {info.get('pid')}) and its heartbeat is fresh ({info.get('heartbeat_age_s')} s ago, every "
        f"{info.get('heartbeat_s'):g} s): that run is alive; stop it first, or pass --force"
    )


def force_unlock_warning(info: dict[str, Any]) -> str:
    """What breaking a live run's lock can do, said plainly before ``unlock --force`` asks."""
    every = info.get("heartbeat_s") or 30.0
    return (
        f"WARNING: the run holding this lock is still alive (pid {info.get('pid')} on {info.get('host')}). "
        "Breaking its lock lets another run start while it goes on: until its next heartbeat finds the lock "
        f"gone (within {every:g} s) and its requests in flight finish, both runs may send to StopChurn, so an "
        "older value of a row can arrive after a newer one. StopChurn then keeps the older value, and no later "
        "run notices (the newer run's snapshot says the newer value was delivered) until that row changes "
        "again. Stop that run first if you can; if you go on, wait that long before starting another run."
    )


def _check_plan_owner(store: SnapshotStore, meta: dict[str, Any]) -> None:
    if meta.get("brand_id") != store.brand_id or meta.get("table_name") != store.table_name:
        raise StopChurnConfigError(f"The pending plan in {store.location} belongs to another brand or table.")


def preview_settle(store: SnapshotStore) -> dict[str, Any] | None:
    """What :func:`settle_pending` would settle (reads only), or None when no plan is pending."""
    return _pending(store)


def settle_pending(store: SnapshotStore, *, holder: str) -> dict[str, Any]:
    """Settle the pending plan under the table's lock: commit what was acknowledged, drop the rest."""
    started = time.time()
    with store.lock(holder, ttl_s=LOCK_TTL_S) as lock, lock.heartbeat():
        plan = store.pending_plan()
        if plan is None:
            return {"settled": False, "plan_id": None}
        _check_plan_owner(store, plan.meta)
        acks = store.acks(plan)
        result = settle(store, plan, acks, lock=lock)
        counts = {
            "inserted": result.inserted,
            "updated": result.updated,
            "deleted": result.deleted,
            "settled_chunks": len(acks),
            "quarantined": len(result.rejections),
        }
        if result.version is not None:
            history.record(store, kind="settle", holder=holder, started=started, counts=counts)
        current = store.read_current() or {}
    return {
        "settled": True,
        "plan_id": plan.plan_id,
        "acknowledged_chunks": len(acks),
        "total_chunks": len(plan.chunks),
        # not acknowledged: their rows stay as before (or unsure), so the next run sends them again
        "unacknowledged_chunks": len(plan.chunks) - len(acks),
        **{k: counts[k] for k in ("inserted", "updated", "deleted")},
        "rejected": counts["quarantined"],
        "quarantine_uri": result.quarantine_uri,
        "committed": result.version is not None,
        "version": current.get("version"),
        "rows": current.get("rows"),
    }


def rebaseline_options(
    store: SnapshotStore,
    key_columns: Sequence[str] | None,
    *,
    created_at_column: str | None = None,
    decimal_as_string: bool = False,
    json_columns: Sequence[str] = (),
    holder: str = "stopchurn rebaseline",
) -> SyncOptions:
    """The options a rebaseline canonicalizes with: the given key, else the committed snapshot's, else ``id``."""
    keys = tuple(key_columns or ())
    if not keys:
        current = store.read_current() or {}
        keys = tuple(current.get("key_columns") or ("id",))
    return SyncOptions(
        brand_id=store.brand_id,
        table_name=store.table_name,
        key_columns=keys,
        created_at_column=created_at_column,
        decimal_as_string=decimal_as_string,
        json_columns=tuple(json_columns),
        initial_load="baseline",
        holder=holder,
    )


def preview_rebaseline(store: SnapshotStore, canon: Canonical) -> dict[str, Any]:
    """What :func:`rebaseline` would record (reads only): the source's rows and columns, and how they differ."""
    current = store.read_current()
    change = None
    if current is not None:
        change = kind_changes(current.get("kinds") or {}, canon.kinds, current.get("key_columns"), canon.key_columns)
    return {
        "rows": canon.frame.height,
        "key_columns": list(canon.key_columns),
        "columns": dict(canon.kinds),
        "committed_rows": None if current is None else current.get("rows"),
        "schema_change": change or None,
        "pending_plan": _pending(store),
    }


def rebaseline(store: SnapshotStore, canon: Canonical, options: SyncOptions) -> dict[str, Any]:
    """Record the source ``canon`` (:func:`canonical_source`) as what StopChurn holds, sending nothing.

    See the module docstring; ``options`` are those the source was canonicalized with.
    """
    if options.dry_run:
        raise StopChurnConfigError("A rebaseline cannot be a dry run.")
    started = time.time()
    options = replace(options, initial_load="baseline")
    run_ms = time.time_ns() // 1_000_000
    with store.lock(options.holder, ttl_s=LOCK_TTL_S) as lock, lock.heartbeat():
        pending = store.pending_plan()
        settled_plan = None
        if pending is not None:  # as a run does: what StopChurn acknowledged is committed first
            _check_plan_owner(store, pending.meta)
            settle(store, pending, store.acks(pending), lock=lock)
            settled_plan = pending.plan_id
        committed = store.read_committed()
        plan = baseline_plan(canon, committed, options, run_ms)
        base_version = None if committed is None else committed.version
        version = commit_unsent(store, plan, base_version=base_version, lock=lock, shape=plan.meta.get("shape"))
        counts = {"unchanged": plan.target.height, "baseline": True, "schema_change": plan.schema_change}
        history.record(store, kind="rebaseline", holder=options.holder, started=started, counts=counts)
    return {
        "rebaselined": True,
        "version": version,
        "rows": plan.target.height,
        "key_columns": list(plan.key_columns),
        "columns": dict(plan.kinds),
        "schema_change": plan.schema_change,
        "settled_plan": settled_plan,
        "previous_version": None if committed is None else committed.version,
    }


__all__ = [
    "LOCK_TTL_S",
    "canonical_source",
    "lock_info",
    "operator_name",
    "preview_rebaseline",
    "preview_settle",
    "rebaseline",
    "rebaseline_options",
    "rejected_rows",
    "settle_pending",
    "table_status",
    "unlock",
]
