"""The other client sessions of a test's PostgreSQL database, for tests of how a read leaves the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Session = tuple[str, str | None]  #: (state, wait_event)


def sessions(db: Any) -> list[Session]:
    """(state, wait_event) of every other client session of the test's database."""
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT state, wait_event FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
    return [(str(state), wait) for state, wait in rows]


def waits(db: Any) -> list[str | None]:
    """The wait event of every other client session of the test's database."""
    return [wait for _, wait in sessions(db)]


def wait_for(
    read: Callable[[Any], list[Any]], db: Any, done: Callable[[list[Any]], Any], tries: int = 200
) -> list[Any]:
    """Poll ``read(db)`` until ``done`` holds of it (at most ``tries`` times, 50 ms apart); the last reading."""
    seen = read(db)
    for _ in range(tries):
        if done(seen):
            break
        time.sleep(0.05)
        seen = read(db)
    return seen
