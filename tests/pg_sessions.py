"""The other client sessions of a test's PostgreSQL database, for tests of how a read leaves the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Session = tuple[str, str | None]  #: (state, wait_event)


def _others(db: Any, columns: str) -> list[Any]:
    """``columns`` of pg_stat_activity for every other client session of the test's database."""
    with db.connect() as conn:
        return list(
            conn.execute(
                f"SELECT {columns} FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchall()
        )


def sessions(db: Any) -> list[Session]:
    """(state, wait_event) of every other client session of the test's database."""
    return [(str(state), wait) for state, wait in _others(db, "state, wait_event")]


def queries(db: Any) -> list[str]:
    """The query text of every other client session of the test's database."""
    return [str(query) for (query,) in _others(db, "query")]


def driver_error(uri: Any, sql: str) -> BaseException:
    """The error ADBC's PostgreSQL driver itself raises reading ``sql``, in this thread (what a read through the
    engine must raise as it is)."""
    import adbc_driver_postgresql.dbapi as adbc_postgres

    with adbc_postgres.connect(uri.reveal()) as conn, conn.cursor() as cursor:
        try:
            cursor.execute(sql)
            for _batch in cursor.fetch_record_batch():
                pass
        except Exception as err:
            return err
    raise AssertionError(f"the driver read {sql!r} without an error")


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
