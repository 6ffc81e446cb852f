"""A throwaway MariaDB server for the test suite (a pytest plugin module).

``mysql_server`` (session scope) is :func:`mariadb_server.running_mariadb`: ``mariadb-install-db`` into a temporary
directory, ``mariadbd`` on a free port of 127.0.0.1 without grant tables (any user, no password), stopped and
removed at the end of the session, whatever the outcome of the tests. Without the binaries, or without
mysqlclient (``MySQLdb``), the MySQL tests are skipped with the reason, unless ``STOPCHURN_REQUIRE_MYSQL=1`` is
set: then the fixture fails, so that CI cannot pass without them.

Tests that need the server carry ``@pytest.mark.mysql``.
"""

from __future__ import annotations

from typing import Any

import pytest
from mariadb_server import MysqlServer, MysqlUnavailable, running_mariadb
from throwaway_server import server_fixtures, set_airflow_conn

__all__ = ["MysqlServer", "MysqlUnavailable", "set_airflow_mysql_conn"]

REQUIRE_ENV = "STOPCHURN_REQUIRE_MYSQL"

# ``mysql_server``: no grant tables, session time zone UTC; ``mysql_database``: a fresh database of it
mysql_server, mysql_database = server_fixtures("mysql", running_mariadb, REQUIRE_ENV, "MariaDB", quote="`")


def set_airflow_mysql_conn(monkeypatch: pytest.MonkeyPatch, server: MysqlServer, conn_id: str, **extra: Any) -> str:
    """Point the Airflow connection ``conn_id`` at ``server`` through ``AIRFLOW_CONN_<ID>``."""
    return set_airflow_conn(monkeypatch, conn_id, server.airflow_connection_json(**extra))


@pytest.fixture
def mysql_conn_id(mysql_database: MysqlServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection id for a fresh database of its own (see ``mysql_database``)."""
    return set_airflow_mysql_conn(monkeypatch, mysql_database, "stopchurn_test_mysql")
