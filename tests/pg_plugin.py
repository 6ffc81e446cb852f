"""A throwaway PostgreSQL server for the test suite (a pytest plugin module).

``postgres_server`` (session scope) is :func:`pg_server.running_postgres` (shared with the benchmark): ``initdb``
into a temporary directory, the server on a free port of 127.0.0.1 with durability switched off, stopped and
removed at the end of the session, whatever the outcome of the tests. Without usable binaries the PostgreSQL
tests are skipped with the reason, unless ``STOPCHURN_REQUIRE_POSTGRES=1`` is set: then the fixture fails, so
that CI cannot pass without them.

Tests that need the server carry ``@pytest.mark.postgres``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
from pg_server import PostgresServer, PostgresUnavailable, running_postgres

REQUIRE_ENV = "STOPCHURN_REQUIRE_POSTGRES"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but PostgreSQL cannot run: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running, disposable PostgreSQL server (database ``postgres``, trust auth on 127.0.0.1)."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running_postgres())
        except PostgresUnavailable as err:
            _unavailable(str(err))
            raise  # unreachable: _unavailable skips or fails
        yield server


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    postgres_server.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.with_database(name)
    finally:
        with contextlib.suppress(Exception):
            postgres_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def set_airflow_postgres_conn(monkeypatch: pytest.MonkeyPatch, server: PostgresServer, conn_id: str) -> str:
    """Point the Airflow connection ``conn_id`` at ``server`` through ``AIRFLOW_CONN_<ID>``."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", server.airflow_connection_json())
    return conn_id


@pytest.fixture
def postgres_conn_id(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection id for the server's ``postgres`` database."""
    return set_airflow_postgres_conn(monkeypatch, postgres_server, "stopchurn_test_postgres")


@pytest.fixture
def postgres_database_conn_id(postgres_database: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection id for a fresh database of its own (see ``postgres_database``)."""
    return set_airflow_postgres_conn(monkeypatch, postgres_database, "stopchurn_test_postgres_db")
