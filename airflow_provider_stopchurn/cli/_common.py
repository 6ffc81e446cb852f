"""What the ``stopchurn`` commands share: exit codes, errors, the store a command names, the confirmation,
and the text helpers. Standard library only at import time."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from airflow_provider_stopchurn.cli.airflow_connections import object_storage_path

#: Exit codes.
OK, ERROR, USAGE = 0, 1, 2

ArgSpec = tuple[tuple[str, ...], dict[str, Any]]


class UsageError(Exception):
    """The command line cannot be acted on (exit code 2)."""


class CommandError(Exception):
    """The command cannot be done as asked (exit code 1)."""


class Aborted(Exception):
    """The person declined the confirmation (exit code 1; nothing changed)."""


_EPILOG = "Exit codes: 0 done, 1 error (or declined), 2 usage."


# --- the store -----------------------------------------------------------------------------------------------
def store_root(uri: str, conn_id: str | None = None) -> Any:
    """The snapshot root of ``uri``, as the operator resolves its ``snapshot_uri``.

    A path or ``file://`` URL is a local directory; another URL is a UPath, or with ``conn_id`` Airflow's
    ``ObjectStoragePath`` with that connection.
    """
    if not uri.strip():
        raise UsageError("URI is empty")
    if "://" not in uri:
        return Path(uri).expanduser()
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{uri!r} names a remote host; a file:// URL must be local (file:///path)")
        return Path(unquote(parts.path))
    if conn_id:
        return object_storage_path(uri, conn_id)
    from upath import UPath

    return UPath(uri)


def _store(args: argparse.Namespace, *, must_exist: bool = True) -> Any:
    from airflow_provider_stopchurn.store import SnapshotStore

    if not args.table.strip():
        raise UsageError("--table is empty")
    store = SnapshotStore(store_root(args.uri, args.conn_id), args.brand, args.table)
    if must_exist and not store.backend.exists(""):
        raise CommandError(
            f"no StopChurn store for brand {args.brand} table {args.table!r} at {store.location} "
            "(check URI, --brand, --table and --conn-id)"
        )
    return store


def _confirm(args: argparse.Namespace, preview: str, question: str) -> None:
    """Go on with --yes, or after a "y" typed on a terminal; otherwise refuse (nothing changed)."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("changes the store: pass --yes, or run it on a terminal to confirm")
    # the preview and the question go to stderr, so --json output on stdout stays one document
    print(preview, file=sys.stderr)
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise Aborted("declined; nothing was changed")


def _emit_json(out: TextIO, data: Any) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


# --- text helpers --------------------------------------------------------------------------------------------
def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def _since(iso: Any) -> str:
    try:
        return _ago(time.time() - datetime.fromisoformat(str(iso)).timestamp())
    except (TypeError, ValueError):
        return "?"


def _size(n: Any) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _short_time(iso: Any) -> str:
    text = str(iso or "")
    return text[:19].replace("T", " ") if text else "?"


def _lock_text(lock: Mapping[str, Any] | None) -> str:
    if lock is None:
        return "free"
    if lock["state"] == "unreadable":
        return "a LOCK file that cannot be read (its writer died mid-write); the next run breaks it"
    state = {
        "alive": "its process is running on this host",
        "gone": "its process is gone from this host: the next run breaks it, or `stopchurn unlock`",
        "unknown": (
            f"on another host, alive: its heartbeat is fresh ({lock.get('heartbeat_age_s')} s ago)"
            if lock.get("heartbeat_fresh")
            else "on another host, its heartbeat stopped: dead or stalled"
        ),
    }.get(str(lock["state"]), str(lock["state"]))
    expiry = (
        f"expired at {lock['expires_at']}: the next run takes it over"
        if lock["expired"]
        else f"expires {lock['expires_at']}"
    )
    return (
        f"held by {lock['holder']!r} (host {lock['host']}, pid {lock['pid']}; {state}), acquired "
        f"{lock['acquired_at']} ({_ago(lock['age_s'])} ago), {expiry}"
    )
