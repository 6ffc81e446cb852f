"""What a lock record says about its holder: whether its process still lives, and whether its heartbeat is fresh.

A ``LOCK`` (or claim) record names the host, pid and PID namespace of the process that wrote it (see :mod:`.lock`
for the lease itself). A pid is judged only where it means something: the same host name and PID namespace
(containers sharing the host's network share its name, not its processes). The lock reads these to break a stale
lease; ``stopchurn status`` and ``stopchurn unlock`` (:mod:`~airflow_provider_stopchurn.cli.operate`) to tell a
live holder from a dead one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def iso(epoch_s: float) -> str:
    """An epoch time as ISO 8601 text (UTC)."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def loose_json(raw: bytes | None) -> dict[str, Any] | None:
    """A JSON object (a lock or claim record, a pointer), or None when absent or unreadable (a torn write)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_namespace() -> str | None:
    """This process's PID namespace (Linux: ``pid:[<inode>]``), or None where there is no way to tell."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _same_processes(record: Mapping[str, Any]) -> bool:
    """Whether a lock record's pid names a process this one can see: the same host name, and the same PID
    namespace (containers that share the host's network share its name, not its processes). A record that does
    not say its namespace (written by an earlier release) is taken to share it."""
    if record.get("host") != socket.gethostname():
        return False
    namespace = record.get("pid_ns")
    return namespace is None or namespace == pid_namespace()


def gone_pid(record: dict[str, Any]) -> int | None:
    """The pid of a record written by a process of this host that no longer exists, else None."""
    if not _same_processes(record):
        return None
    try:
        pid = int(record.get("pid") or 0)
    except (TypeError, ValueError):
        return None
    if pid and pid != os.getpid() and not _pid_alive(pid):
        return pid
    return None


def holder_state(record: Mapping[str, Any]) -> str:
    """Whether the process that wrote a lock record lives: ``"alive"`` (a running process of this host, this one
    included), ``"gone"`` (of this host, no longer running) or ``"unknown"`` (another host, or another PID
    namespace of this host name: no way to tell).
    """
    if not _same_processes(record):
        return "unknown"
    return "gone" if gone_pid(dict(record)) is not None else "alive"


#: A heartbeat is *fresh* while the LOCK was refreshed within two of its intervals plus this (storage latency,
#: clock skew between hosts): its run is alive, wherever it runs, and ``stopchurn unlock`` refuses it without --force.
HEARTBEAT_SLACK_S = 10.0


def heartbeat(record: Mapping[str, Any], now: float | None = None) -> tuple[bool, float | None, float]:
    """Whether a lock record's heartbeat is fresh, its age in seconds (None when unknown) and its interval.

    The interval is the record's ``heartbeat_s``; a record written before it was kept there gives
    ``min(30 s, ttl / 3)`` as a heartbeat did, the ttl read from ``expires_at - refreshed_at``. An expired lease
    is never fresh.
    """
    now = time.time() if now is None else now
    try:
        expires = float(record.get("expires_at", 0))
    except (TypeError, ValueError):
        expires = 0.0
    try:
        refreshed: float | None = datetime.fromisoformat(str(record.get("refreshed_at"))).timestamp()
    except (TypeError, ValueError):
        refreshed = None
    try:
        interval = float(record["heartbeat_s"])
    except (KeyError, TypeError, ValueError):
        interval = min(30.0, max(expires - (refreshed or expires), 0.0) / 3)
    if refreshed is None:
        return expires >= now, None, interval
    age = now - refreshed
    return expires >= now and age <= 2 * interval + HEARTBEAT_SLACK_S, age, interval
