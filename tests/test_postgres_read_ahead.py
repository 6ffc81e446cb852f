"""The PostgreSQL source reads on a thread of its own, a batch ahead of the engine, and stops with it.

Against a real server: the next batch is read while the engine holds the one before; a task's timeout or SIGTERM
(an exception raised by a signal handler in the engine's thread, as Airflow raises them), an error of the engine and
an early close each stop the reader, cancel its query and close its connection (no reader thread left, no session
left on the server); an error of the read is raised as the driver raises it; statements are committed only once the
engine took every batch.
"""

from __future__ import annotations

import contextvars
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pg_sessions import driver_error, wait_for
from pg_sessions import sessions as server_sessions

from airflow_provider_stopchurn.exceptions import SourceDataError
from airflow_provider_stopchurn.source.canonical import canonicalize_source
from airflow_provider_stopchurn.source.read_ahead import THREAD_NAME
from airflow_provider_stopchurn.source.sql import PostgresUri, postgres_uri, read_postgres

pytestmark = pytest.mark.postgres

#: About 40 MB in three ADBC batches (the driver cuts them at about 16 MB): more than the socket buffers hold, so
#: the server can finish its query only if the client reads ahead of the engine.
WIDE_QUERY = "SELECT i AS id, repeat('x', 2000) AS pad FROM generate_series(1, 20000) AS i"
#: A query that holds its session until it is cancelled (far longer than any test waits).
SLOW_QUERY = "SELECT 1 AS id FROM pg_sleep(600)"


class TaskStopped(Exception):
    """Stands for Airflow's AirflowTaskTimeout / AirflowTaskTerminated: raised by a signal handler."""


@pytest.fixture
def uri(postgres_database: Any) -> PostgresUri:
    db = postgres_database
    return postgres_uri(host=db.host, port=db.port, login=db.user, password=None, database=db.dbname)


def _readers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


def _assert_released(db: Any) -> None:
    assert _readers() == []
    # a closed connection's server process leaves pg_stat_activity a moment after the client said goodbye
    assert wait_for(server_sessions, db, lambda sessions: not sessions) == []


@pytest.fixture
def raising_signal() -> Iterator[Any]:
    """``arm(signum)``: a handler for ``signum`` that raises :class:`TaskStopped`, as Airflow's do; restored after."""
    saved: dict[int, Any] = {}

    def arm(signum: int) -> None:
        def handler(_signum: int, _frame: Any) -> None:
            raise TaskStopped(f"signal {_signum}")

        saved.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)

    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0)
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_the_next_batch_is_read_while_the_engine_holds_one(uri: PostgresUri, postgres_database: Any) -> None:
    batches = read_postgres(uri, WIDE_QUERY)
    first = next(batches)  # the engine holds this one and asks for nothing more
    try:
        # read one batch at a time, the server would wait for the client (ClientWrite) until the engine asked
        sessions = wait_for(server_sessions, postgres_database, lambda s: s and s[0][0] != "active")
        assert sessions == [("idle in transaction", "ClientRead")], "the server is still sending: no read-ahead"
        rows = first.num_rows + sum(batch.num_rows for batch in batches)
    finally:
        batches.close()
    assert rows == 20_000
    _assert_released(postgres_database)


def test_a_timeout_while_the_query_runs_cancels_it(
    uri: PostgresUri, postgres_database: Any, raising_signal: Any
) -> None:
    raising_signal(signal.SIGALRM)
    signal.setitimer(signal.ITIMER_REAL, 0.5)  # the task's timeout, while the engine waits for the first batch
    with pytest.raises(TaskStopped):
        canonicalize_source(lambda: read_postgres(uri, SLOW_QUERY), key_columns=["id"])
    _assert_released(postgres_database)  # the query was cancelled: it did not run its 600 s


def test_sigterm_while_the_engine_converts_stops_the_reader(
    uri: PostgresUri, postgres_database: Any, raising_signal: Any
) -> None:
    raising_signal(signal.SIGTERM)
    batches = read_postgres(uri, WIDE_QUERY)

    def engine() -> Iterator[Any]:
        yield next(batches)
        # the reader has read ahead and waits for room; the task is told to stop while the engine works
        wait_for(server_sessions, postgres_database, lambda s: s and s[0][0] != "active")
        signal.raise_signal(signal.SIGTERM)
        yield from batches  # pragma: no cover - the handler raised

    def source() -> Iterator[Any]:
        try:
            yield from engine()
        finally:
            batches.close()

    with pytest.raises(TaskStopped):
        canonicalize_source(source, key_columns=["id"])
    _assert_released(postgres_database)


def test_an_error_of_the_engine_stops_the_reader_and_commits_nothing(uri: PostgresUri, postgres_database: Any) -> None:
    postgres_database.execute("CREATE TABLE audit (id int)")
    # the key is NULL in a later batch: the engine raises while the reader is ahead of it
    sql = ["INSERT INTO audit VALUES (1)", WIDE_QUERY.replace("i AS id", "NULLIF(i, 15000) AS id")]
    with pytest.raises(SourceDataError, match=r"missing value.*row\(s\) 14999"):
        canonicalize_source(lambda: read_postgres(uri, sql), key_columns=["id"])
    _assert_released(postgres_database)
    with postgres_database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (0,)


def test_statements_are_committed_once_every_batch_was_taken(uri: PostgresUri, postgres_database: Any) -> None:
    postgres_database.execute("CREATE TABLE audit (id int)")
    canon = canonicalize_source(
        lambda: read_postgres(uri, ["INSERT INTO audit VALUES (1)", WIDE_QUERY]), key_columns=["id"]
    )
    assert canon.frame.height == 20_000
    _assert_released(postgres_database)
    with postgres_database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (1,)


@pytest.mark.parametrize("taken", [1, 2])
def test_a_source_closed_early_releases_everything(uri: PostgresUri, postgres_database: Any, taken: int) -> None:
    batches = read_postgres(uri, WIDE_QUERY)
    for _ in range(taken):
        next(batches)
    batches.close()
    _assert_released(postgres_database)


def test_an_error_of_the_read_is_raised_as_the_driver_raises_it(uri: PostgresUri, postgres_database: Any) -> None:
    sql = "SELECT i AS id, 1 / (i - 15000) AS v, repeat('x', 2000) AS pad FROM generate_series(1, 20000) AS i"
    direct = driver_error(uri, sql)  # the driver, read in this thread
    with pytest.raises(type(direct)) as through:
        canonicalize_source(lambda: read_postgres(uri, sql), key_columns=["id"])
    assert type(through.value) is type(direct)
    assert str(through.value) == str(direct)
    assert "division by zero" in str(through.value)
    _assert_released(postgres_database)


_TASK = contextvars.ContextVar("task", default="none")


def test_the_reader_logs_in_the_callers_context(
    uri: PostgresUri, postgres_database: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A task's logging context (context variables) goes with the read to the reader thread."""
    caplog.set_level(logging.INFO, logger="airflow_provider_stopchurn.source.sql")
    seen: list[tuple[str, str]] = []

    class Remember(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append((record.threadName or "", _TASK.get()))
            return True

    logger = logging.getLogger("airflow_provider_stopchurn.source.sql")
    remember = Remember()
    logger.addFilter(remember)
    token = _TASK.set("the task's run")
    try:
        canonicalize_source(lambda: read_postgres(uri, "SELECT 1 AS id"), key_columns=["id"])
    finally:
        _TASK.reset(token)
        logger.removeFilter(remember)
    assert seen == [(THREAD_NAME, "the task's run")]
    _assert_released(postgres_database)
