"""A throwaway PostgreSQL server for the test suite (a pytest plugin module).

``postgres_server`` (session scope) is :func:`pg_server.running_postgres` (shared with the benchmark): ``initdb``
into a temporary directory, the server on a free port of 127.0.0.1 with durability switched off, stopped and
removed at the end of the session, whatever the outcome of the tests. Without usable binaries the PostgreSQL
tests are skipped with the reason, unless ``STOPCHURN_REQUIRE_POSTGRES=1`` is set: then the fixture fails, so
that CI cannot pass without them.

Tests that need the server carry ``@pytest.mark.postgres``.
"""

from __future__ import annotations

import pytest
from pg_server import PostgresServer, running_postgres
from throwaway_server import server_fixtures, set_airflow_conn

REQUIRE_ENV = "STOPCHURN_REQUIRE_POSTGRES"

# ``postgres_server``: database ``postgres``, trust auth; ``postgres_database``: a fresh database of it
postgres_server, postgres_database = server_fixtures(
    "postgres", running_postgres, REQUIRE_ENV, "PostgreSQL", quote='"', drop_suffix=" WITH (FORCE)"
)


def set_airflow_postgres_conn(monkeypatch: pytest.MonkeyPatch, server: PostgresServer, conn_id: str) -> str:
    """Point the Airflow connection ``conn_id`` at ``server`` through ``AIRFLOW_CONN_<ID>``."""
    return set_airflow_conn(monkeypatch, conn_id, server.airflow_connection_json())


@pytest.fixture
def postgres_conn_id(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection id for the server's ``postgres`` database."""
    return set_airflow_postgres_conn(monkeypatch, postgres_server, "stopchurn_test_postgres")


@pytest.fixture
def postgres_database_conn_id(postgres_database: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection id for a fresh database of its own (see ``postgres_database``)."""
    return set_airflow_postgres_conn(monkeypatch, postgres_database, "stopchurn_test_postgres_db")
